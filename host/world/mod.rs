//! Multi-process worlds: the launcher environment, the TCP bootstrap that hands NVSHMEM's
//! unique id from rank 0 to every rank, NVSHMEM initialisation, and a local launcher that
//! starts one process per rank.

pub mod bootstrap;
pub mod env;
pub mod launcher;
pub mod nvshmem;

pub use bootstrap::{exchange_unique_id, BootstrapOptions, Rendezvous};
pub use env::WorldEnv;
pub use launcher::{emit_result, launch_local, launch_local_with, LaunchOptions, RankReport};
pub use nvshmem::{NvshmemOptions, NvshmemWorld, PeerReport, SymmetricHeap};

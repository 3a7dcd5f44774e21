//! flashmoe: a distributed Mixture-of-Experts layer as one persistent CUDA kernel per GPU.
//!
//! The host side plans ([`plan::LayerPlan`]) and launches; the same plan drives the CPU
//! executor (the reference implementation of the protocol, and the backend on machines
//! without a GPU). See the README and `DESIGN.md` for the architecture.
#![deny(missing_docs)]

pub mod config;
pub mod cpu;
pub mod error;
pub mod gpu;
pub mod memory;
pub mod metrics;
pub mod model;
mod par;
pub mod params;
pub mod plan;
pub mod presets;
pub mod reference;
pub mod stages;
pub mod weights;
pub mod world;

pub use config::{
    Capacity, ClampParams, Dtype, GivenRouting, GroupLimit, MlpKind, MoeConfig, Placement, Router,
    SharedExperts,
};
pub use cpu::CpuExecutor;
pub use error::{Error, Result};
pub use plan::LayerPlan;
pub use reference::{GateOutput, LayerOutput, RankInput, RouteOverrides};
pub use weights::{ExpertWeights, LayerWeights};

//! The NVSHMEM world: one process per GPU, NVSHMEM initialised from a unique id handed
//! out by rank 0 over the TCP bootstrap, the layer's symmetric heap allocated with
//! `nvshmem_align`, and the table of peer addresses from `nvshmem_ptr`.
//!
//! Initialisation follows the exported path (see `shared/notes/toolchain.md`): rank 0's
//! `nvshmemx_get_uniqueid`, every rank's `nvshmemx_set_attr_uniqueid_args` and
//! `nvshmemx_hostlib_init_attr`, then the cubin is loaded through cudarc and registered
//! with `nvshmemx_cumodule_init`. The host library's version is checked before anything
//! else. Everything is finalised on drop.
//!
//! NVSHMEM's own bootstrap (the uid plugin, found next to `libnvshmem_host.so.3` through
//! its `$ORIGIN` RPATH) opens its own sockets between the ranks: on machines without a
//! routable interface set `NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo`; without InfiniBand,
//! `NVSHMEM_REMOTE_TRANSPORT=none` and `NVSHMEM_DISABLE_NCCL=1` may be needed. The heap
//! comes from NVSHMEM's symmetric region (`NVSHMEM_SYMMETRIC_SIZE`, 1 GiB by default).
//!
//! Status: compiled and checked on a machine without GPU only. The paths that need no GPU
//! (library loading, version check, refusing without a GPU, the bootstrap) are tested; the
//! GPU path has never run.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaModule};
use nvshmem_sys::types::TEAM_NODE;
use nvshmem_sys::{Nvshmem, UniqueId, Version};

use crate::error::{Error, Result};
use crate::plan::{LayerPlan, REGION_ALIGN};
use crate::world::bootstrap::{exchange_unique_id, BootstrapOptions, Rendezvous};
use crate::world::env::WorldEnv;

/// NVSHMEM can be initialised once per process at a time.
static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Options of [`NvshmemWorld::init`].
#[derive(Debug, Clone, Default)]
pub struct NvshmemOptions {
    /// Deadlines of the TCP bootstrap.
    pub bootstrap: BootstrapOptions,
    /// Load the host library from this file instead of searching (see
    /// [`nvshmem_sys::Nvshmem::load`]).
    pub library: Option<PathBuf>,
    /// Print the peer report ([`PeerReport`]) to stderr at start-up.
    pub report: bool,
}

/// Releases the process-wide claim on NVSHMEM when dropped.
struct Claim;

impl Claim {
    fn take() -> Result<Self> {
        INITIALISED
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Claim)
            .map_err(|_| {
                Error::input(
                    "NvshmemWorld",
                    "NVSHMEM is already initialised in this process (one world per process)",
                )
            })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        INITIALISED.store(false, Ordering::Release);
    }
}

fn cuda(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

/// The initialised library; finalises NVSHMEM when the world and all its heaps are gone.
struct Session {
    lib: Nvshmem,
    ctx: Arc<CudaContext>,
    /// The registered module and its raw handle.
    module: Option<(Arc<CudaModule>, sys::CUmodule)>,
    _claim: Claim,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        if let Some((_, m)) = self.module.take() {
            // SAFETY: `m` was registered by `cumodule_init` and its `CudaModule` (held in the
            // tuple just dropped, or by other owners) is unloaded only after this call.
            let _ = unsafe { self.lib.cumodule_finalize(m.cast()) };
        }
        // SAFETY: NVSHMEM was initialised by this session; every `SymmetricHeap` holds an
        // `Rc<Session>`, so none is alive any more.
        unsafe { self.lib.finalize() };
    }
}

/// Loads `cubin`, recovers its `CUmodule` through `entry` and registers it with NVSHMEM.
fn register_module(
    session: &Session,
    cubin: &[u8],
    entry: &str,
) -> Result<(Arc<CudaModule>, sys::CUmodule)> {
    let module = session
        .ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
        .map_err(|e| cuda("load cubin", e))?;
    let func = module
        .load_function(entry)
        .map_err(|e| cuda(&format!("kernel `{entry}`"), e))?;
    let mut raw: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: `func` is a live function of `module`; the driver writes its module handle.
    unsafe { sys::cuFuncGetModule(&mut raw, func.cu_function()) }
        .result()
        .map_err(|e| cuda("cuFuncGetModule", e))?;
    // SAFETY: NVSHMEM is initialised and `raw` is a module loaded in the current context.
    unsafe { session.lib.cumodule_init(raw.cast())? };
    Ok((module, raw))
}

/// Longest error text one rank shares with the others in [`agree`].
const MAX_SHARED_ERROR: usize = 4096;

/// Every rank shares whether its local step succeeded; all fail together, with this rank's
/// own error first, else the first failing rank's.
fn agree(rv: &mut Rendezvous, step: &str, local: Result<()>) -> Result<()> {
    let mine = match &local {
        Ok(()) => Vec::new(),
        Err(e) => {
            let mut text = format!("!{e}").into_bytes();
            text.truncate(MAX_SHARED_ERROR);
            text
        }
    };
    let all = rv.all_gather(&mine)?;
    local?;
    match all.iter().enumerate().find(|(_, m)| !m.is_empty()) {
        None => Ok(()),
        Some((rank, m)) => Err(Error::Bootstrap(format!(
            "rank {rank} failed {step}: {}",
            String::from_utf8_lossy(&m[1..])
        ))),
    }
}

/// Which peers this rank reaches with loads and stores (P2P) and which only through the
/// network (RDMA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReport {
    /// This rank.
    pub rank: usize,
    /// Ranks reachable by P2P (this rank included).
    pub p2p: Vec<usize>,
    /// Ranks reachable only by RDMA.
    pub rdma: Vec<usize>,
    /// Ranks on this node and this rank's index among them.
    pub node: (usize, usize),
    /// Host library version.
    pub version: Version,
}

impl std::fmt::Display for PeerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "flashmoe rank {}: NVSHMEM {}, node PE {} of {}, P2P peers {:?}, RDMA peers {:?}",
            self.rank, self.version, self.node.1, self.node.0, self.p2p, self.rdma
        )
    }
}

/// One rank of an NVSHMEM world. Not `Send`: NVSHMEM and the CUDA context are used from
/// the thread that created it.
pub struct NvshmemWorld {
    session: Rc<Session>,
    rendezvous: Rendezvous,
    env: WorldEnv,
    report: PeerReport,
}

impl std::fmt::Debug for NvshmemWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvshmemWorld")
            .field("env", &self.env)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl NvshmemWorld {
    /// Initialises this rank: checks the host library's version, selects GPU `LOCAL_RANK`,
    /// runs the bootstrap, initialises NVSHMEM, loads `cubin` and registers it with
    /// NVSHMEM (`entry` is one of its kernels, used to recover the module handle), and
    /// probes which peers are P2P-reachable. Collective: every rank must call it.
    pub fn init(env: &WorldEnv, cubin: &[u8], entry: &str, opts: &NvshmemOptions) -> Result<Self> {
        let claim = Claim::take()?;
        let lib = match &opts.library {
            Some(p) => Nvshmem::load_file(p)?,
            None => Nvshmem::load()?,
        };
        let version = lib.check_version()?;

        // SAFETY: only checks whether libcuda can be dlopened; cudarc panics instead of
        // returning an error when it cannot, so this must come first.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "libcuda is not loadable (no NVIDIA driver)".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| cuda("device count", e))?;
        if env.local_rank >= count.max(0) as usize {
            return Err(Error::NoGpu(format!(
                "LOCAL_RANK {} but this node has {count} CUDA device(s)",
                env.local_rank
            )));
        }
        let ctx = CudaContext::new(env.local_rank).map_err(|e| cuda("context", e))?;
        ctx.bind_to_thread().map_err(|e| cuda("bind context", e))?;

        let (uid, mut rendezvous) =
            exchange_unique_id(env, opts.bootstrap, || Ok(lib.get_uniqueid()?.to_bytes()))?;
        let uid = UniqueId::from_bytes(&uid);
        if !uid.has_expected_version() {
            return Err(Error::Bootstrap(format!(
                "rank {}: the unique id from rank 0 has version {:#x}, expected {:#x}",
                env.rank,
                uid.version,
                nvshmem_sys::types::struct_version(std::mem::size_of::<UniqueId>())
            )));
        }
        // SAFETY: the context of this rank's GPU is current on this thread, and the claim
        // guarantees no other initialisation in this process.
        unsafe { lib.init_with_uniqueid(env.rank, env.world_size, &uid)? };
        let mut session = Session {
            lib,
            ctx,
            module: None,
            _claim: claim,
        };
        let (pe, npes) = (session.lib.my_pe(), session.lib.n_pes());
        if pe != env.rank as i32 || npes != env.world_size as i32 {
            return Err(Error::Bootstrap(format!(
                "NVSHMEM says PE {pe} of {npes}, the environment says rank {} of {}",
                env.rank, env.world_size
            )));
        }

        // Loading can fail on one rank only; agree before the next collective call so no
        // rank is left waiting in it.
        let local = register_module(&session, cubin, entry);
        if let Ok(m) = &local {
            session.module = Some(m.clone());
        }
        agree(&mut rendezvous, "loading the cubin", local.map(|_| ()))?;

        // Reachability: probe a small symmetric allocation on every PE.
        // SAFETY: NVSHMEM is initialised and every rank makes the same calls in order.
        let probe = unsafe { session.lib.malloc(REGION_ALIGN as usize) };
        if probe.is_null() {
            return Err(Error::Cuda(
                "nvshmem_malloc of the reachability probe failed".into(),
            ));
        }
        let (mut p2p, mut rdma) = (Vec::new(), Vec::new());
        for peer in 0..env.world_size {
            // SAFETY: `probe` lies in the symmetric heap; `peer` < n_pes.
            let ptr = unsafe { session.lib.ptr(probe, peer as i32) };
            if ptr.is_null() {
                rdma.push(peer);
            } else {
                p2p.push(peer);
            }
        }
        // SAFETY: `probe` came from `malloc` above; every rank frees it.
        unsafe { session.lib.free(probe) };
        // SAFETY: NVSHMEM is initialised.
        let node = unsafe {
            (
                session.lib.team_n_pes(TEAM_NODE).max(0) as usize,
                session.lib.team_my_pe(TEAM_NODE).max(0) as usize,
            )
        };
        let report = PeerReport {
            rank: env.rank,
            p2p,
            rdma,
            node,
            version,
        };
        if opts.report {
            eprintln!("{report}");
        }
        Ok(Self {
            session: Rc::new(session),
            rendezvous,
            env: env.clone(),
            report,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.env.world_size
    }

    /// Which peers are P2P- or RDMA-reachable.
    pub fn report(&self) -> &PeerReport {
        &self.report
    }

    /// Whether some peer is reached by RDMA, so the layer plan needs send cells
    /// (`LayerPlan::with_staging(config, world.needs_staging())`).
    pub fn needs_staging(&self) -> bool {
        !self.report.rdma.is_empty()
    }

    /// The CUDA context of this rank's GPU.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.session.ctx
    }

    /// The registered kernel module.
    pub fn module(&self) -> Option<&Arc<CudaModule>> {
        self.session.module.as_ref().map(|(m, _)| m)
    }

    /// The host-side rendezvous (all-gather and barrier over TCP), still connected.
    pub fn rendezvous(&mut self) -> &mut Rendezvous {
        &mut self.rendezvous
    }

    /// `nvshmem_barrier_all`.
    pub fn barrier(&self) -> Result<()> {
        self.session
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda("bind context", e))?;
        // SAFETY: NVSHMEM is initialised for as long as the session lives; collective.
        unsafe { self.session.lib.barrier_all() };
        Ok(())
    }

    /// Allocates and zeroes the symmetric heap of `plan` (collective: every rank calls it
    /// with the same plan) and records the address of each peer's copy.
    pub fn alloc_heap(&self, plan: &LayerPlan) -> Result<SymmetricHeap> {
        if plan.config.world != self.world() {
            return Err(Error::config(
                "world",
                plan.config.world,
                format!("the NVSHMEM world has {} PEs", self.world()),
            ));
        }
        if self.needs_staging() && !plan.staging {
            return Err(Error::config(
                "staging",
                false,
                format!(
                    "peers {:?} are reached by RDMA: plan with LayerPlan::with_staging(config, true)",
                    self.report.rdma
                ),
            ));
        }
        let bytes = usize::try_from(plan.heap.bytes)
            .map_err(|_| Error::PlanTooLarge {
                what: format!("symmetric heap of {} bytes", plan.heap.bytes),
            })?
            .max(1);
        let s = &self.session;
        s.ctx
            .bind_to_thread()
            .map_err(|e| cuda("bind context", e))?;
        // SAFETY: NVSHMEM is initialised; REGION_ALIGN is a power of two; collective.
        let ptr = unsafe { s.lib.align(REGION_ALIGN as usize, bytes) };
        if ptr.is_null() {
            return Err(Error::Cuda(format!(
                "nvshmem_align of {bytes} bytes failed: the symmetric heap is too small \
                 (raise NVSHMEM_SYMMETRIC_SIZE)"
            )));
        }
        let mut heap = SymmetricHeap {
            session: self.session.clone(),
            ptr: ptr as u64,
            bytes,
            peers: Vec::new(),
        };
        // SAFETY: `ptr` is a live device allocation of `bytes` bytes in the current context.
        unsafe { cudarc::driver::result::memset_d8_sync(heap.ptr, 0, bytes) }
            .map_err(|e| cuda("zero the symmetric heap", e))?;
        s.ctx.synchronize().map_err(|e| cuda("synchronize", e))?;
        // Every rank's heap is zero before anyone may signal into it.
        // SAFETY: collective, NVSHMEM initialised.
        unsafe { s.lib.barrier_all() };
        heap.peers = (0..self.world())
            // SAFETY: `ptr` lies in the symmetric heap; `pe` < n_pes.
            .map(|pe| unsafe { s.lib.ptr(ptr, pe as i32) } as u64)
            .collect();
        Ok(heap)
    }
}

/// A zeroed symmetric allocation of one layer. Freeing is collective: every rank must drop
/// its heaps in the same order.
pub struct SymmetricHeap {
    session: Rc<Session>,
    ptr: u64,
    bytes: usize,
    peers: Vec<u64>,
}

impl std::fmt::Debug for SymmetricHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymmetricHeap")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("bytes", &self.bytes)
            .field("peers", &self.peers)
            .finish()
    }
}

impl SymmetricHeap {
    /// Device address of this rank's copy.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Address of each rank's copy as seen from this GPU, 0 where only RDMA reaches it.
    pub fn peers(&self) -> &[u64] {
        &self.peers
    }
}

impl Drop for SymmetricHeap {
    fn drop(&mut self) {
        let _ = self.session.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `nvshmem_align` of this session, which is still alive
        // (held by this heap); the caller frees heaps in the same order on every rank.
        unsafe { self.session.lib.free(self.ptr as *mut std::ffi::c_void) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_claim_at_a_time() {
        let first = Claim::take().unwrap();
        assert!(matches!(
            Claim::take(),
            Err(Error::InvalidInput {
                field: "NvshmemWorld",
                ..
            })
        ));
        drop(first);
        drop(Claim::take().unwrap());
    }

    fn agree_among(failing: &[usize]) -> Vec<Result<()>> {
        use std::net::TcpListener;
        use std::time::Duration;
        let opts = BootstrapOptions {
            timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(20),
            ..BootstrapOptions::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let world = 3;
        let local = |r: usize| {
            if failing.contains(&r) {
                Err(Error::Cuda(format!("no kernel on rank {r}")))
            } else {
                Ok(())
            }
        };
        let peers: Vec<_> = (1..world)
            .map(|r| {
                let mine = local(r);
                std::thread::spawn(move || {
                    let mut rv = Rendezvous::peer(r, world, addr, opts).unwrap();
                    agree(&mut rv, "loading the cubin", mine)
                })
            })
            .collect();
        let mut rv = Rendezvous::master(l, world, opts).unwrap();
        let mut out = vec![agree(&mut rv, "loading the cubin", local(0))];
        out.extend(peers.into_iter().map(|p| p.join().unwrap()));
        out
    }

    #[test]
    fn agree_succeeds_only_when_every_rank_did() {
        assert!(agree_among(&[]).iter().all(|r| r.is_ok()));
        let out = agree_among(&[2]);
        for (r, res) in out.iter().enumerate() {
            let msg = res.as_ref().unwrap_err().to_string();
            if r == 2 {
                assert!(matches!(res, Err(Error::Cuda(_))), "{msg}");
            } else {
                assert!(msg.contains("rank 2 failed loading the cubin"), "{msg}");
                assert!(msg.contains("no kernel on rank 2"), "{msg}");
            }
        }
    }

    #[test]
    fn peer_report_names_both_kinds() {
        let r = PeerReport {
            rank: 1,
            p2p: vec![0, 1],
            rdma: vec![2, 3],
            node: (2, 1),
            version: nvshmem_sys::DEVICE_LIBRARY,
        };
        let s = r.to_string();
        assert!(
            s.contains("P2P peers [0, 1]") && s.contains("RDMA peers [2, 3]"),
            "{s}"
        );
        assert!(s.contains("3.3.24"), "{s}");
    }
}

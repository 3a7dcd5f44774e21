//! The loaded host library and its functions.

use std::ffi::{c_int, c_uint, c_void, OsString};
use std::path::Path;

use crate::error::{Error, Result};
use crate::locate::{candidates, project_root, Candidate, HOST_LIBRARY};
use crate::types::{InitAttr, Team, UniqueId, INIT_WITH_UNIQUEID};
use crate::version::{check_compatible, Version, DEVICE_LIBRARY};

/// A `CUmodule` handle as the CUDA driver API defines it.
pub type CuModule = *mut c_void;
/// A `cudaStream_t` / `CUstream` handle.
pub type CuStream = *mut c_void;

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type SetAttrUniqueIdArgs =
    unsafe extern "C" fn(c_int, c_int, *const UniqueId, *mut InitAttr) -> c_int;
type HostlibInitAttr = unsafe extern "C" fn(c_uint, *mut InitAttr) -> c_int;
type VoidFn = unsafe extern "C" fn();
type IntFn = unsafe extern "C" fn() -> c_int;
type TeamIntFn = unsafe extern "C" fn(Team) -> c_int;
type Malloc = unsafe extern "C" fn(usize) -> *mut c_void;
type Align = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void);
type Ptr = unsafe extern "C" fn(*const c_void, c_int) -> *mut c_void;
type OnStream = unsafe extern "C" fn(CuStream);
type ModuleFn = unsafe extern "C" fn(CuModule) -> c_int;
type VendorVersion = unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int);
type SpecVersion = unsafe extern "C" fn(*mut c_int, *mut c_int);

/// The NVSHMEM host library, loaded at run time, with the functions flashmoe uses.
///
/// Loading needs no GPU. Every function other than the version queries and
/// [`Nvshmem::get_uniqueid`] needs an initialised NVSHMEM (see [`Nvshmem::init_with_uniqueid`]).
pub struct Nvshmem {
    path: String,
    get_uniqueid: GetUniqueId,
    set_attr_uniqueid_args: SetAttrUniqueIdArgs,
    hostlib_init_attr: HostlibInitAttr,
    hostlib_finalize: VoidFn,
    init_status: IntFn,
    malloc: Malloc,
    align: Align,
    free: Free,
    ptr: Ptr,
    my_pe: IntFn,
    n_pes: IntFn,
    team_my_pe: TeamIntFn,
    team_n_pes: TeamIntFn,
    barrier_all: VoidFn,
    barrier_all_on_stream: OnStream,
    quiet: VoidFn,
    quiet_on_stream: OnStream,
    cumodule_init: ModuleFn,
    cumodule_finalize: ModuleFn,
    vendor_version: VendorVersion,
    spec_version: SpecVersion,
    // Kept last so the function pointers above never outlive the mapping.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nvshmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvshmem")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn sym<T: Copy>(lib: &libloading::Library, path: &str, name: &'static str) -> Result<T> {
    let mut c_name = Vec::with_capacity(name.len() + 1);
    c_name.extend_from_slice(name.as_bytes());
    c_name.push(0);
    // SAFETY: `T` is the `unsafe extern "C" fn` type of `name` as declared in NVSHMEM 3.3's
    // headers (host/nvshmem_api.h, host/nvshmemx_api.h, host/nvshmemx_coll_api.h); the
    // pointer is only used while `lib` is alive (it is stored next to it in `Nvshmem`).
    unsafe { lib.get::<T>(&c_name) }
        .map(|s| *s)
        .map_err(|e| Error::Symbol {
            path: path.to_string(),
            symbol: name,
            reason: e.to_string(),
        })
}

fn check(function: &'static str, code: c_int) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Call { function, code })
    }
}

impl Nvshmem {
    /// Loads the host library from the first place that works, in the order of
    /// [`crate::locate::candidates`] applied to the process environment.
    pub fn load() -> Result<Self> {
        let env = |k: &str| std::env::var_os(k);
        Self::load_from_candidates(&candidates(&env, &project_root()))
    }

    /// Loads the host library from the given candidates, in order; the error lists why each
    /// one failed.
    pub fn load_from_candidates(list: &[Candidate]) -> Result<Self> {
        let mut reasons = Vec::new();
        for c in list {
            let attempt = match c {
                Candidate::File { path, .. } => Self::load_file(path),
                Candidate::Loader => Self::load_name(HOST_LIBRARY),
            };
            match attempt {
                Ok(lib) => return Ok(lib),
                Err(e) => reasons.push(format!("{c}: {e}")),
            }
        }
        Err(Error::Load(format!(
            "tried {}; set FLASHMOE_NVSHMEM_LIB to the file or NVSHMEM_HOME to the installation \
             (pip install nvidia-nvshmem-cu13 provides it)",
            reasons.join("; ")
        )))
    }

    /// Loads the host library from a file path.
    pub fn load_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Load(format!("{} is not a file", path.display())));
        }
        Self::load_name(path.as_os_str().to_owned())
    }

    fn load_name(name: impl Into<OsString>) -> Result<Self> {
        let name: OsString = name.into();
        let shown = name.to_string_lossy().into_owned();
        // SAFETY: loading runs the library's initialisers; libnvshmem_host.so.3 has no
        // constructors that need a GPU (its CUDA use is dlopened lazily), and it depends only
        // on the C/C++ runtime.
        let lib = unsafe { libloading::Library::new(&name) }
            .map_err(|e| Error::Load(format!("{shown}: {e}")))?;
        let p = shown.as_str();
        Ok(Self {
            get_uniqueid: sym(&lib, p, "nvshmemx_get_uniqueid")?,
            set_attr_uniqueid_args: sym(&lib, p, "nvshmemx_set_attr_uniqueid_args")?,
            hostlib_init_attr: sym(&lib, p, "nvshmemx_hostlib_init_attr")?,
            hostlib_finalize: sym(&lib, p, "nvshmemx_hostlib_finalize")?,
            init_status: sym(&lib, p, "nvshmemx_init_status")?,
            malloc: sym(&lib, p, "nvshmem_malloc")?,
            align: sym(&lib, p, "nvshmem_align")?,
            free: sym(&lib, p, "nvshmem_free")?,
            ptr: sym(&lib, p, "nvshmem_ptr")?,
            my_pe: sym(&lib, p, "nvshmem_my_pe")?,
            n_pes: sym(&lib, p, "nvshmem_n_pes")?,
            team_my_pe: sym(&lib, p, "nvshmem_team_my_pe")?,
            team_n_pes: sym(&lib, p, "nvshmem_team_n_pes")?,
            barrier_all: sym(&lib, p, "nvshmem_barrier_all")?,
            barrier_all_on_stream: sym(&lib, p, "nvshmemx_barrier_all_on_stream")?,
            quiet: sym(&lib, p, "nvshmem_quiet")?,
            quiet_on_stream: sym(&lib, p, "nvshmemx_quiet_on_stream")?,
            cumodule_init: sym(&lib, p, "nvshmemx_cumodule_init")?,
            cumodule_finalize: sym(&lib, p, "nvshmemx_cumodule_finalize")?,
            vendor_version: sym(&lib, p, "nvshmemx_vendor_get_version_info")?,
            spec_version: sym(&lib, p, "nvshmem_info_get_version")?,
            path: shown,
            _lib: lib,
        })
    }

    /// The path or name the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The vendor version of the host library (`nvshmemx_vendor_get_version_info`).
    pub fn version(&self) -> Version {
        let (mut major, mut minor, mut patch) = (0, 0, 0);
        // SAFETY: the function writes three ints through valid pointers; it needs no
        // initialisation (it returns compile-time constants).
        unsafe { (self.vendor_version)(&mut major, &mut minor, &mut patch) };
        Version {
            major,
            minor,
            patch,
        }
    }

    /// The OpenSHMEM specification version the library implements (`nvshmem_info_get_version`).
    pub fn spec_version(&self) -> (i32, i32) {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints through valid pointers; needs no initialisation.
        unsafe { (self.spec_version)(&mut major, &mut minor) };
        (major, minor)
    }

    /// Refuses a host library that cannot run kernels linked against
    /// [`DEVICE_LIBRARY`](crate::version::DEVICE_LIBRARY).
    pub fn check_version(&self) -> Result<Version> {
        let v = self.version();
        check_compatible(v, DEVICE_LIBRARY)?;
        Ok(v)
    }

    /// `nvshmemx_init_status()`: one of the `STATUS_*` constants.
    pub fn init_status(&self) -> i32 {
        // SAFETY: reads a global; valid before and after initialisation.
        unsafe { (self.init_status)() }
    }

    /// `nvshmemx_get_uniqueid`: rank 0 makes the id that every rank initialises with. Needs
    /// the bootstrap plugin `nvshmem_bootstrap_uid.so.3`, which the library finds next to
    /// itself (its RPATH is `$ORIGIN`) or through `NVSHMEM_BOOTSTRAP_UID_PLUGIN`. Needs no GPU.
    pub fn get_uniqueid(&self) -> Result<UniqueId> {
        let mut id = UniqueId::default();
        // SAFETY: `id` is a valid, writable 128-byte `nvshmemx_uniqueid_t`.
        check("nvshmemx_get_uniqueid", unsafe {
            (self.get_uniqueid)(&mut id)
        })?;
        Ok(id)
    }

    /// Initialises NVSHMEM on the calling thread's current CUDA context from a unique id
    /// (`nvshmemx_set_attr_uniqueid_args` then `nvshmemx_hostlib_init_attr` with
    /// `NVSHMEMX_INIT_WITH_UNIQUEID`). Collective: every rank must call it with the same id.
    ///
    /// # Safety
    /// A CUDA context must be current on the calling thread, and NVSHMEM must not already
    /// be initialised in this process.
    pub unsafe fn init_with_uniqueid(
        &self,
        rank: usize,
        nranks: usize,
        id: &UniqueId,
    ) -> Result<()> {
        let as_int = |what: &'static str, v: usize| {
            c_int::try_from(v).map_err(|_| Error::Argument {
                what,
                reason: format!("{v} does not fit a C int"),
            })
        };
        let (rank, nranks) = (as_int("rank", rank)?, as_int("nranks", nranks)?);
        if rank >= nranks {
            return Err(Error::Argument {
                what: "rank",
                reason: format!("{rank} >= nranks {nranks}"),
            });
        }
        let mut attr = InitAttr::default();
        // SAFETY: `attr` is a valid init_attr with its version fields set; `id` outlives the
        // call (NVSHMEM copies the id pointer into attr, used only by the init below).
        check("nvshmemx_set_attr_uniqueid_args", unsafe {
            (self.set_attr_uniqueid_args)(rank, nranks, id, &mut attr)
        })?;
        // SAFETY: the caller guarantees a current context and no prior initialisation.
        check("nvshmemx_hostlib_init_attr", unsafe {
            (self.hostlib_init_attr)(INIT_WITH_UNIQUEID, &mut attr)
        })
    }

    /// `nvshmemx_hostlib_finalize`.
    ///
    /// # Safety
    /// NVSHMEM must be initialised; every symmetric allocation and module registration is
    /// invalid afterwards.
    pub unsafe fn finalize(&self) {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.hostlib_finalize)() }
    }

    /// `nvshmem_my_pe()` (-1 before initialisation).
    pub fn my_pe(&self) -> i32 {
        // SAFETY: reads process state; defined before initialisation too.
        unsafe { (self.my_pe)() }
    }

    /// `nvshmem_n_pes()`.
    pub fn n_pes(&self) -> i32 {
        // SAFETY: as for `my_pe`.
        unsafe { (self.n_pes)() }
    }

    /// `nvshmem_team_my_pe(team)` (-1 when not a member).
    ///
    /// # Safety
    /// NVSHMEM must be initialised (the team table exists only then).
    pub unsafe fn team_my_pe(&self, team: Team) -> i32 {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.team_my_pe)(team) }
    }

    /// `nvshmem_team_n_pes(team)`.
    ///
    /// # Safety
    /// NVSHMEM must be initialised.
    pub unsafe fn team_n_pes(&self, team: Team) -> i32 {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.team_n_pes)(team) }
    }

    /// `nvshmem_malloc(bytes)` (collective); null on failure.
    ///
    /// # Safety
    /// NVSHMEM must be initialised and every PE must make the same call.
    pub unsafe fn malloc(&self, bytes: usize) -> *mut c_void {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.malloc)(bytes) }
    }

    /// `nvshmem_align(alignment, bytes)` (collective); null on failure.
    ///
    /// # Safety
    /// As [`Nvshmem::malloc`]; `alignment` must be a power of two.
    pub unsafe fn align(&self, alignment: usize, bytes: usize) -> *mut c_void {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.align)(alignment, bytes) }
    }

    /// `nvshmem_free(ptr)` (collective).
    ///
    /// # Safety
    /// `ptr` must come from `malloc`/`align` of this library and not be used afterwards;
    /// every PE must make the same call.
    pub unsafe fn free(&self, ptr: *mut c_void) {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.free)(ptr) }
    }

    /// `nvshmem_ptr(ptr, pe)`: the address through which this PE reaches `pe`'s copy of the
    /// symmetric object with loads and stores, or null when `pe` is not P2P-reachable.
    ///
    /// # Safety
    /// NVSHMEM must be initialised and `ptr` must lie in the symmetric heap.
    pub unsafe fn ptr(&self, ptr: *const c_void, pe: i32) -> *mut c_void {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.ptr)(ptr, pe) }
    }

    /// `nvshmem_barrier_all()`.
    ///
    /// # Safety
    /// NVSHMEM must be initialised; every PE must call it.
    pub unsafe fn barrier_all(&self) {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.barrier_all)() }
    }

    /// `nvshmemx_barrier_all_on_stream(stream)`.
    ///
    /// # Safety
    /// NVSHMEM must be initialised and `stream` a valid stream of the current context.
    pub unsafe fn barrier_all_on_stream(&self, stream: CuStream) {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.barrier_all_on_stream)(stream) }
    }

    /// `nvshmem_quiet()`.
    ///
    /// # Safety
    /// NVSHMEM must be initialised.
    pub unsafe fn quiet(&self) {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.quiet)() }
    }

    /// `nvshmemx_quiet_on_stream(stream)`.
    ///
    /// # Safety
    /// NVSHMEM must be initialised and `stream` a valid stream of the current context.
    pub unsafe fn quiet_on_stream(&self, stream: CuStream) {
        // SAFETY: guaranteed by the caller.
        unsafe { (self.quiet_on_stream)(stream) }
    }

    /// `nvshmemx_cumodule_init(module)`: binds the device library state of a module that
    /// links `libnvshmem_device.a` to this host library (applies the version rule).
    ///
    /// # Safety
    /// NVSHMEM must be initialised and `module` a loaded module of the current context.
    pub unsafe fn cumodule_init(&self, module: CuModule) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("nvshmemx_cumodule_init", unsafe {
            (self.cumodule_init)(module)
        })
    }

    /// `nvshmemx_cumodule_finalize(module)`.
    ///
    /// # Safety
    /// `module` must have been passed to [`Nvshmem::cumodule_init`] and still be loaded.
    pub unsafe fn cumodule_finalize(&self, module: CuModule) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("nvshmemx_cumodule_finalize", unsafe {
            (self.cumodule_finalize)(module)
        })
    }
}

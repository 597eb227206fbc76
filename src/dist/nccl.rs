//! NCCL collectives on the engine's per-device stream (cudarc's raw `nccl` bindings, loaded
//! at run time).
//!
//! NCCL is a shared library found at run time, like the CUDA driver; cudarc panics when it
//! cannot load it, so everything here first asks [`nccl_availability`], which explains what
//! is missing instead. cudarc 0.19.10 looks for `libnccl.so` (and `libnccl.so.1`,
//! `libnccl.so.9`–`.13`, `libnccl64*.so`), but NCCL's pip wheels (`nvidia-nccl-cu12/-cu13`,
//! which PyTorch depends on) and Debian's `libnccl2` ship only `libnccl.so.2`, so a machine
//! with PyTorch needs a `libnccl.so` link to it in a directory on `LD_LIBRARY_PATH`; the
//! error message gives the exact commands for the library it finds.
//!
//! Every communicator runs on the stream of its [`CudaDevice`], so collectives are ordered
//! with the kernels before and after them without any synchronisation; only
//! [`Collective::all_reduce_host`] and [`Collective::barrier`] wait for the stream (they
//! return host values / promise that every rank got there).
//!
//! The communicators are held as raw `ncclComm_t` (not cudarc's `Comm`, whose drop panics on
//! failure and which cannot be aborted from another thread). [`Collective::abort`] aborts
//! every communicator of this process's group that is not inside an NCCL call, which makes
//! their kernels that wait for the failed rank exit, so the ranks blocked on them (in a
//! download or a synchronisation after the call) wake up and fail; a rank inside an NCCL call
//! aborts its own communicator when the call returns. Calls only enqueue work, except where
//! NCCL waits for peers inside the call: connection setup on first use of an algorithm, and
//! a full work queue behind a stalled kernel. [`nccl_group`] therefore runs a warm-up
//! all-reduce from one thread before handing out the ranks, so that the first collectives of
//! a training run (which a rank that failed to load its model never joins) find their
//! connections made; a rank stuck in NCCL's own wait is the remaining case where an abort
//! cannot wake it. After an abort every collective of the group returns an error, and
//! [`Collective::check`] catches one that the abort cut short, so no rank goes on with a
//! partial result.
//!
//! Buffers come from each device's memory pool, which other GPUs may not touch until the
//! pool grants them access; NCCL's direct peer-to-peer path between GPUs of one process
//! writes straight into the peer's buffers, so [`nccl_group`] grants every peer that can
//! reach a device access to its pool.
//!
//! A communicator of a multi-process job ([`nccl_from_env`]) is finalised (its last sends
//! flushed) and destroyed when its rank is dropped after a successful run, and aborted after
//! a failure; communicators of an in-process group are aborted (NCCL frees their shared
//! resources with the last of them), so no teardown waits for a rank that failed.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;

use super::{Collective, LaunchEnv, check_f32, check_root, rendezvous};
use crate::cuda::{self, CudaDevice};
use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// Most operations put into one NCCL group (a bound well inside what NCCL aggregates).
const MAX_GROUP: usize = 256;

/// An NCCL communicator handle.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it
// at once; it is only reached through the `Mutex` of its `Cell`.
unsafe impl Send for RawComm {}

impl RawComm {
    /// Abort the communicator (local, never waits for peers); errors are ignored: there is
    /// nothing left to do with a communicator being thrown away.
    fn abort(self) {
        // SAFETY: the handle came from a successful init and is aborted exactly once (it is
        // consumed here and was taken out of its cell).
        let _ = unsafe { nccl::comm_abort(self.0) };
    }
}

/// A rank's communicator; `None` once aborted.
type Cell = Arc<Mutex<Option<RawComm>>>;

fn lock(cell: &Cell) -> MutexGuard<'_, Option<RawComm>> {
    // The cell holds a plain handle; a panic elsewhere cannot leave it half-written.
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the ranks of one group in this process share.
struct Shared {
    /// Why the group was aborted (the first reason wins).
    aborted: Mutex<Option<String>>,
    /// Every rank's communicator in this process.
    cells: Vec<Cell>,
}

impl Shared {
    fn new(cells: Vec<Cell>) -> Arc<Self> {
        Arc::new(Shared {
            aborted: Mutex::new(None),
            cells,
        })
    }

    fn aborted(&self) -> Option<String> {
        self.aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Record `why` and abort every communicator not inside an NCCL call.
    fn abort(&self, why: String) {
        {
            let mut a = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
            if a.is_none() {
                *a = Some(why);
            }
        }
        for cell in &self.cells {
            let guard = match cell.try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                // Inside an NCCL call: its rank aborts it when the call returns.
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut g) = guard
                && let Some(c) = g.take()
            {
                c.abort();
            }
        }
    }
}

/// One rank of an NCCL communicator, bound to one GPU. Use each rank from one thread at a
/// time (calls are serialised by a lock).
pub struct NcclRank {
    cell: Cell,
    shared: Arc<Shared>,
    device: Arc<CudaDevice>,
    rank: usize,
    world: usize,
    /// Finalise and destroy on a clean drop (one rank per process) instead of aborting.
    finalize: bool,
}

impl std::fmt::Debug for NcclRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclRank({}/{} on {:?})",
            self.rank, self.world, self.device
        )
    }
}

/// Whether NCCL can be loaded here, or why not (with the fix).
pub fn nccl_availability() -> std::result::Result<(), String> {
    // SAFETY: probing dlopen()s the library and closes it again; only its initialisers run.
    let present = unsafe { sys::is_culib_present() };
    if !present {
        return Err(missing_message());
    }
    match std::panic::catch_unwind(nccl::get_nccl_version) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "NCCL is loaded but ncclGetVersion fails: {}",
            describe(&e)
        )),
        Err(_) => Err("the NCCL library could not be loaded".into()),
    }
}

/// The loaded NCCL's version, as `major.minor.patch`.
pub fn nccl_version() -> Result<String> {
    nccl_availability().map_err(Error::Cuda)?;
    let code =
        cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error(e, "ncclGetVersion"))?;
    // Since NCCL 2.9 the code is major*10000 + minor*100 + patch (before: *1000 + *100).
    let (major, minor, patch) = if code >= 20900 {
        (code / 10000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    };
    Ok(format!("{major}.{minor}.{patch}"))
}

/// NCCL library files (`libnccl.so.2` or `libnccl.so`) on this machine outside the names
/// cudarc loads: in `LD_LIBRARY_PATH`, the active Python environments' `nvidia/nccl/lib`
/// (where PyTorch's dependency `nvidia-nccl-cu*` puts it), conda and the usual system
/// directories. Used to explain a missing NCCL, and by tests to link it.
pub fn nccl_library_candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    let mut site: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var).map(PathBuf::from) {
            dirs.push(prefix.join("lib"));
            if let Ok(entries) = std::fs::read_dir(prefix.join("lib")) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with("python") {
                        site.push(e.path().join("site-packages"));
                    }
                }
            }
        }
    }
    for python in ["python3", "python"] {
        let out = std::process::Command::new(python)
            .args([
                "-c",
                "import sys; print('\\n'.join(p for p in sys.path if p))",
            ])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output();
        if let Ok(out) = out
            && out.status.success()
        {
            site.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| PathBuf::from(l.trim())),
            );
            break;
        }
    }
    dirs.extend(site.iter().map(|s| s.join("nvidia/nccl/lib")));
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
            "/usr/local/cuda/lib64",
            "/usr/local/nccl/lib",
            "/opt/conda/lib",
        ]
        .map(PathBuf::from),
    );
    let mut found: Vec<PathBuf> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for d in dirs {
        for name in ["libnccl.so.2", "libnccl.so"] {
            let f = d.join(name);
            if f.is_file() {
                let key = std::fs::canonicalize(&f).unwrap_or_else(|_| f.clone());
                if seen.insert(key) {
                    found.push(f);
                }
            }
        }
    }
    found
}

fn missing_message() -> String {
    let mut tried: Vec<String> = Vec::new();
    for n in cudarc::get_lib_name_candidates("nccl") {
        if !tried.contains(&n) {
            tried.push(n);
        }
    }
    let mut msg = format!(
        "NCCL cannot be loaded: cudarc looks for {} on the library search path \
         (LD_LIBRARY_PATH, then the system's), but NCCL's pip wheels (nvidia-nccl-cu13 / \
         -cu12, which PyTorch installs) and Debian's libnccl2 ship only libnccl.so.2. ",
        tried.join(", ")
    );
    match nccl_library_candidates().first() {
        Some(lib) => {
            let lib = lib.display();
            msg.push_str(&format!(
                "Found {lib}; link it under a name cudarc tries: mkdir -p ~/.cache/engine/nccl \
                 && ln -sf {lib} ~/.cache/engine/nccl/libnccl.so && export \
                 LD_LIBRARY_PATH=$HOME/.cache/engine/nccl:$LD_LIBRARY_PATH"
            ));
        }
        None => msg.push_str(
            "No libnccl.so.2 was found either: pip install nvidia-nccl-cu13 (or apt install \
             libnccl2), then link it: mkdir -p ~/.cache/engine/nccl && ln -sf \
             SITE_PACKAGES/nvidia/nccl/lib/libnccl.so.2 ~/.cache/engine/nccl/libnccl.so && \
             export LD_LIBRARY_PATH=$HOME/.cache/engine/nccl:$LD_LIBRARY_PATH",
        ),
    }
    msg
}

/// NCCL's name for a result code, plus its last error message when it has one.
fn describe(e: &NcclError) -> String {
    // SAFETY: both functions return static or library-owned NUL-terminated strings (or
    // null); `ncclGetLastError` ignores its argument.
    // `ncclGetLastError` exists from NCCL 2.13 on; cudarc panics on a missing symbol.
    let cstr = |p: *const c_char| {
        // SAFETY: NCCL returns null or a NUL-terminated string it owns.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let name = std::panic::catch_unwind(|| cstr(unsafe { sys::ncclGetErrorString(e.0) }))
        .ok()
        .flatten();
    let last =
        std::panic::catch_unwind(|| cstr(unsafe { sys::ncclGetLastError(std::ptr::null_mut()) }))
            .ok()
            .flatten();
    let mut s = format!("{:?}", e.0);
    if let Some(n) = name {
        s.push_str(&format!(" ({n})"));
    }
    if let Some(l) = last.filter(|l| !l.is_empty()) {
        s.push_str(&format!(": {l}"));
    }
    s
}

fn nccl_error(e: NcclError, doing: &str) -> Error {
    Error::Cuda(format!("NCCL {doing}: {}", describe(&e)))
}

/// One communicator over the GPUs `ordinals` (rank `i` on `ordinals[i]`), built in this
/// process with a single `ncclCommInitAll` (no rendezvous, no init deadlock). Hand each rank
/// to its own thread: a collective of one rank completes only when every rank has issued it,
/// so one thread driving two ranks deadlocks in the first collective that waits for its
/// result ([`Collective::all_reduce_host`], [`Collective::barrier`]).
pub fn nccl_group(ordinals: &[usize]) -> Result<Vec<NcclRank>> {
    if ordinals.is_empty() {
        crate::bail!(Usage, "nccl_group: no GPUs given");
    }
    for (i, o) in ordinals.iter().enumerate() {
        if ordinals[..i].contains(o) {
            crate::bail!(
                Usage,
                "nccl_group: cuda:{o} is listed twice; NCCL needs a different GPU for every rank"
            );
        }
    }
    if ordinals.len() > c_int::MAX as usize || ordinals.iter().any(|&o| o > c_int::MAX as usize) {
        crate::bail!(Usage, "nccl_group: too many GPUs or an impossible ordinal");
    }
    nccl_availability().map_err(Error::Cuda)?;
    let devices = ordinals
        .iter()
        .map(|&o| cuda::device(o))
        .collect::<Result<Vec<_>>>()?;
    // NCCL's direct P2P path writes into the peer's buffers, which live in memory pools.
    for (i, di) in devices.iter().enumerate() {
        for (j, dj) in devices.iter().enumerate() {
            if i != j {
                di.share_pool_with(dj)?;
            }
        }
    }
    let devlist: Vec<c_int> = ordinals.iter().map(|&o| o as c_int).collect();
    let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); ordinals.len()];
    // SAFETY: `comms` has room for one handle per device in `devlist`.
    unsafe { nccl::comm_init_all(comms.as_mut_ptr(), devlist.len() as c_int, devlist.as_ptr()) }
        .map_err(|e| {
            nccl_error(
                e,
                &format!(
                    "ncclCommInitAll over cuda:{}",
                    ordinals
                        .iter()
                        .map(|o| o.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )
        })?;
    let cells: Vec<Cell> = comms
        .iter()
        .map(|&c| Arc::new(Mutex::new(Some(RawComm(c)))))
        .collect();
    let shared = Shared::new(cells.clone());
    // From here on a failure aborts every communicator (dropping `shared` would leak them).
    if let Err(e) = warm_up(&comms, &devices) {
        shared.abort("the warm-up all-reduce failed".into());
        return Err(e);
    }
    let world = ordinals.len();
    Ok(cells
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(rank, (cell, device))| NcclRank {
            cell,
            shared: shared.clone(),
            device,
            rank,
            world,
            finalize: false,
        })
        .collect())
}

/// All-reduces over every rank of an in-process group, issued from this thread in one NCCL
/// group per size and waited for: they check the communicators end to end and make NCCL set
/// up its connections (lazily, on first use of an algorithm and protocol, which depend on the
/// message size) while no rank can be missing. The sizes span a host scalar and a LoRA
/// gradient tensor of a full-size model (a few MiB).
fn warm_up(comms: &[sys::ncclComm_t], devices: &[Arc<CudaDevice>]) -> Result<()> {
    for elems in [1usize, 1 << 20] {
        let bufs = devices
            .iter()
            .map(|d| d.alloc_zeros(elems * 4))
            .collect::<Result<Vec<_>>>()?;
        let ops: Vec<(sys::ncclComm_t, u64, sys::cudaStream_t)> = comms
            .iter()
            .zip(&bufs)
            .zip(devices)
            .map(|((&c, b), d)| (c, b.raw_ptr(), d.stream().cu_stream() as sys::cudaStream_t))
            .collect();
        grouped(&ops, "ncclAllReduce (warm-up)", |&(comm, ptr, stream)| {
            // SAFETY: in place on `elems` f32 of this device's buffer, alive until the
            // devices are synchronised below; one call per communicator inside one group, as
            // NCCL requires when one thread drives several devices.
            unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    elems,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map(|_| ())
        })?;
        for d in devices {
            d.synchronize()?;
        }
    }
    Ok(())
}

/// This process's rank of a job launched with one process per GPU (see [`LaunchEnv`]): rank
/// 0 creates NCCL's unique id, [`rendezvous`] shares it (checking `fingerprint`, a hash of
/// the job's settings) and every rank joins the communicator on GPU `ordinal` (usually
/// `env.local_rank`). Waits at most `env.rdzv_timeout` for the rendezvous; NCCL's own
/// initialisation then needs every rank too.
pub fn nccl_from_env(env: &LaunchEnv, ordinal: usize, fingerprint: u64) -> Result<NcclRank> {
    if env.world > c_int::MAX as usize || env.rank >= env.world {
        crate::bail!(
            Usage,
            "NCCL: impossible rank {} of world size {}",
            env.rank,
            env.world
        );
    }
    nccl_availability().map_err(Error::Cuda)?;
    let device = cuda::device(ordinal)?;
    // NCCL works on the calling thread's current device.
    device.stream().context().bind_to_thread()?;
    let payload = if env.rank == 0 {
        let id = nccl::get_uniqueid().map_err(|e| nccl_error(e, "ncclGetUniqueId"))?;
        Some(id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>())
    } else {
        None
    };
    let bytes = rendezvous(env, fingerprint, payload, env.rdzv_timeout)
        .map_err(|e| e.context(format!("NCCL setup of rank {}", env.rank)))?;
    let internal: [c_char; 128] = match <[u8; 128]>::try_from(bytes.as_slice()) {
        Ok(b) => b.map(|x| x as c_char),
        Err(_) => crate::bail!(
            Cuda,
            "NCCL setup of rank {}: rank 0 sent a {}-byte id, expected 128",
            env.rank,
            bytes.len()
        ),
    };
    device.stream().context().bind_to_thread()?;
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` receives the new handle; the id is the 128 bytes rank 0 created.
    unsafe {
        nccl::comm_init_rank(
            &mut comm,
            env.world as c_int,
            sys::ncclUniqueId { internal },
            env.rank as c_int,
        )
    }
    .map_err(|e| {
        nccl_error(
            e,
            &format!(
                "ncclCommInitRank (rank {} of {} on cuda:{ordinal})",
                env.rank, env.world
            ),
        )
    })?;
    let cell: Cell = Arc::new(Mutex::new(Some(RawComm(comm))));
    Ok(NcclRank {
        shared: Shared::new(vec![cell.clone()]),
        cell,
        device,
        rank: env.rank,
        world: env.world,
        finalize: true,
    })
}

impl NcclRank {
    /// The GPU this rank works on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    fn aborted_error(&self, why: &str) -> Error {
        Error::Cuda(format!(
            "NCCL rank {} of {}: the group was aborted ({why})",
            self.rank, self.world
        ))
    }

    /// Error if the group was aborted (checked after every wait: a wait the abort cut short
    /// leaves partial results).
    fn check_aborted(&self) -> Result<()> {
        match self.shared.aborted() {
            Some(why) => Err(self.aborted_error(&why)),
            None => Ok(()),
        }
    }

    /// Run `f` with the communicator and this device's context current on the calling
    /// thread; abort the communicator afterwards if the group was aborted meanwhile.
    fn with_comm<R>(&self, f: impl FnOnce(sys::ncclComm_t) -> Result<R>) -> Result<R> {
        let r = {
            let guard = lock(&self.cell);
            self.check_aborted()?;
            let Some(comm) = guard.as_ref().map(|c| c.0) else {
                return Err(self.aborted_error("its communicator is gone"));
            };
            self.device.stream().context().bind_to_thread()?;
            f(comm)
        };
        // Checked after the lock is released: an abort that found the cell locked had
        // recorded its reason before trying the lock, so it is seen here.
        if let Some(why) = self.shared.aborted() {
            if let Some(c) = lock(&self.cell).take() {
                c.abort();
            }
            return Err(self.aborted_error(&why));
        }
        r
    }

    fn stream(&self) -> sys::cudaStream_t {
        self.device.stream().cu_stream() as sys::cudaStream_t
    }

    /// One NCCL call per tensor of `ts` (in one group) from the tensor into a fresh buffer of
    /// the same size on this device; `op(src, dst, bytes, comm, stream)` issues it. The inputs
    /// and the new buffers stay alive until this returns, and every later use of them is
    /// ordered after the call on the device's stream. Empty tensors issue nothing.
    fn out_of_place(
        &self,
        ts: &[Tensor],
        what: &str,
        mut op: impl FnMut(
            *const c_void,
            *mut c_void,
            usize,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> std::result::Result<nccl::NcclStatus, NcclError>,
    ) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(ts.len());
        let mut ops = Vec::with_capacity(ts.len());
        for (i, t) in ts.iter().enumerate() {
            self.check_device(t, what, i)?;
            let bytes = t.elem_count() * t.dtype().size_in_bytes();
            let out = self.device.alloc(bytes)?;
            if bytes > 0 {
                ops.push((t.cuda_storage()?.buf.raw_ptr(), out.raw_ptr(), bytes));
            }
            outs.push(out);
        }
        let stream = self.stream();
        self.with_comm(|comm| {
            grouped(&ops, what, |&(src, dst, bytes)| {
                op(
                    src as *const c_void,
                    dst as *mut c_void,
                    bytes,
                    comm,
                    stream,
                )
                .map(|_| ())
            })
        })?;
        ts.iter()
            .zip(outs)
            .map(|(t, buf)| Tensor::from_cuda(buf, t.dtype(), t.shape()))
            .collect()
    }

    fn check_device(&self, t: &Tensor, what: &str, i: usize) -> Result<()> {
        let here = Device::Cuda(self.device.ordinal());
        if t.device() != here {
            crate::bail!(
                Shape,
                "{what}: tensor {i} is on {}, but NCCL rank {} works on {here}",
                t.device(),
                self.rank
            );
        }
        Ok(())
    }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // This rank failed: free the others instead of letting them wait for it.
            self.abort();
            return;
        }
        // Let this rank's last collectives finish (their results may still be read), then
        // free the communicator. A failure here leaves nothing to report to.
        let clean = self.shared.aborted().is_none() && self.device.synchronize().is_ok();
        if let Some(c) = lock(&self.cell).take() {
            if clean && self.finalize {
                // One rank per process: flush the last sends (a peer may still be receiving
                // them), then free. Every rank of a successful run gets here.
                // SAFETY: a live handle, finalised and destroyed once (taken from its cell).
                if unsafe { nccl::comm_finalize(c.0) }.is_ok() {
                    // After a failed destroy the handle's state is unknown: leave it.
                    let _ = unsafe { nccl::comm_destroy(c.0) };
                    return;
                }
            }
            c.abort();
        }
    }
}

/// Issue one NCCL call per item inside `ncclGroupStart`/`ncclGroupEnd`, in chunks of
/// [`MAX_GROUP`]; the group is always closed, and the first error wins.
fn grouped<T>(
    items: &[T],
    what: &str,
    mut op: impl FnMut(&T) -> std::result::Result<(), NcclError>,
) -> Result<()> {
    for chunk in items.chunks(MAX_GROUP) {
        nccl::group_start().map_err(|e| nccl_error(e, "ncclGroupStart"))?;
        let mut failed = None;
        for item in chunk {
            if let Err(e) = op(item) {
                failed = Some(nccl_error(e, what));
                break;
            }
        }
        let end = nccl::group_end();
        if let Some(e) = failed {
            return Err(e);
        }
        end.map_err(|e| nccl_error(e, &format!("{what} (ncclGroupEnd)")))?;
    }
    Ok(())
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        for (i, t) in ts.iter().enumerate() {
            check_f32(t, i)?;
        }
        self.out_of_place(ts, "ncclAllReduce", |src, dst, bytes, comm, stream| {
            // SAFETY: `src` and `dst` address `bytes` (f32 values) on this rank's device;
            // see `out_of_place`.
            unsafe {
                nccl::all_reduce(
                    src,
                    dst,
                    bytes / 4,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
        })
    }

    fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        check_root(root, self.world)?;
        // A broadcast copies bytes, so every dtype goes as bytes.
        self.out_of_place(ts, "ncclBroadcast", |src, dst, bytes, comm, stream| {
            // SAFETY: as in `all_reduce_sum`.
            unsafe {
                nccl::broadcast(
                    src,
                    dst,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root as c_int,
                    comm,
                    stream,
                )
            }
        })
    }

    fn all_reduce_host(&self, v: &[f64]) -> Result<Vec<f64>> {
        if v.is_empty() {
            return Ok(Vec::new());
        }
        let buf = self.device.upload(bytemuck::cast_slice(v))?;
        let ptr = buf.raw_ptr();
        let stream = self.stream();
        self.with_comm(|comm| {
            // SAFETY: in place on `v.len()` f64 of `buf`, alive until the download below
            // (which waits for the stream).
            unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    v.len(),
                    sys::ncclDataType_t::ncclFloat64,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map_err(|e| nccl_error(e, "ncclAllReduce (host values)"))
            .map(|_| ())
        })?;
        let bytes = buf.download()?;
        self.check_aborted()?;
        Ok(bytes[..v.len() * 8]
            .chunks_exact(8)
            .map(bytemuck::pod_read_unaligned::<f64>)
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        let buf = self.device.alloc_zeros(4)?;
        let ptr = buf.raw_ptr();
        let stream = self.stream();
        self.with_comm(|comm| {
            // SAFETY: in place on one f32 of `buf`, alive until the stream is synchronised.
            unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    1,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map_err(|e| nccl_error(e, "ncclAllReduce (barrier)"))
            .map(|_| ())
        })?;
        self.device.synchronize()?;
        drop(buf);
        self.check_aborted()
    }

    fn check(&self) -> Result<()> {
        self.device.synchronize()?;
        self.check_aborted()
    }

    fn abort(&self) {
        self.shared
            .abort(format!("rank {} of {} gave up", self.rank, self.world));
    }
}

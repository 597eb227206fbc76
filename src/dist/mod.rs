//! Collectives for data-parallel training: every rank runs the same step on its own slice of
//! the batch, then the ranks sum their gradients (and a few host scalars such as the loss and
//! the token count) so that every rank applies the same update.
//!
//! The trainer is written against one trait, [`Collective`], with four implementations:
//!
//! | implementation | ranks | tensors | used for |
//! |---|---|---|---|
//! | [`Solo`] | 1 | any | single-device training: every collective is the identity |
//! | [`ThreadRank`] from [`thread_group`] | n threads of one process | CPU (GPU by a host round trip) | CPU tests standing in for GPUs |
//! | [`NcclRank`] from [`nccl_group`] | one thread per GPU, one process | this rank's GPU | one machine with several GPUs |
//! | [`NcclRank`] from [`nccl_from_env`] | one process per GPU, any number of machines | this rank's GPU | `torchrun`-style launches |
//!
//! # In-process groups and one process per rank
//!
//! [`thread_group`] and [`nccl_group`] build every rank of a group at once in the calling
//! process; the caller hands one handle to each worker thread. [`nccl_group`] initialises all
//! communicators with one `ncclCommInitAll`, so there is no rendezvous and no risk of the
//! init calls deadlocking each other.
//!
//! With one process per rank (several machines, or a launcher that starts one process per
//! GPU) the ranks only share an address: [`launch_env`] reads the launch variables, rank 0
//! creates NCCL's 128-byte unique id and [`rendezvous`] hands it to the others over TCP, and
//! then each process joins the communicator ([`nccl_from_env`] does all three).
//!
//! # Launch variables (as `torchrun` sets them)
//!
//! | variable | meaning | required |
//! |---|---|---|
//! | `WORLD_SIZE` | number of ranks; unset means "not a distributed launch" | — |
//! | `RANK` | this process's rank, `0..WORLD_SIZE` | when `WORLD_SIZE` > 1 (else 0) |
//! | `LOCAL_RANK` | rank on this machine: the GPU ordinal to use | when `WORLD_SIZE` > 1 (else 0) |
//! | `LOCAL_WORLD_SIZE` | ranks on this machine; checked against `LOCAL_RANK` if set | no |
//! | `MASTER_ADDR` | host name or address of rank 0's machine | when `WORLD_SIZE` > 1 |
//! | `MASTER_PORT` | a port on that machine | when `WORLD_SIZE` > 1 |
//! | `ENGINE_RDZV_PORT` | the rendezvous port, overriding the rule below | no |
//! | `ENGINE_RDZV_TIMEOUT` | seconds to wait for all ranks at the rendezvous (default 600) | no |
//!
//! Every malformed value is an error naming the variable (a non-number, `RANK` ≥ `WORLD_SIZE`,
//! a missing `MASTER_ADDR`, …); [`LaunchEnv::from_vars`] parses from any lookup function, so
//! the rules are tested without touching the process environment.
//!
//! # The rendezvous and its port
//!
//! Rank 0 listens on the rendezvous port (on the loopback address when `MASTER_ADDR` is a
//! loopback name, else on every interface, as torch's store does: a host name may resolve
//! to a different address on the master than on the peers). Each other rank connects,
//! retrying until the timeout, and sends a magic string with a protocol version, its rank,
//! its world size and a *fingerprint*: a hash of the job's settings (model, data, recipe, …)
//! chosen by the caller. Rank 0 waits until every rank `1..WORLD_SIZE` has arrived, checks
//! them all, and only then sends the payload to all of them, so either every rank proceeds
//! or none does. A duplicate rank, a different world size, a different fingerprint or a
//! different protocol version fails the whole rendezvous with the same explanation on rank 0
//! and on the peers; a timeout names the ranks that never arrived (on rank 0) or the address
//! that could not be reached (on a peer).
//!
//! Port rule: under `torchrun` the elastic agent's TCP store already listens on
//! `MASTER_PORT` on the master machine, so when `TORCHELASTIC_RUN_ID` or
//! `TORCHELASTIC_USE_AGENT_STORE` is set the rendezvous uses `MASTER_PORT + 1`; otherwise it
//! uses `MASTER_PORT`. `ENGINE_RDZV_PORT` overrides both.
//!
//! # Determinism
//!
//! Every rank receives bit-identical results from every collective:
//! - [`ThreadRank`] sums in rank order, `((x0 + x1) + x2) + …`, once, and hands the same
//!   result to every rank, so its results are also reproducible from run to run.
//! - NCCL's all-reduce reduces each element once along its ring or tree and then copies that
//!   value to every rank, so all ranks agree bit for bit; the order of the additions depends
//!   on NCCL's choice of algorithm and protocol (topology, message size, `NCCL_ALGO`,
//!   `NCCL_PROTO`), so two runs on different hardware may differ in the last bits. With one
//!   rank the sum is the input, bit for bit.
//! - Host sums ([`Collective::all_reduce_host`]) are f64.
//!
//! # Failure
//!
//! A collective never waits forever on a rank that is gone in these cases:
//! - [`ThreadRank`]: when a rank is dropped (its thread returned or panicked) the group is
//!   marked broken and every other rank's pending or later collective returns an error naming
//!   it.
//! - [`NcclRank`] of an in-process group: the failing rank's [`Collective::abort`] aborts the
//!   other ranks' communicators, which ends the NCCL kernels they wait on; their waits fail,
//!   and [`Collective::check`] reports a sum the abort cut short. The group runs one warm-up
//!   all-reduce before any rank starts, so the first collectives do not sit in NCCL's
//!   connection setup (inside the call, where no abort reaches) waiting for a rank that failed
//!   to load its model. A rank inside NCCL's own wait (a full work queue behind a stalled
//!   kernel) is the case left.
//!
//! NCCL cannot detect a vanished peer *process* in general: a crashed rank of a multi-process
//! job makes the others' next collective hang until the launcher (torchrun) ends the job,
//! which is what torch users already see.

mod env;
mod nccl;
mod rendezvous;
mod threads;

pub use env::{DEFAULT_RDZV_TIMEOUT, LaunchEnv, launch_env};
pub use nccl::{
    NcclRank, nccl_availability, nccl_from_env, nccl_group, nccl_library_candidates, nccl_version,
};
pub use rendezvous::rendezvous;
pub use threads::{ThreadRank, thread_group, thread_group_with_timeout};

use crate::error::Result;
use crate::tensor::Tensor;

/// The collectives a data-parallel trainer needs. Every rank of a group must call the same
/// collectives in the same order with tensors of the same shapes.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks of each tensor in `ts` (f32; same shapes, order and
    /// count on every rank; on this rank's device). Returns new tensors on the same device.
    /// Every rank must receive bit-identical results.
    fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Rank `root`'s tensors, delivered to every rank (each rank passes tensors of the same
    /// shapes/dtypes; only root's values matter).
    fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<Vec<Tensor>>;
    /// Sum over ranks of a small host vector (losses, token counts, positions), identical on
    /// every rank.
    fn all_reduce_host(&self, v: &[f64]) -> Result<Vec<f64>>;
    fn barrier(&self) -> Result<()>;
    /// Wait for this rank's collectives issued so far and fail if the group was aborted
    /// meanwhile: a device collective cut short by an abort leaves partial results without an
    /// error of its own. Not a collective (no other rank takes part). The trainer calls it
    /// before it uses summed gradients.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Give up on the group because this rank failed: the other ranks' pending and later
    /// collectives return an error instead of waiting for this rank. Idempotent. In-process
    /// groups ([`ThreadRank`], [`nccl_group`]) wake every rank; a rank of a multi-process
    /// NCCL job can only abort its own communicator (the launcher ends the others). Dropping
    /// a rank while its thread panics aborts too.
    fn abort(&self) {}
}

/// One rank alone: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        for (i, t) in ts.iter().enumerate() {
            check_f32(t, i)?;
        }
        Ok(ts.to_vec())
    }

    fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        check_root(root, 1)?;
        Ok(ts.to_vec())
    }

    fn all_reduce_host(&self, v: &[f64]) -> Result<Vec<f64>> {
        Ok(v.to_vec())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Error unless tensor `i` of an all-reduce is f32 (the gradients and f32 masters are).
fn check_f32(t: &Tensor, i: usize) -> Result<()> {
    if t.dtype() != crate::tensor::DType::F32 {
        crate::bail!(
            Shape,
            "all_reduce_sum: tensor {i} (shape {:?}) is {}; only f32 tensors are summed",
            t.shape(),
            t.dtype().name()
        );
    }
    Ok(())
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        crate::bail!(
            Usage,
            "broadcast from rank {root}, but the group has {world} rank(s)"
        );
    }
    Ok(())
}

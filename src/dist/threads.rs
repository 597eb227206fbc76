//! An in-process group of ranks, one per thread, exchanging host tensors through shared
//! memory: the CPU stand-in for a group of GPUs.
//!
//! Each collective is one *round*: every rank deposits its contribution, the last rank to
//! arrive checks that all contributions agree (same collective, shapes, root, lengths),
//! computes the result once (sums in rank order) and publishes it; every rank returns that
//! same result. A rank whose handle is dropped (its thread returned or panicked) marks the
//! group broken, which wakes every waiting rank with an error naming it; an optional timeout
//! does the same for a rank that is alive but never arrives.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Collective, check_f32, check_root};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};

/// One rank of an in-process group (see [`thread_group`]); hand each to its own thread.
pub struct ThreadRank {
    rank: usize,
    group: Arc<Group>,
}

impl std::fmt::Debug for ThreadRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadRank({}/{})", self.rank, self.group.n)
    }
}

/// `n` ranks of one in-process group; rank `i` is element `i`. A rank waits for the others
/// for as long as they live.
pub fn thread_group(n: usize) -> Vec<ThreadRank> {
    make(n, None)
}

/// As [`thread_group`], but a rank that waits longer than `timeout` for the others fails and
/// breaks the group (so every rank errors instead of hanging on a rank that is stuck).
pub fn thread_group_with_timeout(n: usize, timeout: Duration) -> Vec<ThreadRank> {
    make(n, Some(timeout))
}

fn make(n: usize, timeout: Option<Duration>) -> Vec<ThreadRank> {
    let group = Arc::new(Group {
        n,
        timeout,
        state: Mutex::new(State {
            round: 0,
            arrived: 0,
            slots: (0..n).map(|_| None).collect(),
            done: None,
            broken: None,
        }),
        cv: Condvar::new(),
    });
    (0..n)
        .map(|rank| ThreadRank {
            rank,
            group: group.clone(),
        })
        .collect()
}

struct Group {
    n: usize,
    timeout: Option<Duration>,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    /// The round being gathered.
    round: u64,
    arrived: usize,
    /// This round's contributions, by rank.
    slots: Vec<Option<Contribution>>,
    /// The result of the last completed round (a rank still waiting on round k can only be
    /// waiting for this one: round k+1 cannot complete without it).
    done: Option<(u64, Arc<Outcome>)>,
    /// Why the group can no longer be used.
    broken: Option<String>,
}

/// What one rank brings to a round. Tensors are host copies.
enum Contribution {
    Sum(Vec<Tensor>),
    /// Root's tensors, or only their (shape, dtype) on the other ranks.
    Broadcast {
        root: usize,
        sig: Vec<(Vec<usize>, DType)>,
        tensors: Option<Vec<Tensor>>,
    },
    Host(Vec<f64>),
    Barrier,
}

impl Contribution {
    fn name(&self) -> &'static str {
        match self {
            Contribution::Sum(_) => "all_reduce_sum",
            Contribution::Broadcast { .. } => "broadcast",
            Contribution::Host(_) => "all_reduce_host",
            Contribution::Barrier => "barrier",
        }
    }
}

enum Value {
    Tensors(Vec<Tensor>),
    Host(Vec<f64>),
    Unit,
}

type Outcome = std::result::Result<Value, String>;

fn lock(group: &Group) -> MutexGuard<'_, State> {
    // A panic while the lock is held can only come from an allocation failure inside
    // `reduce`; the state itself stays consistent, and `broken` reports the loss of a rank.
    group.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl ThreadRank {
    /// Take part in one round; returns the round's shared outcome.
    fn exchange(&self, c: Contribution) -> Result<Arc<Outcome>> {
        let g = &*self.group;
        let what = c.name();
        let mut st = lock(g);
        if let Some(why) = &st.broken {
            return Err(broken_error(self.rank, what, why));
        }
        if st.slots[self.rank].is_some() {
            return Err(Error::Usage(format!(
                "thread group: rank {} called {what} while already inside a collective \
                 (one rank's handle used from two threads at once)",
                self.rank
            )));
        }
        let round = st.round;
        st.slots[self.rank] = Some(c);
        st.arrived += 1;
        if st.arrived == g.n {
            let contributions: Vec<Contribution> = st
                .slots
                .iter_mut()
                .map(|s| {
                    s.take()
                        .expect("every rank of a complete round has deposited")
                })
                .collect();
            st.arrived = 0;
            let outcome = Arc::new(reduce(contributions));
            st.done = Some((round, outcome.clone()));
            st.round += 1;
            g.cv.notify_all();
            return Ok(outcome);
        }
        let deadline = g.timeout.map(|t| Instant::now() + t);
        loop {
            if let Some((k, outcome)) = &st.done
                && *k == round
            {
                return Ok(outcome.clone());
            }
            if let Some(why) = &st.broken {
                return Err(broken_error(self.rank, what, why));
            }
            match deadline {
                None => st = g.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let missing: Vec<String> = st
                            .slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(r, _)| r.to_string())
                            .collect();
                        let why = format!(
                            "rank {} waited {:.1}s in {what} for rank(s) {} that never arrived",
                            self.rank,
                            g.timeout.unwrap_or_default().as_secs_f64(),
                            missing.join(", ")
                        );
                        st.broken = Some(why.clone());
                        // Leave the round as it is: the group is unusable from here on.
                        g.cv.notify_all();
                        return Err(Error::Msg(format!(
                            "thread group: {why} (the group is now broken)"
                        )));
                    }
                    st =
                        g.cv.wait_timeout(st, deadline - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                }
            }
        }
    }
}

fn broken_error(rank: usize, what: &str, why: &str) -> Error {
    Error::Msg(format!(
        "thread group: rank {rank} cannot run {what}: the group is broken: {why}"
    ))
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let g = &*self.group;
        let mut st = lock(g);
        if st.broken.is_none() {
            let how = if std::thread::panicking() {
                "its thread panicked"
            } else {
                "its handle was dropped"
            };
            st.broken = Some(format!("rank {} left the group ({how})", self.rank));
        }
        g.cv.notify_all();
    }
}

/// Check that every rank called the same collective with matching arguments, then compute
/// the result once.
fn reduce(cs: Vec<Contribution>) -> Outcome {
    let first = cs[0].name();
    for (r, c) in cs.iter().enumerate() {
        if c.name() != first {
            return Err(format!(
                "rank {r} called {} while rank 0 called {first}",
                c.name()
            ));
        }
    }
    match &cs[0] {
        Contribution::Barrier => Ok(Value::Unit),
        Contribution::Host(v0) => {
            let mut out = v0.clone();
            for (r, c) in cs.iter().enumerate().skip(1) {
                let Contribution::Host(v) = c else {
                    unreachable!("kinds checked above")
                };
                if v.len() != out.len() {
                    return Err(format!(
                        "all_reduce_host: rank 0 passed {} value(s), rank {r} passed {}",
                        out.len(),
                        v.len()
                    ));
                }
                for (o, x) in out.iter_mut().zip(v) {
                    *o += *x;
                }
            }
            Ok(Value::Host(out))
        }
        Contribution::Sum(t0) => {
            let per_rank: Vec<&Vec<Tensor>> = cs
                .iter()
                .map(|c| match c {
                    Contribution::Sum(ts) => ts,
                    _ => unreachable!("kinds checked above"),
                })
                .collect();
            for (r, ts) in per_rank.iter().enumerate().skip(1) {
                if ts.len() != t0.len() {
                    return Err(format!(
                        "all_reduce_sum: rank 0 passed {} tensor(s), rank {r} passed {}",
                        t0.len(),
                        ts.len()
                    ));
                }
                for (i, (a, b)) in t0.iter().zip(ts.iter()).enumerate() {
                    if a.shape() != b.shape() {
                        return Err(format!(
                            "all_reduce_sum: tensor {i} has shape {:?} on rank 0 but {:?} on rank {r}",
                            a.shape(),
                            b.shape()
                        ));
                    }
                }
            }
            let mut out = Vec::with_capacity(t0.len());
            for i in 0..t0.len() {
                // Rank order, starting from rank 0's values (so one rank returns its input
                // bit for bit, -0.0 included).
                let mut acc = per_rank[0][i]
                    .as_f32_slice()
                    .map_err(|e| e.to_string())?
                    .to_vec();
                for ts in &per_rank[1..] {
                    let x = ts[i].as_f32_slice().map_err(|e| e.to_string())?;
                    for (a, b) in acc.iter_mut().zip(x) {
                        *a += *b;
                    }
                }
                out.push(Tensor::from_f32(acc, t0[i].shape()).map_err(|e| e.to_string())?);
            }
            Ok(Value::Tensors(out))
        }
        Contribution::Broadcast { root, sig, .. } => {
            for (r, c) in cs.iter().enumerate().skip(1) {
                let Contribution::Broadcast {
                    root: root_r,
                    sig: sig_r,
                    ..
                } = c
                else {
                    unreachable!("kinds checked above")
                };
                if root_r != root {
                    return Err(format!(
                        "broadcast: rank 0 broadcasts from rank {root}, rank {r} from rank {root_r}"
                    ));
                }
                if sig_r.len() != sig.len() {
                    return Err(format!(
                        "broadcast: rank 0 passed {} tensor(s), rank {r} passed {}",
                        sig.len(),
                        sig_r.len()
                    ));
                }
                for (i, (a, b)) in sig.iter().zip(sig_r).enumerate() {
                    if a != b {
                        return Err(format!(
                            "broadcast: tensor {i} is {:?} {} on rank 0 but {:?} {} on rank {r}",
                            a.0,
                            a.1.name(),
                            b.0,
                            b.1.name()
                        ));
                    }
                }
            }
            match &cs[*root] {
                Contribution::Broadcast {
                    tensors: Some(ts), ..
                } => Ok(Value::Tensors(ts.clone())),
                _ => Err(format!("broadcast: root rank {root} brought no tensors")),
            }
        }
    }
}

/// The tensors of `outcome`, each moved to the device of the matching input.
fn tensors_like(outcome: &Outcome, like: &[Tensor]) -> Result<Vec<Tensor>> {
    match outcome {
        Ok(Value::Tensors(ts)) => ts
            .iter()
            .zip(like)
            .map(|(t, l)| match l.device() {
                Device::Cpu => Ok(t.clone()),
                d => t.to_device(d),
            })
            .collect(),
        Ok(_) => Err(Error::Msg("thread group: unexpected result kind".into())),
        Err(msg) => Err(Error::Usage(format!("thread group: {msg}"))),
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.n
    }

    fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut host = Vec::with_capacity(ts.len());
        for (i, t) in ts.iter().enumerate() {
            check_f32(t, i)?;
            host.push(t.to_cpu()?);
        }
        let outcome = self.exchange(Contribution::Sum(host))?;
        tensors_like(&outcome, ts)
    }

    fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        check_root(root, self.group.n)?;
        let sig = ts.iter().map(|t| (t.shape().to_vec(), t.dtype())).collect();
        let tensors = if self.rank == root {
            Some(ts.iter().map(Tensor::to_cpu).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        let outcome = self.exchange(Contribution::Broadcast { root, sig, tensors })?;
        tensors_like(&outcome, ts)
    }

    fn all_reduce_host(&self, v: &[f64]) -> Result<Vec<f64>> {
        let outcome = self.exchange(Contribution::Host(v.to_vec()))?;
        match &*outcome {
            Ok(Value::Host(v)) => Ok(v.clone()),
            Ok(_) => Err(Error::Msg("thread group: unexpected result kind".into())),
            Err(msg) => Err(Error::Usage(format!("thread group: {msg}"))),
        }
    }

    fn barrier(&self) -> Result<()> {
        let outcome = self.exchange(Contribution::Barrier)?;
        match &*outcome {
            Ok(_) => Ok(()),
            Err(msg) => Err(Error::Usage(format!("thread group: {msg}"))),
        }
    }

    fn abort(&self) {
        let g = &*self.group;
        let mut st = lock(g);
        if st.broken.is_none() {
            st.broken = Some(format!("rank {} aborted the group", self.rank));
        }
        g.cv.notify_all();
    }
}

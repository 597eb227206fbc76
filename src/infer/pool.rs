//! Dynamic hand-out of packed batches to several workers (one per GPU, or CPU workers standing
//! in for GPUs in tests).
//!
//! Each worker is a thread that builds its own scorer (its own model copy, on its own device)
//! and then scores whatever batch the coordinator hands it. The coordinator (the calling
//! thread) keeps the queue of batches, longest first, and gives the next one to whichever
//! worker reports back first, so a fast GPU simply takes more batches. Results are written
//! into per-sequence slots, so the output order never depends on who scored what.
//!
//! A worker whose scorer fails (load error, kernel error, out of memory, even a panic) is
//! retired: its failure is recorded with the rows it held, the batch goes back to the front of
//! the queue for the surviving workers (once; a batch that fails twice is given up), and every
//! result already computed is kept. The caller decides what to do with unscored rows.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::Instant;

use crate::error::{Error, Result};

/// Something that turns a packed batch of token rows into class probabilities.
pub trait Scorer {
    /// Probabilities (A, B, tie) for each row, in order.
    fn score(&mut self, rows: &[&[u32]]) -> Result<Vec<[f64; 3]>>;
}

/// What one worker did.
#[derive(Clone, Debug, Default)]
pub struct WorkerStats {
    /// The worker's name (its device, e.g. `cuda:1`).
    pub name: String,
    pub batches: usize,
    pub rows: usize,
    pub tokens: usize,
    /// Seconds to build the scorer (load the model).
    pub load_seconds: f64,
    /// Seconds spent scoring.
    pub busy_seconds: f64,
}

/// A worker that stopped on an error.
#[derive(Clone, Debug)]
pub struct WorkerFailure {
    pub worker: String,
    pub error: String,
    /// The sequences of the batch it held when it failed (empty if it failed while loading).
    pub held: Vec<usize>,
}

/// One scored batch, in the order batches finished: what per-token costs by length are
/// measured from (each call returns host probabilities, so the time includes the device's).
#[derive(Clone, Copy, Debug)]
pub struct BatchTiming {
    pub worker: usize,
    pub rows: usize,
    pub tokens: usize,
    /// The longest sequence of the batch.
    pub max_len: usize,
    pub seconds: f64,
}

/// The outcome of [`run`].
#[derive(Debug)]
pub struct PoolResult {
    /// One slot per sequence; `None` where no worker could score it.
    pub probs: Vec<Option<[f64; 3]>>,
    pub workers: Vec<WorkerStats>,
    pub failures: Vec<WorkerFailure>,
    pub timings: Vec<BatchTiming>,
}

impl PoolResult {
    /// Sequences without a result.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.probs.len())
            .filter(|&i| self.probs[i].is_none())
            .collect()
    }
}

enum Report {
    Ready(usize, f64),
    Done {
        worker: usize,
        batch: usize,
        probs: Vec<[f64; 3]>,
        seconds: f64,
    },
    Failed {
        worker: usize,
        batch: Option<usize>,
        error: String,
    },
}

/// Check a finished batch before it is accepted (e.g. for non-finite probabilities); an error
/// here stops the whole run, since it is a property of the model or data, not of a device.
pub type Validate<'a> = dyn Fn(&[usize], &[[f64; 3]]) -> Result<()> + 'a;

/// Score `batches` (lists of indices into `seqs`) on `names.len()` workers; `make(i)` builds
/// worker `i`'s scorer on that worker's own thread. `progress(rows, tokens)` is called on the
/// calling thread after every finished batch.
pub fn run<M, S>(
    names: &[String],
    make: M,
    seqs: &[Vec<u32>],
    batches: &[Vec<usize>],
    validate: &Validate<'_>,
    mut progress: impl FnMut(usize, usize),
) -> Result<PoolResult>
where
    M: Fn(usize) -> Result<S> + Sync,
    S: Scorer,
{
    if names.is_empty() {
        return Err(Error::Usage("no workers to score with".into()));
    }
    let mut probs: Vec<Option<[f64; 3]>> = vec![None; seqs.len()];
    let mut stats: Vec<WorkerStats> = names
        .iter()
        .map(|n| WorkerStats {
            name: n.clone(),
            ..Default::default()
        })
        .collect();
    let mut failures = Vec::new();
    let mut timings = Vec::with_capacity(batches.len());
    let mut queue: VecDeque<usize> = (0..batches.len()).collect();
    let mut attempts = vec![0usize; batches.len()];
    let mut settled = 0usize; // batches scored or given up
    let mut fatal: Option<Error> = None;

    std::thread::scope(|scope| {
        let (report_tx, report_rx) = mpsc::channel::<Report>();
        let mut job_tx: Vec<Option<mpsc::Sender<usize>>> = Vec::new();
        for w in 0..names.len() {
            let (tx, rx) = mpsc::channel::<usize>();
            job_tx.push(Some(tx));
            let report = report_tx.clone();
            let make = &make;
            scope.spawn(move || worker(w, make, seqs, batches, rx, report));
        }
        drop(report_tx);
        let mut busy: Vec<Option<usize>> = vec![None; names.len()];

        // Give `w` the next batch; with the queue empty it waits idle, since a batch still in
        // flight elsewhere may come back if its worker fails.
        let dispatch = |w: usize,
                        queue: &mut VecDeque<usize>,
                        job_tx: &mut Vec<Option<mpsc::Sender<usize>>>,
                        busy: &mut Vec<Option<usize>>| {
            if let Some(b) = queue.pop_front() {
                match job_tx[w].as_ref().map(|tx| tx.send(b)) {
                    Some(Ok(())) => busy[w] = Some(b),
                    _ => {
                        queue.push_front(b);
                        job_tx[w] = None;
                    }
                }
            }
        };
        let mut ready = vec![false; names.len()];

        while settled < batches.len() && fatal.is_none() {
            let Ok(msg) = report_rx.recv() else { break };
            match msg {
                Report::Ready(w, seconds) => {
                    stats[w].load_seconds = seconds;
                    ready[w] = true;
                    dispatch(w, &mut queue, &mut job_tx, &mut busy);
                }
                Report::Done {
                    worker: w,
                    batch,
                    probs: p,
                    seconds,
                } => {
                    busy[w] = None;
                    let idx = &batches[batch];
                    if p.len() != idx.len() {
                        fatal = Some(Error::Msg(format!(
                            "{}: a batch of {} rows came back with {} results",
                            names[w],
                            idx.len(),
                            p.len()
                        )));
                        break;
                    }
                    if let Err(e) = validate(idx, &p) {
                        fatal = Some(e);
                        break;
                    }
                    let tokens: usize = idx.iter().map(|&i| seqs[i].len()).sum();
                    for (&i, v) in idx.iter().zip(&p) {
                        probs[i] = Some(*v);
                    }
                    let s = &mut stats[w];
                    s.batches += 1;
                    s.rows += idx.len();
                    s.tokens += tokens;
                    s.busy_seconds += seconds;
                    timings.push(BatchTiming {
                        worker: w,
                        rows: idx.len(),
                        tokens,
                        max_len: idx.iter().map(|&i| seqs[i].len()).max().unwrap_or(0),
                        seconds,
                    });
                    settled += 1;
                    progress(idx.len(), tokens);
                    dispatch(w, &mut queue, &mut job_tx, &mut busy);
                }
                Report::Failed {
                    worker: w,
                    batch,
                    error,
                } => {
                    job_tx[w] = None;
                    busy[w] = None;
                    failures.push(WorkerFailure {
                        worker: names[w].clone(),
                        error,
                        held: batch.map(|b| batches[b].clone()).unwrap_or_default(),
                    });
                    if let Some(b) = batch {
                        attempts[b] += 1;
                        if attempts[b] >= 2 {
                            settled += 1; // given up: failed on two workers
                        } else {
                            queue.push_front(b);
                        }
                    }
                    // Hand the returned batch to an idle survivor, if one is waiting.
                    for v in 0..names.len() {
                        if ready[v] && job_tx[v].is_some() && busy[v].is_none() {
                            dispatch(v, &mut queue, &mut job_tx, &mut busy);
                        }
                    }
                    if job_tx.iter().all(Option::is_none) {
                        break; // nobody left to score the rest
                    }
                }
            }
        }
        // Closing the job channels ends every worker's loop.
        for tx in job_tx.iter_mut() {
            *tx = None;
        }
    });
    if let Some(e) = fatal {
        return Err(e);
    }
    Ok(PoolResult {
        probs,
        workers: stats,
        failures,
        timings,
    })
}

fn worker<M, S>(
    w: usize,
    make: &M,
    seqs: &[Vec<u32>],
    batches: &[Vec<usize>],
    jobs: mpsc::Receiver<usize>,
    report: mpsc::Sender<Report>,
) where
    M: Fn(usize) -> Result<S> + Sync,
    S: Scorer,
{
    let t0 = Instant::now();
    let scorer = catch_unwind(AssertUnwindSafe(|| make(w)))
        .unwrap_or_else(|p| Err(Error::Msg(format!("panicked: {}", panic_text(&p)))));
    let mut scorer = match scorer {
        Ok(s) => s,
        Err(e) => {
            let _ = report.send(Report::Failed {
                worker: w,
                batch: None,
                error: format!("could not load the model: {e}"),
            });
            return;
        }
    };
    if report
        .send(Report::Ready(w, t0.elapsed().as_secs_f64()))
        .is_err()
    {
        return;
    }
    while let Ok(b) = jobs.recv() {
        let t = Instant::now();
        let rows: Vec<&[u32]> = batches[b].iter().map(|&i| seqs[i].as_slice()).collect();
        let out = catch_unwind(AssertUnwindSafe(|| scorer.score(&rows)))
            .unwrap_or_else(|p| Err(Error::Msg(format!("panicked: {}", panic_text(&p)))));
        let msg = match out {
            Ok(probs) => Report::Done {
                worker: w,
                batch: b,
                probs,
                seconds: t.elapsed().as_secs_f64(),
            },
            Err(e) => Report::Failed {
                worker: w,
                batch: Some(b),
                error: e.to_string(),
            },
        };
        let failed = matches!(msg, Report::Failed { .. });
        if report.send(msg).is_err() || failed {
            return;
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Scores a row as (len, first id, worker) normalised, optionally failing on a batch count.
    struct Fake {
        worker: usize,
        fail_after: Option<usize>,
        done: usize,
        log: &'static Mutex<Vec<(usize, usize)>>,
        delay_ms: u64,
    }

    impl Scorer for Fake {
        fn score(&mut self, rows: &[&[u32]]) -> Result<Vec<[f64; 3]>> {
            if Some(self.done) == self.fail_after {
                return Err(Error::Cuda("device lost".into()));
            }
            self.done += 1;
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
            self.log
                .lock()
                .unwrap()
                .push((self.worker, rows.first().map_or(0, |r| r[0] as usize)));
            Ok(rows
                .iter()
                .map(|r| {
                    let x = r[0] as f64;
                    [x / (x + 2.0), 1.0 / (x + 2.0), 1.0 / (x + 2.0)]
                })
                .collect())
        }
    }

    fn seqs(n: usize) -> Vec<Vec<u32>> {
        (0..n).map(|i| vec![i as u32 + 1; 1 + i % 5]).collect()
    }

    fn expect(i: usize) -> [f64; 3] {
        let x = (i + 1) as f64;
        [x / (x + 2.0), 1.0 / (x + 2.0), 1.0 / (x + 2.0)]
    }

    fn no_check(_: &[usize], _: &[[f64; 3]]) -> Result<()> {
        Ok(())
    }

    #[test]
    fn every_sequence_lands_in_its_slot_whoever_scores_it() {
        static LOG: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
        let s = seqs(37);
        let batches: Vec<Vec<usize>> = (0..37)
            .collect::<Vec<_>>()
            .chunks(3)
            .map(<[usize]>::to_vec)
            .collect();
        let names: Vec<String> = (0..3).map(|i| format!("cpu:{i}")).collect();
        let rows = AtomicUsize::new(0);
        let r = run(
            &names,
            |w| {
                Ok(Fake {
                    worker: w,
                    fail_after: None,
                    done: 0,
                    log: &LOG,
                    delay_ms: if w == 0 { 0 } else { 3 },
                })
            },
            &s,
            &batches,
            &no_check,
            |n, _| {
                rows.fetch_add(n, Ordering::Relaxed);
            },
        )
        .unwrap();
        assert!(r.failures.is_empty());
        assert_eq!(rows.load(Ordering::Relaxed), 37);
        for (i, p) in r.probs.iter().enumerate() {
            assert_eq!(p.unwrap(), expect(i), "sequence {i}");
        }
        // Dynamic hand-out: the fast worker took more batches than the slow ones.
        let per: Vec<usize> = r.workers.iter().map(|w| w.batches).collect();
        assert_eq!(per.iter().sum::<usize>(), batches.len());
        assert!(per[0] > per[1] && per[0] > per[2], "{per:?}");
    }

    #[test]
    fn a_failing_worker_hands_its_batch_to_the_others() {
        static LOG: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
        let s = seqs(20);
        let batches: Vec<Vec<usize>> = (0..20)
            .collect::<Vec<_>>()
            .chunks(2)
            .map(<[usize]>::to_vec)
            .collect();
        let names: Vec<String> = (0..2).map(|i| format!("cuda:{i}")).collect();
        let r = run(
            &names,
            |w| {
                Ok(Fake {
                    worker: w,
                    fail_after: (w == 1).then_some(1),
                    done: 0,
                    log: &LOG,
                    delay_ms: 1,
                })
            },
            &s,
            &batches,
            &no_check,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].worker, "cuda:1");
        assert!(r.failures[0].error.contains("device lost"));
        assert_eq!(r.failures[0].held.len(), 2);
        assert!(
            r.missing().is_empty(),
            "the survivor scored the returned batch"
        );
        for (i, p) in r.probs.iter().enumerate() {
            assert_eq!(p.unwrap(), expect(i));
        }
    }

    #[test]
    fn when_every_worker_fails_the_finished_rows_are_kept() {
        static LOG: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
        let s = seqs(12);
        let batches: Vec<Vec<usize>> = (0..12)
            .collect::<Vec<_>>()
            .chunks(2)
            .map(<[usize]>::to_vec)
            .collect();
        let names = vec!["cuda:0".to_string(), "cuda:1".to_string()];
        let r = run(
            &names,
            |w| {
                if w == 1 {
                    panic!("no such device");
                }
                Ok(Fake {
                    worker: w,
                    fail_after: Some(2),
                    done: 0,
                    log: &LOG,
                    delay_ms: 0,
                })
            },
            &s,
            &batches,
            &no_check,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(r.failures.len(), 2);
        let load = r.failures.iter().find(|f| f.worker == "cuda:1").unwrap();
        assert!(load.error.contains("no such device") && load.held.is_empty());
        let done: Vec<usize> = (0..12).filter(|&i| r.probs[i].is_some()).collect();
        assert_eq!(
            done,
            vec![0, 1, 2, 3],
            "two batches finished before the failure"
        );
        assert_eq!(r.missing().len(), 8);
    }

    #[test]
    fn a_validation_error_stops_the_run() {
        static LOG: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
        let s = seqs(6);
        let batches = vec![vec![0, 1], vec![2, 3], vec![4, 5]];
        let names = vec!["cpu:0".to_string()];
        let e = run(
            &names,
            |w| {
                Ok(Fake {
                    worker: w,
                    fail_after: None,
                    done: 0,
                    log: &LOG,
                    delay_ms: 0,
                })
            },
            &s,
            &batches,
            &|idx: &[usize], _: &[[f64; 3]]| {
                if idx.contains(&3) {
                    Err(Error::Msg("row 4: non-finite".into()))
                } else {
                    Ok(())
                }
            },
            |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("non-finite"));
    }
}

//! The `dist` module on the CPU: the in-process thread group (sums in rank order, bit-identical
//! on every rank; broadcast, host sums, barrier; a rank that leaves, aborts or never arrives
//! makes the others fail instead of hanging; mismatched calls are reported), `Solo`, the launch
//! variables (every good and bad case, errors naming the variable) and the TCP rendezvous
//! (payload delivered to every rank, and each way a launch can be wrong: fingerprint, world
//! size, duplicate rank, a missing root, a missing rank, a foreign server on the port).
//!
//! Every test that waits on other threads runs under a deadline, so a hang fails the test.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use engine::dist::{
    Collective, LaunchEnv, Solo, rendezvous, thread_group, thread_group_with_timeout,
};
use engine::tensor::{CpuStorage, DType, Tensor};

/// Run `f` on its own thread; fail the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung: no result within {secs}s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("the test thread ended without a result"),
        },
    }
}

/// Odd shapes, including a scalar-like and an empty tensor.
const SHAPES: [&[usize]; 5] = [&[7], &[3, 5], &[1], &[0], &[2, 3, 11]];

/// Rank `r`'s tensors: values of very different magnitudes, so the order of the additions
/// shows in the bits.
fn rank_tensors(r: usize) -> Vec<Tensor> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n: usize = shape.iter().product();
            let scale = [1.0f32, 1e-3, 1e4, 0.5][(r + i) % 4];
            let mut v = common::rand_vec(n, (r * 31 + i) as u64 + 1, scale);
            if let Some(x) = v.first_mut() {
                *x = if r == 0 { -0.0 } else { *x };
            }
            Tensor::from_f32(v, shape).unwrap()
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.as_f32_slice()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn thread_group_sums_in_rank_order_bit_identically() {
    within(60, || {
        for n in 1..=4 {
            // The reference: ((x0 + x1) + x2) + x3, element by element, starting from x0.
            let inputs: Vec<Vec<Tensor>> = (0..n).map(rank_tensors).collect();
            let want: Vec<Vec<u32>> = (0..SHAPES.len())
                .map(|i| {
                    let mut acc = inputs[0][i].as_f32_slice().unwrap().to_vec();
                    for rank in &inputs[1..] {
                        for (a, b) in acc.iter_mut().zip(rank[i].as_f32_slice().unwrap()) {
                            *a += *b;
                        }
                    }
                    acc.iter().map(|x| x.to_bits()).collect()
                })
                .collect();
            let results: Vec<Vec<Tensor>> = std::thread::scope(|s| {
                let handles: Vec<_> = thread_group(n)
                    .into_iter()
                    .zip(&inputs)
                    .map(|(rank, ts)| {
                        s.spawn(move || {
                            assert_eq!(rank.world(), n);
                            // Two rounds: the group is reusable.
                            let first = rank.all_reduce_sum(ts).unwrap();
                            let second = rank.all_reduce_sum(ts).unwrap();
                            for (a, b) in first.iter().zip(&second) {
                                assert_eq!(bits(a), bits(b), "rounds differ");
                            }
                            first
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, outs) in results.iter().enumerate() {
                assert_eq!(outs.len(), SHAPES.len());
                for (i, t) in outs.iter().enumerate() {
                    assert_eq!(t.shape(), SHAPES[i], "n={n} rank {r} tensor {i}: shape");
                    assert_eq!(t.dtype(), DType::F32);
                    assert_eq!(bits(t), want[i], "n={n} rank {r} tensor {i}: bits");
                }
            }
            if n == 1 {
                // One rank: the input itself, -0.0 included.
                for (t, x) in results[0].iter().zip(&inputs[0]) {
                    assert_eq!(bits(t), bits(x));
                }
            }
            // The order matters for these values: a different order gives different bits
            // somewhere (which is why the rank order is fixed).
            if n == 4 {
                let i = 4;
                let mut rev = inputs[3][i].as_f32_slice().unwrap().to_vec();
                for r in (0..3).rev() {
                    for (a, b) in rev.iter_mut().zip(inputs[r][i].as_f32_slice().unwrap()) {
                        *a += *b;
                    }
                }
                let rev: Vec<u32> = rev.iter().map(|x| x.to_bits()).collect();
                assert_ne!(rev, want[i], "test values too tame to show the order");
            }
        }
    });
}

#[test]
fn thread_group_broadcasts_from_a_nonzero_root() {
    within(30, || {
        let n = 3;
        let root = 2;
        let shapes: [&[usize]; 3] = [&[5], &[3, 3], &[0]];
        let make = |r: usize| -> Vec<Tensor> {
            let mut ts: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let k: usize = s.iter().product();
                    Tensor::from_f32(common::rand_vec(k, (r * 7 + i) as u64, 2.0), s).unwrap()
                })
                .collect();
            // A bf16 tensor too: broadcast keeps dtypes.
            let bf =
                CpuStorage::F32(common::rand_vec(9, r as u64 + 100, 1.0)).to_dtype(DType::BF16);
            ts.push(Tensor::from_cpu(bf, &[9]).unwrap());
            ts
        };
        let want = make(root);
        let results: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = thread_group(n)
                .into_iter()
                .map(|rank| {
                    let mine = make(rank.rank());
                    s.spawn(move || rank.broadcast(&mine, root).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, outs) in results.iter().enumerate() {
            for (i, (got, want)) in outs.iter().zip(&want).enumerate() {
                assert_eq!(got.shape(), want.shape(), "rank {r} tensor {i}");
                assert_eq!(got.dtype(), want.dtype(), "rank {r} tensor {i}");
                assert_eq!(
                    got.cpu_storage().unwrap().as_bytes(),
                    want.cpu_storage().unwrap().as_bytes(),
                    "rank {r} tensor {i}"
                );
            }
        }
        // A root outside the group is a usage error, on every rank, before any waiting.
        let g = thread_group(2);
        let err = g[0].broadcast(&[], 2).unwrap_err().to_string();
        assert!(err.contains("rank 2") && err.contains("2 rank"), "{err}");
    });
}

#[test]
fn thread_group_sums_host_values_and_barriers() {
    within(30, || {
        let n = 4;
        let arrived = AtomicUsize::new(0);
        let results: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = thread_group(n)
                .into_iter()
                .map(|rank| {
                    let arrived = &arrived;
                    s.spawn(move || {
                        for round in 0..5 {
                            arrived.fetch_add(1, Ordering::SeqCst);
                            rank.barrier().unwrap();
                            // Nobody leaves a barrier before everyone reached it.
                            assert!(arrived.load(Ordering::SeqCst) >= (round + 1) * n);
                            rank.barrier().unwrap();
                        }
                        let r = rank.rank() as f64;
                        assert!(rank.all_reduce_host(&[]).unwrap().is_empty());
                        rank.all_reduce_host(&[r, 1.5, 1e-3 * r, -r * r]).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = {
            let mut acc = vec![0.0, 1.5, 0.0, -0.0];
            for r in 1..n {
                let r = r as f64;
                for (a, b) in acc.iter_mut().zip([r, 1.5, 1e-3 * r, -r * r]) {
                    *a += b;
                }
            }
            acc
        };
        for got in &results {
            let g: Vec<u64> = got.iter().map(|x| x.to_bits()).collect();
            let w: Vec<u64> = want.iter().map(|x| x.to_bits()).collect();
            assert_eq!(g, w);
        }
        assert_eq!(
            [results[0][0], results[0][1], results[0][3]],
            [6.0, 6.0, -14.0]
        );
    });
}

#[test]
fn thread_group_rank_that_returns_or_panics_fails_the_others() {
    for panics in [false, true] {
        let errors = within(30, move || {
            std::thread::scope(|s| {
                let handles: Vec<_> = thread_group(3)
                    .into_iter()
                    .map(|rank| {
                        s.spawn(move || {
                            if rank.rank() == 2 {
                                // Sleep so the others are already waiting when it goes.
                                std::thread::sleep(Duration::from_millis(50));
                                if panics {
                                    panic!("rank 2 fails on purpose");
                                }
                                return None;
                            }
                            let t = Tensor::from_f32(vec![1.0; 3], &[3]).unwrap();
                            let first = rank.all_reduce_sum(&[t]).map(|_| ());
                            // Later calls fail too, at once.
                            let later = rank.barrier();
                            Some((first, later))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
            })
        });
        for (r, e) in errors.into_iter().enumerate() {
            if r == 2 {
                assert_eq!(e.is_err(), panics, "rank 2's own outcome");
                continue;
            }
            let (first, later) = e.unwrap().unwrap();
            let msg = first.unwrap_err().to_string();
            let how = if panics { "panicked" } else { "dropped" };
            assert!(msg.contains("rank 2 left") && msg.contains(how), "{msg}");
            assert!(later.unwrap_err().to_string().contains("rank 2 left"));
        }
    }
}

#[test]
fn thread_group_abort_wakes_the_waiting_ranks() {
    let msgs = within(30, || {
        std::thread::scope(|s| {
            let handles: Vec<_> = thread_group(3)
                .into_iter()
                .map(|rank| {
                    s.spawn(move || {
                        if rank.rank() == 1 {
                            std::thread::sleep(Duration::from_millis(50));
                            rank.abort();
                            rank.abort(); // idempotent
                            // Its own later calls fail too; the handle stays alive meanwhile.
                            let own = rank.barrier().unwrap_err().to_string();
                            std::thread::sleep(Duration::from_millis(50));
                            return own;
                        }
                        rank.all_reduce_host(&[1.0]).unwrap_err().to_string()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    });
    for m in msgs {
        assert!(m.contains("rank 1 aborted the group"), "{m}");
    }
    // Solo has nobody to wake: abort is a no-op.
    Solo.abort();
    Solo.barrier().unwrap();
}

#[test]
fn thread_group_times_out_on_a_rank_that_never_arrives() {
    let msg = within(30, || {
        let mut g = thread_group_with_timeout(3, Duration::from_millis(200));
        // Ranks 1 and 2 stay alive (held here) but never call.
        let r0 = g.remove(0);
        let msg = r0.barrier().unwrap_err().to_string();
        // The group is broken for everyone from now on.
        let again = g[0].all_reduce_host(&[1.0]).unwrap_err().to_string();
        assert!(again.contains("broken"), "{again}");
        drop(g);
        msg
    });
    assert!(
        msg.contains("never arrived") && msg.contains("1, 2") && msg.contains("barrier"),
        "{msg}"
    );
}

#[test]
fn thread_group_reports_mismatched_calls() {
    within(30, || {
        let run = |f: fn(usize, &engine::dist::ThreadRank) -> String| -> Vec<String> {
            std::thread::scope(|s| {
                let handles: Vec<_> = thread_group(2)
                    .into_iter()
                    .map(|rank| s.spawn(move || f(rank.rank(), &rank)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        // Different collectives.
        for m in run(|r, g| {
            if r == 0 {
                g.barrier().unwrap_err().to_string()
            } else {
                g.all_reduce_host(&[1.0]).unwrap_err().to_string()
            }
        }) {
            assert!(
                m.contains("all_reduce_host") && m.contains("barrier"),
                "{m}"
            );
        }
        // Different shapes.
        for m in run(|r, g| {
            let t = Tensor::from_f32(vec![0.0; 3 + r], &[3 + r]).unwrap();
            g.all_reduce_sum(&[t]).unwrap_err().to_string()
        }) {
            assert!(m.contains("[3]") && m.contains("[4]"), "{m}");
        }
        // Different lengths of host vectors.
        for m in run(|r, g| {
            g.all_reduce_host(&vec![1.0; 1 + r])
                .unwrap_err()
                .to_string()
        }) {
            assert!(m.contains("1 value") && m.contains("passed 2"), "{m}");
        }
        // Different roots.
        for m in run(|r, g| g.broadcast(&[], r).unwrap_err().to_string()) {
            assert!(
                m.contains("from rank 0") && m.contains("from rank 1"),
                "{m}"
            );
        }
        // Only f32 is summed (checked before any waiting).
        let g = thread_group(1);
        let bf = Tensor::from_cpu(CpuStorage::BF16(vec![half::bf16::ONE; 2]), &[2]).unwrap();
        let m = g[0].all_reduce_sum(&[bf]).unwrap_err().to_string();
        assert!(m.contains("bf16") && m.contains("f32"), "{m}");
    });
}

#[test]
fn solo_is_the_identity() {
    let s = Solo;
    assert_eq!((s.rank(), s.world()), (0, 1));
    let ts = rank_tensors(3);
    for (a, b) in s.all_reduce_sum(&ts).unwrap().iter().zip(&ts) {
        assert_eq!(bits(a), bits(b));
    }
    for (a, b) in s.broadcast(&ts, 0).unwrap().iter().zip(&ts) {
        assert_eq!(bits(a), bits(b));
    }
    assert!(s.broadcast(&ts, 1).is_err());
    assert_eq!(s.all_reduce_host(&[1.5, -0.25]).unwrap(), vec![1.5, -0.25]);
    s.barrier().unwrap();
    // A collective works through a trait object, as the trainer holds it.
    let boxed: Box<dyn Collective> = Box::new(Solo);
    assert_eq!(boxed.world(), 1);
}

// ---- launch variables ----

fn parse(vars: &[(&str, &str)]) -> engine::Result<Option<LaunchEnv>> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LaunchEnv::from_vars(|name| map.get(name).cloned())
}

const TORCHRUN: [(&str, &str); 7] = [
    ("WORLD_SIZE", "4"),
    ("RANK", "3"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "2"),
    ("MASTER_ADDR", "node0.cluster"),
    ("MASTER_PORT", "29500"),
    ("TORCHELASTIC_RUN_ID", "abc"),
];

#[test]
fn launch_env_parses_good_settings() {
    assert_eq!(parse(&[]).unwrap(), None);
    // One rank needs nothing else.
    let one = parse(&[("WORLD_SIZE", "1")]).unwrap().unwrap();
    assert_eq!(one, LaunchEnv::single());
    assert_eq!((one.rank, one.world, one.local_rank), (0, 1, 0));
    // torchrun: the rendezvous moves to MASTER_PORT + 1.
    let e = parse(&TORCHRUN).unwrap().unwrap();
    assert_eq!((e.rank, e.world, e.local_rank), (3, 4, 1));
    assert_eq!(e.master_addr, "node0.cluster");
    assert_eq!((e.master_port, e.rdzv_port), (29500, 29501));
    assert_eq!(e.rdzv_timeout, engine::dist::DEFAULT_RDZV_TIMEOUT);
    let agent = [
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", " 1234 "),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ];
    assert_eq!(parse(&agent).unwrap().unwrap().rdzv_port, 1235);
    // A hand launch: the rendezvous uses MASTER_PORT itself.
    let hand = parse(&agent[..5]).unwrap().unwrap();
    assert_eq!((hand.master_port, hand.rdzv_port), (1234, 1234));
    // ENGINE_RDZV_PORT wins; ENGINE_RDZV_TIMEOUT in seconds.
    let mut v = TORCHRUN.to_vec();
    v.push(("ENGINE_RDZV_PORT", "40000"));
    v.push(("ENGINE_RDZV_TIMEOUT", "2.5"));
    let e = parse(&v).unwrap().unwrap();
    assert_eq!(e.rdzv_port, 40000);
    assert_eq!(e.rdzv_timeout, Duration::from_millis(2500));
}

#[test]
fn launch_env_errors_name_the_variable() {
    let with = |changes: &[(&'static str, Option<&'static str>)]| {
        let mut v: Vec<(&str, &str)> = TORCHRUN.to_vec();
        for (k, val) in changes {
            v.retain(|(name, _)| name != k);
            if let Some(val) = val {
                v.push((k, val));
            }
        }
        parse(&v).unwrap_err().to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (with(&[("WORLD_SIZE", Some("four"))]), "WORLD_SIZE=`four`"),
        (with(&[("WORLD_SIZE", Some(""))]), "WORLD_SIZE"),
        (with(&[("WORLD_SIZE", Some("0"))]), "WORLD_SIZE=0"),
        (
            with(&[("RANK", Some("4"))]),
            "RANK=4 is not below WORLD_SIZE=4",
        ),
        (with(&[("RANK", Some("-1"))]), "RANK=`-1`"),
        (with(&[("RANK", None)]), "RANK is not set"),
        (with(&[("LOCAL_RANK", None)]), "LOCAL_RANK is not set"),
        (with(&[("LOCAL_RANK", Some("x"))]), "LOCAL_RANK=`x`"),
        (
            with(&[("LOCAL_RANK", Some("2"))]),
            "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
        ),
        (
            with(&[("LOCAL_WORLD_SIZE", Some("5"))]),
            "LOCAL_WORLD_SIZE=5",
        ),
        (with(&[("MASTER_ADDR", None)]), "MASTER_ADDR is not set"),
        (with(&[("MASTER_ADDR", Some(" "))]), "MASTER_ADDR is empty"),
        (with(&[("MASTER_PORT", None)]), "MASTER_PORT is not set"),
        (
            with(&[("MASTER_PORT", Some("70000"))]),
            "MASTER_PORT=`70000`",
        ),
        (with(&[("MASTER_PORT", Some("http"))]), "MASTER_PORT=`http`"),
        (with(&[("MASTER_PORT", Some("65535"))]), "MASTER_PORT=65535"),
        (
            with(&[("ENGINE_RDZV_PORT", Some("0"))]),
            "ENGINE_RDZV_PORT=`0`",
        ),
        (
            with(&[("ENGINE_RDZV_TIMEOUT", Some("-3"))]),
            "ENGINE_RDZV_TIMEOUT=`-3`",
        ),
        (
            with(&[("ENGINE_RDZV_TIMEOUT", Some("soon"))]),
            "ENGINE_RDZV_TIMEOUT=`soon`",
        ),
    ];
    for (msg, want) in cases {
        assert!(msg.contains(want), "expected `{want}` in: {msg}");
        assert!(msg.starts_with("launch environment: "), "{msg}");
    }
    // One rank: checked too when given.
    let msg = parse(&[("WORLD_SIZE", "1"), ("RANK", "1")])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("RANK=1 is not below WORLD_SIZE=1"), "{msg}");
}

// ---- rendezvous ----

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local_env(rank: usize, world: usize, port: u16) -> LaunchEnv {
    LaunchEnv {
        rank,
        world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rdzv_port: port,
        rdzv_timeout: Duration::from_secs(10),
    }
}

/// Run one rendezvous per (env, fingerprint) on its own thread, each with its env's timeout;
/// rank 0 starts `root_delay` after the others. Returns each rank's payload or error text.
fn run_rendezvous(
    ranks: Vec<(LaunchEnv, u64)>,
    root_delay: Duration,
) -> Vec<Result<Vec<u8>, String>> {
    within(60, move || {
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|(env, fp)| {
                    s.spawn(move || {
                        let payload = if env.rank == 0 {
                            std::thread::sleep(root_delay);
                            Some(b"the payload: 128 bytes in real life".to_vec())
                        } else {
                            None
                        };
                        rendezvous(&env, fp, payload, env.rdzv_timeout).map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    })
}

#[test]
fn rendezvous_hands_rank_0_payload_to_every_rank() {
    let port = free_port();
    // The peers start first and retry until rank 0 listens.
    let ranks = (0..4).map(|r| (local_env(r, 4, port), 42)).collect();
    let out = run_rendezvous(ranks, Duration::from_millis(300));
    for (r, o) in out.into_iter().enumerate() {
        assert_eq!(
            o.unwrap_or_else(|e| panic!("rank {r}: {e}")),
            b"the payload: 128 bytes in real life"
        );
    }
    // One rank: no network at all.
    let one = rendezvous(&LaunchEnv::single(), 1, Some(vec![7]), Duration::ZERO).unwrap();
    assert_eq!(one, vec![7]);
    // Rank 0 must bring the payload.
    let e = rendezvous(&local_env(0, 2, port), 1, None, Duration::from_millis(10));
    assert!(e.unwrap_err().to_string().contains("payload"));
}

#[test]
fn rendezvous_rejects_a_different_fingerprint_on_both_sides() {
    let port = free_port();
    let out = run_rendezvous(
        vec![
            (local_env(0, 2, port), 0xabc),
            (local_env(1, 2, port), 0xdef),
        ],
        Duration::ZERO,
    );
    for o in &out {
        let e = o.as_ref().unwrap_err();
        assert!(
            e.contains("fingerprint") && e.contains("0000000000000abc") && e.contains("def"),
            "{e}"
        );
    }
    assert!(out[1].as_ref().unwrap_err().contains("refused rank 1"));
}

#[test]
fn rendezvous_rejects_a_different_world_size() {
    let port = free_port();
    let out = run_rendezvous(
        vec![(local_env(0, 2, port), 5), (local_env(1, 3, port), 5)],
        Duration::ZERO,
    );
    for o in &out {
        let e = o.as_ref().unwrap_err();
        assert!(
            e.contains("WORLD_SIZE=3") && e.contains("WORLD_SIZE=2"),
            "{e}"
        );
    }
}

#[test]
fn rendezvous_rejects_a_duplicate_rank() {
    let port = free_port();
    let out = run_rendezvous(
        vec![
            (local_env(0, 3, port), 5),
            (local_env(1, 3, port), 5),
            (local_env(1, 3, port), 5),
        ],
        Duration::from_millis(200),
    );
    for o in &out {
        let e = o.as_ref().unwrap_err();
        assert!(
            e.contains("rank 1 arrived twice") && e.contains("RANK=1"),
            "{e}"
        );
    }
}

#[test]
fn rendezvous_times_out_when_rank_0_never_comes() {
    let port = free_port();
    let start = std::time::Instant::now();
    let e = rendezvous(&local_env(1, 2, port), 5, None, Duration::from_millis(400))
        .unwrap_err()
        .to_string();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        e.contains("rank 1 could not reach rank 0")
            && e.contains(&format!("127.0.0.1:{port}"))
            && e.contains("0.4s"),
        "{e}"
    );
}

#[test]
fn rendezvous_rank_0_names_the_ranks_that_never_arrived() {
    let port = free_port();
    let mut root = local_env(0, 4, port);
    root.rdzv_timeout = Duration::from_millis(800);
    let out = run_rendezvous(vec![(root, 5), (local_env(2, 4, port), 5)], Duration::ZERO);
    let e = out[0].as_ref().unwrap_err();
    assert!(e.contains("rank(s) 1, 3 of 4 never arrived"), "{e}");
    // The rank that did come is told, instead of waiting out its own timeout.
    let e = out[1].as_ref().unwrap_err();
    assert!(e.contains("gave up") && e.contains("1, 3"), "{e}");
}

#[test]
fn rendezvous_detects_a_foreign_server_on_the_port() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = within(30, move || {
        rendezvous(&local_env(1, 2, port), 5, None, Duration::from_secs(5))
            .unwrap_err()
            .to_string()
    });
    server.join().unwrap();
    assert!(e.contains("not rank 0's rendezvous"), "{e}");
}

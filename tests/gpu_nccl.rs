//! NCCL collectives end to end on real GPUs: a one-rank communicator built both ways
//! (`nccl_group(&[0])`, and `nccl_from_env` with `WORLD_SIZE=1`) runs all_reduce_sum,
//! broadcast, all_reduce_host and barrier with the values checked bit for bit (a sum over one
//! rank is the input), over odd sizes, an empty tensor and more tensors than one NCCL group
//! holds; with two GPUs, two ranks in one process (one thread each) both ways, the second
//! through a TCP rendezvous on 127.0.0.1, and an abort by one rank waking the other from a
//! collective it waits in. After `abort` every collective fails. Outputs start poisoned
//! (NaN), so an element NCCL did not write fails.
//!
//! Without a GPU or without NCCL every test prints `SKIPPED <test>: <why>`. NCCL usually
//! exists only as `libnccl.so.2` (PyTorch's `nvidia-nccl-cu*` wheel), a name cudarc does
//! not try: then each test reruns itself in a child process with a `libnccl.so` link to it
//! on `LD_LIBRARY_PATH`, and passes only if the child passes.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use engine::dist::{
    Collective, LaunchEnv, nccl_availability, nccl_from_env, nccl_group, nccl_library_candidates,
    nccl_version,
};
use engine::tensor::{CpuStorage, DType, Device, Tensor};

/// Set in the child process that runs with the `libnccl.so` link.
const CHILD: &str = "ENGINE_TEST_NCCL_LINKED";

fn skip(test: &str, why: &str) {
    // Straight to the process's stderr: the harness captures print! output of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Rerun `test` in a child process that finds `lib` as `libnccl.so`; panic unless it passes.
fn rerun_linked(test: &str, lib: &Path) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::os::unix::fs::symlink(lib, dir.path().join("libnccl.so")).expect("a symlink");
    let mut path = dir.path().as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: NCCL is only {}; rerunning with LD_LIBRARY_PATH={} (libnccl.so -> it)",
        lib.display(),
        dir.path().display()
    );
    let status = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", path)
        .env(CHILD, "1")
        .status()
        .expect("the test binary reruns");
    assert!(status.success(), "{test} failed in the child process");
}

/// The number of GPUs when GPUs and NCCL can be used here; `None` after printing why not (or
/// after the test passed in a child process that could load NCCL).
fn ready(test: &str) -> Option<usize> {
    let count = match engine::cuda::availability() {
        Ok(n) => n,
        Err(why) => {
            skip(test, &format!("no GPU ({why})"));
            return None;
        }
    };
    match nccl_availability() {
        Ok(()) => Some(count),
        Err(why) => {
            if std::env::var_os(CHILD).is_none()
                && let Some(lib) = nccl_library_candidates().first()
            {
                rerun_linked(test, lib);
                return None;
            }
            skip(test, &format!("no NCCL ({why})"));
            None
        }
    }
}

fn gpu(ordinal: usize) -> Device {
    let d = engine::cuda::device(ordinal).expect("a visible GPU opens");
    d.set_poison(true);
    Device::Cuda(ordinal)
}

/// Odd sizes, an empty tensor, and (on rank 0) -0.0 / subnormal / huge values: a one-rank
/// sum must keep every bit; with two ranks the other addend is normal, so even a kernel that
/// flushes subnormals gives the host's bits.
const SHAPES: [&[usize]; 5] = [&[7], &[3, 5], &[1], &[0], &[2, 3, 11]];

fn host_tensors(rank: usize) -> Vec<Tensor> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let n: usize = shape.iter().product();
            let mut v = common::rand_vec(n, (rank * 31 + i) as u64 + 1, [1.0, 1e-3, 1e4][i % 3]);
            for (j, special) in [-0.0f32, 1e-42, -3.0e38].into_iter().enumerate() {
                if j < v.len() && i % 2 == 0 && rank == 0 {
                    v[j] = special;
                }
            }
            Tensor::from_f32(v, shape).unwrap()
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn to(ts: &[Tensor], d: Device) -> Vec<Tensor> {
    ts.iter().map(|t| t.to_device(d).unwrap()).collect()
}

/// Every collective of a one-rank communicator on `d`, values checked bit for bit.
fn check_one_rank(c: &dyn Collective, d: Device) {
    assert_eq!((c.rank(), c.world()), (0, 1));
    let host = host_tensors(0);
    let ts = to(&host, d);
    let sums = c.all_reduce_sum(&ts).unwrap();
    assert_eq!(sums.len(), ts.len());
    for (i, (s, h)) in sums.iter().zip(&host).enumerate() {
        assert_eq!(s.device(), d, "tensor {i}: device");
        assert_eq!(s.shape(), h.shape(), "tensor {i}: shape");
        assert_ne!(s.id(), ts[i].id(), "tensor {i}: a new tensor");
        assert_eq!(bits(s), bits(h), "tensor {i}: a one-rank sum is the input");
    }

    // More tensors than one NCCL group holds.
    let many_host: Vec<Tensor> = (0..600)
        .map(|i| {
            Tensor::from_f32(common::rand_vec(i % 13 + 1, i as u64, 3.0), &[i % 13 + 1]).unwrap()
        })
        .collect();
    let many = c.all_reduce_sum(&to(&many_host, d)).unwrap();
    for (i, (s, h)) in many.iter().zip(&many_host).enumerate() {
        assert_eq!(bits(s), bits(h), "tensor {i} of 600");
    }

    // Broadcast keeps dtypes and bytes.
    let bf = Tensor::from_cpu(
        CpuStorage::F32(common::rand_vec(11, 9, 2.0)).to_dtype(DType::BF16),
        &[11],
    )
    .unwrap();
    let mut bcast_host = host.clone();
    bcast_host.push(bf);
    let got = c.broadcast(&to(&bcast_host, d), 0).unwrap();
    for (i, (g, h)) in got.iter().zip(&bcast_host).enumerate() {
        assert_eq!(
            (g.dtype(), g.shape(), g.device()),
            (h.dtype(), h.shape(), d),
            "tensor {i}"
        );
        assert_eq!(
            g.to_cpu().unwrap().cpu_storage().unwrap().as_bytes(),
            h.cpu_storage().unwrap().as_bytes(),
            "broadcast tensor {i}"
        );
    }

    let v = [1.5, -2.0, 1e300, -0.0, 5e-324];
    let got = c.all_reduce_host(&v).unwrap();
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(c.all_reduce_host(&[]).unwrap().is_empty());
    c.barrier().unwrap();

    // Misuse is an error, not a crash.
    let cpu = Tensor::from_f32(vec![1.0; 3], &[3]).unwrap();
    let e = c.all_reduce_sum(&[cpu]).unwrap_err().to_string();
    assert!(e.contains("cpu") && e.contains("cuda"), "{e}");
    let e = c
        .all_reduce_sum(&to(&bcast_host[5..], d))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bf16"), "{e}");
    assert!(c.broadcast(&ts, 1).is_err());
}

/// After `abort`, every collective fails (and dropping the rank afterwards is fine).
fn check_aborted(c: &dyn Collective, d: Device) {
    c.abort();
    c.abort();
    let ts = to(&host_tensors(0), d);
    for e in [
        c.all_reduce_sum(&ts).map(|_| ()),
        c.broadcast(&ts, 0).map(|_| ()),
        c.all_reduce_host(&[1.0]).map(|_| ()),
        c.barrier(),
    ] {
        let e = e.unwrap_err().to_string();
        assert!(e.contains("aborted"), "{e}");
    }
}

#[test]
fn nccl_loads_through_a_libnccl_so_link() {
    // Needs no GPU: only the library.
    let test = "nccl_loads_through_a_libnccl_so_link";
    match nccl_availability() {
        Ok(()) => {
            let v = nccl_version().unwrap();
            let _ = writeln!(std::io::stderr(), "{test}: NCCL {v}");
            assert!(v.starts_with("2."), "{v}");
        }
        Err(why) => {
            assert!(
                why.contains("libnccl.so.2") && why.contains("LD_LIBRARY_PATH"),
                "{why}"
            );
            assert!(
                std::env::var_os(CHILD).is_none(),
                "NCCL still does not load through the link: {why}"
            );
            match nccl_library_candidates().first() {
                Some(lib) => rerun_linked(test, lib),
                None => skip(test, "no NCCL library on this machine"),
            }
        }
    }
}

#[test]
fn nccl_one_rank_group() {
    let test = "nccl_one_rank_group";
    if ready(test).is_none() {
        return;
    }
    let d = gpu(0);
    let ranks = nccl_group(&[0]).unwrap();
    assert_eq!(ranks.len(), 1);
    check_one_rank(&ranks[0], d);
    check_aborted(&ranks[0], d);
    drop(ranks);
    // A GPU listed twice is refused before NCCL sees it.
    let e = nccl_group(&[0, 0]).unwrap_err().to_string();
    assert!(e.contains("cuda:0 is listed twice"), "{e}");
}

#[test]
fn nccl_one_rank_from_env() {
    let test = "nccl_one_rank_from_env";
    if ready(test).is_none() {
        return;
    }
    let d = gpu(0);
    let port = free_port().to_string();
    let env = LaunchEnv::from_vars(|name| {
        Some(match name {
            "WORLD_SIZE" => "1".to_string(),
            "RANK" | "LOCAL_RANK" => "0".to_string(),
            "MASTER_ADDR" => "127.0.0.1".to_string(),
            "MASTER_PORT" => port.clone(),
            _ => return None,
        })
    })
    .unwrap()
    .unwrap();
    let rank = nccl_from_env(&env, env.local_rank, 0x5eed).unwrap();
    check_one_rank(&rank, d);
    check_aborted(&rank, d);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two ranks, one thread each: sums equal a + b bit for bit (two addends commute exactly),
/// identical on both ranks; broadcast from rank 1; host sums; barrier.
fn check_two_ranks(ranks: Vec<engine::dist::NcclRank>) {
    let inputs: Vec<Vec<Tensor>> = (0..2).map(host_tensors).collect();
    let want: Vec<Vec<u32>> = (0..SHAPES.len())
        .map(|i| {
            let a = inputs[0][i].as_f32_slice().unwrap();
            let b = inputs[1][i].as_f32_slice().unwrap();
            a.iter().zip(b).map(|(x, y)| (x + y).to_bits()).collect()
        })
        .collect();
    type Seen = (Vec<Vec<u32>>, Vec<Vec<u8>>, Vec<f64>);
    let (results, ranks): (Vec<Seen>, Vec<_>) = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .enumerate()
            .map(|(r, rank)| {
                let inputs = &inputs;
                s.spawn(move || {
                    let d = Device::Cuda(r);
                    let sums = rank.all_reduce_sum(&to(&inputs[r], d)).unwrap();
                    let b = rank.broadcast(&to(&inputs[r], d), 1).unwrap();
                    let h = rank
                        .all_reduce_host(&[r as f64 + 0.5, 1e-3 * r as f64])
                        .unwrap();
                    rank.barrier().unwrap();
                    let seen: Seen = (
                        sums.iter().map(bits).collect(),
                        b.iter()
                            .map(|t| {
                                t.to_cpu()
                                    .unwrap()
                                    .cpu_storage()
                                    .unwrap()
                                    .as_bytes()
                                    .to_vec()
                            })
                            .collect(),
                        h,
                    );
                    (seen, rank)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    // The communicators go only after both threads are done with them.
    drop(ranks);
    for (r, (sums, bcast, host)) in results.iter().enumerate() {
        assert_eq!(sums, &want, "rank {r}: sums");
        for (i, b) in bcast.iter().enumerate() {
            assert_eq!(
                b.as_slice(),
                inputs[1][i].cpu_storage().unwrap().as_bytes(),
                "rank {r}: broadcast tensor {i}"
            );
        }
        assert_eq!(host, &vec![2.0, 1e-3], "rank {r}: host sums");
    }
}

#[test]
fn nccl_two_ranks_group() {
    let test = "nccl_two_ranks_group";
    let Some(count) = ready(test) else { return };
    if count < 2 {
        skip(test, &format!("needs 2 GPUs, {count} visible"));
        return;
    }
    gpu(0);
    gpu(1);
    check_two_ranks(nccl_group(&[0, 1]).unwrap());
}

#[test]
fn nccl_two_ranks_abort_wakes_the_waiting_rank() {
    let test = "nccl_two_ranks_abort_wakes_the_waiting_rank";
    let Some(count) = ready(test) else { return };
    if count < 2 {
        skip(test, &format!("needs 2 GPUs, {count} visible"));
        return;
    }
    gpu(0);
    gpu(1);
    // Rank 0 waits in collectives rank 1 never joins, and rank 1 aborts instead: first in
    // the group's first collective (a rank that failed to load its model never makes one),
    // then in a large all-reduce after the ranks met once (a rank that failed mid-step). Rank
    // 0 runs on a detached thread, so a hang fails the test instead of hanging it.
    for met_before in [false, true] {
        let mut ranks = nccl_group(&[0, 1]).unwrap().into_iter();
        let (r0, r1) = (ranks.next().unwrap(), ranks.next().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if met_before {
                r0.barrier().unwrap();
                let big = Tensor::zeros(&[1 << 24], DType::F32, gpu(0)).unwrap();
                let _ = tx.send(r0.all_reduce_sum(&[big]).and_then(|_| r0.check()));
            } else {
                let _ = tx.send(r0.all_reduce_host(&[1.0]).map(|_| ()));
            }
        });
        if met_before {
            r1.barrier().unwrap();
        }
        std::thread::sleep(Duration::from_millis(500));
        r1.abort();
        let got = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "rank 0 is still waiting 60s after rank 1 aborted (met before: {met_before})"
                )
            });
        let e = got.unwrap_err().to_string();
        assert!(e.contains("aborted") && e.contains("rank 1"), "{e}");
    }
}

#[test]
fn nccl_two_ranks_from_env_through_the_rendezvous() {
    let test = "nccl_two_ranks_from_env_through_the_rendezvous";
    let Some(count) = ready(test) else { return };
    if count < 2 {
        skip(test, &format!("needs 2 GPUs, {count} visible"));
        return;
    }
    gpu(0);
    gpu(1);
    let port = free_port();
    let ranks: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let env = LaunchEnv {
                        rank: r,
                        world: 2,
                        local_rank: r,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        rdzv_port: port,
                        rdzv_timeout: Duration::from_secs(60),
                    };
                    nccl_from_env(&env, r, 0x5eed).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    check_two_ranks(ranks);
}

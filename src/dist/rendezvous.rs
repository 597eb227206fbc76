//! Out-of-band exchange of one payload (NCCL's unique id) from rank 0 to every other rank,
//! over plain TCP. The protocol and the port rule are described in [`crate::dist`].
//!
//! Wire format (little-endian):
//! - peer → rank 0, *hello*: `MAGIC` (8 bytes), protocol version (u32), rank (u32), world
//!   size (u32), fingerprint (u64);
//! - rank 0 → peer, *reply*: `MAGIC`, status (u8: 0 accepted, 1 rejected), length (u32), then
//!   the payload (accepted) or a UTF-8 explanation (rejected).
//!
//! Rank 0 answers nobody until every rank has arrived and been checked.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::LaunchEnv;
use crate::error::{Error, Result};

const MAGIC: [u8; 8] = *b"ENGRDZV\0";
const VERSION: u32 = 1;
const HELLO_LEN: usize = 8 + 4 + 4 + 4 + 8;
/// Largest payload a peer accepts (NCCL's id is 128 bytes).
const MAX_PAYLOAD: usize = 1 << 20;
const STATUS_OK: u8 = 0;
const STATUS_REJECTED: u8 = 1;

/// Share rank 0's payload with every rank of the launch described by `env`.
///
/// Rank 0 passes `Some(payload)` and gets it back once every other rank has connected with
/// the same world size, protocol version and `fingerprint` (a hash of the job's settings:
/// ranks launched with different settings fail here, loudly, instead of training
/// different models). The other ranks pass `None` (a payload they pass is ignored) and get
/// rank 0's payload. Everything must happen within `timeout`; errors say which ranks never
/// arrived (rank 0) or which address could not be reached (the others). A one-rank launch
/// returns the payload without touching the network.
pub fn rendezvous(
    env: &LaunchEnv,
    fingerprint: u64,
    payload_if_root: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    if env.rank >= env.world {
        crate::bail!(
            Usage,
            "rendezvous: rank {} is not below the world size {}",
            env.rank,
            env.world
        );
    }
    if env.world > u32::MAX as usize {
        crate::bail!(Usage, "rendezvous: world size {} is too large", env.world);
    }
    if env.rank == 0 {
        let Some(payload) = payload_if_root else {
            crate::bail!(
                Usage,
                "rendezvous: rank 0 must provide the payload to share"
            );
        };
        if payload.len() > MAX_PAYLOAD {
            crate::bail!(
                Usage,
                "rendezvous: a {}-byte payload is over the {MAX_PAYLOAD}-byte limit",
                payload.len()
            );
        }
        if env.world == 1 {
            return Ok(payload);
        }
        serve(env, fingerprint, payload, timeout)
    } else {
        join(env, fingerprint, timeout)
    }
}

/// Where rank 0 listens: the loopback address when `MASTER_ADDR` names one, else every
/// interface (a host name may resolve to a different address on the master than on the
/// peers, e.g. Debian's 127.0.1.1 for the machine's own name).
fn listen_addrs(env: &LaunchEnv) -> Vec<SocketAddr> {
    let port = env.rdzv_port;
    let resolved: Vec<SocketAddr> = (env.master_addr.as_str(), port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    if !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback()) {
        return resolved;
    }
    let any_v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let any_v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    if resolved.iter().all(|a| a.is_ipv6()) && !resolved.is_empty() {
        vec![any_v6, any_v4]
    } else {
        vec![any_v4, any_v6]
    }
}

struct Peer {
    stream: TcpStream,
    from: SocketAddr,
}

fn serve(
    env: &LaunchEnv,
    fingerprint: u64,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let addrs = listen_addrs(env);
    let listener = TcpListener::bind(&addrs[..]).map_err(|e| {
        Error::Msg(format!(
            "rendezvous: rank 0 cannot listen on port {} ({}): {e} (is the port in use? \
             set ENGINE_RDZV_PORT to a free port, the same on every rank)",
            env.rdzv_port,
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ))
    })?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| format!("port {}", env.rdzv_port));
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Msg(format!("rendezvous: rank 0 on {local}: {e}")))?;

    let mut peers: Vec<Option<Peer>> = (0..env.world).map(|_| None).collect();
    let mut arrived = 0usize;
    while arrived < env.world - 1 {
        let (stream, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<String> = (1..env.world)
                        .filter(|&r| peers[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    let msg = format!(
                        "rank 0 waited {:.1}s on {local} and rank(s) {} of {} never arrived \
                         (were they launched with MASTER_ADDR={} and the same port {}? a \
                         firewall may block the port)",
                        timeout.as_secs_f64(),
                        missing.join(", "),
                        env.world,
                        env.master_addr,
                        env.rdzv_port
                    );
                    reject_all(&mut peers, &format!("rank 0 gave up: {msg}"));
                    return Err(Error::Msg(format!("rendezvous: {msg}")));
                }
                std::thread::sleep(Duration::from_millis(10).min(deadline - now));
                continue;
            }
            Err(e) => {
                let msg = format!("rank 0 could not accept connections on {local}: {e}");
                reject_all(&mut peers, &format!("rank 0 gave up: {msg}"));
                return Err(Error::Msg(format!("rendezvous: {msg}")));
            }
        };
        let mut stream = stream;
        let hello = match read_hello(&mut stream, deadline) {
            Some(h) => h,
            // Not one of ours (a port scanner, a health check) or stalled: ignore it.
            None => continue,
        };
        let problem = if hello.version != VERSION {
            Some(format!(
                "rank {} (from {from}) speaks rendezvous protocol v{}, rank 0 speaks \
                 v{VERSION}: every rank must run the same engine build",
                hello.rank, hello.version
            ))
        } else if hello.world as usize != env.world {
            Some(format!(
                "rank {} (from {from}) was launched with WORLD_SIZE={}, rank 0 with \
                 WORLD_SIZE={}",
                hello.rank, hello.world, env.world
            ))
        } else if hello.rank == 0 {
            Some(format!(
                "a process at {from} claims rank 0, which rank 0 on {local} already is: two \
                 processes were launched with RANK=0"
            ))
        } else if hello.rank as usize >= env.world {
            Some(format!(
                "rank {} (from {from}) is not below WORLD_SIZE={}",
                hello.rank, env.world
            ))
        } else if let Some(first) = &peers[hello.rank as usize] {
            Some(format!(
                "rank {} arrived twice (from {} and from {from}): two processes were \
                 launched with RANK={}",
                hello.rank, first.from, hello.rank
            ))
        } else if hello.fingerprint != fingerprint {
            Some(format!(
                "rank {} (from {from}) has job fingerprint {:016x}, rank 0 has \
                 {fingerprint:016x}: the ranks were launched with different settings \
                 (model, data, recipe or options)",
                hello.rank, hello.fingerprint
            ))
        } else {
            None
        };
        if let Some(msg) = problem {
            let _ = reply(&mut stream, STATUS_REJECTED, msg.as_bytes(), deadline);
            reject_all(&mut peers, &format!("rank 0 aborted the rendezvous: {msg}"));
            return Err(Error::Usage(format!("rendezvous: {msg}")));
        }
        peers[hello.rank as usize] = Some(Peer { stream, from });
        arrived += 1;
    }

    // Everyone is here and agrees: hand out the payload.
    let mut failures = Vec::new();
    for (rank, peer) in peers.iter_mut().enumerate() {
        if let Some(p) = peer
            && let Err(e) = reply(&mut p.stream, STATUS_OK, &payload, deadline)
        {
            failures.push(format!("rank {rank} at {}: {e}", p.from));
        }
    }
    if !failures.is_empty() {
        crate::bail!(
            Msg,
            "rendezvous: rank 0 could not send the payload to {}",
            failures.join("; ")
        );
    }
    Ok(payload)
}

/// Tell every peer still waiting that the rendezvous failed.
fn reject_all(peers: &mut [Option<Peer>], msg: &str) {
    let soon = Instant::now() + Duration::from_secs(2);
    for p in peers.iter_mut().flatten() {
        let _ = reply(&mut p.stream, STATUS_REJECTED, msg.as_bytes(), soon);
    }
}

struct Hello {
    version: u32,
    rank: u32,
    world: u32,
    fingerprint: u64,
}

fn read_hello(stream: &mut TcpStream, deadline: Instant) -> Option<Hello> {
    stream.set_nonblocking(false).ok()?;
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    stream.set_read_timeout(Some(wait)).ok()?;
    let mut buf = [0u8; HELLO_LEN];
    stream.read_exact(&mut buf).ok()?;
    if buf[..8] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap_or_default());
    Some(Hello {
        version: u32_at(8),
        rank: u32_at(12),
        world: u32_at(16),
        fingerprint: u64::from_le_bytes(buf[20..28].try_into().unwrap_or_default()),
    })
}

fn reply(
    stream: &mut TcpStream,
    status: u8,
    body: &[u8],
    deadline: Instant,
) -> std::io::Result<()> {
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    stream.set_write_timeout(Some(wait))?;
    let mut msg = Vec::with_capacity(13 + body.len());
    msg.extend_from_slice(&MAGIC);
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)?;
    stream.flush()
}

fn join(env: &LaunchEnv, fingerprint: u64, timeout: Duration) -> Result<Vec<u8>> {
    let start = Instant::now();
    let deadline = start + timeout;
    let target = if env.master_addr.contains(':') && !env.master_addr.starts_with('[') {
        format!("[{}]:{}", env.master_addr, env.rdzv_port)
    } else {
        format!("{}:{}", env.master_addr, env.rdzv_port)
    };
    let rank = env.rank;

    // Connect, retrying until rank 0 listens or time runs out.
    let mut last_error = String::from("no attempt finished");
    let mut stream = 'connect: loop {
        match (env.master_addr.as_str(), env.rdzv_port).to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) {
                        Ok(s) => break 'connect s,
                        Err(e) => last_error = format!("{addr}: {e}"),
                    }
                }
            }
            Err(e) => last_error = format!("cannot resolve {}: {e}", env.master_addr),
        }
        let now = Instant::now();
        if now >= deadline {
            crate::bail!(
                Msg,
                "rendezvous: rank {rank} could not reach rank 0 at {target} within {:.1}s \
                 (last error: {last_error}); is rank 0 running, with the same MASTER_ADDR \
                 and port{}?",
                timeout.as_secs_f64(),
                if env.rdzv_port != env.master_port {
                    " (the rendezvous uses MASTER_PORT+1 under torchrun, or ENGINE_RDZV_PORT)"
                } else {
                    ""
                }
            );
        }
        std::thread::sleep(Duration::from_millis(100).min(deadline - now));
    };
    let io = |e: std::io::Error, doing: &str| {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            Error::Msg(format!(
                "rendezvous: rank {rank} reached rank 0 at {target} but got no answer within \
                 {:.1}s: other ranks never arrived, or rank 0 is stuck",
                timeout.as_secs_f64()
            ))
        } else if e.kind() == ErrorKind::UnexpectedEof {
            Error::Msg(format!(
                "rendezvous: rank 0 at {target} closed the connection without answering \
                 rank {rank} (it failed, or another program holds the port)"
            ))
        } else {
            Error::Msg(format!(
                "rendezvous: rank {rank} {doing} rank 0 at {target}: {e}"
            ))
        }
    };

    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(left))
        .and_then(|_| stream.set_read_timeout(Some(left)))
        .map_err(|e| io(e, "could not set up the connection to"))?;
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(env.world as u32).to_le_bytes());
    hello.extend_from_slice(&fingerprint.to_le_bytes());
    stream
        .write_all(&hello)
        .and_then(|_| stream.flush())
        .map_err(|e| io(e, "could not send its hello to"))?;

    let mut head = [0u8; 13];
    stream
        .read_exact(&mut head)
        .map_err(|e| io(e, "got no answer from"))?;
    if head[..8] != MAGIC {
        crate::bail!(
            Msg,
            "rendezvous: the program listening on {target} is not rank 0's rendezvous (another \
             service holds the port? under torchrun the rendezvous uses MASTER_PORT+1; set \
             ENGINE_RDZV_PORT to a free port)"
        );
    }
    let len = u32::from_le_bytes([head[9], head[10], head[11], head[12]]) as usize;
    if len > MAX_PAYLOAD {
        crate::bail!(
            Msg,
            "rendezvous: rank 0 at {target} announced a {len}-byte answer (over the \
             {MAX_PAYLOAD}-byte limit)"
        );
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(|e| io(e, "lost the answer from"))?;
    match head[8] {
        STATUS_OK => Ok(body),
        STATUS_REJECTED => Err(Error::Usage(format!(
            "rendezvous: rank 0 at {target} refused rank {rank}: {}",
            String::from_utf8_lossy(&body)
        ))),
        s => Err(Error::Msg(format!(
            "rendezvous: rank 0 at {target} answered with unknown status {s}"
        ))),
    }
}

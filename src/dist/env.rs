//! The launch environment: rank, world size and rank 0's address, as `torchrun` (or a
//! hand-written launcher) sets them. The rules are in the module docs of [`crate::dist`].

use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// How long [`crate::dist::rendezvous`] waits for every rank unless `ENGINE_RDZV_TIMEOUT`
/// says otherwise.
pub const DEFAULT_RDZV_TIMEOUT: Duration = Duration::from_secs(600);

/// torch's default `MASTER_PORT`, used when a one-rank launch names none.
const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where this process sits in a distributed launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of ranks (processes) in the job.
    pub world: usize,
    /// Rank on this machine: the CUDA ordinal this process uses.
    pub local_rank: usize,
    /// Rank 0's machine (`MASTER_ADDR`; `127.0.0.1` for a one-rank launch without one).
    pub master_addr: String,
    /// `MASTER_PORT` (29500 for a one-rank launch without one).
    pub master_port: u16,
    /// The port rank 0's rendezvous listens on: `ENGINE_RDZV_PORT`, else `MASTER_PORT + 1`
    /// under torchrun (whose agent store holds `MASTER_PORT`), else `MASTER_PORT`.
    pub rdzv_port: u16,
    /// How long the rendezvous waits for all ranks (`ENGINE_RDZV_TIMEOUT` seconds).
    pub rdzv_timeout: Duration,
}

impl LaunchEnv {
    /// A one-rank job on this machine (what a run without `WORLD_SIZE` amounts to).
    pub fn single() -> LaunchEnv {
        LaunchEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            rdzv_port: DEFAULT_MASTER_PORT,
            rdzv_timeout: DEFAULT_RDZV_TIMEOUT,
        }
    }

    /// Parse the launch variables through `get` (a variable's value, or `None` when unset).
    /// `Ok(None)` when `WORLD_SIZE` is unset; an error naming the variable for any value that
    /// is malformed or inconsistent.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let Some(world) = number::<usize>(&get, "WORLD_SIZE")? else {
            return Ok(None);
        };
        if world == 0 {
            return Err(bad("WORLD_SIZE=0: a job has at least one rank"));
        }
        let multi = world > 1;
        let required = |name: &str| {
            bad(format!(
                "{name} is not set, but WORLD_SIZE={world} needs it (launch with torchrun, or \
                 set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process)"
            ))
        };

        let rank = match number::<usize>(&get, "RANK")? {
            Some(r) => r,
            None if multi => return Err(required("RANK")),
            None => 0,
        };
        if rank >= world {
            return Err(bad(format!(
                "RANK={rank} is not below WORLD_SIZE={world} (ranks are 0..{world})"
            )));
        }

        let local_rank = match number::<usize>(&get, "LOCAL_RANK")? {
            Some(r) => r,
            None if multi => return Err(required("LOCAL_RANK")),
            None => 0,
        };
        if let Some(local_world) = number::<usize>(&get, "LOCAL_WORLD_SIZE")? {
            if local_world == 0 || local_world > world {
                return Err(bad(format!(
                    "LOCAL_WORLD_SIZE={local_world} must be between 1 and WORLD_SIZE={world}"
                )));
            }
            if local_rank >= local_world {
                return Err(bad(format!(
                    "LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}"
                )));
            }
        }

        let master_addr = match get("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            Some(_) => return Err(bad("MASTER_ADDR is empty")),
            None if multi => return Err(required("MASTER_ADDR")),
            None => "127.0.0.1".to_string(),
        };
        let master_port = match port(&get, "MASTER_PORT")? {
            Some(p) => p,
            None if multi => return Err(required("MASTER_PORT")),
            None => DEFAULT_MASTER_PORT,
        };

        let torchrun = ["TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"]
            .iter()
            .any(|v| get(v).is_some_and(|s| !s.trim().is_empty()));
        let rdzv_port = match port(&get, "ENGINE_RDZV_PORT")? {
            Some(p) => p,
            None if torchrun => master_port.checked_add(1).ok_or_else(|| {
                bad(format!(
                    "MASTER_PORT={master_port}: under torchrun the rendezvous uses \
                     MASTER_PORT+1, which does not exist; set ENGINE_RDZV_PORT"
                ))
            })?,
            None => master_port,
        };

        let rdzv_timeout = match get("ENGINE_RDZV_TIMEOUT") {
            None => DEFAULT_RDZV_TIMEOUT,
            Some(s) => match s.trim().parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
                    Duration::from_secs_f64(secs)
                }
                _ => {
                    return Err(bad(format!(
                        "ENGINE_RDZV_TIMEOUT=`{s}` is not a positive number of seconds"
                    )));
                }
            },
        };

        Ok(Some(LaunchEnv {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            rdzv_port,
            rdzv_timeout,
        }))
    }
}

/// The launch environment of this process, or `None` when `WORLD_SIZE` is unset.
pub fn launch_env() -> Result<Option<LaunchEnv>> {
    LaunchEnv::from_vars(|name| {
        // A value that is not UTF-8 is kept (lossily) so the parser names the variable.
        std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
    })
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Usage(format!("launch environment: {}", msg.into()))
}

fn number<T: FromStr>(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>> {
    match get(name) {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| bad(format!("{name}=`{s}` is not a whole number"))),
    }
}

fn port(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<u16>> {
    match get(name) {
        None => Ok(None),
        Some(s) => match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(Some(p)),
            _ => Err(bad(format!(
                "{name}=`{s}` is not a TCP port (a whole number from 1 to 65535)"
            ))),
        },
    }
}

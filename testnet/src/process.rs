//! Real `hubmesh run` processes: spawning one with the CLI contract, reading
//! its `hubmesh ready …` line, keeping its output in a per-hub log file
//! (optionally forwarded, prefixed by the hub's name), and stopping it with
//! SIGTERM (graceful, with a deadline) or SIGKILL. Children are tied to the
//! process that spawned them ([`PARENT_PID_VAR`], [`exit_with_parent`]), so a
//! testnet whose parent dies — even by `kill -9` — leaves no hub behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::error::TestnetError;

/// Env var naming the pid a hub process must not outlive: `hubmesh run` calls
/// [`exit_with_parent`], which arms `PR_SET_PDEATHSIG` (Linux).
pub const PARENT_PID_VAR: &str = "HUBMESH_PARENT_PID";

/// Longest log line kept; longer lines are cut (the rest is discarded).
const MAX_LOG_LINE: usize = 16 * 1024;

/// Where a hub is, as its ready line tells.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HubInfo {
    /// `hub-0`, `hub-1`, …
    pub name: String,
    /// Facade URL (`http://127.0.0.1:7000`).
    pub http: String,
    /// Mesh address others dial (`/ip4/…/udp/…/quic-v1/p2p/PEERID`).
    pub mesh: String,
    /// PeerId.
    pub peer: String,
}

/// If [`PARENT_PID_VAR`] is set, asks the kernel to send this process SIGTERM
/// (a graceful hub shutdown) when its parent dies, and fails if the parent is
/// already gone. Linux only; elsewhere the variable is ignored.
pub fn exit_with_parent() -> Result<(), TestnetError> {
    let Some(want) = std::env::var_os(PARENT_PID_VAR) else {
        return Ok(());
    };
    let want: i32 = want
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TestnetError::Invalid(format!("{PARENT_PID_VAR} is not a pid")))?;
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
        // The parent may have died before the call: then we were re-parented.
        if nix::unistd::getppid().as_raw() != want {
            return Err(TestnetError::Invalid(format!(
                "parent process {want} is gone"
            )));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = want;
    Ok(())
}

/// How to start one hub process.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub bin: PathBuf,
    pub name: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub http_port: u16,
    pub mesh_port: u16,
    pub federation: String,
    pub bootstrap: Vec<String>,
    pub env: Vec<(String, String)>,
    pub forward_logs: bool,
    pub ready_timeout: Duration,
}

/// A running hub process.
#[derive(Debug)]
pub(crate) struct ProcHub {
    child: Child,
    pid: u32,
    pumps: Vec<JoinHandle<()>>,
}

fn field(line: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(str::to_owned)
}

/// Parses `hubmesh ready http=… mesh=… peer=…` (the mesh address must end
/// in `/p2p/<peer>`); `name` labels the hub in the result and the error.
pub fn parse_ready(name: &str, line: &str) -> Result<HubInfo, TestnetError> {
    let bad = || TestnetError::hub(name, format!("unexpected first stdout line {line:?}"));
    if !line.starts_with("hubmesh ready ") {
        return Err(bad());
    }
    let (Some(http), Some(mesh), Some(peer)) = (
        field(line, "http"),
        field(line, "mesh"),
        field(line, "peer"),
    ) else {
        return Err(bad());
    };
    if !mesh.ends_with(&format!("/p2p/{peer}")) {
        return Err(bad());
    }
    Ok(HubInfo {
        name: name.to_owned(),
        http: format!("http://{http}"),
        mesh,
        peer,
    })
}

async fn open_log(path: &Path) -> Result<tokio::fs::File, TestnetError> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| TestnetError::io(format!("opening {}", path.display()), e))
}

/// Copies lines of `src` into the log file and, if asked, to our stderr as
/// `name | line`, until EOF.
fn pump<R>(
    name: String,
    lines: FramedRead<R, LinesCodec>,
    mut log: tokio::fs::File,
    forward: bool,
) -> JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = lines;
        while let Some(next) = lines.next().await {
            let line = match next {
                Ok(l) => l,
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    format!("[line longer than {MAX_LOG_LINE} bytes cut]")
                }
                Err(LinesCodecError::Io(_)) => break,
            };
            if log.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                forward_line(&name, "[log file write failed]");
            }
            if forward {
                forward_line(&name, &line);
            }
        }
        let _ = log.flush().await;
    })
}

fn forward_line(name: &str, line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{name:>6} | {line}");
}

impl ProcHub {
    /// Starts the hub and waits for its ready line.
    pub(crate) async fn spawn(spec: &SpawnSpec) -> Result<(ProcHub, HubInfo), TestnetError> {
        let mut cmd = Command::new(&spec.bin);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--http", &format!("127.0.0.1:{}", spec.http_port)])
            .args([
                "--mesh",
                &format!("/ip4/127.0.0.1/udp/{}/quic-v1", spec.mesh_port),
            ])
            .args(["--federation", &spec.federation]);
        for b in &spec.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        // The testnet decides these; an operator's environment must not leak in.
        for var in [
            "HUBMESH_CONFIG",
            "HUBMESH_BOOTSTRAP",
            "HUBMESH_ALLOWLIST",
            "HUBMESH_TLS",
            "HUBMESH_MESH",
            "HUBMESH_HTTP",
            "HUBMESH_DATA_DIR",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env(PARENT_PID_VAR, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches the testnet,
            // which stops the hubs in order, not every hub at once.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| TestnetError::io(format!("spawning {}", spec.bin.display()), e))?;
        let pid = child
            .id()
            .ok_or_else(|| TestnetError::hub(&spec.name, "exited at once"))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(TestnetError::hub(&spec.name, "no stdout/stderr pipe"));
        };
        let mut pumps = vec![pump(
            spec.name.clone(),
            FramedRead::new(stderr, LinesCodec::new_with_max_length(MAX_LOG_LINE)),
            open_log(&spec.log).await?,
            spec.forward_logs,
        )];
        let mut out = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_LOG_LINE));
        let first = tokio::time::timeout(spec.ready_timeout, out.next()).await;
        let line = match first {
            Ok(Some(Ok(line))) => line,
            Ok(_) => {
                let status = child.wait().await.ok();
                for p in pumps {
                    let _ = p.await;
                }
                return Err(TestnetError::hub(
                    &spec.name,
                    format!(
                        "exited before its ready line ({status:?}); see {}",
                        spec.log.display()
                    ),
                ));
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(TestnetError::Timeout {
                    what: format!("{}: ready line (see {})", spec.name, spec.log.display()),
                    after: spec.ready_timeout,
                });
            }
        };
        let info = parse_ready(&spec.name, &line)?;
        pumps.push(pump(
            spec.name.clone(),
            out,
            open_log(&spec.log).await?,
            spec.forward_logs,
        ));
        Ok((ProcHub { child, pid, pumps }, info))
    }

    /// The exit status, if the process has exited (reaping it).
    pub(crate) fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    fn signal(&self, sig: Signal) -> Result<(), TestnetError> {
        let pid = i32::try_from(self.pid)
            .map_err(|_| TestnetError::Invalid(format!("pid {} out of range", self.pid)))?;
        match kill(Pid::from_raw(pid), sig) {
            // Already exited (not yet reaped): nothing to signal.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn finish(&mut self) {
        for p in self.pumps.drain(..) {
            let _ = p.await;
        }
    }

    /// SIGTERM, then waits up to `grace` for a clean exit; SIGKILL after that.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, TestnetError> {
        self.signal(Signal::SIGTERM)?;
        self.terminate_wait(grace).await
    }

    async fn terminate_wait(&mut self, grace: Duration) -> Result<ExitStatus, TestnetError> {
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(r) => r.map_err(|e| TestnetError::io(format!("waiting for pid {}", self.pid), e))?,
            Err(_) => {
                tracing::warn!(pid = self.pid, "hub did not stop within {grace:?}: SIGKILL");
                self.kill_now().await?
            }
        };
        self.finish().await;
        Ok(status)
    }

    async fn kill_now(&mut self) -> Result<ExitStatus, TestnetError> {
        self.child
            .kill()
            .await
            .map_err(|e| TestnetError::io(format!("killing pid {}", self.pid), e))?;
        self.child
            .wait()
            .await
            .map_err(|e| TestnetError::io(format!("reaping pid {}", self.pid), e))
    }

    /// `kill -9`: no shutdown at all, as a crash.
    pub(crate) async fn kill9(&mut self) -> Result<ExitStatus, TestnetError> {
        let status = self.kill_now().await?;
        self.finish().await;
        Ok(status)
    }

    /// Resident set size now (`VmRSS` of `/proc/<pid>/status`), bytes.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid)
    }
}

/// `VmRSS` of `/proc/<pid>/status`, bytes (Linux; `None` elsewhere or if gone).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses_and_garbage_is_refused() {
        let h = parse_ready(
            "hub-0",
            "hubmesh ready http=127.0.0.1:7000 mesh=/ip4/127.0.0.1/udp/7000/quic-v1/p2p/12D3KooWX peer=12D3KooWX",
        )
        .unwrap();
        assert_eq!(h.http, "http://127.0.0.1:7000");
        assert_eq!(h.peer, "12D3KooWX");
        assert!(h.mesh.ends_with("/p2p/12D3KooWX"));
        assert!(parse_ready("hub-0", "Error: address in use").is_err());
        assert!(parse_ready("hub-0", "hubmesh ready http=1.2.3.4:5").is_err());
        assert!(
            parse_ready(
                "hub-0",
                "hubmesh ready http=127.0.0.1:7000 mesh=/ip4/127.0.0.1/udp/7000/quic-v1/p2p/12D3KooWX peer=12D3KooWY",
            )
            .is_err(),
            "a mesh address of another peer is refused"
        );
    }
}

//! Running the standard tools we rely on (util-linux, e2fsprogs): bounded
//! in time, never outliving the thread that ran them, and failing with one
//! line that names the tool, how it ended and what it last said.
//!
//! Each tool runs in its own process group, so that killing it takes any
//! helper it started along, and with a parent-death signal, so that it dies
//! with the daemon thread that started it even if that thread never gets
//! to clean up (the daemon exiting mid-job). A tool that overruns its time
//! limit gets SIGKILL. The whole output goes to the debug log; the error
//! keeps only the line an operator needs.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} not found (install the {package} package)")]
    Missing { tool: &'static str, package: &'static str },
    #[error("{tool}: {source}")]
    Spawn { tool: &'static str, source: io::Error },
    #[error("{tool} timed out after {} s", limit.as_secs())]
    TimedOut { tool: &'static str, limit: Duration },
    /// Its job was cancelled (shutdown, card pulled, operator): killed.
    #[error("{tool} interrupted")]
    Interrupted { tool: &'static str },
    /// `status` is e.g. "exit status 4"; `detail` the tool's last words.
    #[error("{tool} failed ({status}): {detail}")]
    Failed { tool: &'static str, status: String, detail: String },
    #[error("{tool}: unreadable output: {detail}")]
    Unreadable { tool: &'static str, detail: String },
}

/// What a tool printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub tool: &'static str,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    status: ExitStatus,
}

impl Output {
    /// The error for a tool that ended in a way its caller does not accept:
    /// its exit status and the last line it wrote that says something.
    pub fn error(&self) -> ToolError {
        let status = match (self.status.code(), self.status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => Signal::try_from(signal)
                .map_or_else(|_| format!("killed by signal {signal}"), |s| format!("killed by {s}")),
            (None, None) => self.status.to_string(),
        };
        let detail =
            last_words(&self.stderr).or_else(|| last_words(&self.stdout)).unwrap_or_else(|| "no output".to_owned());
        ToolError::Failed { tool: self.tool, status, detail }
    }
}

/// The Debian package that ships a tool, for the "install it" hint.
fn package(tool: &str) -> &'static str {
    match tool {
        "sfdisk" => "fdisk",
        "e2fsck" | "resize2fs" | "dumpe2fs" => "e2fsprogs",
        _ => "util-linux",
    }
}

/// How long a tool may take. The filesystem tools walk metadata that grows
/// with the card (a slow 256 GB card over USB 2 takes minutes); the others
/// read or write a few sectors, so a hung one is a hung device.
fn limit(tool: &str) -> Duration {
    match tool {
        "e2fsck" => Duration::from_secs(10 * 60),
        "resize2fs" => Duration::from_secs(15 * 60),
        _ => Duration::from_secs(30),
    }
}

/// Runs `tool args…` with `stdin` as input, within the tool's time limit;
/// any exit status is returned for the caller to judge (`Output::error`).
pub fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<Output, ToolError> {
    run_within(tool, args, stdin, limit(tool), None)
}

/// As [`run`], and killed as soon as `stop` turns true: a long e2fsck or
/// resize2fs must not hold up the end of its job (`systemctl stop` gives
/// the daemon seconds, and the card must be blanked within them).
pub fn run_until(
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
    stop: &AtomicBool,
) -> Result<Output, ToolError> {
    run_within(tool, args, stdin, limit(tool), Some(stop))
}

/// Runs a tool that must succeed (exit status 0).
pub fn check(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<Output, ToolError> {
    let out = run(tool, args, stdin)?;
    if out.code == Some(0) { Ok(out) } else { Err(out.error()) }
}

fn run_within(
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
    stop: Option<&AtomicBool>,
) -> Result<Output, ToolError> {
    let spawn_error = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => ToolError::Missing { tool, package: package(tool) },
        _ => ToolError::Spawn { tool, source },
    };
    let mut cmd = Command::new(tool);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).env("LC_ALL", "C");
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.process_group(0);
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: prctl and getppid are, and it
    // allocates nothing (io::Error::last_os_error only stores the errno).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent.as_raw() {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(spawn_error)?;
    let (stdout, stderr, input) = (child.stdout.take(), child.stderr.take(), child.stdin.take());
    let group = Group::new(child).map_err(|source| ToolError::Spawn { tool, source })?;
    let (status, stdout, stderr) = std::thread::scope(|scope| {
        // Owned here: should anything below panic, the group is killed
        // while unwinding, before the scope joins the readers.
        let mut group = group;
        let stdout = scope.spawn(move || read_all(stdout));
        let stderr = scope.spawn(move || read_all(stderr));
        if let (Some(text), Some(mut pipe)) = (stdin, input) {
            // A tool that exits without reading its input says why itself.
            scope.spawn(move || pipe.write_all(text.as_bytes()));
        }
        let status = group.wait(limit, stop);
        // The readers see end-of-file once the whole group is gone.
        (status, stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default())
    });
    tracing::debug!(tool, ?args, ?status, elapsed = ?started.elapsed(), stdout, stderr, "tool finished");
    match status {
        Ok(Ended::Exited(status)) => Ok(Output { tool, code: status.code(), stdout, stderr, status }),
        Ok(Ended::TimedOut) => Err(ToolError::TimedOut { tool, limit }),
        Ok(Ended::Stopped) => Err(ToolError::Interrupted { tool }),
        Err(source) => Err(ToolError::Spawn { tool, source }),
    }
}

fn read_all(pipe: Option<impl Read>) -> String {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        // A read error ends the output early; the exit status still counts.
        let _ = pipe.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// How often a tool run with a stop flag looks at it.
const STOP_POLL: Duration = Duration::from_millis(50);

/// How a wait for a tool ended.
#[derive(Debug)]
enum Ended {
    Exited(ExitStatus),
    TimedOut,
    Stopped,
}

/// A running tool and its process group, killed and reaped on drop: on a
/// timeout, an error or a panic, nothing of it is left behind.
struct Group {
    child: Child,
    /// The tool's pid, which is also its process group's id.
    pid: Pid,
    reaped: bool,
}

impl Group {
    fn new(mut child: Child) -> io::Result<Self> {
        if let Ok(pid) = i32::try_from(child.id()) {
            return Ok(Self { child, pid: Pid::from_raw(pid), reaped: false });
        }
        // Cannot happen (pid_max is 2^22), but without a pid there is no group to kill.
        let _ = child.kill();
        let _ = child.wait();
        Err(io::Error::other("process id out of range"))
    }

    /// Waits until the tool exits, `limit` passes or `stop` turns true (the
    /// group is killed then). Either way the group is gone afterwards.
    fn wait(&mut self, limit: Duration, stop: Option<&AtomicBool>) -> io::Result<Ended> {
        let ended = self.exited_within(limit, stop)?;
        // Whatever the tool left running in its group goes with it. Until
        // the tool is reaped, its zombie keeps the group id from reuse.
        self.kill();
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(match ended {
            Ended::Exited(_) => Ended::Exited(status),
            other => other,
        })
    }

    /// Blocks on the tool's exit, without reaping it, for at most `limit`,
    /// looking at `stop` every [`STOP_POLL`]. A thread does the waiting
    /// because only a thread can block on a child and be given up on.
    fn exited_within(&self, limit: Duration, stop: Option<&AtomicBool>) -> io::Result<Ended> {
        let pid = self.pid;
        let (tx, rx) = mpsc::sync_channel(1);
        // Not scoped: after a timeout it lives on until the kill that
        // follows ends its wait. WNOWAIT leaves the reaping to `wait`.
        std::thread::Builder::new().name("tool-wait".into()).spawn(move || {
            let exited = loop {
                match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                    Err(nix::errno::Errno::EINTR) => {}
                    other => break other.map(drop).map_err(io::Error::from),
                }
            };
            let _ = tx.send(exited);
        })?;
        let deadline = Instant::now() + limit;
        loop {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Ok(Ended::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(if stop.is_some() { STOP_POLL } else { left })) {
                Ok(exited) => return exited.map(|()| Ended::Exited(ExitStatus::from_raw(0))),
                Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => return Ok(Ended::TimedOut),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(io::Error::other("the waiting thread ended")),
            }
        }
    }

    fn kill(&self) {
        // ESRCH: the group is already empty.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last line of `text` that says something: blank lines and progress
/// (a bar or a percentage: no letters but X) are skipped, and an indented
/// line continues the one before it, as e2fsck's "(i.e., without -a or -p
/// options)" does. Capped, so that one runaway line cannot flood a status.
fn last_words(text: &str) -> Option<String> {
    const MAX: usize = 300;
    let mut last: Option<String> = None;
    for raw in text.split(['\n', '\r']) {
        let line: String = raw.chars().filter(|c| !c.is_control() || *c == '\t').collect();
        let words = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if words.is_empty() || !words.chars().any(|c| c.is_alphabetic() && c != 'X') {
            continue;
        }
        last = match last {
            Some(before) if line.starts_with([' ', '\t']) => Some(format!("{before} {words}")),
            _ => Some(words),
        };
    }
    last.map(|line| match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process `pid` no longer runs: gone, or a zombie its new parent
    /// has not reaped yet.
    fn is_gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // "pid (comm) S ...": the state follows the last ')'.
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    /// SIGKILL is delivered asynchronously: a killed process may still be
    /// on its way out when `kill` returns, so give it a moment.
    fn dies_soon(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_gone(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn read_pid(path: &std::path::Path) -> i32 {
        std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn a_tool_past_its_limit_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let (tool_pid, helper_pid) = (dir.path().join("tool"), dir.path().join("helper"));
        // The helper runs in the background: only the group kill reaches it.
        let script = format!(
            "sleep 60 & echo $! > {}; echo $$ > {}; wait",
            helper_pid.to_str().unwrap(),
            tool_pid.to_str().unwrap()
        );
        let started = Instant::now();
        let err = run_within("sh", &["-c", &script], None, Duration::from_secs(1), None).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        assert!(matches!(err, ToolError::TimedOut { tool: "sh", .. }), "{err}");
        assert_eq!(err.to_string(), "sh timed out after 1 s");
        // Reaped by us, so not even a zombie: kill(pid, 0) finds nothing.
        let tool = Pid::from_raw(read_pid(&tool_pid));
        assert_eq!(nix::sys::signal::kill(tool, None), Err(nix::errno::Errno::ESRCH));
        let helper = read_pid(&helper_pid);
        assert!(dies_soon(helper), "the tool's helper {helper} survived");
    }

    #[test]
    fn a_stopped_job_kills_its_tool_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("tool");
        let script = format!("echo $$ > {}; exec sleep 60", pid_file.to_str().unwrap());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        let err = run_until("sh", &["-c", &script], None, &stop).unwrap_err();
        stopper.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(err.to_string(), "sh interrupted");
        assert!(dies_soon(read_pid(&pid_file)), "the stopped tool survived");
    }

    #[test]
    fn a_tool_within_its_limit_returns_its_output() {
        let out =
            run_within("sh", &["-c", "cat; echo done >&2"], Some("input\n"), Duration::from_secs(30), None).unwrap();
        assert_eq!((out.code, out.stdout.as_str(), out.stderr.as_str()), (Some(0), "input\n", "done\n"));
    }

    #[test]
    fn a_failure_is_one_line_with_the_last_thing_said() {
        let script = "echo 'on stdout'; printf 'resize2fs 1.47.0\\n\\nfirst problem\\nthe real problem\\n  42%%\\n\\n' >&2; exit 3";
        let err = check("sh", &["-c", script], None).unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 3): the real problem");
        // e2fsck continues its last line on an indented one.
        let script = "printf '\\n\\n/dev/x: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.\\n\\t(i.e., without -a or -p options)\\n' >&2; exit 4";
        let err = check("sh", &["-c", script], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sh failed (exit status 4): /dev/x: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY. (i.e., without -a or -p options)"
        );
        // Nothing on stderr: stdout's last words; nothing at all: say so.
        let err = check("sh", &["-c", "echo one; echo two; exit 1"], None).unwrap_err();
        assert_eq!(err.to_string(), "sh failed (exit status 1): two");
        let err = check("sh", &["-c", "kill -9 $$"], None).unwrap_err();
        assert_eq!(err.to_string(), "sh failed (killed by SIGKILL): no output");
    }

    #[test]
    fn progress_lines_and_overwritten_bars_are_not_last_words() {
        assert_eq!(last_words("Pass 1\r 10%\r 55%\r\n XXXXXXXX\n[=====   ]\n"), Some("Pass 1".to_owned()));
        assert_eq!(last_words("\n \n50%\n"), None);
        let long = "y".repeat(1000);
        assert_eq!(last_words(&long).map(|l| l.chars().count()), Some(301));
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = run("flashbay-no-such-tool", &[], None).unwrap_err();
        assert_eq!(err.to_string(), "flashbay-no-such-tool not found (install the util-linux package)");
    }
}

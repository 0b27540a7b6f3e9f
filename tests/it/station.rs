//! Fixtures for daemon tests: the test udev rule, a running `flashbay run`
//! with its notify socket and status file, and slow cards (blkio throttle).

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bed::{Bed, Reader, run};

const RULE: &str = include_str!("../udev/61-flashbay-test-loop.rules");

/// The ID_PATH the test rule gives a reader.
pub fn port(reader: &Reader) -> String {
    let dev = reader.dev();
    let n = dev.to_str().unwrap().trim_start_matches("/dev/loop").to_owned();
    format!("platform-test-usb-0:1.{n}:1.0-scsi-0:0:0:0")
}

/// `slots:` YAML for (name, reader) pairs.
pub fn slots_yaml(slots: &[(&str, &Reader)]) -> String {
    let mut yaml = String::from("slots:\n");
    for (name, reader) in slots {
        yaml.push_str(&format!("  - {{name: {name}, port: {}}}\n", port(reader)));
    }
    yaml
}

/// A station of one slot, A1 on `reader`, writing `image`; `settings` are
/// more top-level lines (each ending in a newline).
pub fn one_slot_yaml(image: &Path, reader: &Reader, settings: &str) -> String {
    format!("image: {}\n{settings}{}", image.display(), slots_yaml(&[("A1", reader)]))
}

/// The test udev rule, installed while this lives. Each test installs its
/// own copy (same content), so concurrent tests never remove another's.
pub struct UdevRule(PathBuf);

impl UdevRule {
    pub fn install() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all("/run/udev/rules.d").unwrap();
        let path = PathBuf::from(format!(
            "/run/udev/rules.d/61-flashbay-test-{}-{}.rules",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, RULE).unwrap();
        run("udevadm", &["control", "--reload"]);
        Self(path)
    }

    /// Applies the rule to a device that exists already (an empty reader, a
    /// card inserted before the daemon starts).
    pub fn apply(&self, dev: &Path) {
        run("udevadm", &["trigger", "--action=change", "--settle", dev.to_str().unwrap()]);
    }
}

impl Drop for UdevRule {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
        let _ = Command::new("udevadm").args(["control", "--reload"]).status();
    }
}

/// A running daemon; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
    /// The lines the fixture adds to every configuration it writes.
    header: String,
    pub status: PathBuf,
    log: PathBuf,
    notify: UnixDatagram,
    messages: Vec<String>,
}

impl Daemon {
    /// Writes `yaml` (status file, state and cache dirs are added) and starts
    /// `flashbay run`, waiting for READY=1.
    pub fn start(bed: &Bed, yaml: &str) -> Self {
        Self::start_with(bed, yaml, &[], &[])
    }

    pub fn start_with(bed: &Bed, yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let name = crate::bed::unique("daemon");
        let status = bed.path(&format!("{name}-status.json"));
        let config = bed.path(&format!("{name}.yaml"));
        let mut header = format!(
            "status_file: {}\nstate_dir: {}\ncache_dir: {}\n",
            status.display(),
            bed.path(&format!("{name}-state")).display(),
            bed.path(&format!("{name}-cache")).display()
        );
        // Any free port, unless the test configures HTTP itself.
        if !yaml.starts_with("http:") && !yaml.contains("\nhttp:") {
            header.push_str("http:\n  listen: 127.0.0.1:0\n");
        }
        fs::write(&config, format!("{header}{yaml}")).unwrap();
        let socket_path = bed.path(&format!("{name}-notify.sock"));
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        notify.set_nonblocking(true).unwrap();
        let log = bed.path(&format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashbay"));
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .args(if args.is_empty() { &["--log", "stderr"][..] } else { args })
            .env("NOTIFY_SOCKET", &socket_path)
            .env("FLASHBAY_LOG", "debug")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut daemon = Self { child, config, header, status, log, notify, messages: Vec::new() };
        daemon.wait_notified("READY=1", Duration::from_secs(15));
        daemon
    }

    /// Starts the daemon again on the same configuration, state and cache
    /// (after this one was killed): what systemd does after a crash.
    pub fn restart(&self) -> Self {
        let name = crate::bed::unique("restart");
        let dir = self.config.parent().unwrap();
        let socket_path = dir.join(format!("{name}-notify.sock"));
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        notify.set_nonblocking(true).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_flashbay"))
            .args(["run", "--config", self.config.to_str().unwrap(), "--log", "stderr"])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("FLASHBAY_LOG", "debug")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = Self {
            child,
            config: self.config.clone(),
            header: self.header.clone(),
            status: self.status.clone(),
            log,
            notify,
            messages: Vec::new(),
        };
        daemon.wait_notified("READY=1", Duration::from_secs(15));
        daemon
    }

    /// The value of one key of the fixture's header (`state_dir`, `cache_dir`).
    pub fn dir(&self, key: &str) -> PathBuf {
        let prefix = format!("{key}: ");
        PathBuf::from(self.header.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap())
    }

    /// Replaces the configuration file (keeping the fixture's paths).
    pub fn rewrite(&self, yaml: &str) {
        fs::write(&self.config, format!("{}{yaml}", self.header)).unwrap();
    }

    /// The base URL of the daemon's HTTP endpoint, from its status file.
    pub fn url(&self) -> String {
        self.wait_until("the HTTP endpoint", Duration::from_secs(10), |_| {}, |s| s["http"].is_string())["http"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every notification received so far, one `KEY=value` per entry.
    pub fn notifications(&mut self) -> &[String] {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.messages.extend(text.lines().map(str::to_owned));
        }
        &self.messages
    }

    pub fn wait_notified(&mut self, line: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.notifications().iter().any(|m| m == line) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("daemon exited ({status}) before {line}; log:\n{}", self.log());
            }
            assert!(
                start.elapsed() < timeout,
                "no {line} within {timeout:?}; got {:?}; log:\n{}",
                self.messages,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> Value {
        // The file is replaced by rename, so a read never sees half a document.
        fs::read(&self.status).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null)
    }

    pub fn slot(&self, name: &str) -> Value {
        let status = self.status();
        status["slots"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name).cloned()).unwrap_or(Value::Null)
    }

    /// Polls the status file until `pred` holds; each status seen is also
    /// passed to `each` (for properties that must hold throughout).
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut each: impl FnMut(&Value),
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let status = self.status();
            each(&status);
            if pred(&status) {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; status:\n{}\nlog:\n{}",
                serde_json::to_string_pretty(&status).unwrap(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_slot(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let status =
            self.wait_until(&format!("{name} {state}"), timeout, |_| {}, |s| slot_of(s, name)["state"] == state);
        slot_of(&status, name)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn slot_of(status: &Value, name: &str) -> Value {
    status["slots"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name).cloned()).unwrap_or(Value::Null)
}

/// Slow cards: a blkio cgroup that limits a process's direct I/O to the
/// given loop devices. The process leaves the group (and the group goes) on drop.
pub struct Throttle {
    dir: PathBuf,
    pid: i32,
}

impl Throttle {
    pub fn new(pid: i32, readers: &[&Reader], bytes_per_second: u64) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/blkio/flashbay-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        for reader in readers {
            let n = reader.dev().to_str().unwrap().trim_start_matches("/dev/loop").to_owned();
            for file in ["blkio.throttle.write_bps_device", "blkio.throttle.read_bps_device"] {
                fs::write(dir.join(file), format!("7:{n} {bytes_per_second}\n")).unwrap();
            }
        }
        fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        Self { dir, pid }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = fs::write("/sys/fs/cgroup/blkio/cgroup.procs", self.pid.to_string());
        // The group can only go once empty; a dead process leaves by itself.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An HTTP request that returns any status (no error for 4xx/5xx).
pub fn http(method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut response = agent.run(req.body(()).unwrap()).unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap_or_default())
}

/// A Server-Sent Events client on its own thread: events arrive on `rx`
/// as (event name, JSON data) until the stream ends or this is dropped.
pub struct SseClient {
    pub rx: std::sync::mpsc::Receiver<(String, Value)>,
}

impl SseClient {
    pub fn connect(url: &str) -> Self {
        use std::io::BufRead;
        let (tx, rx) = std::sync::mpsc::channel();
        let url = format!("{url}/api/events");
        std::thread::spawn(move || {
            let Ok(response) = ureq::get(&url).call() else { return };
            let reader = std::io::BufReader::new(response.into_body().into_reader());
            let mut event = String::new();
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Some(name) = line.strip_prefix("event: ") {
                    event = name.to_owned();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    let value = serde_json::from_str(data).unwrap_or(Value::Null);
                    if tx.send((std::mem::take(&mut event), value)).is_err() {
                        return;
                    }
                }
            }
        });
        Self { rx }
    }

    /// Collects events until `done` says stop (or `timeout`).
    pub fn until(&self, timeout: Duration, mut done: impl FnMut(&str, &Value) -> bool) -> Vec<(String, Value)> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while let Some(left) = timeout.checked_sub(start.elapsed()) {
            match self.rx.recv_timeout(left) {
                Ok((event, data)) => {
                    let stop = done(&event, &data);
                    seen.push((event, data));
                    if stop {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("SSE: condition not met within {timeout:?}; got {} events, last {:?}", seen.len(), seen.last());
    }
}

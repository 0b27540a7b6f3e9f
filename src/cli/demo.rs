//! `flashbay demo`: a whole station on this machine, nothing to plug in.
//!
//! Builds a small partitioned image (FAT32 boot + ext4 root, xz), emulates
//! a 4-port card reader hub with fresh loop devices and a udev rule that
//! gives them USB-like ports (starting systemd-udevd when none runs), runs
//! the real daemon with the status page, inserts cards of different sizes
//! one after another (one too small for the image), follows them to the
//! end and prints a summary. Cards are slowed down to card-like speeds
//! (blkio cgroup) where the kernel allows it, so the page is worth watching.
//!
//! Everything it creates (loop devices, the udev rule, udevd if it started
//! it, the cgroup, files) is undone on exit, on Ctrl-C and on failure: each
//! is held by a guard whose `Drop` removes it.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Slot name, card size in MiB; the third is smaller than the image.
const CARDS: [(&str, u64); 4] = [("H1", 256), ("H2", 128), ("H3", 48), ("H4", 192)];
const FINAL: [&str; 3] = ["done", "failed", "refused"];

#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Where the status page listens (port 0: any free port).
    pub(crate) listen: String,
    /// Card speed in MiB/s (0: as fast as the machine goes).
    pub(crate) speed: u64,
    /// Keep the station running after the summary, until Ctrl-C.
    pub(crate) stay: bool,
}

pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("flashbay demo needs root (loop devices, udev rules)");
    }
    for tool in ["losetup", "sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "partx", "udevadm", "e2fsck", "resize2fs"] {
        if !on_path(tool) {
            bail!("{tool} is missing: run scripts/demo, or install util-linux fdisk dosfstools e2fsprogs mtools udev");
        }
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }
    let stop = || -> anyhow::Result<()> {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    };

    let mut demo = Demo::default();
    let url = start(&mut demo, opts, &stop)?;
    let mut shown: Vec<String> = vec![String::new(); CARDS.len()];
    let dir = demo.scratch.as_ref().map(|s| s.0.clone()).context("scratch")?;
    let readers = demo.readers.as_mut().context("readers")?;
    for (i, (name, size)) in CARDS.iter().enumerate() {
        stop()?;
        let backing = dir.join(format!("card-{name}.img"));
        File::create(&backing)?.set_len(size * MIB)?;
        readers.insert(i, &backing)?;
        println!("  {name}: inserted a {size} MiB card");
        let (seen_by, at_least) = (Instant::now() + Duration::from_secs(30), Instant::now() + Duration::from_secs(2));
        loop {
            let doc = follow(&url, &mut shown)?;
            let seen = doc["slots"][i]["state"] != "empty";
            if seen && Instant::now() > at_least {
                break;
            }
            if !seen && Instant::now() > seen_by {
                bail!("the station did not see the card in {name} within 30 s: is systemd-udevd handling events?");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    summarise(&url, &mut shown, &stop)?;
    if opts.stay {
        println!("\nthe station keeps running at {url}/ (Ctrl-C to stop and clean up)");
        while !interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("cleaning up ...");
    drop(demo);
    println!("done: loop devices, udev rule and files removed");
    Ok(())
}

/// Image, readers, udev rule, daemon; returns the status page URL.
fn start(demo: &mut Demo, opts: &Options, stop: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("flashbay-demo-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    demo.scratch = Some(Scratch(dir.clone()));
    println!("building a demo image (FAT32 boot + ext4 root, xz) ...");
    let image = build_image(&dir)?;
    demo.udevd = Udevd::ensure()?;
    let readers = Readers::create(CARDS.len())?;
    let ports: Vec<String> =
        (1..=CARDS.len()).map(|i| format!("platform-demo-hub-usb-0:1.{i}:1.0-scsi-0:0:0:0")).collect();
    demo.rule = Some(Rule::install(&readers.numbers, &ports, &dir)?);
    let numbers = readers.numbers.clone();
    demo.readers = Some(readers);
    stop()?;

    let config = dir.join("flashbay.yaml");
    let mut yaml = format!(
        "image: {}\nconcurrency: 2\neject: sync\nstatus_file: {d}/status.json\nstate_dir: {d}/state\ncache_dir: {d}/cache\nhttp:\n  listen: {}\nslots:\n",
        image.display(),
        free_or_any(&opts.listen),
        d = dir.display()
    );
    for ((name, _), port) in CARDS.iter().zip(&ports) {
        let _ = writeln!(yaml, "  - {{name: {name}, port: {port}}}");
    }
    fs::write(&config, yaml)?;
    let log = dir.join("daemon.log");
    let daemon = Daemon::start(&config, &log)?;
    let pid = daemon.pid;
    demo.daemon = Some(daemon);
    let url = wait_for_url(&dir.join("status.json"), stop)?;
    if opts.speed > 0 {
        demo.slow = SlowCards::apply(pid, &numbers, opts.speed * MIB);
    }
    println!("station running: 4-port hub H1-H4, {}, cards at {} MiB/s", short(&image), opts.speed);
    println!("status page: {url}/   (daemon log: {})", log.display());
    Ok(url)
}

/// Follows the cards to the end, then prints the table and each stage.
fn summarise(url: &str, shown: &mut [String], stop: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        stop()?;
        let doc = follow(url, shown)?;
        let states: Vec<&str> =
            doc["slots"].as_array().map(|s| s.iter().filter_map(|s| s["state"].as_str()).collect()).unwrap_or_default();
        if states.len() == CARDS.len() && states.iter().all(|s| FINAL.contains(s)) {
            println!("\n{}", super::status::table(&doc));
            for slot in doc["slots"].as_array().into_iter().flatten() {
                let name = slot["name"].as_str().unwrap_or_default();
                for stage in slot["stages"].as_array().into_iter().flatten() {
                    let text = |k: &str| stage[k].as_str().unwrap_or_default().to_owned();
                    println!("  {name} {}: {} {}", text("stage"), text("result"), text("detail"));
                }
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the demo cards did not finish within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Prints each slot's state changes; returns the station document.
fn follow(url: &str, shown: &mut [String]) -> anyhow::Result<Value> {
    let body = ureq::get(&format!("{url}/api/status")).call()?.body_mut().read_to_string()?;
    let doc: Value = serde_json::from_str(&body)?;
    for (slot, last) in doc["slots"].as_array().into_iter().flatten().zip(shown.iter_mut()) {
        let state = slot["state"].as_str().unwrap_or_default();
        if state != last.as_str() {
            let extra = match state {
                "done" => " ✓".to_owned(),
                "failed" | "refused" => format!(": {}", slot["error"].as_str().unwrap_or_default()),
                _ => String::new(),
            };
            if !last.is_empty() || state != "empty" {
                println!("  {}: {state}{extra}", slot["name"].as_str().unwrap_or_default());
            }
            state.clone_into(last);
        }
    }
    Ok(doc)
}

fn wait_for_url(status: &Path, stop: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        stop()?;
        let url = fs::read(status)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|d| d["http"].as_str().map(str::to_owned));
        if let Some(url) = url {
            return Ok(url);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the daemon did not start; see its log next to {}", status.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The requested address if its port is free, else any free port.
fn free_or_any(listen: &str) -> String {
    if std::net::TcpListener::bind(listen).is_ok() {
        listen.to_owned()
    } else {
        let host = listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
        format!("{host}:0")
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(tool).exists())
    })
}

fn short(p: &Path) -> String {
    p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn sh(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool).args(args).output().with_context(|| format!("{tool}: cannot run"))?;
    if !out.status.success() {
        bail!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A FAT32 boot partition and an ext4 root partition with a few files,
/// like an image builder's output, compressed with xz.
fn build_image(dir: &Path) -> anyhow::Result<PathBuf> {
    let (boot_mib, root_mib) = (36, 28);
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("etc"))?;
    fs::write(root.join("etc/hostname"), "flashbay-demo\n")?;
    fs::write(root.join("etc/motd"), "Flashed by flashbay.\n")?;
    // Some content, so writing and verifying take a visible while.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..(12 * MIB))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    fs::write(root.join("etc/firmware.bin"), &data)?;
    let boot = dir.join("boot.part");
    File::create(&boot)?.set_len(boot_mib * MIB)?;
    sh("mkfs.vfat", &["-F", "32", "-n", "BOOT", path(&boot)])?;
    let config = dir.join("config.txt");
    fs::write(&config, "# flashbay demo\nenable_uart=1\n")?;
    sh("mcopy", &["-i", path(&boot), path(&config), "::"])?;
    let rootfs = dir.join("root.part");
    sh("mkfs.ext4", &["-q", "-F", "-L", "rootfs", "-d", path(&root), path(&rootfs), &format!("{root_mib}M")])?;

    let raw = dir.join("demo.img");
    File::create(&raw)?.set_len((1 + boot_mib + root_mib + 1) * MIB)?;
    let script = format!(
        "label: dos\nstart=2048, size={}, type=c\nstart={}, size={}, type=83\n",
        boot_mib * 2048,
        2048 + boot_mib * 2048,
        root_mib * 2048
    );
    let mut sfdisk =
        Command::new("sfdisk").args(["-q", path(&raw)]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn()?;
    sfdisk.stdin.take().context("sfdisk stdin")?.write_all(script.as_bytes())?;
    if !sfdisk.wait()?.success() {
        bail!("sfdisk failed on {}", raw.display());
    }
    let image = fs::OpenOptions::new().write(true).open(&raw)?;
    std::os::unix::fs::FileExt::write_all_at(&image, &fs::read(&boot)?, MIB)?;
    std::os::unix::fs::FileExt::write_all_at(&image, &fs::read(&rootfs)?, (1 + boot_mib) * MIB)?;
    drop(image);

    let xz = dir.join("demo.img.xz");
    let mut encoder = liblzma::write::XzEncoder::new(File::create(&xz)?, 3);
    std::io::copy(&mut File::open(&raw)?, &mut encoder)?;
    encoder.finish()?;
    for f in [&raw, &boot, &rootfs] {
        fs::remove_file(f)?;
    }
    Ok(xz)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[derive(Default)]
struct Demo {
    daemon: Option<Daemon>,
    slow: Option<SlowCards>,
    readers: Option<Readers>,
    rule: Option<Rule>,
    udevd: Option<Udevd>,
    scratch: Option<Scratch>,
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// systemd-udevd, started by us only when none runs.
struct Udevd(Child);

impl Udevd {
    fn ensure() -> anyhow::Result<Option<Self>> {
        let ping = || Command::new("udevadm").args(["control", "--ping"]).output().is_ok_and(|o| o.status.success());
        if ping() {
            return Ok(None);
        }
        let child =
            Command::new("/lib/systemd/systemd-udevd").spawn().context("cannot start /lib/systemd/systemd-udevd")?;
        for _ in 0..50 {
            if ping() {
                return Ok(Some(Self(child)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("systemd-udevd did not start")
    }
}

impl Drop for Udevd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The udev rule that makes our loop devices (and only them) hub ports.
struct Rule(PathBuf);

impl Rule {
    /// Only while a card file of ours is attached is the device a port: a
    /// stranger's `losetup -f` landing on one of our readers gets nothing.
    fn install(numbers: &[u32], ports: &[String], dir: &Path) -> anyhow::Result<Self> {
        let path = PathBuf::from(format!("/run/udev/rules.d/62-flashbay-demo-{}.rules", std::process::id()));
        let mut text =
            String::from("# flashbay demo: loop devices as the ports of a card reader hub (removed on exit)\n");
        for (n, port) in numbers.iter().zip(ports) {
            let ours = format!("ATTR{{loop/backing_file}}==\"{}/*\"", dir.display());
            let _ = writeln!(text, "SUBSYSTEM==\"block\", KERNEL==\"loop{n}\", {ours}, ENV{{ID_PATH}}=\"{port}\"");
            let _ = writeln!(text, "SUBSYSTEM==\"block\", KERNEL==\"loop{n}p[0-9]*\", IMPORT{{parent}}=\"ID_PATH\"");
        }
        fs::create_dir_all("/run/udev/rules.d")?;
        fs::write(&path, text)?;
        let rule = Self(path);
        sh("udevadm", &["control", "--reload"])?;
        for n in numbers {
            sh("udevadm", &["trigger", "--action=change", "--settle", &format!("/dev/loop{n}")])?;
        }
        Ok(rule)
    }
}

impl Drop for Rule {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
        let _ = Command::new("udevadm").args(["control", "--reload"]).status();
    }
}

/// Empty card readers: loop devices we create, attach to and remove.
struct Readers {
    numbers: Vec<u32>,
    attached: Vec<bool>,
}

const LOOP_CTL_ADD: libc::c_ulong = 0x4C80;
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;

impl Readers {
    /// Creates `count` loop devices at numbers nobody uses (from 200 up),
    /// so the demo never takes a device that something else expects.
    fn create(count: usize) -> anyhow::Result<Self> {
        let ctl = File::open("/dev/loop-control").context("/dev/loop-control (is the loop module loaded?)")?;
        let mut numbers = Vec::new();
        let mut n = 200u32;
        while numbers.len() < count && n < 1000 {
            if !Path::new(&format!("/sys/block/loop{n}")).exists() {
                // SAFETY: LOOP_CTL_ADD takes the device number by value.
                let ret = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_ADD, libc::c_ulong::from(n)) };
                if ret >= 0 {
                    numbers.push(n);
                }
            }
            n += 1;
        }
        let readers = Self { attached: vec![false; numbers.len()], numbers };
        if readers.numbers.len() < count {
            bail!("cannot create {count} loop devices");
        }
        for n in &readers.numbers {
            let node = format!("/dev/loop{n}");
            for _ in 0..50 {
                if Path::new(&node).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(readers)
    }

    fn insert(&mut self, i: usize, backing: &Path) -> anyhow::Result<()> {
        sh("losetup", &["-P", &format!("/dev/loop{}", self.numbers[i]), path(backing)])?;
        self.attached[i] = true;
        Ok(())
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        for (n, attached) in self.numbers.iter().zip(&self.attached) {
            if *attached {
                for _ in 0..50 {
                    if Command::new("losetup")
                        .args(["-d", &format!("/dev/loop{n}")])
                        .output()
                        .is_ok_and(|o| o.status.success())
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if let Ok(ctl) = File::open("/dev/loop-control") {
                for _ in 0..50 {
                    // SAFETY: LOOP_CTL_REMOVE takes the device number by value.
                    if unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_REMOVE, libc::c_ulong::from(*n)) } >= 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// The daemon, as its own process; stopped with SIGTERM on drop.
struct Daemon {
    child: Child,
    pid: i32,
}

impl Daemon {
    fn start(config: &Path, log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(["run", "--config", path(config), "--log", "stderr"])
            .env("FLASHBAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()?;
        let pid = i32::try_from(child.id()).unwrap_or_default();
        Ok(Self { child, pid })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Card-like speeds for loop devices: a blkio cgroup (v1) or io.max (v2)
/// holding the daemon. Best effort: without either, cards go full speed.
struct SlowCards {
    dir: PathBuf,
    pid: i32,
    parent: PathBuf,
}

impl SlowCards {
    fn apply(pid: i32, numbers: &[u32], bytes_per_second: u64) -> Option<Self> {
        let (v1, v2) = (Path::new("/sys/fs/cgroup/blkio"), Path::new("/sys/fs/cgroup"));
        let parent = if v1.join("blkio.throttle.write_bps_device").exists() {
            v1
        } else if fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.contains("io")) {
            let _ = fs::write(v2.join("cgroup.subtree_control"), "+io");
            v2
        } else {
            println!("(no cgroup I/O throttling here: cards go at full speed)");
            return None;
        };
        let dir = parent.join(format!("flashbay-demo-{}", std::process::id()));
        let slow = Self { dir: dir.clone(), pid, parent: parent.to_owned() };
        let limit = |n: u32| -> std::io::Result<()> {
            if parent == v1 {
                fs::write(dir.join("blkio.throttle.write_bps_device"), format!("7:{n} {bytes_per_second}"))?;
                fs::write(dir.join("blkio.throttle.read_bps_device"), format!("7:{n} {bytes_per_second}"))
            } else {
                fs::write(dir.join("io.max"), format!("7:{n} rbps={bytes_per_second} wbps={bytes_per_second}"))
            }
        };
        let applied = fs::create_dir_all(&dir).and_then(|()| {
            numbers.iter().try_for_each(|n| limit(*n))?;
            fs::write(dir.join("cgroup.procs"), pid.to_string())
        });
        match applied {
            Ok(()) => Some(slow),
            Err(e) => {
                println!("(cannot slow the cards down: {e}; they go at full speed)");
                None
            }
        }
    }
}

impl Drop for SlowCards {
    fn drop(&mut self) {
        let _ = fs::write(self.parent.join("cgroup.procs"), self.pid.to_string());
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

//! The test bed: real loop devices, real images, real tools.
//!
//! Everything a test creates lives in its [`Bed`]: a temporary directory,
//! loop devices (detached on drop, even when the test panics), mounts and
//! swap (undone on drop). Loop devices are taken by explicit number under a
//! machine-wide lock, with a reservation marker per device, so concurrent
//! tests (and later, a test's "empty card readers") never share one, and a
//! test only ever writes to devices it attached itself.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where reservations and the allocation lock live (tmpfs: gone on reboot).
const RUN_DIR: &str = "/run/flashbay-test";
pub const MIB: u64 = 1 << 20;

/// Returns the bed, or prints `SKIPPED: reason` and returns from the test.
/// Under CI a missing prerequisite is a failure, never a skip.
macro_rules! bed {
    (udev) => {
        bed!(@check $crate::bed::Bed::new().and_then(|b| b.require_udev().map(|()| b)))
    };
    () => {
        bed!(@check $crate::bed::Bed::new())
    };
    (needs $tools:expr) => {
        bed!(@check $crate::bed::Bed::new().and_then(|b| b.require_tools($tools).map(|()| b)))
    };
    (@check $bed:expr) => {
        match $bed {
            Ok(bed) => bed,
            Err(reason) => {
                if std::env::var_os("CI").is_some() {
                    panic!("test bed unavailable under CI: {reason}");
                }
                eprintln!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

pub struct Bed {
    pub dir: tempfile::TempDir,
}

impl Bed {
    pub fn new() -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("device tests need root".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("no /dev/loop-control (loop module not loaded?)".into());
        }
        for tool in ["losetup", "partx", "sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "xz", "gzip", "zstd"] {
            if which(tool).is_none() {
                return Err(format!("{tool} is not installed (run scripts/test, which installs it)"));
            }
        }
        fs::create_dir_all(RUN_DIR).map_err(|e| format!("{RUN_DIR}: {e}"))?;
        let dir = tempfile::Builder::new().prefix("flashbay-test-").tempdir().map_err(|e| e.to_string())?;
        Ok(Self { dir })
    }

    /// Daemon tests need a running systemd-udevd (and journald for journal
    /// checks); scripts/test starts both.
    pub fn require_udev(&self) -> Result<(), String> {
        // A ping can fail while udevd reloads rules for a concurrent test.
        let ping = || {
            Command::new("udevadm")
                .args(["control", "--ping", "--timeout=5"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !(0..10).any(|_| {
            ping() || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                false
            }
        }) {
            return Err("systemd-udevd is not running (scripts/test starts it)".into());
        }
        if !Path::new("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device").exists() {
            return Err("no cgroup v1 blkio controller for slow cards".into());
        }
        Ok(())
    }

    /// Tools only some tests use (qemu-img, tar); scripts/deps --tests installs them.
    pub fn require_tools(&self, tools: &[&str]) -> Result<(), String> {
        match tools.iter().find(|t| which(t).is_none()) {
            Some(tool) => Err(format!("{tool} is not installed (run scripts/test, which installs it)")),
            None => Ok(()),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse backing file of `size` bytes filled with a recognisable
    /// pattern every MiB, so "unchanged" is a meaningful assertion.
    pub fn card(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let mut off = 0;
        while off < size {
            file.write_all_at(&pattern(off), off).unwrap();
            off += MIB;
        }
        path
    }

    /// Attaches a backing file as a loop device: a card in a reader.
    pub fn attach(&self, backing: &Path) -> Loop {
        self.attach_with(backing, &[])
    }

    /// As [`Bed::attach`], with extra `losetup` flags (e.g. `-r`).
    pub fn attach_with(&self, backing: &Path, flags: &[&str]) -> Loop {
        let reader = Reader::new();
        let mut card = reader.insert_with(backing, flags);
        card.reader = Some(reader);
        card
    }

    /// Runs the flashbay binary.
    pub fn flashbay(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_flashbay")).args(args).env_remove("FLASHBAY_LOG").output().unwrap()
    }

    /// A deterministic pseudo-random raw image whose first sector is an
    /// (empty) MBR-sized zero block, as real images start: a random first
    /// byte pair could otherwise look like a compressed stream.
    pub fn random_image(&self, name: &str, size: u64, seed: u64) -> PathBuf {
        let path = self.path(name);
        let mut file = File::create(&path).unwrap();
        let mut rng = Rng(seed | 1);
        let mut left = size;
        let mut first = true;
        while left > 0 {
            let n = left.min(MIB);
            let mut buf = vec![0u8; usize::try_from(n).unwrap()];
            rng.fill(&mut buf);
            if first {
                let n = buf.len().min(512);
                buf[..n].fill(0);
                first = false;
            }
            file.write_all(&buf).unwrap();
            left -= n;
        }
        path
    }

    /// A partitioned OS-like image as image builders make them: a FAT32
    /// boot partition and an ext4 root partition, both holding files.
    pub fn os_image(&self, name: &str, table: Table) -> PathBuf {
        self.os_image_with(name, &OsSpec { table, ..OsSpec::default() }).path
    }

    /// As [`Bed::os_image`], sized and optionally damaged; the returned
    /// [`OsImage`] keeps the files that went into each partition.
    pub fn os_image_with(&self, name: &str, spec: &OsSpec) -> OsImage {
        let boot_mib = 64;
        let root_mib = spec.root_mib;
        let work = self.path(&format!("{name}.parts"));
        fs::create_dir_all(work.join("root/etc")).unwrap();
        fs::create_dir_all(work.join("root/usr/lib")).unwrap();
        fs::create_dir_all(work.join("boot")).unwrap();
        fs::write(work.join("root/etc/hostname"), "flashbay-test\n").unwrap();
        let mut rng = Rng(0x5eed);
        let mut blob = vec![0u8; 3 << 20];
        rng.fill(&mut blob);
        fs::write(work.join("root/usr/lib/blob.bin"), &blob).unwrap();
        fs::write(work.join("boot/config.txt"), "arm_64bit=1\nenable_uart=1\n").unwrap();
        fs::write(work.join("boot/kernel.img"), &blob[..1 << 20]).unwrap();

        let boot = work.join("boot.part");
        File::create(&boot).unwrap().set_len(boot_mib * MIB).unwrap();
        run("mkfs.vfat", &["-F", "32", "-n", "BOOT", boot.to_str().unwrap()]);
        for f in ["config.txt", "kernel.img"] {
            run("mcopy", &["-i", boot.to_str().unwrap(), work.join("boot").join(f).to_str().unwrap(), "::"]);
        }
        let root = work.join("root.part");
        let root_dir = work.join("root");
        let size = format!("{root_mib}M");
        run(
            "mkfs.ext4",
            &["-q", "-F", "-L", "rootfs", "-d", root_dir.to_str().unwrap(), root.to_str().unwrap(), &size],
        );
        if spec.break_root {
            // Clear the root directory's inode: e2fsck -p cannot fix that.
            run("debugfs", &["-w", "-R", "clri <2>", root.to_str().unwrap()]);
        }

        let path = self.path(name);
        // 1 MiB for the table, the partitions, 1 MiB for a GPT backup.
        let total = (1 + boot_mib + root_mib + 1) * MIB;
        File::create(&path).unwrap().set_len(total).unwrap();
        let (label, boot_type, root_type) = match spec.table {
            Table::Mbr => ("dos", "c", "83"),
            Table::Gpt => ("gpt", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        };
        let script = format!(
            "label: {label}\nstart=2048, size={}, type={boot_type}\nstart={}, size={}, type={root_type}\n",
            boot_mib * 2048,
            2048 + boot_mib * 2048,
            root_mib * 2048
        );
        run_stdin("sfdisk", &["-q", path.to_str().unwrap()], &script);
        let image = OpenOptions::new().write(true).open(&path).unwrap();
        image.write_all_at(&fs::read(&boot).unwrap(), MIB).unwrap();
        image.write_all_at(&fs::read(&root).unwrap(), (1 + boot_mib) * MIB).unwrap();
        fs::remove_file(&boot).unwrap();
        fs::remove_file(&root).unwrap();
        OsImage {
            path,
            boot_files: ["config.txt", "kernel.img"]
                .iter()
                .map(|f| ((*f).to_owned(), work.join("boot").join(f)))
                .collect(),
            root_files: ["etc/hostname", "usr/lib/blob.bin"]
                .iter()
                .map(|f| (format!("/{f}"), root_dir.join(f)))
                .collect(),
            root_bytes: root_mib * MIB,
        }
    }

    /// Compresses with the real tool, keeping the original.
    pub fn compress(&self, raw: &Path, format: &str) -> PathBuf {
        let (tool, args, ext): (&str, &[&str], &str) = match format {
            "xz" => ("xz", &["-k", "-f", "-T0", "-1"], "xz"),
            "gz" => ("gzip", &["-k", "-f", "-1"], "gz"),
            "zst" => ("zstd", &["-q", "-k", "-f", "-1"], "zst"),
            other => panic!("unknown format {other}"),
        };
        let mut all = args.to_vec();
        all.push(raw.to_str().unwrap());
        run(tool, &all);
        PathBuf::from(format!("{}.{ext}", raw.display()))
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Table {
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, Copy)]
pub struct OsSpec {
    pub table: Table,
    /// Size of the ext4 root partition (and filesystem).
    pub root_mib: u64,
    /// Damage the root filesystem beyond what `e2fsck -p` repairs.
    pub break_root: bool,
}

impl Default for OsSpec {
    fn default() -> Self {
        Self { table: Table::Mbr, root_mib: 48, break_root: false }
    }
}

/// An image from [`Bed::os_image_with`] and what went into it.
pub struct OsImage {
    pub path: PathBuf,
    /// (name on the FAT partition, source file)
    pub boot_files: Vec<(String, PathBuf)>,
    /// (path in the ext4 partition, source file)
    pub root_files: Vec<(String, PathBuf)>,
    pub root_bytes: u64,
}

/// An empty card reader: a loop device number reserved for this test and
/// left unattached (size 0) until a card is inserted.
pub struct Reader {
    reservation: Reservation,
}

impl Reader {
    pub fn new() -> Self {
        Self { reservation: Reservation::take() }
    }

    pub fn dev(&self) -> PathBuf {
        self.reservation.device()
    }

    /// Inserts a card: attaches the backing file to this reader's device.
    pub fn insert(&self, backing: &Path) -> Loop {
        self.insert_with(backing, &[])
    }

    fn insert_with(&self, backing: &Path, flags: &[&str]) -> Loop {
        let dev = self.dev();
        let mut args = vec!["-P"];
        args.extend_from_slice(flags);
        args.extend([dev.to_str().unwrap(), backing.to_str().unwrap()]);
        run("losetup", &args);
        Loop { dev, backing: backing.to_owned(), reader: None }
    }
}

/// An attached loop device (a card in a reader); detached on drop.
pub struct Loop {
    pub dev: PathBuf,
    pub backing: PathBuf,
    /// Set when the card came with its own reader (see [`Bed::attach`]).
    reader: Option<Reader>,
}

impl Loop {
    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }

    pub fn name(&self) -> String {
        self.dev.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Plays the kernel's part: this VM's kernel parses no partition
    /// tables, so partitions appear only through BLKPG.
    pub fn add_partitions(&self) {
        run("partx", &["--update", self.path()]);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Partitions added by partx go away with the device.
        let _ = Command::new("partx").args(["-d", self.path()]).output();
        for _ in 0..50 {
            match Command::new("losetup").args(["-d", self.path()]).output() {
                Ok(out) if out.status.success() => break,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        drop(self.reader.take());
    }
}

/// A loop device number this process owns, by a marker file holding our PID.
struct Reservation {
    n: u32,
    marker: PathBuf,
}

impl Reservation {
    fn take() -> Self {
        let lock = File::create(Path::new(RUN_DIR).join("alloc.lock")).unwrap();
        // SAFETY: flock on a valid fd; released when `lock` is closed.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        for n in 0.. {
            let marker = Path::new(RUN_DIR).join(format!("loop{n}"));
            if let Ok(pid) = fs::read_to_string(&marker) {
                let alive = pid.trim().parse::<i32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
                if alive {
                    continue;
                }
            }
            if Path::new(&format!("/sys/block/loop{n}/loop/backing_file")).exists() {
                continue;
            }
            ensure_loop_node(n);
            fs::write(&marker, std::process::id().to_string()).unwrap();
            return Self { n, marker };
        }
        unreachable!()
    }

    fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.n))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.marker);
    }
}

/// Creates /dev/loopN if the kernel has not yet (LOOP_CTL_ADD).
fn ensure_loop_node(n: u32) {
    let dev = format!("/dev/loop{n}");
    if Path::new(&dev).exists() {
        return;
    }
    let ctl = File::open("/dev/loop-control").unwrap();
    // SAFETY: LOOP_CTL_ADD takes the device number by value.
    let _ = unsafe { libc::ioctl(ctl.as_raw_fd(), 0x4C80, libc::c_ulong::from(n)) };
    for _ in 0..50 {
        if Path::new(&dev).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{dev} did not appear");
}

/// A mount undone on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn new(dev: &str, dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap();
        run("mount", &[dev, dir.to_str().unwrap()]);
        Self(dir.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// Swap enabled on a device, disabled on drop.
pub struct Swap(pub String);

impl Swap {
    pub fn new(dev: &str) -> Self {
        run("mkswap", &["-q", dev]);
        run("swapon", &[dev]);
        Self(dev.to_owned())
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).output();
    }
}

/// Waits until udev has processed every event so far (when udevd runs):
/// after a writer closes a disk, udev re-probes it and may drop its caches.
pub fn settle() {
    let _ = Command::new("udevadm").args(["settle", "--timeout=10"]).output();
}

/// Runs a tool; panics with its stderr if it fails.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run_stdin(tool: &str, args: &[&str], input: &str) -> String {
    use std::process::Stdio;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// The bytes a fresh card holds at MiB boundary `off`.
pub fn pattern(off: u64) -> Vec<u8> {
    format!("flashbay-test card pattern at {off:016x}\n").into_bytes()
}

/// First offset where the first `len` bytes of two files differ.
pub fn first_difference(a: &Path, b: &Path, len: u64) -> Option<u64> {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(MIB)).unwrap();
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap();
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    None
}

/// SHA-256 of a whole file, via the system tool.
pub fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()]).split_whitespace().next().unwrap().to_owned()
}

/// Reads `len` bytes at `off` of any file or device.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique within this test process.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

//! A card that misbehaves on demand: yanked, dying, counterfeit, flaky, slow.
//!
//! A card pulled out of its reader fails every pending and later I/O. A loop
//! device cannot emulate that by vanishing: while a writer holds it open,
//! `losetup -d` only arms autoclear and the device lives on. So the device
//! stays and its backing file misbehaves instead: [`FaultyCard`] serves that
//! file from an in-process FUSE file system, forwarding I/O to a real file
//! and bending it as the test asks, at any time:
//!
//! | mode | the card |
//! |---|---|
//! | [`FaultyCard::fail_all`] | was pulled: every read, write, flush, fsync fails with EIO |
//! | [`FaultyCard::fail_after`] | is dead past a byte: I/O touching it or anything after fails |
//! | [`FaultyCard::eio_at`] | has one bad spot: I/O touching that byte fails |
//! | [`FaultyCard::drop_writes_past`] | is a fake that drops writes past its real size and reads zeros there |
//! | [`FaultyCard::wrap_at`] | is a fake that wraps: offset o is o % n of the backing file |
//! | [`FaultyCard::flip_on_read`] | flips one bit of one byte whenever it is read |
//! | [`FaultyCard::slow`] | serves so many bytes per second |
//!
//! The modes combine; the size the card reports is always the backing
//! file's, as a fake card claims its full size. The card is opened with
//! `FOPEN_DIRECT_IO`, so no page cache of the FUSE file serves reads or
//! absorbs writes: every I/O the loop device issues reaches the handlers
//! here, and misbehaves as soon as the test says so.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use nix::mount::{MntFlags, umount, umount2};

use crate::bed::{self, Bed, Loop, MIB, Reader};

const CARD: &str = "card";
const CARD_INO: INodeNo = INodeNo(2);

/// "Not set" for the offset-valued modes.
const OFF: u64 = u64::MAX;

/// What the test and the file system share; offsets are [`OFF`] when unset.
#[derive(Debug)]
struct State {
    failing: AtomicBool,
    writes: AtomicU64,
    fail_after: AtomicU64,
    eio_at: AtomicU64,
    drop_writes_past: AtomicU64,
    wrap_at: AtomicU64,
    flip_on_read: AtomicU64,
    /// Bytes per second; 0 is full speed.
    rate: AtomicU64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            failing: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            fail_after: AtomicU64::new(OFF),
            eio_at: AtomicU64::new(OFF),
            drop_writes_past: AtomicU64::new(OFF),
            wrap_at: AtomicU64::new(OFF),
            flip_on_read: AtomicU64::new(OFF),
            rate: AtomicU64::new(0),
        }
    }
}

impl State {
    fn get(field: &AtomicU64) -> Option<u64> {
        Some(field.load(Ordering::SeqCst)).filter(|&v| v != OFF)
    }
}

/// The file system: a root directory holding the single file [`CARD`].
struct CardFs {
    backing: File,
    state: Arc<State>,
}

impl CardFs {
    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (kind, perm, size) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0)
        } else if ino == CARD_INO {
            (FileType::RegularFile, 0o600, self.backing.metadata()?.len())
        } else {
            return Err(Errno::ENOENT);
        };
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// EIO once the card has been pulled.
    fn present(&self) -> Result<(), Errno> {
        if self.state.failing.load(Ordering::SeqCst) { Err(Errno::EIO) } else { Ok(()) }
    }

    /// EIO for I/O on [offset, offset + len) of a pulled card, past the dead
    /// byte, or over the bad spot.
    fn usable(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.present()?;
        let end = offset + len;
        let dead = State::get(&self.state.fail_after).is_some_and(|n| end > n);
        let bad = State::get(&self.state.eio_at).is_some_and(|at| (offset..end).contains(&at));
        if dead || bad { Err(Errno::EIO) } else { Ok(()) }
    }

    /// Takes as long as `len` bytes take at the card's speed.
    fn throttle(&self, len: usize) {
        let rate = self.state.rate.load(Ordering::SeqCst);
        if rate > 0 {
            sleep(Duration::from_secs_f64(len as f64 / rate as f64));
        }
    }

    /// Where the `len` bytes at card offset `offset` live: the longest run
    /// that maps to one stretch of the backing file, as (backing offset or
    /// `None` for nowhere, run length).
    fn map(&self, offset: u64, len: u64) -> (Option<u64>, u64) {
        if let Some(real) = State::get(&self.state.drop_writes_past) {
            if offset >= real {
                return (None, len);
            }
            let (at, run) = self.wrap(offset, len);
            return (at, run.min(real - offset));
        }
        self.wrap(offset, len)
    }

    fn wrap(&self, offset: u64, len: u64) -> (Option<u64>, u64) {
        match State::get(&self.state.wrap_at) {
            Some(n) => (Some(offset % n), len.min(n - offset % n)),
            None => (Some(offset), len),
        }
    }
}

impl Filesystem for CardFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name.to_str() != Some(CARD) {
            return reply.error(Errno::ENOENT);
        }
        // Attributes are never cached (TTL zero): the size is always the backing file's.
        match self.attr(CARD_INO) {
            Ok(attr) => reply.entry(&Duration::ZERO, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(e) => reply.error(e),
        }
    }

    /// Only a size change (truncation) is honoured; the rest is ignored.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = match size {
            Some(size) if ino == CARD_INO => self.backing.set_len(size).map_err(Errno::from),
            _ => Ok(()),
        };
        match result.and_then(|()| self.attr(ino)) {
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.throttle(size as usize);
        let result = self.usable(offset, u64::from(size)).and_then(|()| {
            // A read past the reported size is short, as for any file.
            let len = u64::from(size).min(self.backing.metadata()?.len().saturating_sub(offset));
            let mut buf = vec![0; len as usize];
            let mut done = 0;
            while done < len {
                let (at, run) = self.map(offset + done, len - done);
                let piece = &mut buf[done as usize..(done + run) as usize];
                // Unmapped bytes (dropped writes) read as zeros.
                if let Some(at) = at {
                    self.backing.read_exact_at(piece, at)?;
                }
                done += run;
            }
            if let Some(at) = State::get(&self.state.flip_on_read).filter(|at| (offset..offset + len).contains(at)) {
                buf[(at - offset) as usize] ^= 0x01;
            }
            Ok(buf)
        });
        match result {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.state.writes.fetch_add(1, Ordering::SeqCst);
        self.throttle(data.len());
        let len = data.len() as u64;
        let result = self.usable(offset, len).and_then(|()| {
            let mut done = 0;
            while done < len {
                let (at, run) = self.map(offset + done, len - done);
                // Unmapped bytes (past a fake's real size) vanish, reported written.
                if let Some(at) = at {
                    self.backing.write_all_at(&data[done as usize..(done + run) as usize], at)?;
                }
                done += run;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        match self.present() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.present().and_then(|()| Ok(self.backing.sync_data()?)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A file `card` inside a FUSE mount, forwarding reads/writes to a real
/// backing file; unmounted on drop.
///
/// Drop order matters: a loop device backed by [`FaultyCard::file`] keeps
/// the mount busy, so detach it first (declare the `Loop` after the
/// `FaultyCard`: locals drop in reverse order, panics included). Drop still
/// copes with a device that lets go a moment late (`losetup -d` on a device
/// udev holds open only arms autoclear), then falls back to a lazy unmount.
#[derive(Debug)]
pub struct FaultyCard {
    mountpoint: PathBuf,
    state: Arc<State>,
    session: Option<BackgroundSession>,
}

impl FaultyCard {
    /// Mounts a FUSE file system at `mountpoint` (an existing empty
    /// directory) exposing one regular file named `card` whose size and
    /// contents are those of `backing` (an existing regular file; reads and
    /// writes go to it with pread/pwrite).
    pub fn mount(backing: &Path, mountpoint: &Path) -> FaultyCard {
        let backing = OpenOptions::new().read(true).write(true).open(backing).unwrap();
        let state = Arc::new(State::default());
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("flashbay-fusecard".into())];
        let fs = CardFs { backing, state: Arc::clone(&state) };
        // As root, fuser calls mount(2) itself (no fusermount). No `allow_other`:
        // the loop device opens the card as root, and its workers' I/O is root's too.
        let session = fuser::spawn_mount(fs, mountpoint, &config).expect("mount the FUSE card (root needed)");
        FaultyCard { mountpoint: mountpoint.canonicalize().unwrap(), state, session: Some(session) }
    }

    /// Path of the card file inside the mount (what the test passes to losetup).
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(CARD)
    }

    /// From now on every read, write, flush and fsync of the card returns EIO.
    pub fn fail_all(&self) {
        self.state.failing.store(true, Ordering::SeqCst);
    }

    /// From now on every read or write touching byte `n` or any byte after
    /// it fails with EIO: a card dead past `n`.
    pub fn fail_after(&self, n: u64) {
        self.state.fail_after.store(n, Ordering::SeqCst);
    }

    /// From now on every read or write touching byte `offset` fails with
    /// EIO: one bad spot.
    pub fn eio_at(&self, offset: u64) {
        self.state.eio_at.store(offset, Ordering::SeqCst);
    }

    /// From now on writes at or past byte `n` vanish (they report success)
    /// and reads there return zeros: a fake that holds `n` bytes and drops
    /// the rest. The backing file past `n` is left alone.
    pub fn drop_writes_past(&self, n: u64) {
        self.state.drop_writes_past.store(n, Ordering::SeqCst);
    }

    /// From now on every read and write at card offset o goes to offset
    /// o % `n` of the backing file: a fake that holds `n` bytes and ignores
    /// the high address bits. The card still reports its full size.
    pub fn wrap_at(&self, n: u64) {
        assert!(n > 0 && n != OFF, "wrap_at({n})");
        self.state.wrap_at.store(n, Ordering::SeqCst);
    }

    /// From now on every read covering card offset `offset` returns that
    /// byte with its lowest bit flipped; the stored byte stays intact.
    pub fn flip_on_read(&self, offset: u64) {
        self.state.flip_on_read.store(offset, Ordering::SeqCst);
    }

    /// From now on each read and write takes as long as its size takes at
    /// `bytes_per_sec` (0: full speed again).
    pub fn slow(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Number of write requests served so far (successful or not), to let a
    /// test wait until writing has started.
    pub fn writes(&self) -> u64 {
        self.state.writes.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyCard {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else { return };
        let deadline = Instant::now() + Duration::from_secs(5);
        while umount(&self.mountpoint) == Err(nix::errno::Errno::EBUSY) {
            if Instant::now() > deadline {
                // The session thread serves the card until the loop device lets go of it.
                eprintln!("{} still busy (loop device attached?): lazy unmount", self.mountpoint.display());
                let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
                return;
            }
            sleep(Duration::from_millis(20));
        }
        // Unmounted: the kernel has torn the connection down, ending the session.
        if let Err(e) = session.join() {
            eprintln!("FUSE card session failed: {e}");
        }
    }
}

/// A [`FaultyCard`] in a reader: the usual shape of a test. Fields drop in
/// order, so the loop device lets go of the mount before it is unmounted.
pub struct FaultyLoop {
    pub dev: Loop,
    pub card: FaultyCard,
    /// The real file behind the card, for checking what landed.
    pub backing: PathBuf,
}

impl FaultyLoop {
    /// A `size`-byte card holding the bed's pattern ([`Bed::card`]), well
    /// behaved until the test sets a mode.
    pub fn new(bed: &Bed, name: &str, size: u64) -> Self {
        Self::with_backing(bed, name, bed.card(name, size))
    }

    /// As [`FaultyLoop::new`], over an existing backing file.
    pub fn with_backing(bed: &Bed, name: &str, backing: PathBuf) -> Self {
        let mountpoint = bed.path(&format!("{name}.mnt"));
        fs::create_dir(&mountpoint).unwrap();
        let card = FaultyCard::mount(&backing, &mountpoint);
        let dev = bed.attach(&card.file());
        // Let udev's look at the new device finish before a mode bends it.
        bed::settle();
        Self { dev, card, backing }
    }

    /// The loop device opened for O_DIRECT reads and writes.
    pub fn open(&self) -> File {
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&self.dev.dev).unwrap()
    }
}

/// `len` bytes of test data in a buffer fit for O_DIRECT.
fn data(len: u64, seed: u64) -> flashbay::blockdev::AlignedBuf {
    let mut buf = flashbay::blockdev::AlignedBuf::new(len as usize);
    bed::Rng(seed | 1).fill(&mut buf);
    buf
}

/// Reads `len` bytes at `offset` with O_DIRECT.
fn read_direct(file: &File, offset: u64, len: u64) -> std::io::Result<flashbay::blockdev::AlignedBuf> {
    let mut buf = flashbay::blockdev::AlignedBuf::new(len as usize);
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Whether the backing file still holds the bed's pattern at MiB boundary `offset`.
fn holds_pattern(backing: &Path, offset: u64) -> bool {
    let pattern = bed::pattern(offset);
    bed::read_at(backing, offset, pattern.len()) == pattern
}

fn is_eio(result: std::io::Result<impl Sized>) -> bool {
    result.err().and_then(|e| e.raw_os_error()) == Some(libc::EIO)
}

/// The fixture end to end: O_DIRECT writes through a loop device land in
/// the backing file, then fail with EIO once the card is pulled.
#[test]
fn fuse_card_fails_on_demand_under_a_loop_device() {
    use flashbay::blockdev::AlignedBuf;

    let bed = bed!();
    let backing = bed.card("backing", 16 * MIB);
    let mountpoint = bed.path("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    // Before the loop device, so dropped after it.
    let card = FaultyCard::mount(&backing, &mountpoint);
    let reader = Reader::new();
    let dev = reader.insert(&card.file());
    assert_eq!(std::fs::metadata(card.file()).unwrap().len(), 16 * MIB);

    let target = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&dev.dev).unwrap();
    let mut buf = AlignedBuf::new(MIB as usize);
    buf.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
    target.write_all_at(&buf, 4 * MIB).unwrap();
    assert_eq!(bed::read_at(&backing, 4 * MIB, buf.len()), &buf[..]);
    let before = card.writes();
    assert!(before > 0, "no write reached the FUSE handler");

    card.fail_all();
    let err = target.write_all_at(&buf, 8 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(card.writes() > before, "the failed write never reached the FUSE handler");
    let pattern = bed::pattern(8 * MIB);
    assert_eq!(bed::read_at(&backing, 8 * MIB, pattern.len()), pattern, "a failed write changed the card");

    // Close and detach before unmounting, as the declaration order would.
    drop(target);
    drop(dev);
    drop(card);
}

/// `fail_after`: I/O below the dead byte works, I/O touching it or past it
/// fails, and a failed write leaves the card as it was.
#[test]
fn fuse_card_dies_past_a_byte() {
    let bed = bed!();
    let fl = FaultyLoop::new(&bed, "card", 16 * MIB);
    let dev = fl.open();
    fl.card.fail_after(8 * MIB);
    let buf = data(MIB, 1);
    dev.write_all_at(&buf, 4 * MIB).unwrap();
    assert_eq!(bed::read_at(&fl.backing, 4 * MIB, buf.len()), &buf[..]);
    assert_eq!(&read_direct(&dev, 7 * MIB, MIB).unwrap()[..], &bed::read_at(&fl.backing, 7 * MIB, MIB as usize)[..]);
    assert!(is_eio(dev.write_all_at(&buf, 8 * MIB)), "a write at the dead byte succeeded");
    assert!(is_eio(dev.write_all_at(&buf, 7 * MIB + MIB / 2)), "a write across the dead byte succeeded");
    assert!(is_eio(read_direct(&dev, 12 * MIB, MIB)), "a read past the dead byte succeeded");
    assert!(holds_pattern(&fl.backing, 8 * MIB));
}

/// `eio_at`: exactly the I/O touching the bad byte fails.
#[test]
fn fuse_card_fails_io_over_one_bad_spot() {
    let bed = bed!();
    let fl = FaultyLoop::new(&bed, "card", 16 * MIB);
    let dev = fl.open();
    let bad = 6 * MIB + 4096 + 17;
    fl.card.eio_at(bad);
    assert!(is_eio(read_direct(&dev, 6 * MIB, 8192)), "a read over the bad spot succeeded");
    assert!(read_direct(&dev, 6 * MIB, 4096).is_ok(), "the block before the bad spot failed");
    assert!(read_direct(&dev, 6 * MIB + 8192, MIB).is_ok(), "the blocks after the bad spot failed");
    let buf = data(8192, 2);
    assert!(is_eio(dev.write_all_at(&buf, 6 * MIB)), "a write over the bad spot succeeded");
    assert!(holds_pattern(&fl.backing, 6 * MIB), "a failed write landed");
    dev.write_all_at(&buf, 9 * MIB).unwrap();
    assert_eq!(bed::read_at(&fl.backing, 9 * MIB, buf.len()), &buf[..]);
}

/// `drop_writes_past`: below the real size the card works; past it writes
/// "succeed" without landing and reads return zeros.
#[test]
fn fuse_card_drops_writes_past_its_real_size() {
    let bed = bed!();
    let fl = FaultyLoop::new(&bed, "card", 16 * MIB);
    let dev = fl.open();
    fl.card.drop_writes_past(8 * MIB);
    let buf = data(MIB, 3);
    dev.write_all_at(&buf, 12 * MIB).unwrap();
    assert!(holds_pattern(&fl.backing, 12 * MIB), "a dropped write landed");
    assert!(read_direct(&dev, 12 * MIB, MIB).unwrap().iter().all(|&b| b == 0), "past the real size reads non-zero");
    dev.write_all_at(&buf, 4 * MIB).unwrap();
    assert_eq!(&read_direct(&dev, 4 * MIB, MIB).unwrap()[..], &buf[..]);
    assert_eq!(bed::read_at(&fl.backing, 4 * MIB, buf.len()), &buf[..]);
    // A write across the real size: the part below lands, the rest vanishes.
    dev.write_all_at(&buf, 8 * MIB - 4096).unwrap();
    assert_eq!(bed::read_at(&fl.backing, 8 * MIB - 4096, 4096), &buf[..4096]);
    assert!(holds_pattern(&fl.backing, 8 * MIB));
}

/// `wrap_at`: the card claims its full size, and offset o is o % n.
#[test]
fn fuse_card_wraps_around() {
    let bed = bed!();
    let fl = FaultyLoop::new(&bed, "card", 16 * MIB);
    let dev = fl.open();
    fl.card.wrap_at(4 * MIB);
    assert_eq!(fs::metadata(fl.card.file()).unwrap().len(), 16 * MIB);
    assert_eq!(bed::run("blockdev", &["--getsize64", fl.dev.path()]).trim(), (16 * MIB).to_string());
    let buf = data(MIB, 4);
    dev.write_all_at(&buf, 9 * MIB).unwrap();
    assert_eq!(bed::read_at(&fl.backing, MIB, buf.len()), &buf[..], "9 MiB did not land at 1 MiB");
    assert!(holds_pattern(&fl.backing, 9 * MIB));
    for alias in [MIB, 5 * MIB, 13 * MIB] {
        assert_eq!(&read_direct(&dev, alias, MIB).unwrap()[..], &buf[..], "{alias} does not alias 9 MiB");
    }
    // Across the wrap: the end of the real part, then its start.
    let across = data(8192, 5);
    dev.write_all_at(&across, 8 * MIB - 4096).unwrap();
    assert_eq!(bed::read_at(&fl.backing, 4 * MIB - 4096, 4096), &across[..4096]);
    assert_eq!(bed::read_at(&fl.backing, 0, 4096), &across[4096..]);
    assert_eq!(&read_direct(&dev, 4 * MIB - 4096, 8192).unwrap()[..], &across[..]);
}

/// `flip_on_read`: the byte comes back with one bit flipped, every time,
/// while the card holds what was written.
#[test]
fn fuse_card_flips_a_bit_on_read() {
    let bed = bed!();
    let fl = FaultyLoop::new(&bed, "card", 16 * MIB);
    let dev = fl.open();
    let at = 5 * MIB + 123;
    fl.card.flip_on_read(at);
    let buf = data(MIB, 6);
    dev.write_all_at(&buf, 5 * MIB).unwrap();
    assert_eq!(bed::read_at(&fl.backing, 5 * MIB, buf.len()), &buf[..]);
    for _ in 0..2 {
        let back = read_direct(&dev, 5 * MIB, MIB).unwrap();
        let diffs: Vec<(usize, u8)> = back
            .iter()
            .zip(buf.iter())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, a ^ b))
            .collect();
        assert_eq!(diffs, vec![(123, 0x01)]);
    }
    assert_eq!(&read_direct(&dev, 5 * MIB + 4096, 4096).unwrap()[..], &buf[4096..8192]);
}

/// `slow`: I/O takes as long as the rate says, and the bytes are intact.
#[test]
fn fuse_card_is_as_slow_as_asked() {
    let bed = bed!();
    let fl = FaultyLoop::new(&bed, "card", 16 * MIB);
    let dev = fl.open();
    fl.card.slow(8 * MIB);
    let buf = data(2 * MIB, 7);
    let started = Instant::now();
    dev.write_all_at(&buf, 2 * MIB).unwrap();
    let wrote = started.elapsed();
    let started = Instant::now();
    let back = read_direct(&dev, 2 * MIB, 2 * MIB).unwrap();
    let read = started.elapsed();
    assert_eq!(&back[..], &buf[..]);
    // 2 MiB at 8 MiB/s: 250 ms each way, whatever the request sizes.
    for (what, took) in [("write", wrote), ("read", read)] {
        assert!(took >= Duration::from_millis(240) && took < Duration::from_secs(3), "{what} took {took:?}");
    }
    fl.card.slow(0);
    let started = Instant::now();
    read_direct(&dev, 2 * MIB, 2 * MIB).unwrap();
    assert!(started.elapsed() < Duration::from_millis(240), "full speed again took {:?}", started.elapsed());
}

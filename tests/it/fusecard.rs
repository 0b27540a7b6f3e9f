//! A card that can be yanked mid-write.
//!
//! A card pulled out of its reader fails every pending and later I/O. A loop
//! device cannot emulate that by vanishing: while a writer holds it open,
//! `losetup -d` only arms autoclear and the device lives on. So the device
//! stays and its backing file starts failing instead: [`FaultyCard`] serves
//! that file from an in-process FUSE file system, forwarding I/O to a real
//! file until [`FaultyCard::fail_all`] and failing it with EIO from then on.
//!
//! The card is opened with `FOPEN_DIRECT_IO`, so no page cache of the FUSE
//! file serves reads or absorbs writes: every I/O the loop device issues
//! reaches the handlers here, and fails as soon as the card is "pulled".

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
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

use crate::bed::{self, MIB, Reader};

const CARD: &str = "card";
const CARD_INO: INodeNo = INodeNo(2);

/// What the test and the file system share.
#[derive(Debug, Default)]
struct State {
    failing: AtomicBool,
    writes: AtomicU64,
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
        let mut buf = vec![0; size as usize];
        let result = self.present().and_then(|()| Ok(self.backing.read_at(&mut buf, offset)?));
        match result {
            Ok(n) => reply.data(&buf[..n]),
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
        match self.present().and_then(|()| Ok(self.backing.write_all_at(data, offset)?)) {
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

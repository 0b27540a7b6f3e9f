//! Targets: a block device (or regular file) opened for direct, exclusive I/O.
//!
//! A block device is opened `O_DIRECT | O_EXCL`: direct so that writes are
//! not buffered in RAM and reads come from the card, exclusive so that the
//! open fails while anything has it mounted or claimed. We then hold
//! `flock(LOCK_EX)` for as long as the target is open, which tells
//! systemd-udevd not to probe the device while we change it.
//!
//! A regular file takes the same path, with `O_DIRECT` where its filesystem
//! supports it and buffered I/O plus `fdatasync` where it does not.

mod aligned;
pub(crate) mod ioctl;
pub mod partitions;
pub mod scsi;
pub mod sysfs;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

pub use aligned::{ALIGN, AlignedBuf};
pub use sysfs::{Bus, DevNum, SysBlock, Sysfs};

/// How long we wait for a short-lived lock holder (udev probing) to let go.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{}: no such device", path.display())]
    Missing { path: PathBuf },
    #[error("{}: device is busy: mounted, or opened exclusively by another program", path.display())]
    Busy { path: PathBuf },
    #[error("{}: another program holds a lock on the device", path.display())]
    Locked { path: PathBuf },
    #[error("{}: is neither a block device nor a regular file", path.display())]
    Unsupported { path: PathBuf },
    #[error("{}: {op} failed: {source}", path.display())]
    Ioctl { path: PathBuf, op: &'static str, source: Errno },
    #[error("{}: write failed at offset {offset}: {source}", path.display())]
    Write { path: PathBuf, offset: u64, source: io::Error },
    #[error("{}: read failed at offset {offset}: {source}", path.display())]
    Read { path: PathBuf, offset: u64, source: io::Error },
    #[error("{}: flush to the medium failed: {source}", path.display())]
    Sync { path: PathBuf, source: io::Error },
    #[error("{}: the card was changed (DISKSEQ {found}, expected {expected})", path.display())]
    MediaChanged { path: PathBuf, expected: u64, found: u64 },
}

impl DeviceError {
    /// The underlying OS error, when there is one; the daemon uses it to
    /// tell a pulled card (ENODEV, ENXIO, EIO) from other failures.
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Self::Write { source, .. } | Self::Read { source, .. } | Self::Sync { source, .. } => source.raw_os_error(),
            Self::Ioctl { source, .. } => Some(*source as i32),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BlockDevice,
    RegularFile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Exclusive, locked, read-write: for flashing.
    Write,
    /// Shared read-only: for verifying a card on its own.
    Read,
    /// Read-only, but holding the exclusive lock: keeps udev away while
    /// other tools (sfdisk, e2fsck) edit the card.
    Lock,
}

/// An open block device or regular file.
///
/// The BSD lock lives on a descriptor of its own, apart from the one that
/// does the I/O: [`Target::release_claim`] can then give up the exclusive
/// claim (which expand and resize need gone) without ever dropping the
/// lock, so udev and automounters never get the card in between.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
    /// The I/O descriptor.
    file: File,
    /// Held until the target is dropped: exclusive for writing and
    /// locking, shared for reading.
    lock: Flock<File>,
    kind: Kind,
    dev: Option<DevNum>,
    /// Device size; for a regular file, its length when opened.
    size: u64,
    block_size: usize,
    direct: bool,
}

impl Target {
    pub fn open(path: &Path, access: Access) -> Result<Self, DeviceError> {
        let open_err = |source: io::Error| DeviceError::Open { path: path.to_owned(), source };
        let kind = match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => Kind::BlockDevice,
            Ok(meta) if meta.is_file() => Kind::RegularFile,
            Ok(_) => return Err(DeviceError::Unsupported { path: path.to_owned() }),
            // A typo such as /dev/sdx must not create a file in /dev.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && (access == Access::Read || (path.starts_with("/dev") && !path.starts_with("/dev/shm"))) =>
            {
                return Err(DeviceError::Missing { path: path.to_owned() });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Kind::RegularFile,
            Err(e) => return Err(open_err(e)),
        };
        let classify = |e: io::Error| match e.raw_os_error() {
            Some(libc::EBUSY) => DeviceError::Busy { path: path.to_owned() },
            Some(libc::ENXIO | libc::ENODEV | libc::ENOMEDIUM) => DeviceError::Missing { path: path.to_owned() },
            _ => open_err(e),
        };

        // A new output file must exist before the lock's descriptor can open it.
        if kind == Kind::RegularFile && access == Access::Write {
            OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(open_err)?;
        }
        // The lock first, then the claim: nothing can slip in between.
        let locker = OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(classify)?;
        let lock = match access {
            Access::Write | Access::Lock => lock(locker, path)?,
            // Flock has no "unlocked" state; a shared lock costs nothing and
            // only waits out a writer that holds the exclusive one.
            Access::Read => Flock::lock(locker, FlockArg::LockSharedNonblock)
                .map_err(|(_, _)| DeviceError::Locked { path: path.to_owned() })?,
        };
        let (file, direct) = match access {
            Access::Lock => (lock.try_clone().map_err(open_err)?, false),
            _ => open_file(path, kind, access).map_err(classify)?,
        };

        let ioctl_err = |op, source| DeviceError::Ioctl { path: path.to_owned(), op, source };
        let (size, block_size, dev) = match kind {
            Kind::BlockDevice => {
                let meta = file.metadata().map_err(open_err)?;
                (
                    ioctl::size(&file).map_err(|e| ioctl_err("BLKGETSIZE64", e))?,
                    ioctl::logical_block_size(&file).map_err(|e| ioctl_err("BLKSSZGET", e))?,
                    Some(DevNum::from_rdev(std::os::unix::fs::MetadataExt::rdev(&meta))),
                )
            }
            Kind::RegularFile => (file.metadata().map_err(open_err)?.len(), 512, None),
        };
        Ok(Self { path: path.to_owned(), file, lock, kind, dev, size, block_size, direct })
    }

    /// Gives up the exclusive claim but keeps the lock: partitions become
    /// openable for sfdisk, e2fsck and resize2fs, while udev still keeps
    /// off the card. The target is read-only afterwards, until
    /// [`Target::writable_again`].
    pub fn release_claim(&mut self) -> Result<(), DeviceError> {
        // The claim goes with the old descriptor.
        self.file = self.lock.try_clone().map_err(|source| DeviceError::Open { path: self.path.clone(), source })?;
        self.direct = false;
        Ok(())
    }

    /// After [`Target::release_claim`]: a direct read-write descriptor
    /// again, under the same lock (not exclusive: a partition may still be
    /// in the kernel's hands), to blank a card whose job failed late.
    pub fn writable_again(&mut self) -> Result<(), DeviceError> {
        if self.direct {
            return Ok(());
        }
        let (file, direct) = open_file(&self.path, self.kind, Access::Lock)
            .map_err(|source| DeviceError::Open { path: self.path.clone(), source })?;
        self.file = file;
        self.direct = direct;
        Ok(())
    }

    /// Fails with [`DeviceError::MediaChanged`] unless the device still
    /// holds the media `expected` (a DISKSEQ); `None` expects nothing.
    pub fn ensure_media(&self, expected: Option<u64>) -> Result<(), DeviceError> {
        match (expected, self.diskseq()) {
            (Some(expected), Some(found)) if expected != found => {
                Err(DeviceError::MediaChanged { path: self.path.clone(), expected, found })
            }
            (Some(expected), None) if self.kind == Kind::BlockDevice => {
                Err(DeviceError::MediaChanged { path: self.path.clone(), expected, found: 0 })
            }
            _ => Ok(()),
        }
    }

    /// A second descriptor for reading on another thread (verification's
    /// read-ahead); it shares the claim and the lock of this one.
    pub fn reader(&self) -> Result<TargetReader, DeviceError> {
        let file = self.file.try_clone().map_err(|source| DeviceError::Open { path: self.path.clone(), source })?;
        Ok(TargetReader { path: self.path.clone(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn dev(&self) -> Option<DevNum> {
        self.dev
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Unit of aligned I/O on this target.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes all of `buf` at `offset`; with direct I/O both must be aligned.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.file.write_at(&buf[done..], at) {
                Ok(0) => {
                    return Err(DeviceError::Write {
                        path: self.path.clone(),
                        offset: at,
                        source: io::ErrorKind::WriteZero.into(),
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(DeviceError::Write { path: self.path.clone(), offset: at, source }),
            }
        }
        Ok(())
    }

    /// Reads into `buf` at `offset` until it is full or the target ends;
    /// returns the number of bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, DeviceError> {
        read_full(&self.file, &self.path, buf, offset)
    }

    /// Makes everything written so far durable on the medium.
    pub fn sync(&self) -> Result<(), DeviceError> {
        self.file.sync_data().map_err(|source| DeviceError::Sync { path: self.path.clone(), source })
    }

    /// Drops cached pages of the target, so the next reads hit the medium.
    pub fn drop_caches(&self) -> Result<(), DeviceError> {
        match self.kind {
            Kind::BlockDevice => ioctl::flush_buffers(&self.file).map_err(|source| DeviceError::Ioctl {
                path: self.path.clone(),
                op: "BLKFLSBUF",
                source,
            }),
            Kind::RegularFile => {
                nix::fcntl::posix_fadvise(self.file.as_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
                    .map_err(|source| DeviceError::Ioctl { path: self.path.clone(), op: "posix_fadvise", source })
            }
        }
    }

    /// The media sequence number of a block device; `None` for files and on
    /// kernels older than 5.15.
    pub fn diskseq(&self) -> Option<u64> {
        match self.kind {
            Kind::BlockDevice => ioctl::diskseq(&self.file).ok(),
            Kind::RegularFile => None,
        }
    }

    /// Sets a regular file's length (no-op for devices).
    pub fn set_file_len(&self, len: u64) -> Result<(), DeviceError> {
        if self.kind == Kind::RegularFile {
            self.file.set_len(len).map_err(|source| DeviceError::Write {
                path: self.path.clone(),
                offset: len,
                source,
            })?;
        }
        Ok(())
    }
}

/// A reading descriptor of a [`Target`], owned by another thread.
#[derive(Debug)]
pub struct TargetReader {
    path: PathBuf,
    file: File,
}

impl TargetReader {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, DeviceError> {
        read_full(&self.file, &self.path, buf, offset)
    }
}

fn read_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize, DeviceError> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(DeviceError::Read { path: path.to_owned(), offset: at, source }),
        }
    }
    Ok(done)
}

fn open_file(path: &Path, kind: Kind, access: Access) -> io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    let mut flags = libc::O_CLOEXEC;
    if access != Access::Read {
        opts.write(true);
    }
    if access == Access::Write {
        match kind {
            // O_EXCL on a block device (without O_CREAT) claims it: the open
            // fails with EBUSY while it or any partition is mounted or claimed.
            Kind::BlockDevice => flags |= libc::O_EXCL,
            Kind::RegularFile => {
                opts.create(true);
            }
        }
    }
    match opts.clone().custom_flags(flags | libc::O_DIRECT).open(path) {
        Ok(file) => Ok((file, true)),
        // tmpfs and some FUSE filesystems refuse O_DIRECT: fall back to
        // buffered I/O, which `sync` then makes durable.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && kind == Kind::RegularFile => {
            Ok((opts.custom_flags(flags).open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Takes the exclusive BSD lock, waiting out udev's brief shared lock while
/// it probes a freshly inserted (or just written) card. Probing takes a few
/// milliseconds, so the wait starts short and backs off.
fn lock(mut file: File, path: &Path) -> Result<Flock<File>, DeviceError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) if start.elapsed() < LOCK_TIMEOUT => {
                file = f;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err((_, _)) => return Err(DeviceError::Locked { path: path.to_owned() }),
        }
    }
}

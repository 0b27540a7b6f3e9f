//! The block-layer ioctls we use, declared once.
//!
//! Request codes follow `<linux/fs.h>`. `BLKGETSIZE64` is declared with
//! `size_t` in the kernel header even though the kernel writes a `u64`, so its
//! request code differs between 32- and 64-bit systems (a 32-bit Raspberry Pi
//! OS among them); we encode it with the platform's `size_t` and pass a `u64`.

use std::os::fd::AsRawFd;

use nix::errno::Errno;

nix::ioctl_read_bad!(blkgetsize64, nix::request_code_read!(0x12, 114, size_of::<libc::size_t>()), u64);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_none!(blkflsbuf, 0x12, 97);
nix::ioctl_read!(blkgetdiskseq, 0x12, 128, u64);

/// Size of the device in bytes.
pub(crate) fn size(fd: &impl AsRawFd) -> Result<u64, Errno> {
    let mut size = 0u64;
    // SAFETY: the kernel writes one u64 through the valid pointer.
    unsafe { blkgetsize64(fd.as_raw_fd(), &raw mut size) }?;
    Ok(size)
}

/// Logical block size: the unit of `O_DIRECT` offsets and lengths.
pub(crate) fn logical_block_size(fd: &impl AsRawFd) -> Result<usize, Errno> {
    let mut size: libc::c_int = 0;
    // SAFETY: the kernel writes one int through the valid pointer.
    unsafe { blksszget(fd.as_raw_fd(), &raw mut size) }?;
    usize::try_from(size).map_err(|_| Errno::EINVAL)
}

/// Drops the device's buffer cache, so later reads come from the medium.
pub(crate) fn flush_buffers(fd: &impl AsRawFd) -> Result<(), Errno> {
    // SAFETY: BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(fd.as_raw_fd()) }.map(drop)
}

/// The kernel's media sequence number (Linux 5.15+): it changes whenever
/// new media appears in the device, so it identifies one card in one reader.
pub(crate) fn diskseq(fd: &impl AsRawFd) -> Result<u64, Errno> {
    let mut seq = 0u64;
    // SAFETY: the kernel writes one u64 through the valid pointer.
    unsafe { blkgetdiskseq(fd.as_raw_fd(), &raw mut seq) }?;
    Ok(seq)
}

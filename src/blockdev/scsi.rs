//! The two SCSI commands an eject needs, sent with SG_IO as `eject` and
//! udisks do: SYNCHRONIZE CACHE, so the reader writes out what it holds,
//! and START STOP UNIT with LoEj, so it stops and ejects the medium.
//!
//! [`Scsi`] is the seam: the daemon uses [`SgIo`]; tests, which have no
//! SCSI devices, record the commands instead.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Sends SCSI commands to an open disk.
pub trait Scsi: Send + Sync {
    fn synchronize_cache(&self, disk: &File) -> std::io::Result<()>;
    fn stop_and_eject(&self, disk: &File) -> std::io::Result<()>;
}

/// The real thing, through the SG_IO ioctl.
#[derive(Debug, Default)]
pub struct SgIo;

const SYNCHRONIZE_CACHE_10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// START STOP UNIT, LoEj=1 Start=0: stop the unit and eject the medium.
const START_STOP_EJECT: [u8; 6] = [0x1b, 0, 0, 0, 0x02, 0];
/// Flushing a large cache on a slow card can take a while.
const TIMEOUT_MS: u32 = 60_000;

impl Scsi for SgIo {
    fn synchronize_cache(&self, disk: &File) -> std::io::Result<()> {
        sg_io(disk, &SYNCHRONIZE_CACHE_10)
    }

    fn stop_and_eject(&self, disk: &File) -> std::io::Result<()> {
        sg_io(disk, &START_STOP_EJECT)
    }
}

/// `struct sg_io_hdr` from `<scsi/sg.h>` (interface 'S').
#[repr(C)]
struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: u8,
    mx_sb_len: u8,
    iovec_count: u16,
    dxfer_len: u32,
    dxferp: *mut libc::c_void,
    cmdp: *const u8,
    sbp: *mut u8,
    timeout: u32,
    flags: u32,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: u8,
    masked_status: u8,
    msg_status: u8,
    sb_len_wr: u8,
    host_status: u16,
    driver_status: u16,
    resid: libc::c_int,
    duration: u32,
    info: u32,
}

const SG_IO: libc::c_ulong = 0x2285;
const SG_DXFER_NONE: libc::c_int = -1;

fn sg_io(disk: &File, cdb: &[u8]) -> std::io::Result<()> {
    let mut sense = [0u8; 32];
    let mut hdr = SgIoHdr {
        interface_id: libc::c_int::from(b'S'),
        dxfer_direction: SG_DXFER_NONE,
        cmd_len: u8::try_from(cdb.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        mx_sb_len: 32,
        iovec_count: 0,
        dxfer_len: 0,
        dxferp: std::ptr::null_mut(),
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: TIMEOUT_MS,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: hdr is a valid sg_io_hdr whose cmdp and sbp point at buffers
    // (cdb, sense) that outlive the synchronous ioctl; no data is transferred.
    let ret = unsafe { libc::ioctl(disk.as_raw_fd(), SG_IO, &raw mut hdr) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if hdr.status != 0 || hdr.host_status != 0 || hdr.driver_status != 0 {
        // Fixed-format sense: key in byte 2, ASC/ASCQ in bytes 12/13.
        let (key, asc, ascq) = (sense[2] & 0x0f, sense[12], sense[13]);
        return Err(std::io::Error::other(format!(
            "SCSI command {:#04x} failed: status {:#04x}, host {:#06x}, driver {:#06x}, sense {key:#x}/{asc:#04x}/{ascq:#04x}",
            cdb[0], hdr.status, hdr.host_status, hdr.driver_status
        )));
    }
    Ok(())
}

//! The eject stage: hand the card back in the state the operator asked for.
//!
//! - `none`: nothing.
//! - `sync`: flush to the medium and drop the buffer cache; safe to pull.
//! - `eject`: sync, then SCSI SYNCHRONIZE CACHE and START STOP UNIT (stop,
//!   eject) as `eject` and udisks do.
//! - `power-off`: as `eject`, then power the USB device down through its
//!   sysfs `remove` attribute, as udisks does. A multi-slot reader takes
//!   every slot with it, so this is refused (the card is still synced)
//!   while another disk of the same USB device is busy.
//!
//! A disk with no SCSI parent (loop, virtio, MMC) is synced, and the
//! outcome says why that is all.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::model::EjectMode;

use super::Outcome;
use crate::blockdev::scsi::Scsi;
use crate::blockdev::{DevNum, Sysfs, ioctl};
use crate::guard::Guard;

/// What the stage talks to; tests point these at a fake sysfs and a
/// recording SCSI layer.
pub struct Env<'a> {
    pub sysfs: &'a Sysfs,
    pub scsi: &'a dyn Scsi,
    pub guard: &'a Guard,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("sysfs", &self.sysfs).finish_non_exhaustive()
    }
}

pub fn run(path: &Path, dev: DevNum, mode: EjectMode, env: &Env<'_>) -> Result<Outcome, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.sync_data().map_err(|e| format!("{}: flush failed: {e}", path.display()))?;
    ioctl::flush_buffers(&file).map_err(|e| format!("{}: BLKFLSBUF failed: {e}", path.display()))?;
    if mode == EjectMode::Sync {
        return Ok(Outcome::done("synced"));
    }

    let disk = env.sysfs.block(dev).map_err(|e| format!("{}: sysfs: {e}", path.display()))?;
    if !env.sysfs.is_scsi(&disk) {
        return Ok(Outcome::done(format!("synced only: {} has no SCSI/USB parent to {}", path.display(), mode.name())));
    }
    let usb = usb_device(&disk.syspath);
    if mode == EjectMode::PowerOff
        && let Some(usb) = &usb
        && let Some(busy) = busy_sibling(env, usb, &disk.name)
    {
        return Ok(Outcome::skipped(format!(
            "power-off refused: {busy} on the same USB device ({}) is busy, and would lose power too; the card is synced",
            usb.file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    if let Err(e) = env.scsi.synchronize_cache(&file) {
        // Many card readers reject it; the sync above already flushed ours.
        tracing::warn!("{}: SYNCHRONIZE CACHE: {e}", path.display());
    }
    env.scsi.stop_and_eject(&file).map_err(|e| format!("{}: eject: {e}", path.display()))?;
    drop(file);
    if mode == EjectMode::Eject {
        return Ok(Outcome::done("ejected"));
    }
    let Some(usb) = usb else { return Ok(Outcome::done("ejected; no USB device to power off")) };
    std::fs::write(usb.join("remove"), "1").map_err(|e| format!("{}: power-off: {e}", usb.join("remove").display()))?;
    Ok(Outcome::done(format!(
        "ejected and powered off USB device {}",
        usb.file_name().unwrap_or_default().to_string_lossy()
    )))
}

/// The USB device a disk hangs off: the nearest ancestor with `idVendor`
/// (interfaces, hosts and targets have none).
fn usb_device(syspath: &Path) -> Option<PathBuf> {
    syspath
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("idVendor").exists() && dir.join("remove").exists())
        .map(Path::to_owned)
}

/// Another disk of the same USB device that is being written (a flashbay
/// job holds its lock) or is mounted.
fn busy_sibling(env: &Env<'_>, usb: &Path, own: &str) -> Option<String> {
    let entries = std::fs::read_dir(env.sysfs.root().join("block")).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(syspath) = std::fs::canonicalize(entry.path()) else { continue };
        if name == own || !syspath.starts_with(usb) {
            continue;
        }
        let node = PathBuf::from("/dev").join(&name);
        if let Ok(sibling) = File::open(&node) {
            // A job holds LOCK_EX for its whole run; a shared lock then fails.
            if nix::fcntl::Flock::lock(sibling, nix::fcntl::FlockArg::LockSharedNonblock).is_err() {
                return Some(node.display().to_string());
            }
        }
        if let Ok(block) = env.sysfs.block_at_path(&syspath)
            && let Err(refusal) = env.guard.check_not_in_use(&node, &block)
        {
            tracing::debug!("{refusal}");
            return Some(node.display().to_string());
        }
    }
    None
}

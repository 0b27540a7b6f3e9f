//! Jobs in flight, on disk: what a crash or `kill -9` leaves behind.
//!
//! A job writes its record into `state_dir/jobs/` before it touches the
//! card and removes it when it has ended, whatever the result. A record
//! found at start belongs to a job the daemon never saw end: its card may
//! be half-written, or mid-resize with a valid-looking table. Such a card,
//! if it is still in its reader (same DISKSEQ), gets its partition tables
//! blanked before anything else runs, and its slot shows
//! `failed: interrupted by restart`.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One job that started on a card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub slot: String,
    pub port: String,
    pub devnode: PathBuf,
    pub diskseq: Option<u64>,
    pub serial: Option<String>,
    pub image: PathBuf,
    /// DISKSEQ numbers restart with every boot: a record from another boot
    /// identifies no card.
    pub boot_id: String,
}

/// This boot's identity.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jobs")
}

fn file(state_dir: &Path, slot: &str) -> PathBuf {
    dir(state_dir).join(format!("{slot}.json"))
}

/// Records a job before it writes; durable, so a crash right after still
/// finds it.
pub fn begin(state_dir: &Path, job: &InFlight) -> std::io::Result<()> {
    fs::create_dir_all(dir(state_dir))?;
    let path = file(state_dir, &job.slot);
    let tmp = path.with_extension("json.tmp");
    let f = fs::File::create(&tmp)?;
    serde_json::to_writer(&f, job).map_err(std::io::Error::other)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    fs::File::open(dir(state_dir))?.sync_all()
}

/// The job has ended (any way): forget it.
pub fn end(state_dir: &Path, slot: &str) {
    let path = file(state_dir, slot);
    if let Err(e) = fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
}

/// Takes the records a previous run left, removing them.
pub fn leftovers(state_dir: &Path) -> Vec<InFlight> {
    let Ok(entries) = fs::read_dir(dir(state_dir)) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<InFlight>(&b).map_err(|e| e.to_string()))
            {
                Ok(job) => found.push(job),
                Err(e) => tracing::warn!("ignoring unreadable job record {}: {e}", path.display()),
            }
        }
        let _ = fs::remove_file(&path);
    }
    found.sort_by(|a, b| a.slot.cmp(&b.slot));
    found
}

/// Blanks the card of each interrupted job that is still in its reader;
/// logs what it did. Blocking; runs once at start, before udev is read.
pub fn recover(jobs: &[InFlight]) {
    let boot = boot_id();
    for job in jobs {
        let dev = job.devnode.display();
        // Only the very card: same boot, same port, same media.
        let at_port = port_of(&job.devnode).is_some_and(|p| p == job.port);
        if job.boot_id != boot || job.diskseq.is_none() || !at_port {
            tracing::warn!(slot = %job.slot, "{}: interrupted by restart; its card cannot be identified any more", job.slot);
            continue;
        }
        match crate::pipeline::blank_card(&job.devnode, job.diskseq) {
            Ok(()) => tracing::warn!(
                slot = %job.slot,
                "{}: interrupted by restart: the card in {dev} had its partition tables blanked",
                job.slot
            ),
            Err(e) => tracing::warn!(
                slot = %job.slot,
                "{}: interrupted by restart; its card is no longer in {dev} to blank ({e})",
                job.slot
            ),
        }
    }
}

/// The udev `ID_PATH` of a disk, as the slots know ports.
fn port_of(devnode: &Path) -> Option<String> {
    let name = devnode.file_name()?.to_str()?;
    let device = udev::Device::from_subsystem_sysname("block".into(), name.into()).ok()?;
    device.property_value("ID_PATH").map(|v| v.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_until_ended_and_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let job = InFlight {
            slot: "A1".into(),
            port: "p".into(),
            devnode: "/dev/null-card".into(),
            diskseq: Some(7),
            serial: None,
            image: "/os.img".into(),
            boot_id: boot_id(),
        };
        begin(dir.path(), &job).unwrap();
        begin(dir.path(), &InFlight { slot: "A2".into(), ..job.clone() }).unwrap();
        end(dir.path(), "A2");
        assert_eq!(leftovers(dir.path()), vec![job]);
        assert!(leftovers(dir.path()).is_empty(), "taken once");
    }
}

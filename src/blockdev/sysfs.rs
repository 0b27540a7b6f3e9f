//! What sysfs knows about a block device: disk or partition, bus, holders.
//!
//! The sysfs root is a parameter so that tests can point it at a tree they
//! built; everything here is read-only.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A device number as `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub fn from_rdev(rdev: u64) -> Self {
        Self { major: libc::major(rdev), minor: libc::minor(rdev) }
    }

    /// Parses `"8:17"` as sysfs `dev` files and mountinfo write it.
    pub fn parse(s: &str) -> Option<Self> {
        let (major, minor) = s.trim().split_once(':')?;
        Some(Self { major: major.parse().ok()?, minor: minor.parse().ok()? })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The bus a disk hangs off, as far as a duplicator cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Usb,
    Mmc,
    Loop,
    Other,
}

/// One block device (disk or partition) as sysfs describes it.
#[derive(Debug, Clone)]
pub struct SysBlock {
    /// Kernel name, e.g. `sdb` or `sdb1`.
    pub name: String,
    pub dev: DevNum,
    /// Canonical sysfs path of this device.
    pub syspath: PathBuf,
    /// Kernel name of the whole disk; equal to `name` for a disk.
    pub disk: String,
    pub is_partition: bool,
}

#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new("/sys")
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks a device up by its canonical sysfs path.
    pub fn block_at_path(&self, syspath: &Path) -> io::Result<SysBlock> {
        Self::block_at(syspath.to_owned())
    }

    /// Looks a device up by number.
    pub fn block(&self, dev: DevNum) -> io::Result<SysBlock> {
        let syspath = fs::canonicalize(self.root.join(format!("dev/block/{dev}")))?;
        Self::block_at(syspath)
    }

    fn block_at(syspath: PathBuf) -> io::Result<SysBlock> {
        let name = file_name(&syspath)?;
        let dev = DevNum::parse(&fs::read_to_string(syspath.join("dev"))?)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad dev file"))?;
        let is_partition = syspath.join("partition").exists();
        let disk = if is_partition {
            syspath.parent().map(file_name).transpose()?.unwrap_or_else(|| name.clone())
        } else {
            name.clone()
        };
        Ok(SysBlock { name, dev, syspath, disk, is_partition })
    }

    /// The partitions of a disk, in kernel order.
    pub fn partitions(&self, disk: &SysBlock) -> io::Result<Vec<SysBlock>> {
        let mut parts = Vec::new();
        for entry in fs::read_dir(&disk.syspath)? {
            let path = entry?.path();
            if path.join("partition").exists() {
                parts.push(Self::block_at(path)?);
            }
        }
        parts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(parts)
    }

    /// Devices stacked on top of this one (device mapper, md RAID, bcache).
    pub fn holders(&self, block: &SysBlock) -> io::Result<Vec<SysBlock>> {
        let dir = block.syspath.join("holders");
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(Vec::new()) };
        entries.map(|e| Self::block_at(fs::canonicalize(e?.path())?)).collect()
    }

    /// A `0/1` attribute of the whole disk (`removable`, `ro`).
    pub fn flag(&self, block: &SysBlock, attr: &str) -> bool {
        fs::read_to_string(block.syspath.join(attr)).is_ok_and(|s| s.trim() == "1")
    }

    /// Whether the disk hangs off a SCSI host and target (USB mass storage,
    /// SATA): it takes SCSI commands such as START STOP UNIT.
    pub fn is_scsi(&self, disk: &SysBlock) -> bool {
        let path = disk.syspath.to_string_lossy();
        path.contains("/host") && path.contains("/target")
    }

    pub fn bus(&self, disk: &SysBlock) -> Bus {
        let path = disk.syspath.to_string_lossy();
        if disk.name.starts_with("loop") && path.contains("/virtual/") {
            Bus::Loop
        } else if path.contains("/usb") {
            Bus::Usb
        } else if path.contains("/mmc_host/") {
            Bus::Mmc
        } else {
            Bus::Other
        }
    }
}

fn file_name(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{}: no file name", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devnum_parses_sysfs_format() {
        assert_eq!(DevNum::parse("8:17\n"), Some(DevNum { major: 8, minor: 17 }));
        assert_eq!(DevNum::parse("8"), None);
        assert_eq!(DevNum { major: 259, minor: 3 }.to_string(), "259:3");
    }
}

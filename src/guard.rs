//! May this target be written? The one safety check shared by the CLI and
//! the daemon, run after the target is opened exclusively and before a
//! single byte is written.
//!
//! Refusals, from hardest to softest:
//! - the disk holds the running system (`/`, `/boot`, `/usr`, swap, … on it
//!   or on anything stacked on it): never, not even with `--force`;
//! - anything on the disk is mounted, used as swap or held by device mapper
//!   or md: never (writing would corrupt a live filesystem);
//! - a partition rather than a whole disk, a read-only (write-protected)
//!   card, an empty reader, a disk smaller than the image: never;
//! - a fixed disk that is neither removable, USB, MMC nor loop: only with
//!   `--force` (the daemon's configured slots count as forced, since the
//!   operator named the port).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::blockdev::{Bus, DevNum, Kind, SysBlock, Sysfs, Target};
use crate::units::Bytes;

/// Mount points whose disk is "the running system".
const SYSTEM_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/boot/firmware", "/efi", "/usr", "/var", "/home"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{}: holds the running system ({detail}); refusing to write, even with --force", device.display())]
    SystemDisk { device: PathBuf, detail: String },
    #[error("{}: {detail}; refusing to write", device.display())]
    InUse { device: PathBuf, detail: String },
    #[error("{}: is a partition; write to the whole disk /dev/{disk} instead", device.display())]
    Partition { device: PathBuf, disk: String },
    #[error("{}: is read-only (is the card's write-protect switch on?)", device.display())]
    ReadOnly { device: PathBuf },
    #[error("{}: no medium (empty card reader?)", device.display())]
    NoMedium { device: PathBuf },
    #[error("{}: device is {}, image needs {}", device.display(), Bytes(*device_size), Bytes(*image_size))]
    TooSmall { device: PathBuf, device_size: u64, image_size: u64 },
    #[error("{}: is a fixed disk, not a removable card or USB stick; use --force if you really mean it", device.display())]
    NotRemovable { device: PathBuf },
    #[error("{}: is the image itself", device.display())]
    SameFile { device: PathBuf },
    #[error("{}: cannot inspect device: {detail}", device.display())]
    Unknown { device: PathBuf, detail: String },
}

/// Where the guard looks; tests point these at files they wrote.
#[derive(Debug, Clone)]
pub struct Guard {
    pub sysfs: Sysfs,
    pub mountinfo: PathBuf,
    pub swaps: PathBuf,
}

impl Default for Guard {
    fn default() -> Self {
        Self { sysfs: Sysfs::default(), mountinfo: "/proc/self/mountinfo".into(), swaps: "/proc/swaps".into() }
    }
}

/// What the caller asks for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub image: &'a Path,
    pub image_size: u64,
    /// Allow fixed disks. Never overrides any other refusal.
    pub force: bool,
}

impl Guard {
    pub fn check(&self, target: &Target, req: &Request<'_>) -> Result<(), Refusal> {
        let device = target.path().to_owned();
        if target.kind() == Kind::RegularFile {
            return check_file(target, req);
        }
        let unknown = |e: std::io::Error| Refusal::Unknown { device: device.clone(), detail: e.to_string() };
        let dev = target.dev().ok_or_else(|| unknown(std::io::ErrorKind::NotFound.into()))?;
        let block = self.sysfs.block(dev).map_err(unknown)?;
        if block.is_partition {
            return Err(Refusal::Partition { device, disk: block.disk });
        }
        self.check_not_in_use(&device, &block)?;
        // An empty reader can keep a stale ro flag; "no medium" is the real story.
        if target.size() == 0 {
            return Err(Refusal::NoMedium { device });
        }
        if self.sysfs.flag(&block, "ro") {
            return Err(Refusal::ReadOnly { device });
        }
        if target.size() < req.image_size {
            return Err(Refusal::TooSmall { device, device_size: target.size(), image_size: req.image_size });
        }
        let removable = self.sysfs.flag(&block, "removable") || self.sysfs.bus(&block) != Bus::Other;
        if !removable && !req.force {
            return Err(Refusal::NotRemovable { device });
        }
        Ok(())
    }

    /// Refuses a disk if it, a partition of it, or anything stacked on them
    /// is mounted or used as swap, or if anything is stacked on it at all.
    pub fn check_not_in_use(&self, device: &Path, disk: &SysBlock) -> Result<(), Refusal> {
        let unknown = |e: std::io::Error| Refusal::Unknown { device: device.to_owned(), detail: e.to_string() };
        let mounts = read_mounts(&self.mountinfo).map_err(unknown)?;
        let swaps = read_swaps(&self.swaps);

        let mut own = vec![disk.clone()];
        own.extend(self.sysfs.partitions(disk).map_err(unknown)?);
        // Devices stacked on ours (dm, md), transitively: their mounts are ours too.
        let mut stacked: Vec<SysBlock> = Vec::new();
        let mut seen: HashSet<DevNum> = own.iter().map(|b| b.dev).collect();
        let mut i = 0;
        while i < own.len() + stacked.len() {
            let below = if i < own.len() { &own[i] } else { &stacked[i - own.len()] };
            let above = self.sysfs.holders(below).map_err(unknown)?;
            stacked.extend(above.into_iter().filter(|h| seen.insert(h.dev)));
            i += 1;
        }

        let mut in_use = stacked.first().map(|h| format!("/dev/{} is held by /dev/{}", disk.name, h.name));
        for member in own.iter().chain(&stacked) {
            for mount in mounts.iter().filter(|m| m.dev == member.dev || m.source_dev == Some(member.dev)) {
                let detail = format!("{} is mounted from /dev/{}", mount.point, member.name);
                if SYSTEM_MOUNTS.contains(&mount.point.as_str()) {
                    return Err(Refusal::SystemDisk { device: device.to_owned(), detail });
                }
                in_use.get_or_insert(detail);
            }
            if swaps.contains(&member.dev) {
                let detail = format!("/dev/{} is in use as swap", member.name);
                return Err(Refusal::SystemDisk { device: device.to_owned(), detail });
            }
        }
        match in_use {
            Some(detail) => Err(Refusal::InUse { device: device.to_owned(), detail }),
            None => Ok(()),
        }
    }
}

fn check_file(target: &Target, req: &Request<'_>) -> Result<(), Refusal> {
    use std::os::unix::fs::MetadataExt;
    let device = target.path().to_owned();
    if let (Ok(t), Ok(i)) = (target.file().metadata(), fs::metadata(req.image))
        && (t.dev(), t.ino()) == (i.dev(), i.ino())
    {
        return Err(Refusal::SameFile { device });
    }
    Ok(())
}

/// One line of mountinfo, reduced to what the guard needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// `st_dev` of the filesystem (field 3).
    dev: DevNum,
    point: String,
    /// Device number of the mount source, when it is a device node; btrfs
    /// and friends report an anonymous `st_dev`, so the source is what names
    /// the disk for them.
    source_dev: Option<DevNum>,
}

fn read_mounts(path: &Path) -> std::io::Result<Vec<Mount>> {
    Ok(fs::read_to_string(path)?.lines().filter_map(parse_mountinfo_line).collect())
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let dev = DevNum::parse(fields.get(2)?)?;
    let point = unescape(fields.get(4)?);
    let source = right.split(' ').nth(1)?;
    let source_dev = source.starts_with("/dev/").then(|| rdev_of(Path::new(&unescape(source)))).flatten();
    Some(Mount { dev, point, source_dev })
}

/// Device numbers of block devices in /proc/swaps (swap files live on
/// mounted filesystems, which the mount check already covers).
fn read_swaps(path: &Path) -> HashSet<DevNum> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| rdev_of(Path::new(&unescape(name))))
        .collect()
}

fn rdev_of(path: &Path) -> Option<DevNum> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| DevNum::from_rdev(meta.rdev()))
}

/// Undoes the octal escapes (`\040` for space) of mountinfo and swaps.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let line = "29 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.dev, DevNum { major: 254, minor: 0 });
        assert_eq!(m.point, "/");
        let line = r"40 29 7:3 / /mnt/my\040card rw - vfat /dev/nonexistent rw";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.point, "/mnt/my card");
        assert_eq!(m.source_dev, None);
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"a\040b\011c\134"), "a b\tc\\");
    }
}

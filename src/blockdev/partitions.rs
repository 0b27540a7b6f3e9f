//! Partition tables, through util-linux: `sfdisk --json` reads them and
//! `partx --update` tells the kernel about them with BLKPG, which works
//! whether or not the kernel parses partition tables itself (and does not
//! need the disk to be unused, as a BLKRRPART re-read does).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tools::{self, ToolError};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Table {
    /// `dos` or `gpt` (sfdisk's names).
    pub label: String,
    #[serde(default)]
    pub lastlba: Option<u64>,
    #[serde(default = "default_sector")]
    pub sectorsize: u64,
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

fn default_sector() -> u64 {
    512
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Partition {
    /// sfdisk's name for it, e.g. `/dev/sdb2`; the number is its suffix.
    pub node: String,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Partition {
    /// The partition number (`/dev/loop0p2` → 2).
    pub fn number(&self) -> Option<u32> {
        let digits: String = self.node.chars().rev().take_while(char::is_ascii_digit).collect();
        digits.chars().rev().collect::<String>().parse().ok()
    }

    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

impl Table {
    /// The partition that ends last on the disk.
    pub fn last(&self) -> Option<&Partition> {
        self.partitions.iter().max_by_key(|p| p.end())
    }
}

#[derive(Debug, Deserialize)]
struct Dump {
    partitiontable: Table,
}

/// Reads the partition table of `dev`; `None` when it has none.
pub fn read(dev: &Path) -> Result<Option<Table>, ToolError> {
    let out = tools::run("sfdisk", &["--json", path_str(dev)], None)?;
    if out.code != Some(0) {
        // sfdisk says "does not contain a recognized partition table".
        if out.stderr.contains("does not contain a recognized partition table") {
            return Ok(None);
        }
        return Err(out.error());
    }
    let dump: Dump = serde_json::from_str(&out.stdout)
        .map_err(|e| ToolError::Unreadable { tool: "sfdisk", detail: e.to_string() })?;
    Ok(Some(dump.partitiontable))
}

/// Makes the kernel's partitions of `dev` match its table (BLKPG add,
/// resize, delete). A disk without a table is left as it is.
pub fn update_kernel(dev: &Path) -> Result<(), ToolError> {
    let out = tools::run("partx", &["--update", path_str(dev)], None)?;
    match out.code {
        Some(0) => Ok(()),
        _ if out.stderr.contains("failed to read partition table") => Ok(()),
        _ => Err(out.error()),
    }
}

/// The device node of partition `number` of the disk at `disk_syspath`
/// (`loop0p2`, `sdb2`, `mmcblk0p2`: the kernel's name, from sysfs).
pub fn node(disk_syspath: &Path, number: u32) -> Option<PathBuf> {
    std::fs::read_dir(disk_syspath).ok()?.flatten().find_map(|entry| {
        let part = std::fs::read_to_string(entry.path().join("partition")).ok()?;
        (part.trim().parse::<u32>().ok()? == number).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sfdisk_json() {
        let json = r#"{"partitiontable": {"label": "gpt", "id": "X", "device": "/dev/loop0", "unit": "sectors",
            "firstlba": 2048, "lastlba": 233438, "sectorsize": 512, "partitions": [
            {"node": "/dev/loop0p1", "start": 2048, "size": 131072, "type": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"},
            {"node": "/dev/loop0p10", "start": 133120, "size": 98304, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}]}}"#;
        let t: Dump = serde_json::from_str(json).unwrap();
        let last = t.partitiontable.last().unwrap();
        assert_eq!((last.number(), last.end()), (Some(10), 231_424));
        assert_eq!(t.partitiontable.lastlba, Some(233_438));
    }
}

//! The resize stage: grow the filesystem of the last partition to fill it.
//!
//! ext2/3/4 only, offline, the way the e2fsprogs manuals ask: `e2fsck -f -p`
//! first (resize2fs refuses an unchecked filesystem), then `resize2fs`.
//! A filesystem e2fsck cannot repair fails the job with e2fsck's words.
//! Anything else (FAT, btrfs, no filesystem) is skipped, not failed.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::Outcome;
use crate::blockdev::partitions;
use crate::tools::{self, ToolError};
use crate::units::Bytes;

/// `stop` kills e2fsck or resize2fs at once when the job is cancelled.
pub(super) fn run(dev: &Path, disk_syspath: &Path, stop: &AtomicBool) -> Result<Outcome, StageError> {
    let Some(number) = super::expand::last_partition(dev)? else {
        return Ok(Outcome::skipped("no partition table"));
    };
    partitions::update_kernel(dev)?;
    let Some(node) = partitions::node(disk_syspath, number) else {
        return Err(StageError::Other(format!("partition {number} of {} has no device node", dev.display())));
    };
    let node = node.to_str().unwrap_or_default();
    let on_node = |source| StageError::Partition { node: node.to_owned(), source };
    let probe = tools::run("blkid", &["-p", "-o", "value", "-s", "TYPE", node], None).map_err(on_node)?;
    let fstype = probe.stdout.trim();
    match fstype {
        "ext2" | "ext3" | "ext4" => {}
        "" => return Ok(Outcome::skipped(format!("no filesystem on partition {number}"))),
        other => return Ok(Outcome::skipped(format!("{other} filesystems are not resized"))),
    }
    let before = fs_size(node)?;
    // e2fsck: 0 clean, 1 errors fixed; anything else needs a human.
    let check = tools::run_until("e2fsck", &["-f", "-p", node], None, stop).map_err(on_node)?;
    if !matches!(check.code, Some(0 | 1)) {
        return Err(on_node(check.error()));
    }
    let grown = tools::run_until("resize2fs", &[node], None, stop).map_err(on_node)?;
    if grown.code != Some(0) {
        return Err(on_node(grown.error()));
    }
    let after = fs_size(node)?;
    Ok(Outcome::done(format!("{fstype} on partition {number} grown from {} to {}", Bytes(before), Bytes(after))))
}

/// Size of an ext filesystem in bytes, from its superblock (dumpe2fs -h).
fn fs_size(node: &str) -> Result<u64, StageError> {
    let out = tools::check("dumpe2fs", &["-h", node], None)
        .map_err(|source| StageError::Partition { node: node.to_owned(), source })?;
    let field = |name: &str| -> Option<u64> {
        out.stdout.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(blocks), Some(size)) => Ok(blocks * size),
        _ => Err(StageError::Other(format!("dumpe2fs {node}: no block count or size"))),
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum StageError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A tool failed on the partition (e2fsck names it by label, if at all).
    #[error("{node}: {source}")]
    Partition { node: String, source: ToolError },
    #[error("{0}")]
    Other(String),
}

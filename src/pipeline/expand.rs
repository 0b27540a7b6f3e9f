//! The expand stage: grow the last partition to the end of the card.
//!
//! sfdisk does the editing; we decide whether and how far. For GPT the
//! backup header and table first move to the real end of the disk (an image
//! written to a bigger card has them in the middle), which also rewrites
//! the protective MBR. MBR partitions stop at 2 TiB (2^32 sectors). The new
//! end is aligned down to 1 MiB. The kernel learns the new layout by BLKPG
//! (`partx --update`), not by a re-read that a busy disk would refuse.
//!
//! Nothing is touched when the last partition cannot grow: the image fills
//! the card, an MBR with extended partitions (their chain of logical
//! tables is not something to rewrite blind), or no or an unknown table.

use std::path::Path;

use super::Outcome;
use crate::blockdev::partitions;
use crate::tools::{self, ToolError};
use crate::units::Bytes;

/// MBR fields are 32-bit sector counts.
const MBR_LIMIT: u64 = 1 << 32;
const ALIGN: u64 = 1 << 20;

pub(super) fn run(dev: &Path, device_size: u64) -> Result<Outcome, ToolError> {
    let Some(mut table) = partitions::read(dev)? else { return Ok(Outcome::skipped("no partition table")) };
    let gpt = match table.label.as_str() {
        "gpt" => true,
        "dos" => false,
        other => return Ok(Outcome::skipped(format!("{other} partition tables are not grown"))),
    };
    if !gpt && table.partitions.iter().any(|p| matches!(p.kind.as_str(), "5" | "f" | "85") || p.number() > Some(4)) {
        return Ok(Outcome::skipped("extended partitions are not grown"));
    }
    let ss = table.sectorsize.max(1);
    let disk = device_size / ss;
    if gpt && table.lastlba.is_some_and(|last| last + 34 < disk) {
        // Backup GPT at the real end, and the protective MBR fixed with it.
        sfdisk(dev, &["--relocate", "gpt-bak-std"], None)?;
        table = partitions::read(dev)?.unwrap_or(table);
    }
    let Some(last) = table.last().cloned() else { return Ok(Outcome::skipped("the partition table is empty")) };
    let Some(number) = last.number() else {
        return Ok(Outcome::skipped(format!("cannot tell the number of {}", last.node)));
    };
    let limit = if gpt { table.lastlba.map_or(disk, |l| l + 1) } else { disk.min(MBR_LIMIT) };
    let grain = (ALIGN / ss).max(1);
    let new_end = limit / grain * grain;
    if new_end < last.end() + grain {
        return Ok(Outcome::skipped(if !gpt && disk > MBR_LIMIT && last.end() + grain > MBR_LIMIT {
            "the last partition already reaches the 2 TiB limit of MBR".to_owned()
        } else {
            "the image already fills the card".to_owned()
        }));
    }
    let new_size = new_end - last.start;
    sfdisk(dev, &["-N", &number.to_string()], Some(&format!(",{new_size}\n")))?;
    partitions::update_kernel(dev)?;
    Ok(Outcome::done(format!("partition {number} grown from {} to {}", Bytes(last.size * ss), Bytes(new_size * ss))))
}

/// sfdisk on our terms: no re-read (the kernel hears from us, by BLKPG).
fn sfdisk(dev: &Path, args: &[&str], input: Option<&str>) -> Result<(), ToolError> {
    let mut all = vec!["--no-reread", "--no-tell-kernel", "-q"];
    all.extend_from_slice(args);
    all.push(dev.to_str().unwrap_or_default());
    tools::check("sfdisk", &all, input).map(drop)
}

/// The number of the partition that ends last, for callers that only look.
pub(super) fn last_partition(dev: &Path) -> Result<Option<u32>, ToolError> {
    Ok(partitions::read(dev)?.and_then(|t| t.last()?.number()))
}

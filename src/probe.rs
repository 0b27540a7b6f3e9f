//! Counterfeit cards: does the card hold as many bytes as it claims?
//!
//! A counterfeit "64 GB" card may really hold 8 GB. Its controller either
//! wraps around (it ignores the high address bits, so a write past the real
//! capacity lands on data below it) or silently drops writes past it. The
//! image verifies, since it fits in the real part; the damage comes later,
//! once the filesystem has been grown into the fake part. [`probe`] finds
//! the real capacity in a few hundred small I/Os, as f3probe does:
//!
//! 1. Blocks are stamped with contents derived from a per-run salt and the
//!    block's own offset, so a block read back from the wrong place, a
//!    dropped write (old contents, zeros) and a stamp left by an earlier run
//!    are all told apart from a block that holds its own data.
//! 2. Wrap: the last block is stamped, then the offsets 2^k below it are
//!    read. If the card wraps at a power of two (address lines ignored),
//!    one of them shows the last block's stamp.
//! 3. Spread: blocks at a power-of-two stride over the probed region
//!    (below the wrap, if any), the very last one included, are stamped,
//!    flushed, the device's caches dropped and all of them read back, in a
//!    scrambled order so a controller's small read-ahead cache does not
//!    serve them. A block that shows another's stamp shares its storage:
//!    that catches a wrap at any multiple of the stride, too.
//! 4. Narrowing: between the last good and the first bad block, a few
//!    blocks per round are stamped and read back, down to one block. A
//!    last pass reads every stamped block again: a card that keeps only
//!    its latest writes (in RAM) has lost the first ones by then.
//!
//! Only the region from `keep_below` (the end of the image) to the end of
//! the card is stamped. On a wrapping card those writes may land in the
//! image, so every block's original contents are read just before it is
//! first stamped, and written back in reverse order at the end, whatever
//! happened in between: a restoring write goes through the same alias as
//! the stamp did, and the reverse order puts the oldest contents back last.
//!
//! Like f3probe, this bets that fakes wrap at a power of two (the
//! controller ignores address lines): a wrap at another distance, whose
//! aliases all land where the probe only reads, goes unseen.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::blockdev::{ALIGN, AlignedBuf, DeviceError, Target};
use crate::model::Cancel;
use crate::units::Bytes;

/// Blocks stamped across the probed region in the spread pass (plus the
/// first and the last block). Every fake leaves at least one stride of
/// them unheld, and the count bounds the probe's time on any card size.
const SPREAD: u64 = 128;
/// Blocks stamped per narrowing round: each round cuts the gap between
/// the last good and the first bad block about this many times.
const NARROW: u64 = 15;
/// Narrowing rounds; 15 blocks a round take a 16 TiB gap to one 4 KiB block in 8.
const MAX_ROUNDS: usize = 10;
/// Below this many blocks above `keep_below` there is nothing worth probing.
const MIN_BLOCKS: u64 = 8;
/// Marks a stamped block; the salt and offset follow it.
const MAGIC: &[u8; 8] = b"fbprobe1";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A read or write failed: a dying card, or one pulled mid-probe.
    #[error("{}: probe {op} failed at offset {offset}: {source}", device.display())]
    Io { device: PathBuf, op: &'static str, offset: u64, source: io::Error },
    /// Flushing the writes or dropping the caches failed.
    #[error(transparent)]
    Device(DeviceError),
    #[error("{}: probe interrupted", device.display())]
    Cancelled { device: PathBuf },
    /// Stamped blocks could not be put back: the card's data there is damaged.
    /// Shown with its cause first: a pulled card fails the restore too.
    #[error("{first} ({failed} of {total} probe blocks on {} could not be put back)", device.display())]
    Unrestored {
        device: PathBuf,
        failed: usize,
        total: usize,
        #[source]
        first: Box<ProbeError>,
    },
}

impl ProbeError {
    /// Whether the card failed I/O (pulled, dying), as opposed to the probe
    /// being interrupted.
    pub fn is_io(&self) -> bool {
        match self {
            Self::Io { .. } | Self::Unrestored { .. } => true,
            Self::Device(d) => d.os_error().is_some(),
            Self::Cancelled { .. } => false,
        }
    }

    /// Exit status for the CLI, as for `flashbay write`: 130 interrupted, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Cancelled { .. } => 130,
            _ => 1,
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    pub device: PathBuf,
    /// Size the card reports.
    pub claimed: u64,
    /// The end of the highest block proven to hold its own data below the
    /// first one that does not: about the real capacity. `claimed` for a
    /// genuine card.
    pub usable: u64,
    pub genuine: bool,
    /// For a card whose addresses repeat: the distance at which they do.
    pub wraps_at: Option<u64>,
    /// Distinct blocks stamped and read back.
    pub blocks_checked: u64,
    pub seconds: f64,
    /// Why the card was not (fully) probed.
    pub note: Option<String>,
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.genuine {
            return write!(
                f,
                "counterfeit card: about {} usable of {} claimed",
                Bytes(self.usable),
                Bytes(self.claimed)
            );
        }
        match &self.note {
            Some(note) => write!(f, "genuine card: {} ({note})", Bytes(self.claimed)),
            None => write!(
                f,
                "genuine card: {} ({} blocks checked in {:.1} s)",
                Bytes(self.claimed),
                self.blocks_checked,
                self.seconds
            ),
        }
    }
}

/// Probes `target`'s real capacity without changing its contents.
///
/// Blocks from `keep_below` (rounded up to a block) to the end of the card
/// are stamped and put back afterwards; below `keep_below` the probe only
/// reads, apart from what a wrapping card itself aliases there (which is
/// put back too). Takes a few hundred 4 KiB reads and writes on any card.
pub fn probe(target: &Target, keep_below: u64, cancel: &Cancel) -> Result<ProbeReport, ProbeError> {
    let block = u64::try_from(target.block_size().max(ALIGN)).unwrap_or(ALIGN as u64);
    run(target, target.path(), target.size(), block, keep_below, fresh_salt(), cancel)
}

/// The device as the probe sees it: a seam, so unit tests can play
/// counterfeit cards in memory.
trait Medium {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Makes the writes so far durable and drops cached copies, so the
    /// next reads come from the medium.
    fn settle(&self) -> Result<(), DeviceError>;
}

impl Medium for Target {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let n = self.read_at(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.write_at(buf, offset)
    }

    fn settle(&self) -> Result<(), DeviceError> {
        self.sync()?;
        self.drop_caches()
    }
}

fn run(
    medium: &dyn Medium,
    device: &Path,
    claimed: u64,
    block: u64,
    keep_below: u64,
    salt: u64,
    cancel: &Cancel,
) -> Result<ProbeReport, ProbeError> {
    let started = Instant::now();
    let end = claimed / block * block;
    let lo = keep_below.next_multiple_of(block);
    let mut report = ProbeReport {
        device: device.to_owned(),
        claimed,
        usable: claimed,
        genuine: true,
        wraps_at: None,
        blocks_checked: 0,
        seconds: 0.0,
        note: None,
    };
    if end < lo.saturating_add(MIN_BLOCKS * block) {
        report.note = Some(format!("not probed: less than {} above the image", Bytes(MIN_BLOCKS * block)));
        return Ok(report);
    }

    let mut prober = Prober::new(medium, device, cancel, block, salt);
    let found = prober.search(lo, end);
    let restored = prober.restore();
    let found = match (found, restored) {
        (found, Ok(())) => found?,
        (Ok(_), Err(unrestored)) => return Err(unrestored),
        (Err(e), Err(unrestored)) => {
            tracing::error!("{e}");
            return Err(unrestored);
        }
    };
    report.blocks_checked = prober.seen.len() as u64;
    report.wraps_at = found.wraps_at;
    if let Some(bad) = found.first_bad {
        report.genuine = false;
        report.usable = found.good_end.min(bad);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The outcome of [`Prober::search`].
#[derive(Debug)]
struct Found {
    wraps_at: Option<u64>,
    /// The lowest offset found not to hold its own data.
    first_bad: Option<u64>,
    /// The end of the highest good block below `first_bad`; the start of
    /// the probed region if there is none (the image below was verified).
    good_end: u64,
}

/// What reading a stamped block back showed. Bad is final: a block that
/// lost its data once is not trusted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Unread,
    Good,
    Bad,
}

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Its own stamp.
    Own,
    /// The stamp of another offset: the two share storage.
    Alias(u64),
    /// Anything else: old contents, zeros, another run's stamp, flipped bits.
    Foreign,
}

struct Prober<'a> {
    medium: &'a dyn Medium,
    device: &'a Path,
    cancel: &'a Cancel,
    block: u64,
    salt: u64,
    /// Each stamped block's original contents, in the order stamped.
    saved: Vec<(u64, AlignedBuf)>,
    /// Every stamped block and what reading it back showed.
    seen: BTreeMap<u64, Verdict>,
    /// The wrap found, if any: blocks at or above it are bad, whatever they read.
    wraps_at: Option<u64>,
    buf: AlignedBuf,
    expected: Vec<u8>,
}

impl<'a> Prober<'a> {
    fn new(medium: &'a dyn Medium, device: &'a Path, cancel: &'a Cancel, block: u64, salt: u64) -> Self {
        let len = usize::try_from(block).unwrap_or(ALIGN);
        Self {
            medium,
            device,
            cancel,
            block,
            salt,
            saved: Vec::new(),
            seen: BTreeMap::new(),
            wraps_at: None,
            buf: AlignedBuf::new(len),
            expected: vec![0; len],
        }
    }

    /// Finds the first bad block in [lo, end) (both multiples of the block).
    fn search(&mut self, lo: u64, end: u64) -> Result<Found, ProbeError> {
        let last = end - self.block;
        self.stamp(last)?;
        self.read_back(&[last])?;
        if self.seen.get(&last) == Some(&Verdict::Good)
            && let Some(wrap) = self.find_wrap(last)?
        {
            self.wraps_at = Some(wrap);
            self.seen.range_mut(wrap..).for_each(|(_, v)| *v = Verdict::Bad);
        }
        let hi = self.wraps_at.map_or(end, |wrap| wrap.min(end));
        if hi >= lo + 2 * self.block {
            let spread = spread(lo, hi, self.block);
            for &offset in &spread {
                self.stamp(offset)?;
            }
            self.read_back(&spread)?;
        }
        for _ in 0..MAX_ROUNDS {
            let (good_end, Some(bad)) = self.bounds(lo, hi) else { break };
            let between = between(good_end, bad, self.block);
            if between.is_empty() {
                break;
            }
            for &offset in &between {
                self.stamp(offset)?;
            }
            self.read_back(&between)?;
        }
        // A last look at everything: a card that only keeps the latest
        // writes (in a RAM cache) has lost the early ones by now, and a
        // block aliased by a later one shows that one's stamp.
        let all: Vec<u64> = self.seen.keys().copied().collect();
        self.read_back(&all)?;
        let (good_end, first_bad) = self.bounds(lo, hi);
        Ok(Found { wraps_at: self.wraps_at, first_bad, good_end })
    }

    /// Looks for the distance 2^k at which the stamped, good block `last`
    /// shows up again below itself: a card that ignores address bits.
    fn find_wrap(&mut self, last: u64) -> Result<Option<u64>, ProbeError> {
        let mut distance = self.block;
        while distance <= last {
            self.read_block(last - distance)?;
            if self.classify(last - distance) == Seen::Alias(last) {
                return Ok(Some(distance));
            }
            distance *= 2;
        }
        Ok(None)
    }

    /// The end of the last good block below the first bad one, and the
    /// first bad one (a wrap counts as one).
    fn bounds(&self, lo: u64, hi: u64) -> (u64, Option<u64>) {
        let first_bad = self
            .seen
            .iter()
            .find(|&(_, v)| *v == Verdict::Bad)
            .map(|(&o, _)| o)
            .into_iter()
            .chain(self.wraps_at.map(|_| hi))
            .min();
        let below = first_bad.unwrap_or(u64::MAX);
        let good_end =
            self.seen.range(..below).rev().find(|&(_, v)| *v == Verdict::Good).map_or(lo, |(&o, _)| o + self.block);
        (good_end, first_bad)
    }

    /// Saves the block's contents, then writes its stamp (once per block).
    fn stamp(&mut self, offset: u64) -> Result<(), ProbeError> {
        if self.seen.contains_key(&offset) {
            return Ok(());
        }
        self.check_cancel()?;
        let mut original = AlignedBuf::new(self.buf.len());
        self.medium.read(&mut original, offset).map_err(|e| self.io_error("read", offset, e))?;
        fill(&mut self.buf, self.salt, offset);
        self.medium.write(&self.buf, offset).map_err(|e| self.io_error("write", offset, e))?;
        // Saved only once the stamp is written: a failed write is taken to
        // have changed nothing, and the card is unlikely to take a second.
        self.saved.push((offset, original));
        self.seen.insert(offset, Verdict::Unread);
        Ok(())
    }

    /// Flushes, drops the caches and reads `offsets` back (in a scrambled
    /// order), judging each.
    fn read_back(&mut self, offsets: &[u64]) -> Result<(), ProbeError> {
        self.medium.settle().map_err(ProbeError::Device)?;
        let mut order = offsets.to_vec();
        order.sort_by_key(|&o| mix(o ^ self.salt));
        // Stamp owner -> the offsets that showed its stamp.
        let mut shared: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for offset in order {
            self.read_block(offset)?;
            match self.classify(offset) {
                _ if self.wraps_at.is_some_and(|wrap| offset >= wrap) => self.judge(offset, Verdict::Bad),
                Seen::Own => self.judge(offset, Verdict::Good),
                Seen::Foreign => self.judge(offset, Verdict::Bad),
                Seen::Alias(owner) => shared.entry(owner).or_default().push(offset),
            }
        }
        // Offsets sharing storage: real storage starts at 0, so the lowest
        // of them holds it (its data was overwritten through an alias) and
        // the others are the aliases.
        for (owner, mut group) in shared {
            group.push(owner);
            let lowest = group.iter().copied().min().unwrap_or(owner);
            for offset in group {
                self.judge(offset, if offset == lowest { Verdict::Good } else { Verdict::Bad });
            }
        }
        Ok(())
    }

    fn judge(&mut self, offset: u64, verdict: Verdict) {
        if let Some(v) = self.seen.get_mut(&offset)
            && *v != Verdict::Bad
        {
            *v = verdict;
        }
    }

    fn read_block(&mut self, offset: u64) -> Result<(), ProbeError> {
        self.check_cancel()?;
        self.medium.read(&mut self.buf, offset).map_err(|e| self.io_error("read", offset, e))
    }

    /// Judges the block in `buf`, read from `offset`.
    fn classify(&mut self, offset: u64) -> Seen {
        let field = |at: usize| self.buf.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok());
        if field(0) != Some(*MAGIC) || field(8).map(u64::from_le_bytes) != Some(self.salt) {
            return Seen::Foreign;
        }
        let Some(owner) = field(16).map(u64::from_le_bytes) else { return Seen::Foreign };
        fill(&mut self.expected, self.salt, owner);
        if self.expected[..] != self.buf[..] {
            Seen::Foreign
        } else if owner == offset {
            Seen::Own
        } else {
            Seen::Alias(owner)
        }
    }

    fn check_cancel(&self) -> Result<(), ProbeError> {
        if self.cancel.is_cancelled() { Err(ProbeError::Cancelled { device: self.device.to_owned() }) } else { Ok(()) }
    }

    fn io_error(&self, op: &'static str, offset: u64, e: DeviceError) -> ProbeError {
        match e {
            DeviceError::Read { offset, source, .. } | DeviceError::Write { offset, source, .. } => {
                ProbeError::Io { device: self.device.to_owned(), op, offset, source }
            }
            other => ProbeError::Io { device: self.device.to_owned(), op, offset, source: io::Error::other(other) },
        }
    }

    /// Writes every saved block back, newest first, and flushes. Keeps
    /// going past a failure: the other blocks still deserve their data.
    fn restore(&mut self) -> Result<(), ProbeError> {
        let total = self.saved.len();
        let mut failed = 0;
        let mut first = None;
        for (offset, original) in self.saved.iter().rev() {
            if let Err(e) = self.medium.write(original, *offset) {
                failed += 1;
                first.get_or_insert_with(|| self.io_error("write", *offset, e));
            }
        }
        if first.is_none()
            && let Err(e) = self.medium.settle()
        {
            failed = total;
            first = Some(ProbeError::Device(e));
        }
        match first {
            None => Ok(()),
            Some(first) => {
                Err(ProbeError::Unrestored { device: self.device.to_owned(), failed, total, first: Box::new(first) })
            }
        }
    }
}

/// The spread pass: `lo`, every multiple of a power-of-two stride in
/// between, and the last block before `hi`. A power-of-two stride puts
/// blocks a wrap's distance apart when the wrap is a multiple of it, so
/// they alias each other even where the wrap search cannot see it.
fn spread(lo: u64, hi: u64, block: u64) -> Vec<u64> {
    let stride = ((hi - lo) / SPREAD).max(block).next_power_of_two();
    let last = hi - block;
    let mut offsets = vec![lo];
    offsets.extend((lo / stride + 1..).map(|i| i * stride).take_while(|&o| o < last));
    offsets.push(last);
    offsets.dedup();
    offsets
}

/// A narrowing round: up to [`NARROW`] blocks evenly over [from, to).
fn between(from: u64, to: u64, block: u64) -> Vec<u64> {
    let blocks = to.saturating_sub(from) / block;
    let mut offsets: Vec<u64> =
        (0..NARROW.min(blocks)).map(|i| from + i * blocks / NARROW.min(blocks) * block).collect();
    offsets.dedup();
    offsets
}

/// The stamp of the block at `offset`: a header (magic, salt, offset) and
/// a pseudo-random stream seeded by both, so no two blocks and no two runs
/// share contents.
fn fill(buf: &mut [u8], salt: u64, offset: u64) {
    let mut state = salt ^ offset.rotate_left(32);
    for chunk in buf.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&mix(state).to_le_bytes());
    }
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&salt.to_le_bytes());
    buf[16..24].copy_from_slice(&offset.to_le_bytes());
}

/// splitmix64's finaliser: a cheap, well-spread 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A salt that differs between runs (it need not be unpredictable): std's
/// randomly keyed hasher over the time and the process id.
fn fresh_salt() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()))
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const BLOCK: u64 = ALIGN as u64;

    #[derive(Debug, Clone, Copy)]
    enum Fault {
        None,
        /// Offset o lands at o % n.
        Wrap(u64),
        /// Writes at or past n vanish; reads there return zeros.
        Drop(u64),
        /// Writes at or past n vanish; reads there return the old contents.
        Frozen(u64),
        /// Reads at or past n come back with one bit flipped.
        Flip(u64),
        /// I/O on the block at n fails with EIO.
        Eio(u64),
    }

    /// A card in memory, stored sparsely by 4 KiB block; a block never
    /// written holds a pattern naming its physical offset.
    struct Fake {
        fault: Fault,
        blocks: RefCell<HashMap<u64, Vec<u8>>>,
        reads: Cell<u64>,
        writes: Cell<u64>,
        /// Cancelled once this many writes have been served.
        cancel_after: Option<(u64, Cancel)>,
    }

    impl Fake {
        fn new(fault: Fault) -> Self {
            Self { fault, blocks: RefCell::default(), reads: Cell::new(0), writes: Cell::new(0), cancel_after: None }
        }

        fn pristine(physical: u64) -> Vec<u8> {
            let mut block = vec![(physical / BLOCK).to_le_bytes()[0]; ALIGN];
            block[..8].copy_from_slice(&physical.to_le_bytes());
            block
        }

        /// Where an offset's bytes live; `None`: nowhere.
        fn physical(&self, offset: u64) -> Option<u64> {
            match self.fault {
                Fault::Wrap(n) => Some(offset % n),
                Fault::Drop(n) | Fault::Frozen(n) if offset >= n => None,
                _ => Some(offset),
            }
        }

        /// Physical blocks that no longer hold what they held before the probe.
        fn changed(&self) -> Vec<u64> {
            let mut changed: Vec<u64> =
                self.blocks.borrow().iter().filter(|(o, b)| **b != Self::pristine(**o)).map(|(o, _)| *o).collect();
            changed.sort_unstable();
            changed
        }

        fn eio(&self, offset: u64) -> Option<io::Error> {
            matches!(self.fault, Fault::Eio(n) if n == offset).then(|| io::Error::from_raw_os_error(libc::EIO))
        }
    }

    impl Medium for Fake {
        fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
            if let Some(source) = self.eio(offset) {
                return Err(DeviceError::Read { path: "/dev/fake".into(), offset, source });
            }
            self.reads.set(self.reads.get() + 1);
            let stored = |p: u64| self.blocks.borrow().get(&p).cloned().unwrap_or_else(|| Self::pristine(p));
            match (self.physical(offset), self.fault) {
                (Some(p), _) => buf.copy_from_slice(&stored(p)),
                (None, Fault::Frozen(_)) => buf.copy_from_slice(&stored(offset)),
                (None, _) => buf.fill(0),
            }
            if matches!(self.fault, Fault::Flip(n) if offset >= n) {
                buf[100] ^= 0x10;
            }
            Ok(())
        }

        fn write(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
            if let Some(source) = self.eio(offset) {
                return Err(DeviceError::Write { path: "/dev/fake".into(), offset, source });
            }
            self.writes.set(self.writes.get() + 1);
            if let Some((after, cancel)) = &self.cancel_after
                && self.writes.get() >= *after
            {
                cancel.cancel();
            }
            if let Some(p) = self.physical(offset) {
                self.blocks.borrow_mut().insert(p, buf.to_vec());
            }
            Ok(())
        }

        fn settle(&self) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn probe_fake(fake: &Fake, claimed: u64, keep_below: u64) -> Result<ProbeReport, ProbeError> {
        run(fake, Path::new("/dev/fake"), claimed, BLOCK, keep_below, 0x5a17, &Cancel::default())
    }

    #[test]
    fn a_genuine_card_is_genuine_and_unchanged() {
        let fake = Fake::new(Fault::None);
        let report = probe_fake(&fake, 256 * MIB, 64 * MIB).unwrap();
        assert!(report.genuine, "{report:?}");
        assert_eq!((report.usable, report.wraps_at), (256 * MIB, None));
        // The stride is rounded up to a power of two: between half and all of SPREAD.
        assert!((SPREAD / 2..=SPREAD + 2).contains(&report.blocks_checked), "{report:?}");
        assert_eq!(fake.changed(), Vec::<u64>::new());
        assert_eq!(fake.writes.get(), 2 * report.blocks_checked, "one stamp and one restore per block");
        assert!(report.to_string().starts_with("genuine card: 256.0 MiB ("), "{report}");
    }

    #[test]
    fn a_wrap_into_the_image_is_found_and_undone() {
        let fake = Fake::new(Fault::Wrap(64 * MIB));
        let report = probe_fake(&fake, 256 * MIB, 64 * MIB).unwrap();
        assert!(!report.genuine);
        assert_eq!((report.usable, report.wraps_at), (64 * MIB, Some(64 * MIB)));
        assert_eq!(fake.changed(), Vec::<u64>::new(), "the image was not restored");
        assert_eq!(report.to_string(), "counterfeit card: about 64.0 MiB usable of 256.0 MiB claimed");
    }

    #[test]
    fn a_whole_card_probe_finds_the_wrap_and_undoes_it() {
        let fake = Fake::new(Fault::Wrap(64 * MIB));
        let report = probe_fake(&fake, GIB, 0).unwrap();
        assert!(!report.genuine);
        assert_eq!((report.usable, report.wraps_at), (64 * MIB, Some(64 * MIB)));
        assert_eq!(fake.changed(), Vec::<u64>::new());
    }

    /// Not a power of two, but a multiple of the spread's stride: the
    /// spread blocks alias each other.
    #[test]
    fn a_wrap_at_a_multiple_of_the_stride_is_found() {
        let fake = Fake::new(Fault::Wrap(48 * MIB));
        let report = probe_fake(&fake, 256 * MIB, 0).unwrap();
        assert!(!report.genuine);
        assert_eq!(report.usable, 48 * MIB, "{report:?}");
        assert_eq!(fake.changed(), Vec::<u64>::new());
    }

    #[test]
    fn dropped_writes_are_located_to_the_block() {
        let real = 37 * MIB + 3 * BLOCK;
        for fault in [Fault::Drop(real), Fault::Frozen(real), Fault::Flip(real)] {
            let fake = Fake::new(fault);
            let report = probe_fake(&fake, 256 * MIB, 16 * MIB).unwrap();
            assert!(!report.genuine, "{fault:?}");
            assert_eq!((report.usable, report.wraps_at), (real, None), "{fault:?}");
            // A card that flips bits on reading gave the probe flipped
            // originals too; no one can put those back.
            if !matches!(fault, Fault::Flip(_)) {
                assert_eq!(fake.changed(), Vec::<u64>::new(), "{fault:?}");
            }
        }
    }

    #[test]
    fn nothing_good_above_the_image_means_the_image_is_all_there_is() {
        let fake = Fake::new(Fault::Drop(64 * MIB));
        let report = probe_fake(&fake, 256 * MIB, 64 * MIB).unwrap();
        assert!(!report.genuine);
        assert_eq!(report.usable, 64 * MIB);
    }

    /// Stamps of an earlier run (another salt) left where writes now vanish
    /// are not mistaken for this run's.
    #[test]
    fn stale_stamps_of_an_earlier_run_do_not_count() {
        let fake = Fake::new(Fault::Frozen(64 * MIB));
        for offset in (64 * MIB..256 * MIB).step_by(ALIGN) {
            let mut stale = vec![0; ALIGN];
            fill(&mut stale, 0x01d, offset);
            fake.blocks.borrow_mut().insert(offset, stale);
        }
        let report = probe_fake(&fake, 256 * MIB, 16 * MIB).unwrap();
        assert_eq!((report.genuine, report.usable), (false, 64 * MIB));
    }

    /// A few hundred I/Os, whatever the card's size.
    #[test]
    fn a_huge_card_costs_a_bounded_number_of_ios() {
        for fault in [Fault::None, Fault::Wrap(8 * GIB), Fault::Drop(8 * GIB + 5 * BLOCK)] {
            let fake = Fake::new(fault);
            let report = probe_fake(&fake, 2 << 40, 4 * GIB).unwrap();
            let (reads, writes) = (fake.reads.get(), fake.writes.get());
            assert!(writes <= 2 * 300 && reads <= 800, "{fault:?}: {reads} reads, {writes} writes");
            match fault {
                Fault::None => assert!(report.genuine),
                _ => assert_eq!(report.usable, 8 * GIB + if let Fault::Drop(_) = fault { 5 * BLOCK } else { 0 }),
            }
            assert_eq!(fake.changed(), Vec::<u64>::new(), "{fault:?}");
        }
    }

    #[test]
    fn too_little_room_above_the_image_is_reported_not_probed() {
        let fake = Fake::new(Fault::Drop(0));
        let report = probe_fake(&fake, 64 * MIB + 4 * BLOCK, 64 * MIB).unwrap();
        assert!(report.genuine);
        assert!(report.note.as_deref().is_some_and(|n| n.starts_with("not probed")), "{report:?}");
        assert_eq!(fake.reads.get() + fake.writes.get(), 0);
        assert!(report.to_string().contains("not probed"), "{report}");
    }

    #[test]
    fn an_io_error_names_the_offset_and_the_rest_is_restored() {
        // A block of the spread pass, after some were stamped.
        let fake = Fake::new(Fault::Eio(130 * MIB));
        let err = probe_fake(&fake, 256 * MIB, 64 * MIB).unwrap_err();
        assert!(matches!(err, ProbeError::Io { offset, .. } if offset == 130 * MIB), "{err:?}");
        assert_eq!(
            err.to_string(),
            "/dev/fake: probe read failed at offset 136314880: Input/output error (os error 5)"
        );
        assert!(fake.writes.get() > 2, "nothing was stamped before the error");
        assert_eq!(fake.changed(), Vec::<u64>::new());
    }

    #[test]
    fn an_interrupted_probe_restores_what_it_stamped() {
        let cancel = Cancel::default();
        let fake = Fake { cancel_after: Some((20, cancel.clone())), ..Fake::new(Fault::Wrap(64 * MIB)) };
        let err = run(&fake, Path::new("/dev/fake"), GIB, BLOCK, 0, 7, &cancel).unwrap_err();
        assert!(matches!(err, ProbeError::Cancelled { .. }), "{err:?}");
        assert_eq!(err.exit_code(), 130);
        assert_eq!(fake.changed(), Vec::<u64>::new());
    }

    #[test]
    fn spread_covers_both_ends_with_a_power_of_two_stride() {
        let offsets = spread(64 * MIB, 256 * MIB, BLOCK);
        assert_eq!(offsets.first(), Some(&(64 * MIB)));
        assert_eq!(offsets.last(), Some(&(256 * MIB - BLOCK)));
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        assert!(offsets[1..offsets.len() - 1].iter().all(|o| o % (2 * MIB) == 0));
        assert_eq!(between(0, 3 * BLOCK, BLOCK), vec![0, BLOCK, 2 * BLOCK]);
        assert_eq!(between(BLOCK, BLOCK, BLOCK), Vec::<u64>::new());
        assert_eq!(between(0, 1600 * BLOCK, BLOCK).len() as u64, NARROW);
    }
}

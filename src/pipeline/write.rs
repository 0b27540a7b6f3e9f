//! The write stage: image → device, in an order that never leaves a
//! half-written card looking valid.
//!
//! 1. Zero the first and the last MiB of the device. The first MiB holds the
//!    MBR or primary GPT, the last the backup GPT: with both gone, a card
//!    pulled mid-write has no partition table at all instead of an old one
//!    pointing at half-overwritten filesystems.
//! 2. Write everything after the first MiB.
//! 3. Flush, then write the first MiB (the new partition table) and flush
//!    again. Only a card that received every byte gets a table.

use super::{Cancel, JobError, Observer, Stage};
use crate::blockdev::{AlignedBuf, Kind, Target};
use crate::image::{BlockDigests, ChunkReader, ImageError};

/// The region written last: partition tables and boot loaders live here.
pub const HEAD: usize = 1 << 20;

/// What the writer knows about the image it writes.
pub(super) struct Source<'a> {
    pub path: &'a std::path::Path,
    pub raw_size: u64,
    /// The image's block digests from preparation: every chunk is checked
    /// against them before the card gets it, so a prepared copy that rotted
    /// or changed since never reaches a card.
    pub expected: Option<&'a BlockDigests>,
}

/// Writes the whole image; returns once every byte is on the medium.
pub(super) fn run(
    chunks: &mut ChunkReader<ImageError>,
    target: &Target,
    source: &Source<'_>,
    observer: &dyn Observer,
    cancel: &Cancel,
) -> Result<(), JobError> {
    let raw_size = source.raw_size;
    blank_ends(target)?;
    // The blank ends must be on the medium before any of the new body is:
    // with a volatile cache, a pull could otherwise keep body writes and
    // lose the blanking, leaving the old table over new data.
    target.sync()?;
    let diskseq = target.diskseq();

    let mut head = AlignedBuf::new(HEAD);
    let head_len = usize::try_from(raw_size).map_or(HEAD, |n| n.min(HEAD));
    let mut written = 0u64;
    while let Some(chunk) = chunks.next_chunk() {
        let mut chunk = chunk?;
        super::stopped(cancel, target)?;
        // A swapped card must not get the rest of someone else's image.
        target.ensure_media(diskseq)?;
        let end = chunk.end();
        // The size index decided the guard's verdict; never write past it.
        if end > raw_size {
            return Err(ImageError::SizeChanged { path: source.path.to_owned(), expected: raw_size, found: end }.into());
        }
        if let Some(expected) = source.expected
            && let Err(offset) = expected.check(chunk.offset, chunk.data())
        {
            return Err(JobError::ImageChanged { image: source.path.to_owned(), offset });
        }
        let mut body_start = 0;
        if let Ok(start) = usize::try_from(chunk.offset)
            && start < HEAD
        {
            let n = (HEAD - start).min(chunk.len);
            head[start..start + n].copy_from_slice(&chunk.buf[..n]);
            body_start = n;
        }
        if body_start < chunk.len {
            write_padded(target, &mut chunk.buf, body_start, chunk.len, chunk.offset + body_start as u64)?;
        }
        written = end;
        observer.progress(Stage::Write, written, raw_size);
        chunks.recycle(chunk.buf);
    }
    if written != raw_size {
        let path = source.path.to_owned();
        return Err(ImageError::SizeChanged { path, expected: raw_size, found: written }.into());
    }
    target.sync()?;
    super::stopped(cancel, target)?;
    // The table makes the card look flashed: only onto the card we wrote.
    target.ensure_media(diskseq)?;
    write_padded(target, &mut head, 0, head_len, 0)?;
    target.set_file_len(raw_size)?;
    target.sync()?;
    Ok(())
}

/// Takes the partition tables away again (the first and last MiB), so a
/// card whose job failed after writing began does not look flashed; only
/// while the device still holds the media `expected`, so a card swapped in
/// meanwhile is left alone.
pub(super) fn blank(target: &Target, expected: Option<u64>) -> Result<(), JobError> {
    target.ensure_media(expected)?;
    blank_ends(target)?;
    target.sync()?;
    Ok(())
}

fn blank_ends(target: &Target) -> Result<(), JobError> {
    let zero = AlignedBuf::new(HEAD);
    let size = target.size();
    let bs = target.block_size() as u64;
    match target.kind() {
        Kind::BlockDevice => {
            let head = size.min(HEAD as u64);
            target.write_at(&zero[..to_usize(head)], 0)?;
            let tail_start = size.saturating_sub(HEAD as u64) / bs * bs;
            target.write_at(&zero[..to_usize(size - tail_start)], tail_start)?;
        }
        Kind::RegularFile => target.write_at(&zero, 0)?,
    }
    Ok(())
}

/// Writes `buf[from..to]` at device `offset`. With direct I/O a partial
/// final block is completed with what the device holds after the image
/// (zeros past the end of a file), so bytes beyond the image are kept.
fn write_padded(target: &Target, buf: &mut [u8], from: usize, to: usize, offset: u64) -> Result<(), JobError> {
    let bs = target.block_size();
    let len = to - from;
    if !target.is_direct() || len.is_multiple_of(bs) {
        target.write_at(&buf[from..to], offset)?;
        return Ok(());
    }
    let padded = len.next_multiple_of(bs);
    let tail = from + padded - bs; // start of the last, partial block in buf
    let keep = to - tail; // image bytes in that block
    let mut block = AlignedBuf::new(bs);
    target.read_at(&mut block[..bs], offset + (padded - bs) as u64)?;
    block[..keep].copy_from_slice(&buf[tail..to]);
    buf[tail..tail + bs].copy_from_slice(&block[..bs]);
    target.write_at(&buf[from..from + padded], offset)?;
    Ok(())
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

//! The verify stage: read the card back and compare it with the image.
//!
//! The device is read with `O_DIRECT` after its buffer cache is dropped, so
//! the bytes compared come from the card, not from the RAM that just wrote
//! them. The image side is a fresh decode of the source compared chunk by
//! chunk; for a raw image that is the page cache, so verifying costs no CPU
//! beyond `memcmp`, and a mismatch is reported at its exact byte offset.
//! The image's SHA-256 is computed here, on the reader thread, where it
//! overlaps the device reads instead of slowing the writes.

use super::chunks::ChunkReader;
use super::{Cancel, JobError, Observer, Stage};
use crate::blockdev::{AlignedBuf, Target};
use crate::image::Image;

pub(super) fn run(
    image: &Image,
    target: &Target,
    raw_size: u64,
    chunk_size: usize,
    hash: bool,
    observer: &dyn Observer,
    cancel: &Cancel,
) -> Result<Option<String>, JobError> {
    target.sync()?;
    target.drop_caches()?;
    let mut chunks = ChunkReader::spawn(image.reader()?, chunk_size, hash)?;
    let mut card = AlignedBuf::new(chunk_size);
    let bs = target.block_size();
    let mut checked = 0u64;
    while let Some(chunk) = chunks.next_chunk() {
        let chunk = chunk?;
        cancel.check(target)?;
        let want = if target.is_direct() { chunk.len.next_multiple_of(bs) } else { chunk.len };
        let got = target.read_at(&mut card[..want], chunk.offset)?;
        let expected = &chunk.buf[..chunk.len];
        let actual = &card[..got.min(chunk.len)];
        if actual != expected {
            let at = expected.iter().zip(actual).position(|(a, b)| a != b).unwrap_or(actual.len());
            return Err(JobError::Mismatch { device: target.path().to_owned(), offset: chunk.offset + at as u64 });
        }
        checked = chunk.offset + chunk.len as u64;
        observer.progress(Stage::Verify, checked, raw_size);
        chunks.recycle(chunk.buf);
    }
    if checked != raw_size {
        return Err(JobError::Internal(format!("verified {checked} of {raw_size} bytes")));
    }
    Ok(chunks.finish())
}

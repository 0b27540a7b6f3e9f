//! The verify stage: read the card back and prove it holds the image.
//!
//! The device is read with `O_DIRECT` after its buffer cache is dropped, so
//! the bytes checked come from the card, not from the RAM that just wrote
//! them. A reader thread keeps the next chunk coming from the card while
//! this thread checks the last one.
//!
//! What the card is checked against is the image's identity, never a
//! second read of a copy that may have rotted: the block digests recorded
//! when the image was prepared (or while it was streamed to the card), or,
//! for `flashbay verify` on its own, a fresh decode of the image compared
//! byte for byte. The image's SHA-256, when asked for, is computed from the
//! card's bytes as they pass: equal to the image's once every block matched.

use sha2::{Digest, Sha256};

use super::{Cancel, JobError, Observer, Stage};
use crate::blockdev::{DeviceError, Target};
use crate::image::{BlockDigests, ChunkReader, Hashes, ImageError, hex};

/// What the card must match.
pub(super) enum Reference<'a> {
    Blocks(&'a BlockDigests),
    /// The image's raw bytes, in chunks of the same size as the card's.
    Image(ChunkReader<ImageError>),
}

pub(super) fn run(
    target: &Target,
    mut reference: Reference<'_>,
    raw_size: u64,
    chunk_size: usize,
    sha256: bool,
    observer: &dyn Observer,
    cancel: &Cancel,
) -> Result<Option<String>, JobError> {
    target.sync()?;
    target.drop_caches()?;
    let mut card = read_ahead(target, raw_size, chunk_size)?;
    let mut hasher = sha256.then(Sha256::new);
    let mut checked = 0u64;
    while let Some(chunk) = card.next_chunk() {
        let chunk = chunk?;
        super::stopped(cancel, target)?;
        let mismatch = match &mut reference {
            Reference::Blocks(blocks) => blocks.check(chunk.offset, chunk.data()).err(),
            Reference::Image(image) => {
                let expected = image.next_chunk().ok_or_else(|| {
                    JobError::Internal(format!("the image ended at byte {} while verifying", chunk.offset))
                })??;
                let at = expected.data().iter().zip(chunk.data()).position(|(a, b)| a != b);
                let differ = at.or((expected.len != chunk.len).then_some(expected.len.min(chunk.len)));
                image.recycle(expected.buf);
                differ.map(|at| chunk.offset + at as u64)
            }
        };
        if let Some(offset) = mismatch {
            return Err(JobError::Mismatch { device: target.path().to_owned(), offset });
        }
        if let Some(h) = hasher.as_mut() {
            h.update(chunk.data());
        }
        checked = chunk.end();
        observer.progress(Stage::Verify, checked, raw_size);
        card.recycle(chunk.buf);
    }
    if checked != raw_size {
        return Err(JobError::Internal(format!("verified {checked} of {raw_size} bytes")));
    }
    if let Reference::Image(mut image) = reference
        && image.next_chunk().is_some()
    {
        return Err(JobError::Mismatch { device: target.path().to_owned(), offset: raw_size });
    }
    Ok(hasher.map(|h| hex(&h.finalize())))
}

/// The card's first `len` bytes in chunks, read on their own thread.
fn read_ahead(target: &Target, len: u64, chunk_size: usize) -> Result<ChunkReader<DeviceError>, JobError> {
    let reader = target.reader()?;
    let (bs, direct) = (target.block_size(), target.is_direct());
    let mut offset = 0u64;
    let fill = move |buf: &mut [u8]| -> Result<usize, DeviceError> {
        let n = usize::try_from(len - offset).map_or(buf.len(), |left| left.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        // Direct reads cover whole logical blocks; only `n` bytes count.
        let want = if direct { n.next_multiple_of(bs).min(buf.len()) } else { n };
        let got = reader.read_at(&mut buf[..want], offset)?;
        let n = n.min(got);
        if n == 0 {
            return Err(DeviceError::Read {
                path: reader.path().to_owned(),
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        offset += n as u64;
        Ok(n)
    };
    ChunkReader::spawn("card-reader", fill, chunk_size, Hashes::default())
        .map_err(|e| JobError::Internal(format!("cannot start the card reader: {e}")))
}

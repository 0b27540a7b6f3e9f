//! A reader thread that decodes the image into aligned chunks ahead of the
//! device I/O.
//!
//! Decoding (and hashing) runs on its own thread while the caller writes or
//! reads the device, so the slower of the two sets the pace instead of their
//! sum. Buffers circulate between the two threads through bounded channels:
//! memory stays at `DEPTH` chunks however fast either side is.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::JobError;
use crate::blockdev::AlignedBuf;
use crate::image::{ImageError, ImageReader, hex};

/// Buffers in flight: one being filled, one queued, one at the device.
const DEPTH: usize = 3;

/// A run of raw image bytes at a known offset.
#[derive(Debug)]
pub struct Chunk {
    pub buf: AlignedBuf,
    /// Valid bytes at the start of `buf`; less than its length only at the end.
    pub len: usize,
    /// Offset of `buf[0]` in the raw image.
    pub offset: u64,
}

#[derive(Debug)]
pub struct ChunkReader {
    full: Receiver<Result<Chunk, ImageError>>,
    free: SyncSender<AlignedBuf>,
    thread: Option<JoinHandle<Option<String>>>,
}

impl ChunkReader {
    /// Starts decoding `reader` in `chunk_size` pieces; with `hash`, the
    /// thread also computes the SHA-256 of the raw bytes.
    pub fn spawn(mut reader: ImageReader, chunk_size: usize, hash: bool) -> Result<Self, JobError> {
        let (full_tx, full) = mpsc::sync_channel(DEPTH);
        let (free, free_rx) = mpsc::sync_channel::<AlignedBuf>(DEPTH);
        for _ in 0..DEPTH {
            let _ = free.try_send(AlignedBuf::new(chunk_size));
        }
        let thread = std::thread::Builder::new().name("image-reader".into()).spawn(move || {
            let mut hasher = hash.then(Sha256::new);
            let mut offset = 0u64;
            // Ends when the consumer hangs up (dropped) or the image ends or fails.
            while let Ok(mut buf) = free_rx.recv() {
                match reader.fill(&mut buf) {
                    Ok(0) => return hasher.map(|h| hex(&h.finalize())),
                    Ok(len) => {
                        if let Some(h) = hasher.as_mut() {
                            h.update(&buf[..len]);
                        }
                        if full_tx.send(Ok(Chunk { buf, len, offset })).is_err() {
                            return None;
                        }
                        offset += len as u64;
                    }
                    Err(e) => {
                        let _ = full_tx.send(Err(e));
                        return None;
                    }
                }
            }
            None
        });
        let thread = thread.map_err(|e| JobError::Internal(format!("cannot start image reader: {e}")))?;
        Ok(Self { full, free, thread: Some(thread) })
    }

    /// The next chunk; `None` once the image has ended cleanly (after every
    /// integrity check passed).
    pub fn next_chunk(&mut self) -> Option<Result<Chunk, ImageError>> {
        self.full.recv().ok()
    }

    /// Hands a buffer back for the reader to fill again.
    pub fn recycle(&self, buf: AlignedBuf) {
        let _ = self.free.try_send(buf);
    }

    /// Waits for the reader thread; the SHA-256 when hashing was asked for
    /// and the image ended cleanly.
    pub fn finish(mut self) -> Option<String> {
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

impl Drop for ChunkReader {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Hang up both channels: the thread stops at its next send or recv,
            // after at most the chunk it is decoding now.
            drop(std::mem::replace(&mut self.full, mpsc::sync_channel(0).1));
            drop(std::mem::replace(&mut self.free, mpsc::sync_channel(0).0));
            let _ = thread.join();
        }
    }
}

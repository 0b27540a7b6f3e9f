//! The one decode loop: a reader thread that fills aligned chunks ahead of
//! their consumer, hashing what it produced on the way.
//!
//! Preparation, writing and verifying all read through it: the image's
//! decoder (or a card, for verification) runs on its own thread while the
//! caller writes, compares or copies, so the slower of the two sets the
//! pace instead of their sum. Buffers circulate between the two threads
//! through bounded channels: memory stays at `DEPTH` chunks however fast
//! either side is.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::blocks::{BlockDigests, Digester};
use super::hex;
use crate::blockdev::AlignedBuf;

/// Buffers in flight: one being filled, one queued, one being consumed.
const DEPTH: usize = 3;

/// A run of raw bytes at a known offset.
#[derive(Debug)]
pub struct Chunk {
    pub buf: AlignedBuf,
    /// Valid bytes at the start of `buf`; less than its length only at the end.
    pub len: usize,
    /// Offset of `buf[0]` in the stream.
    pub offset: u64,
}

impl Chunk {
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// What the reader thread computes over the bytes it produced.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hashes {
    pub sha256: bool,
    pub blocks: bool,
}

/// The results of [`Hashes`], once the stream ended cleanly.
#[derive(Debug, Default)]
pub struct Digests {
    pub sha256: Option<String>,
    pub blocks: Option<BlockDigests>,
    /// Bytes produced.
    pub len: u64,
}

/// Chunks from a source read on its own thread; `E` is the source's error.
#[derive(Debug)]
pub struct ChunkReader<E> {
    full: Receiver<Result<Chunk, E>>,
    free: SyncSender<AlignedBuf>,
    thread: Option<JoinHandle<Option<Digests>>>,
}

impl<E: Send + 'static> ChunkReader<E> {
    /// Starts filling `chunk_size` buffers with `source` (which returns the
    /// bytes it put at the start of the buffer, 0 at the end) on a thread
    /// named `name`.
    pub fn spawn<F>(name: &str, mut source: F, chunk_size: usize, hashes: Hashes) -> std::io::Result<Self>
    where
        F: FnMut(&mut [u8]) -> Result<usize, E> + Send + 'static,
    {
        let (full_tx, full) = mpsc::sync_channel(DEPTH);
        let (free, free_rx) = mpsc::sync_channel::<AlignedBuf>(DEPTH);
        for _ in 0..DEPTH {
            let _ = free.try_send(AlignedBuf::new(chunk_size));
        }
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut sha = hashes.sha256.then(Sha256::new);
            let mut blocks = hashes.blocks.then(Digester::default);
            let mut offset = 0u64;
            // Ends when the consumer hangs up (dropped) or the source ends or fails.
            while let Ok(mut buf) = free_rx.recv() {
                match source(&mut buf) {
                    Ok(0) => {
                        return Some(Digests {
                            sha256: sha.map(|h| hex(&h.finalize())),
                            blocks: blocks.map(Digester::finish),
                            len: offset,
                        });
                    }
                    Ok(len) => {
                        if let Some(h) = sha.as_mut() {
                            h.update(&buf[..len]);
                        }
                        if let Some(d) = blocks.as_mut() {
                            d.update(&buf[..len]);
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
        })?;
        Ok(Self { full, free, thread: Some(thread) })
    }

    /// The next chunk; `None` once the source has ended cleanly (after
    /// every integrity check of an image format passed).
    pub fn next_chunk(&mut self) -> Option<Result<Chunk, E>> {
        self.full.recv().ok()
    }

    /// Hands a buffer back for the reader to fill again.
    pub fn recycle(&self, buf: AlignedBuf) {
        let _ = self.free.try_send(buf);
    }

    /// Waits for the reader thread; its digests when the stream ended cleanly.
    pub fn finish(mut self) -> Option<Digests> {
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

impl<E> Drop for ChunkReader<E> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Hang up both channels: the thread stops at its next send or recv,
            // after at most the chunk it is filling now.
            drop(std::mem::replace(&mut self.full, mpsc::sync_channel(0).1));
            drop(std::mem::replace(&mut self.free, mpsc::sync_channel(0).0));
            let _ = thread.join();
        }
    }
}

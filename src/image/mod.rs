//! Image sources: what an image file is, how big it is raw, and its bytes.
//!
//! [`Image::open`] classifies a file by magic bytes, and a compressed
//! file's first decoded bytes the same way, and reads the raw size from the
//! format's index where one exists. [`Image::reader`] streams the
//! raw bytes and turns every kind of damage into an [`ImageError`]; a stream
//! that decodes to the wrong length is damage too. [`Image::measure`] makes
//! one full pass for the raw size and SHA-256, which is what `image inspect`
//! prints and what the daemon records once per image.

pub mod blocks;
pub mod chunks;
mod decode;
mod format;
mod size;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use blocks::{BLOCK, BlockDigests};
pub use chunks::{Chunk, ChunkReader, Digests, Hashes};
pub use decode::ImageReader;
pub use format::Format;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: image is empty", path.display())]
    Empty { path: PathBuf },
    /// Not a disk image, or one we cannot stream; the hint says what to do.
    #[error("{}: {hint}", path.display())]
    Unsupported { path: PathBuf, hint: String },
    #[error("{}: corrupt {format} stream at compressed offset {offset}: {detail}", path.display())]
    Corrupt { path: PathBuf, format: Format, offset: u64, detail: String },
    #[error("{}: truncated {format} stream: the file ends at compressed offset {offset}, inside the stream", path.display())]
    Truncated { path: PathBuf, format: Format, offset: u64 },
    #[error("{}: read failed at offset {offset}: {source}", path.display())]
    Read { path: PathBuf, offset: u64, source: std::io::Error },
    #[error("{}: image changed size while being read", path.display())]
    Changed { path: PathBuf },
    #[error("{}: the image holds {found} bytes, not the {expected} it was sized at (changed since?)", path.display())]
    SizeChanged { path: PathBuf, expected: u64, found: u64 },
}

/// An image file, classified and sized but not yet read.
///
/// It keeps the file open: every reader reads this very file, so a job
/// keeps writing and verifying the version it started with even if the
/// image is replaced (renamed over) or deleted meanwhile.
#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub path: PathBuf,
    pub format: Format,
    /// Size of the file on disk.
    pub compressed_size: u64,
    /// Raw size from the format's index; `None` until measured for gzip and
    /// for zstd written without a content size.
    pub raw_size: Option<u64>,
    #[serde(skip)]
    file: std::sync::Arc<File>,
}

/// The result of one full pass over an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Measured {
    pub raw_size: u64,
    /// Lowercase hex SHA-256 of the raw (decompressed) bytes.
    pub sha256: String,
    #[serde(skip)]
    pub blocks: BlockDigests,
}

impl Image {
    /// Opens and classifies an image. A compressed image is decoded for its
    /// first few KiB too: what it holds must be a disk image as well, not a
    /// tar archive or a VM disk that would decode fine and never boot.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let (file, len) = open_file(path)?;
        let mut head = vec![0u8; format::HEAD_LEN];
        let n = read_head(&file, &mut head).map_err(|source| ImageError::Read {
            path: path.to_owned(),
            offset: 0,
            source,
        })?;
        if len == 0 {
            return Err(ImageError::Empty { path: path.to_owned() });
        }
        let unsupported = |hint| ImageError::Unsupported { path: path.to_owned(), hint };
        let format = match format::detect(&head[..n]) {
            format::Detected::Supported(format) => format,
            format::Detected::Unsupported(foreign) => return Err(unsupported(foreign.hint(Format::Raw))),
        };
        let raw_size = size::from_index(&file, format, len);
        if raw_size == Some(0) {
            return Err(ImageError::Empty { path: path.to_owned() });
        }
        let image =
            Self { path: path.to_owned(), format, compressed_size: len, raw_size, file: std::sync::Arc::new(file) };
        if format != Format::Raw {
            // The raw head was classified above, with the same table.
            let n = image.reader()?.fill(&mut head)?;
            format::inner(format, &head[..n]).map_err(unsupported)?;
        }
        Ok(image)
    }

    /// A fresh stream of the raw bytes, from the start. Reopening the open
    /// file through /proc gives the reader its own file offset.
    pub fn reader(&self) -> Result<ImageReader, ImageError> {
        use std::os::fd::AsRawFd;
        let reopen = Path::new("/proc/self/fd").join(self.file.as_raw_fd().to_string());
        let file = File::open(&reopen).map_err(|source| ImageError::Open { path: self.path.clone(), source })?;
        let len = file.metadata().map_err(|source| ImageError::Open { path: self.path.clone(), source })?.len();
        if len != self.compressed_size {
            return Err(ImageError::Changed { path: self.path.clone() });
        }
        ImageReader::new(&self.path, file, self.format, len, self.raw_size)
    }

    /// Decodes the whole image once: raw size, SHA-256 and block digests.
    /// Also proves the image is intact, since every integrity check of the
    /// format runs.
    pub fn measure(&self) -> Result<Measured, ImageError> {
        self.decode(|_| Ok(()))
    }

    /// Streams the raw bytes in chunks, decoded on a reader thread; see
    /// [`chunks`].
    pub fn chunks(&self, chunk_size: usize, hashes: Hashes) -> Result<ChunkReader<ImageError>, ImageError> {
        let mut reader = self.reader()?;
        ChunkReader::spawn("image-reader", move |buf| reader.fill(buf), chunk_size, hashes)
            .map_err(|source| ImageError::Open { path: self.path.clone(), source })
    }

    /// One full pass with SHA-256 and block digests, handing each chunk to
    /// `sink` (preparation writes them into the cache).
    pub fn decode<E: From<ImageError>>(&self, mut sink: impl FnMut(&Chunk) -> Result<(), E>) -> Result<Measured, E> {
        let mut chunks = self.chunks(4 << 20, Hashes { sha256: true, blocks: true })?;
        while let Some(chunk) = chunks.next_chunk() {
            let chunk = chunk?;
            sink(&chunk)?;
            chunks.recycle(chunk.buf);
        }
        let digests = chunks.finish().unwrap_or_default();
        match (digests.sha256, digests.blocks) {
            (Some(sha256), Some(blocks)) if digests.len > 0 => Ok(Measured { raw_size: digests.len, sha256, blocks }),
            (Some(_), Some(_)) => Err(ImageError::Empty { path: self.path.clone() }.into()),
            // Only a reader thread that died ends without its digests.
            _ => Err(ImageError::Read {
                path: self.path.clone(),
                offset: digests.len,
                source: std::io::Error::other("the image reader thread failed"),
            }
            .into()),
        }
    }

    /// The raw size, decoding the whole image when its format has no index.
    pub fn raw_size_or_measure(&mut self) -> Result<u64, ImageError> {
        if let Some(size) = self.raw_size {
            return Ok(size);
        }
        let size = self.measure()?.raw_size;
        self.raw_size = Some(size);
        Ok(size)
    }
}

fn open_file(path: &Path) -> Result<(File, u64), ImageError> {
    let file = File::open(path).map_err(|source| ImageError::Open { path: path.to_owned(), source })?;
    let meta = file.metadata().map_err(|source| ImageError::Open { path: path.to_owned(), source })?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile { path: path.to_owned() });
    }
    Ok((file, meta.len()))
}

fn read_head(mut file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A second xz stream whose magic straddles the reader's 1 MiB input
    /// buffer: the decoder must not take it for trailing garbage.
    #[test]
    fn concatenated_xz_with_magic_across_the_buffer_edge() {
        let boundary = 1usize << 20;
        let noise =
            |n: usize| -> Vec<u8> { (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 16).to_le_bytes()[0]).collect() };
        let xz = |data: &[u8]| {
            let mut out = Vec::new();
            liblzma::read::XzEncoder::new(data, 0).read_to_end(&mut out).unwrap();
            out
        };
        // Streams and their padding come in multiples of 4 bytes, so the
        // next magic can start 4 bytes before the edge: 4 bytes on this
        // side, 2 on the other.
        let size = 100_000;
        let first = xz(&noise(size));
        assert!(first.len() < boundary - 4);
        let second_raw = noise(5_000);
        let mut file = first;
        file.resize(boundary - 4, 0); // stream padding
        file.extend(xz(&second_raw));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat.xz");
        std::fs::write(&path, &file).unwrap();
        let measured = Image::open(&path).unwrap().measure().unwrap();
        assert_eq!(measured.raw_size, (size + second_raw.len()) as u64);
    }
}

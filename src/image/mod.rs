//! Image sources: what an image file is, how big it is raw, and its bytes.
//!
//! [`Image::open`] classifies a file by magic bytes and reads the raw size
//! from the format's index where one exists. [`Image::reader`] streams the
//! raw bytes and turns every kind of damage into an [`ImageError`]; a stream
//! that decodes to the wrong length is damage too. [`Image::measure`] makes
//! one full pass for the raw size and SHA-256, which is what `image inspect`
//! prints and what the daemon records once per image.

mod decode;
mod format;
mod size;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use decode::ImageReader;
pub use format::Format;

use crate::blockdev::AlignedBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: image is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: {hint}", path.display())]
    Unsupported { path: PathBuf, hint: &'static str },
    #[error("{}: corrupt {format} stream at compressed offset {offset}: {detail}", path.display())]
    Corrupt { path: PathBuf, format: Format, offset: u64, detail: String },
    #[error("{}: truncated {format} stream: the file ends at compressed offset {offset}, inside the stream", path.display())]
    Truncated { path: PathBuf, format: Format, offset: u64 },
    #[error("{}: read failed at offset {offset}: {source}", path.display())]
    Read { path: PathBuf, offset: u64, source: std::io::Error },
    #[error("{}: image changed size while being read", path.display())]
    Changed { path: PathBuf },
}

/// An image file, classified and sized but not yet read.
#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub path: PathBuf,
    pub format: Format,
    /// Size of the file on disk.
    pub compressed_size: u64,
    /// Raw size from the format's index; `None` until measured for gzip and
    /// for zstd written without a content size.
    pub raw_size: Option<u64>,
}

/// The result of one full pass over an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Measured {
    pub raw_size: u64,
    /// Lowercase hex SHA-256 of the raw (decompressed) bytes.
    pub sha256: String,
}

impl Image {
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let (file, len) = open_file(path)?;
        let mut head = [0u8; format::MAGIC_LEN];
        let n = read_head(&file, &mut head).map_err(|source| ImageError::Read {
            path: path.to_owned(),
            offset: 0,
            source,
        })?;
        if len == 0 {
            return Err(ImageError::Empty { path: path.to_owned() });
        }
        let format = match format::detect(&head[..n]) {
            format::Detected::Supported(format) => format,
            format::Detected::Unsupported(hint) => return Err(ImageError::Unsupported { path: path.to_owned(), hint }),
        };
        let raw_size = size::from_index(path, &file, format, len)?;
        if raw_size == Some(0) {
            return Err(ImageError::Empty { path: path.to_owned() });
        }
        Ok(Self { path: path.to_owned(), format, compressed_size: len, raw_size })
    }

    /// A fresh stream of the raw bytes, from the start.
    pub fn reader(&self) -> Result<ImageReader, ImageError> {
        let (file, len) = open_file(&self.path)?;
        if self.format == Format::Raw && len != self.compressed_size {
            return Err(ImageError::Changed { path: self.path.clone() });
        }
        ImageReader::new(&self.path, file, self.format, len, self.raw_size)
    }

    /// Decodes the whole image once: raw size and SHA-256. Also proves the
    /// image is intact, since every integrity check of the format runs.
    pub fn measure(&self) -> Result<Measured, ImageError> {
        let mut reader = self.reader()?;
        let mut hasher = Sha256::new();
        let mut buf = AlignedBuf::new(4 << 20);
        loop {
            let n = reader.fill(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if reader.position() == 0 {
            return Err(ImageError::Empty { path: self.path.clone() });
        }
        Ok(Measured { raw_size: reader.position(), sha256: hex(&hasher.finalize()) })
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

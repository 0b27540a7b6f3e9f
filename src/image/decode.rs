//! Streaming decoders that know where in the compressed file they are.
//!
//! Every decoder reads through [`Counting`], so a failure can name the
//! compressed offset it happened at, and a stream that ends early is told
//! apart from one that is damaged: if the decoder failed after consuming the
//! whole file, the file was cut short.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use liblzma::stream::{Action, MtStreamBuilder, Status, Stream};

use super::{Format, ImageError};

/// Input buffer per decoder: large enough that syscalls are not the cost.
const INPUT_BUFFER: usize = 1 << 20;
/// xz stream header magic, for concatenated streams.
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];

/// A `BufRead` that counts what its consumer has consumed.
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    consumed: u64,
}

impl<R: Read> Read for Counting<BufReader<R>> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consumed += n as u64;
        Ok(n)
    }
}

impl<R: Read> BufRead for Counting<BufReader<R>> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        self.inner.consume(amt);
        self.consumed += amt as u64;
    }
}

type Input = Counting<BufReader<File>>;

enum Decoder {
    Raw(Input),
    Xz(XzDecoder),
    Gzip(flate2::bufread::MultiGzDecoder<Input>),
    Zstd(zstd::stream::read::Decoder<'static, Input>),
}

impl Decoder {
    fn consumed(&self) -> u64 {
        match self {
            Decoder::Raw(input) => input.consumed,
            Decoder::Xz(xz) => xz.input.consumed,
            Decoder::Gzip(gz) => gz.get_ref().consumed,
            Decoder::Zstd(zst) => zst.get_ref().consumed,
        }
    }
}

/// Reads the raw (decompressed) bytes of an image, failing loudly on any
/// damage, truncation or size mismatch.
pub struct ImageReader {
    path: PathBuf,
    format: Format,
    decoder: Decoder,
    compressed_size: u64,
    /// Raw size promised by the image's own index, checked at the end.
    expected: Option<u64>,
    produced: u64,
    done: bool,
}

impl std::fmt::Debug for ImageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("produced", &self.produced)
            .finish_non_exhaustive()
    }
}

impl ImageReader {
    pub(super) fn new(
        path: &Path,
        file: File,
        format: Format,
        compressed_size: u64,
        expected: Option<u64>,
    ) -> Result<Self, ImageError> {
        // The kernel doubles readahead for sequential files; images are read front to back.
        let _ = nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
        let input = Counting { inner: BufReader::with_capacity(INPUT_BUFFER, file), consumed: 0 };
        let decoder = match format {
            Format::Raw => Decoder::Raw(input),
            Format::Xz => Decoder::Xz(XzDecoder::new(input).map_err(|e| ImageError::Corrupt {
                path: path.to_owned(),
                format,
                offset: 0,
                detail: e.to_string(),
            })?),
            Format::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(input)),
            Format::Zstd => {
                Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(input).map_err(|source| ImageError::Read {
                    path: path.to_owned(),
                    offset: 0,
                    source,
                })?)
            }
        };
        Ok(Self { path: path.to_owned(), format, decoder, compressed_size, expected, produced: 0, done: false })
    }

    /// Raw bytes produced so far.
    pub fn position(&self) -> u64 {
        self.produced
    }

    /// Fills `buf` completely unless the image ends first; returns the count.
    /// Zero means the image has ended and passed every integrity check.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ImageError> {
        let mut filled = 0;
        while filled < buf.len() && !self.done {
            let n = self.read_some(&mut buf[filled..])?;
            if n == 0 {
                self.finish()?;
            }
            filled += n;
        }
        Ok(filled)
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, ImageError> {
        let result = match &mut self.decoder {
            Decoder::Raw(input) => input.read(buf).map_err(Failure::Io),
            Decoder::Xz(xz) => xz.read(buf),
            Decoder::Gzip(gz) => gz.read(buf).map_err(Failure::Io),
            Decoder::Zstd(zst) => zst.read(buf).map_err(Failure::Io),
        };
        match result {
            Ok(n) => {
                self.produced += n as u64;
                Ok(n)
            }
            Err(failure) => Err(self.classify(failure)),
        }
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        self.done = true;
        if let Some(expected) = self.expected
            && expected != self.produced
        {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                format: self.format,
                offset: self.decoder.consumed(),
                detail: format!("stream produced {} bytes but its index says {expected}", self.produced),
            });
        }
        if self.format == Format::Raw && self.produced != self.compressed_size {
            return Err(ImageError::Changed { path: self.path.clone() });
        }
        Ok(())
    }

    /// Turns a decoder failure into an error that names the compressed offset.
    fn classify(&self, failure: Failure) -> ImageError {
        let offset = self.decoder.consumed();
        let path = self.path.clone();
        let format = self.format;
        match failure {
            Failure::Io(source) if self.format == Format::Raw => ImageError::Read { path, offset, source },
            // A read error on the file itself is not the stream's fault.
            Failure::Io(source) if is_file_error(&source) => ImageError::Read { path, offset, source },
            _ if offset >= self.compressed_size => ImageError::Truncated { path, format, offset },
            Failure::Io(e) => ImageError::Corrupt { path, format, offset, detail: e.to_string() },
            Failure::Xz(e) => ImageError::Corrupt { path, format, offset, detail: e.to_string() },
            Failure::Trailing => ImageError::Corrupt {
                path,
                format,
                offset,
                detail: "unexpected data after the end of the stream".into(),
            },
        }
    }
}

/// I/O errors that come from the file rather than from the decoder's verdict on the data.
fn is_file_error(e: &io::Error) -> bool {
    e.raw_os_error().is_some()
}

enum Failure {
    Io(io::Error),
    Xz(liblzma::stream::Error),
    Trailing,
}

/// xz decoding driven directly through liblzma, so that we can use the
/// threaded decoder (multi-block images from `xz -T0` decode in parallel)
/// and still accept concatenated streams and stream padding, which the
/// threaded decoder does not handle by itself.
struct XzDecoder {
    input: Input,
    stream: Stream,
    between_streams: bool,
}

impl XzDecoder {
    fn new(input: Input) -> Result<Self, liblzma::stream::Error> {
        Ok(Self { input, stream: new_xz_stream()?, between_streams: false })
    }

    fn read(&mut self, out: &mut [u8]) -> Result<usize, Failure> {
        loop {
            if self.between_streams {
                if !self.next_stream()? {
                    return Ok(0);
                }
                continue;
            }
            let input = self.input.fill_buf().map_err(Failure::Io)?;
            let eof = input.is_empty();
            let (in_before, out_before) = (self.stream.total_in(), self.stream.total_out());
            let status = self.stream.process(input, out, if eof { Action::Finish } else { Action::Run });
            let consumed = usize::try_from(self.stream.total_in() - in_before).unwrap_or(usize::MAX);
            let produced = usize::try_from(self.stream.total_out() - out_before).unwrap_or(usize::MAX);
            self.input.consume(consumed);
            match status.map_err(Failure::Xz)? {
                Status::StreamEnd => {
                    self.between_streams = true;
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
                _ if produced > 0 => return Ok(produced),
                // Input ended inside a stream: the classifier reports truncation.
                _ if eof => return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())),
                Status::MemNeeded if consumed == 0 => return Err(Failure::Xz(liblzma::stream::Error::Data)),
                _ => {}
            }
        }
    }

    /// After a stream ends: skip stream padding, then either start the next
    /// concatenated stream (true) or confirm the file ends here (false).
    fn next_stream(&mut self) -> Result<bool, Failure> {
        loop {
            let input = self.input.fill_buf().map_err(Failure::Io)?;
            if input.is_empty() {
                return Ok(false);
            }
            let zeros = input.iter().take_while(|&&b| b == 0).count();
            if zeros > 0 {
                self.input.consume(zeros);
                continue;
            }
            // The magic may straddle the end of the buffer (fill_buf returns
            // what is left before refilling): a matching prefix starts the
            // next stream too, and liblzma checks the rest of its header.
            let n = input.len().min(XZ_MAGIC.len());
            if input[..n] == XZ_MAGIC[..n] {
                self.stream = new_xz_stream().map_err(Failure::Xz)?;
                self.between_streams = false;
                return Ok(true);
            }
            return Err(Failure::Trailing);
        }
    }
}

fn new_xz_stream() -> Result<Stream, liblzma::stream::Error> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // Like xz(1): threads may use a quarter of RAM (a Pi Zero 2 has 512 MiB);
    // past that liblzma uses fewer threads, down to single-threaded decoding.
    let ram = nix::sys::sysinfo::sysinfo().map_or(1 << 30, |info| info.ram_total());
    MtStreamBuilder::new()
        .threads(u32::try_from(threads).unwrap_or(1))
        .memlimit_threading((ram / 4).max(64 << 20))
        .memlimit_stop(u64::MAX)
        .decoder()
}

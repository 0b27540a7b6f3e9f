//! The raw size of an image, from the format's own index where it has one.
//!
//! Knowing the raw size before writing is what lets the guard refuse a card
//! that is too small before a single byte goes to it. xz keeps an index at
//! the end of the file and zstd frames usually carry their content size, so
//! those cost a few page reads; gzip records the size only modulo 4 GiB,
//! which is useless for disk images, so gzip needs a full decoding pass.

use std::fs::File;
use std::path::Path;
use std::ptr;

use memmap2::Mmap;

use super::{Format, ImageError};

/// Raw size from the image's index, or `None` when the format has no
/// trustworthy one (gzip, zstd frames written without a content size).
pub(super) fn from_index(path: &Path, file: &File, format: Format, file_len: u64) -> Result<Option<u64>, ImageError> {
    match format {
        Format::Raw => Ok(Some(file_len)),
        Format::Gzip => Ok(None),
        Format::Xz | Format::Zstd => {
            // SAFETY: the map is read-only and private to this call. If another
            // process truncates the file meanwhile, reads past the new end
            // raise SIGBUS; images are not rewritten in place while in use, and
            // the decoding pass re-checks every byte against this size anyway.
            let map = unsafe { Mmap::map(file) }.map_err(|source| ImageError::Read {
                path: path.to_owned(),
                offset: 0,
                source,
            })?;
            // A damaged index usually means a damaged stream: return
            // "unknown" so that the measuring pass reports the precise place
            // and kind of damage (truncated, trailing data, ...).
            Ok(if format == Format::Xz {
                xz_uncompressed_size(&map).ok()
            } else {
                zstd_content_size(&map).ok().flatten()
            })
        }
    }
}

/// Sums the content sizes of every zstd frame; `None` if any frame lacks one.
fn zstd_content_size(mut data: &[u8]) -> Result<Option<u64>, String> {
    let mut total: u64 = 0;
    while !data.is_empty() {
        let frame_len = zstd::zstd_safe::find_frame_compressed_size(data)
            .map_err(|code| format!("bad zstd frame: {}", zstd::zstd_safe::get_error_name(code)))?;
        // Skippable frames (pzstd's size hints) carry no content and report 0.
        match zstd::zstd_safe::get_frame_content_size(data) {
            Ok(Some(size)) => total = total.checked_add(size).ok_or("zstd content size overflows")?,
            Ok(None) => return Ok(None),
            Err(_) => return Err("bad zstd frame header".into()),
        }
        data = &data[frame_len.min(data.len())..];
    }
    Ok(Some(total))
}

/// Reads the combined index of every stream in an xz file.
fn xz_uncompressed_size(data: &[u8]) -> Result<u64, liblzma::stream::Error> {
    /// Frees the decoder and the index whatever path we leave by.
    struct Decoder {
        strm: liblzma_sys::lzma_stream,
        index: *mut liblzma_sys::lzma_index,
    }
    impl Drop for Decoder {
        fn drop(&mut self) {
            // SAFETY: `strm` was initialised by lzma_file_info_decoder (or is the
            // all-zero LZMA_STREAM_INIT, which lzma_end accepts), and `index` is
            // either null or an index the decoder handed us and nobody else frees.
            unsafe {
                liblzma_sys::lzma_end(&raw mut self.strm);
                if !self.index.is_null() {
                    liblzma_sys::lzma_index_end(self.index, ptr::null());
                }
            }
        }
    }

    // SAFETY: an all-zero lzma_stream is LZMA_STREAM_INIT.
    let mut dec = Decoder { strm: unsafe { std::mem::zeroed() }, index: ptr::null_mut() };
    // SAFETY: both pointers are valid for the call; the index pointer stays
    // valid for the decoder's lifetime because `dec` does not move until dropped.
    let ret = unsafe {
        liblzma_sys::lzma_file_info_decoder(&raw mut dec.strm, &raw mut dec.index, u64::MAX, data.len() as u64)
    };
    check(ret)?;
    // The whole file is in memory, so the decoder never needs to ask us to seek.
    dec.strm.next_in = data.as_ptr();
    dec.strm.avail_in = data.len();
    loop {
        // SAFETY: next_in/avail_in describe `data`, which outlives the loop.
        let ret = unsafe { liblzma_sys::lzma_code(&raw mut dec.strm, liblzma_sys::LZMA_RUN) };
        match ret {
            liblzma_sys::LZMA_STREAM_END => break,
            liblzma_sys::LZMA_SEEK_NEEDED => {
                let pos = usize::try_from(dec.strm.seek_pos).map_err(|_| liblzma::stream::Error::Data)?;
                let remaining = data.get(pos..).ok_or(liblzma::stream::Error::Data)?;
                dec.strm.next_in = remaining.as_ptr();
                dec.strm.avail_in = remaining.len();
            }
            liblzma_sys::LZMA_OK if dec.strm.avail_in == 0 => return Err(liblzma::stream::Error::Data),
            other => check(other)?,
        }
    }
    // SAFETY: after LZMA_STREAM_END the decoder has stored a valid index.
    Ok(unsafe { liblzma_sys::lzma_index_uncompressed_size(dec.index) })
}

fn check(ret: liblzma_sys::lzma_ret) -> Result<(), liblzma::stream::Error> {
    match ret {
        liblzma_sys::LZMA_OK | liblzma_sys::LZMA_STREAM_END => Ok(()),
        liblzma_sys::LZMA_FORMAT_ERROR => Err(liblzma::stream::Error::Format),
        liblzma_sys::LZMA_OPTIONS_ERROR => Err(liblzma::stream::Error::Options),
        liblzma_sys::LZMA_MEM_ERROR => Err(liblzma::stream::Error::Mem),
        liblzma_sys::LZMA_MEMLIMIT_ERROR => Err(liblzma::stream::Error::MemLimit),
        _ => Err(liblzma::stream::Error::Data),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        liblzma::read::XzEncoder::new(data, 1).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn xz_index_gives_size_of_concatenated_streams() {
        let mut file = xz(&vec![7u8; 100_000]);
        file.extend_from_slice(&[0; 8]); // stream padding
        file.extend(xz(&vec![1u8; 5_000]));
        assert_eq!(xz_uncompressed_size(&file).unwrap(), 105_000);
    }

    #[test]
    fn xz_index_of_truncated_file_is_an_error() {
        let file = xz(&vec![7u8; 100_000]);
        assert!(xz_uncompressed_size(&file[..file.len() - 10]).is_err());
    }

    #[test]
    fn zstd_sizes_sum_over_frames_and_missing_size_is_none() {
        let mut file = zstd::bulk::compress(&vec![3u8; 70_000], 1).unwrap();
        file.extend(zstd::bulk::compress(&vec![4u8; 30_000], 1).unwrap());
        assert_eq!(zstd_content_size(&file).unwrap(), Some(100_000));

        // A streaming encoder does not know the size up front and omits it.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.write_all(&[5u8; 1000]).unwrap();
        assert_eq!(zstd_content_size(&enc.finish().unwrap()).unwrap(), None);
    }
}

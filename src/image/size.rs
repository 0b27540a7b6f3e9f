//! The raw size of an image, from the format's own index where it has one.
//!
//! Knowing the raw size before writing is what lets the guard refuse a card
//! that is too small before a single byte goes to it. xz keeps an index at
//! the end of the file and zstd frames usually carry their content size, so
//! those cost a few page reads; gzip records the size only modulo 4 GiB,
//! which is useless for disk images, so gzip needs a full decoding pass.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr;

use super::Format;

/// Raw size from the image's index, or `None` when the format has no
/// trustworthy one (gzip, zstd frames written without a content size).
/// Everything is read with `pread`: a file replaced in place while we look
/// gives a wrong answer (caught by the decoding pass), never a crash.
pub(super) fn from_index(file: &File, format: Format, file_len: u64) -> Option<u64> {
    // A damaged index usually means a damaged stream: return "unknown" so
    // that the measuring pass reports the precise place and kind of damage
    // (truncated, trailing data, ...).
    match format {
        Format::Raw => Some(file_len),
        Format::Gzip => None,
        Format::Xz => xz_uncompressed_size(file, file_len).ok(),
        Format::Zstd => zstd_content_size(file, file_len).ok().flatten(),
    }
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Sums the content sizes of every zstd frame, walking frames and their
/// block headers as RFC 8878 lays them out; `None` if a frame lacks one.
fn zstd_content_size(file: &File, len: u64) -> Result<Option<u64>, String> {
    let read =
        |buf: &mut [u8], at: u64| -> Result<(), String> { file.read_exact_at(buf, at).map_err(|e| e.to_string()) };
    let mut total: u64 = 0;
    let mut pos = 0u64;
    while pos < len {
        let mut head = [0u8; 18];
        let n = usize::try_from((len - pos).min(18)).unwrap_or(18);
        read(&mut head[..n], pos)?;
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            // Skippable frame (pzstd's size hints): magic, size, payload.
            pos += 8 + u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
            continue;
        }
        if magic != ZSTD_MAGIC || n < 5 {
            return Err(format!("no zstd frame at offset {pos}"));
        }
        match zstd::zstd_safe::get_frame_content_size(&head[..n]) {
            Ok(Some(size)) => total = total.checked_add(size).ok_or("zstd content size overflows")?,
            Ok(None) => return Ok(None),
            Err(_) => return Err(format!("bad zstd frame header at offset {pos}")),
        }
        let fhd = head[4];
        let single_segment = fhd & 0x20 != 0;
        let fcs = match fhd >> 6 {
            0 => u64::from(single_segment),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let did = [0, 1, 2, 4][usize::from(fhd & 3)];
        let mut at = pos + 5 + u64::from(!single_segment) + did + fcs;
        loop {
            let mut block = [0u8; 3];
            read(&mut block, at)?;
            let header = u32::from_le_bytes([block[0], block[1], block[2], 0]);
            let size = u64::from(header >> 3);
            at += 3 + match (header >> 1) & 3 {
                0 | 2 => size, // raw, compressed
                1 => 1,        // RLE: one byte, repeated
                _ => return Err(format!("reserved zstd block type at offset {at}")),
            };
            if header & 1 == 1 {
                break;
            }
        }
        if fhd & 0x04 != 0 {
            at += 4; // content checksum
        }
        pos = at;
    }
    Ok(Some(total))
}

/// Reads the combined index of every stream in an xz file, feeding
/// liblzma's file-info decoder the parts it asks for.
fn xz_uncompressed_size(file: &File, len: u64) -> Result<u64, liblzma::stream::Error> {
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
    let ret = unsafe { liblzma_sys::lzma_file_info_decoder(&raw mut dec.strm, &raw mut dec.index, u64::MAX, len) };
    check(ret)?;
    let mut buf = vec![0u8; 64 << 10];
    // File offset of the next byte to hand over.
    let mut pos = 0u64;
    loop {
        if dec.strm.avail_in == 0 {
            let n = file.read_at(&mut buf, pos).map_err(|_| liblzma::stream::Error::Data)?;
            dec.strm.next_in = buf.as_ptr();
            dec.strm.avail_in = n;
            pos += n as u64;
        }
        let action = if pos >= len { liblzma_sys::LZMA_FINISH } else { liblzma_sys::LZMA_RUN };
        // SAFETY: next_in/avail_in describe (part of) `buf`, which outlives the call.
        let ret = unsafe { liblzma_sys::lzma_code(&raw mut dec.strm, action) };
        match ret {
            liblzma_sys::LZMA_STREAM_END => break,
            liblzma_sys::LZMA_SEEK_NEEDED => {
                pos = dec.strm.seek_pos;
                dec.strm.avail_in = 0;
            }
            liblzma_sys::LZMA_OK => {}
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

    fn file(bytes: &[u8]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        (f, bytes.len() as u64)
    }

    #[test]
    fn xz_index_gives_size_of_concatenated_streams() {
        let mut bytes = xz(&vec![7u8; 100_000]);
        bytes.extend_from_slice(&[0; 8]); // stream padding
        bytes.extend(xz(&vec![1u8; 5_000]));
        let (f, len) = file(&bytes);
        assert_eq!(xz_uncompressed_size(f.as_file(), len).unwrap(), 105_000);
    }

    #[test]
    fn xz_index_of_truncated_file_is_an_error() {
        let bytes = xz(&vec![7u8; 100_000]);
        let (f, len) = file(&bytes[..bytes.len() - 10]);
        assert!(xz_uncompressed_size(f.as_file(), len).is_err());
    }

    #[test]
    fn zstd_sizes_sum_over_frames_and_skippable_frames_and_missing_size_is_none() {
        let mut bytes = zstd::bulk::compress(&vec![3u8; 70_000], 1).unwrap();
        bytes.extend([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]); // skippable frame
        let mut checked = zstd::bulk::Compressor::new(5).unwrap();
        checked.include_checksum(true).unwrap();
        let random: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
        bytes.extend(checked.compress(&random).unwrap());
        let (f, len) = file(&bytes);
        assert_eq!(zstd_content_size(f.as_file(), len).unwrap(), Some(370_000));

        // A streaming encoder does not know the size up front and omits it.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.write_all(&[5u8; 1000]).unwrap();
        let (f, len) = file(&enc.finish().unwrap());
        assert_eq!(zstd_content_size(f.as_file(), len).unwrap(), None);
    }
}

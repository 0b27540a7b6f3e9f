//! Image format detection from magic bytes.
//!
//! The file name is never consulted: operators rename files, and a `.img`
//! that is really gzip must not be written raw. Formats we recognise but
//! cannot stream (archives, other compressors, VM disk formats) are errors,
//! never "raw", because writing them raw produces a card that looks flashed
//! and does not boot.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A streamable image encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Xz,
    Gzip,
    Zstd,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Xz => "xz",
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Detected {
    Supported(Format),
    /// A known format we do not write; the text is a hint for the operator.
    Unsupported(&'static str),
}

/// Bytes needed by [`detect`]; fewer is fine for short files.
pub(super) const MAGIC_LEN: usize = 8;

const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const GZIP: &[u8] = &[0x1f, 0x8b, 0x08];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

const UNSUPPORTED: &[(&[u8], &str)] = &[
    (b"BZh", "bzip2-compressed image: decompress it first (bunzip2)"),
    (&[0x04, 0x22, 0x4d, 0x18], "lz4-compressed image: decompress it first (lz4 -d)"),
    (b"LZIP", "lzip-compressed image: decompress it first (lzip -d)"),
    (&[0x1f, 0x9d], "compress(1) image: decompress it first (uncompress)"),
    (&[0x89, b'L', b'Z', b'O'], "lzop-compressed image: decompress it first (lzop -d)"),
    (b"PK\x03\x04", "zip archive: extract the image from it first (unzip)"),
    (&[b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c], "7-zip archive: extract the image from it first (7z x)"),
    (b"QFI\xfb", "qcow2 disk image: convert it first (qemu-img convert -O raw)"),
    (b"KDMV", "VMDK disk image: convert it first (qemu-img convert -O raw)"),
    (&[0x3a, 0xff, 0x26, 0xed], "Android sparse image: convert it first (simg2img)"),
];

/// Classifies a file by its first bytes (up to [`MAGIC_LEN`]).
pub(super) fn detect(head: &[u8]) -> Detected {
    if head.starts_with(XZ) {
        return Detected::Supported(Format::Xz);
    }
    if head.starts_with(GZIP) {
        return Detected::Supported(Format::Gzip);
    }
    if head.starts_with(ZSTD) {
        return Detected::Supported(Format::Zstd);
    }
    // zstd skippable frames (pzstd writes one first) use magics 0x184D2A50..5F.
    if head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18] {
        return Detected::Supported(Format::Zstd);
    }
    // bzip2 is "BZh" followed by a block-size digit; checking the digit keeps
    // a raw image that happens to start with "BZh" from being refused.
    for (magic, hint) in UNSUPPORTED {
        if head.starts_with(magic) && (*magic != b"BZh" || head.get(3).is_some_and(|d| (b'1'..=b'9').contains(d))) {
            return Detected::Unsupported(hint);
        }
    }
    Detected::Supported(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_supported_formats_by_magic() {
        assert_eq!(detect(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4]), Detected::Supported(Format::Xz));
        assert_eq!(detect(&[0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0]), Detected::Supported(Format::Gzip));
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0x24]), Detected::Supported(Format::Zstd));
        assert_eq!(detect(&[0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0]), Detected::Supported(Format::Zstd));
    }

    #[test]
    fn boot_sector_and_short_files_are_raw() {
        assert_eq!(detect(&[0xeb, 0x3c, 0x90, b'm', b'k', b'f', b's']), Detected::Supported(Format::Raw));
        assert_eq!(detect(&[0; 8]), Detected::Supported(Format::Raw));
        assert_eq!(detect(&[]), Detected::Supported(Format::Raw));
        assert_eq!(detect(b"BZhX...."), Detected::Supported(Format::Raw));
    }

    #[test]
    fn known_unsupported_formats_are_refused_with_a_hint() {
        for head in [&b"BZh91AY&"[..], b"PK\x03\x04\x14\0\0\0", b"QFI\xfb\0\0\0\x03", b"LZIP\x01"] {
            match detect(head) {
                Detected::Unsupported(hint) => assert!(hint.contains("first"), "{hint}"),
                other @ Detected::Supported(_) => panic!("{head:?} detected as {other:?}"),
            }
        }
    }
}

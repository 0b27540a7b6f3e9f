//! Image format detection from magic bytes.
//!
//! The file name is never consulted: operators rename files, and a `.img`
//! that is really gzip must not be written raw. Formats we recognise but
//! cannot stream (archives, other compressors, VM disk formats) are errors,
//! never "raw", because writing them raw produces a card that looks flashed
//! and does not boot.
//!
//! The same table classifies the first decoded bytes of a compressed image
//! ([`inner`]): an `os.img.tar.xz` or a gzipped qcow2 decodes fine, and is
//! just as unbootable once written.

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

    /// The command an operator runs to undo this layer, for hints.
    fn decompressor(self) -> &'static str {
        match self {
            Format::Raw => "cat",
            Format::Xz => "unxz",
            Format::Gzip => "gunzip",
            Format::Zstd => "unzstd",
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
    /// A known format we do not write.
    Unsupported(Foreign),
}

/// Bytes of the (decoded) head that [`detect`] looks at: tar's magic sits
/// at offset 257. Fewer is fine for short files.
pub(super) const HEAD_LEN: usize = 4096;

const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const GZIP: &[u8] = &[0x1f, 0x8b, 0x08];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// A format we recognise and refuse, and what the operator should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Foreign {
    /// Another compression layer: its name and the command that removes it.
    Compressed(&'static str, &'static str),
    /// An archive other than tar: its name and the command that extracts it.
    Archive(&'static str, &'static str),
    /// tar, whose extraction command depends on the compression around it.
    Tar,
    /// A VM or sparse disk format: its name and the command that converts it.
    Disk(&'static str, &'static str),
}

const QEMU_IMG: &str = "qemu-img convert -O raw";

const BZIP2: Foreign = Foreign::Compressed("bzip2", "bunzip2");

/// `(offset, bytes)` pairs that must all match.
type Magic = &'static [(usize, &'static [u8])];

const FOREIGN: &[(Magic, Foreign)] = &[
    (&[(0, b"BZh")], BZIP2),
    (&[(0, &[0x04, 0x22, 0x4d, 0x18])], Foreign::Compressed("lz4", "lz4 -d")),
    (&[(0, b"LZIP")], Foreign::Compressed("lzip", "lzip -d")),
    (&[(0, &[0x1f, 0x9d])], Foreign::Compressed("compress(1)", "uncompress")),
    (&[(0, &[0x89, b'L', b'Z', b'O'])], Foreign::Compressed("lzop", "lzop -d")),
    (&[(0, b"PK\x03\x04")], Foreign::Archive("zip archive", "unzip")),
    (&[(0, &[b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c])], Foreign::Archive("7-zip archive", "7z x")),
    (&[(0, b"Rar!\x1a\x07")], Foreign::Archive("rar archive", "unrar x")),
    // POSIX ustar has "ustar\0" "00" here, old GNU tar "ustar  \0"; the
    // name field before it is arbitrary, so offset 257 is the only magic.
    (&[(257, b"ustar")], Foreign::Tar),
    (&[(0, b"QFI\xfb")], Foreign::Disk("qcow2 disk image", QEMU_IMG)),
    (&[(0, b"KDMV")], Foreign::Disk("VMDK disk image", QEMU_IMG)),
    (&[(0, b"# Disk DescriptorFile")], Foreign::Disk("VMDK descriptor", QEMU_IMG)),
    (&[(0, b"vhdxfile")], Foreign::Disk("VHDX disk image", QEMU_IMG)),
    // A dynamic VHD starts with a copy of its footer; a fixed VHD is raw
    // data with a footer at the end, and writes fine.
    (&[(0, b"conectix")], Foreign::Disk("VHD disk image", QEMU_IMG)),
    // VirtualBox: a "<<< ... Disk Image >>>" banner whose wording changed
    // with the vendor, and the signature 0xBEDA107F (LE) at 64.
    (&[(0, b"<<< "), (64, &[0x7f, 0x10, 0xda, 0xbe])], Foreign::Disk("VDI disk image", QEMU_IMG)),
    // 0xED26FF3A little-endian.
    (&[(0, &[0x3a, 0xff, 0x26, 0xed])], Foreign::Disk("Android sparse image", "simg2img")),
];

impl Foreign {
    /// The operator's hint, for a file that is this (`outer` is `Raw`) or
    /// whose `outer` compression decodes to this.
    pub(super) fn hint(self, outer: Format) -> String {
        let undo = outer.decompressor();
        match (self, outer) {
            (Foreign::Compressed(name, cmd), Format::Raw) => {
                format!("{name}-compressed image: decompress it first ({cmd})")
            }
            (Foreign::Compressed(name, cmd), _) => {
                format!("{outer}-compressed {name} stream: decompress it twice ({undo}, then {cmd})")
            }
            (Foreign::Archive(name, cmd), Format::Raw) => format!("{name}: extract the disk image first ({cmd})"),
            (Foreign::Archive(name, cmd), _) => {
                format!("{outer}-compressed {name}: decompress it, then extract the disk image ({undo}, then {cmd})")
            }
            (Foreign::Tar, _) => {
                let cmd = match outer {
                    Format::Raw => "tar -xf",
                    Format::Xz => "tar -xJf",
                    Format::Gzip => "tar -xzf",
                    Format::Zstd => "tar --zstd -xf",
                };
                let prefix = if outer == Format::Raw { String::new() } else { format!("{outer}-compressed ") };
                format!("{prefix}tar archive: extract the disk image first ({cmd})")
            }
            (Foreign::Disk(name, cmd), Format::Raw) => format!("{name}: convert it first ({cmd})"),
            (Foreign::Disk(name, cmd), _) => {
                format!("{outer}-compressed {name}: decompress it, then convert it ({undo}, then {cmd})")
            }
        }
    }
}

/// Classifies a file by its first bytes (up to [`HEAD_LEN`]).
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
    let at = |offset: usize, magic: &[u8]| head.get(offset..).is_some_and(|rest| rest.starts_with(magic));
    for &(magics, foreign) in FOREIGN {
        // bzip2 is "BZh" followed by a block-size digit; checking the digit
        // keeps a raw image that happens to start with "BZh" from being refused.
        let bzip2_digit = foreign != BZIP2 || head.get(3).is_some_and(|d| (b'1'..=b'9').contains(d));
        if magics.iter().all(|&(offset, magic)| at(offset, magic)) && bzip2_digit {
            return Detected::Unsupported(foreign);
        }
    }
    Detected::Supported(Format::Raw)
}

/// Checks the first decoded bytes of an `outer`-compressed image; the
/// error is the operator's hint. Only a raw disk image inside passes.
pub(super) fn inner(outer: Format, decoded: &[u8]) -> Result<(), String> {
    match detect(decoded) {
        Detected::Supported(Format::Raw) => Ok(()),
        Detected::Supported(nested) => Err(Foreign::Compressed(nested.name(), nested.decompressor()).hint(outer)),
        Detected::Unsupported(foreign) => Err(foreign.hint(outer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head of `len` zero bytes with `magic` at `offset`.
    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut head = vec![0; 512.max(offset + magic.len())];
        head[offset..offset + magic.len()].copy_from_slice(magic);
        head
    }

    fn refusal(head: &[u8]) -> String {
        match detect(head) {
            Detected::Unsupported(foreign) => foreign.hint(Format::Raw),
            other @ Detected::Supported(_) => panic!("{head:?} detected as {other:?}"),
        }
    }

    #[test]
    fn detects_supported_formats_by_magic() {
        assert_eq!(detect(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4]), Detected::Supported(Format::Xz));
        assert_eq!(detect(&[0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0]), Detected::Supported(Format::Gzip));
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0x24]), Detected::Supported(Format::Zstd));
        assert_eq!(detect(&[0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0]), Detected::Supported(Format::Zstd));
    }

    #[test]
    fn boot_sector_and_short_files_are_raw() {
        let mut mbr = head_with(0, &[0xeb, 0x3c, 0x90, b'm', b'k', b'f', b's']);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(detect(&mbr), Detected::Supported(Format::Raw));
        assert_eq!(detect(&[0; HEAD_LEN]), Detected::Supported(Format::Raw));
        assert_eq!(detect(&[]), Detected::Supported(Format::Raw));
        assert_eq!(detect(b"BZhX...."), Detected::Supported(Format::Raw));
        // Short of tar's magic, and a VDI banner without the signature.
        assert_eq!(detect(&head_with(0, b"ustar")[..260]), Detected::Supported(Format::Raw));
        assert_eq!(detect(&head_with(0, b"<<< Not a disk image >>>")), Detected::Supported(Format::Raw));
    }

    #[test]
    fn known_unsupported_formats_are_refused_with_a_hint() {
        let mut vdi = head_with(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        let cases: &[(Vec<u8>, &str)] = &[
            (b"BZh91AY&".to_vec(), "bzip2-compressed image: decompress it first (bunzip2)"),
            (vec![0x04, 0x22, 0x4d, 0x18, 0x64], "lz4-compressed image: decompress it first (lz4 -d)"),
            (b"LZIP\x01".to_vec(), "lzip-compressed image: decompress it first (lzip -d)"),
            (b"PK\x03\x04\x14\0\0\0".to_vec(), "zip archive: extract the disk image first (unzip)"),
            (vec![b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c, 0, 4], "7-zip archive: extract the disk image first (7z x)"),
            (head_with(257, b"ustar\x0000"), "tar archive: extract the disk image first (tar -xf)"),
            (head_with(257, b"ustar  \0"), "tar archive: extract the disk image first (tar -xf)"),
            (b"QFI\xfb\0\0\0\x03".to_vec(), "qcow2 disk image: convert it first (qemu-img convert -O raw)"),
            (b"KDMV\x01\0\0\0".to_vec(), "VMDK disk image: convert it first (qemu-img convert -O raw)"),
            (b"vhdxfile\0\0".to_vec(), "VHDX disk image: convert it first (qemu-img convert -O raw)"),
            (b"conectix\0\0".to_vec(), "VHD disk image: convert it first (qemu-img convert -O raw)"),
            (vdi, "VDI disk image: convert it first (qemu-img convert -O raw)"),
            (vec![0x3a, 0xff, 0x26, 0xed, 1, 0, 0, 0], "Android sparse image: convert it first (simg2img)"),
        ];
        for (head, hint) in cases {
            assert_eq!(refusal(head), *hint);
        }
    }

    #[test]
    fn a_raw_disk_image_inside_a_compressor_passes() {
        assert_eq!(inner(Format::Xz, &head_with(510, &[0x55, 0xaa])), Ok(()));
        assert_eq!(inner(Format::Gzip, &[]), Ok(()));
    }

    #[test]
    fn archives_and_disk_formats_inside_a_compressor_name_both_layers() {
        let tar = head_with(257, b"ustar\x0000");
        assert_eq!(
            inner(Format::Xz, &tar),
            Err("xz-compressed tar archive: extract the disk image first (tar -xJf)".into())
        );
        assert_eq!(
            inner(Format::Gzip, &tar),
            Err("gzip-compressed tar archive: extract the disk image first (tar -xzf)".into())
        );
        assert_eq!(
            inner(Format::Zstd, &head_with(257, b"ustar  \0")),
            Err("zstd-compressed tar archive: extract the disk image first (tar --zstd -xf)".into())
        );
        assert_eq!(
            inner(Format::Gzip, b"QFI\xfb\0\0\0\x03"),
            Err("gzip-compressed qcow2 disk image: decompress it, then convert it (gunzip, then qemu-img convert -O raw)"
                .into())
        );
        assert_eq!(
            inner(Format::Zstd, &[0x3a, 0xff, 0x26, 0xed, 1, 0, 0, 0]),
            Err("zstd-compressed Android sparse image: decompress it, then convert it (unzstd, then simg2img)".into())
        );
        assert_eq!(
            inner(Format::Xz, b"PK\x03\x04\x14\0\0\0"),
            Err("xz-compressed zip archive: decompress it, then extract the disk image (unxz, then unzip)".into())
        );
    }

    #[test]
    fn a_compressor_inside_a_compressor_is_decompressed_twice() {
        assert_eq!(
            inner(Format::Xz, &[0x1f, 0x8b, 0x08, 0]),
            Err("xz-compressed gzip stream: decompress it twice (unxz, then gunzip)".into())
        );
        assert_eq!(
            inner(Format::Gzip, &[0x28, 0xb5, 0x2f, 0xfd, 0x24]),
            Err("gzip-compressed zstd stream: decompress it twice (gunzip, then unzstd)".into())
        );
        assert_eq!(
            inner(Format::Zstd, &[0xfd, b'7', b'z', b'X', b'Z', 0]),
            Err("zstd-compressed xz stream: decompress it twice (unzstd, then unxz)".into())
        );
        assert_eq!(
            inner(Format::Gzip, b"BZh91AY&"),
            Err("gzip-compressed bzip2 stream: decompress it twice (gunzip, then bunzip2)".into())
        );
    }
}

//! `flashbay image inspect`: formats by magic, sizes, SHA-256, bad input.
//! These need no devices, only the compression tools.

use std::fs;

use crate::bed::{self, MIB};

fn inspect_json(bed: &bed::Bed, path: &std::path::Path) -> serde_json::Value {
    let out = bed.flashbay(&["image", "inspect", "--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn inspect_reports_format_sizes_and_sha256_by_content() {
    let bed = bed!();
    let raw = bed.random_image("disk.img", 9 * MIB + 77, 11);
    let sha = bed::sha256(&raw);
    for (format, name) in [("raw", None), ("xz", Some("xz")), ("gzip", Some("gz")), ("zstd", Some("zst"))] {
        let path = name.map_or_else(|| raw.clone(), |n| bed.compress(&raw, n));
        // Renamed to something misleading: detection must not care.
        let renamed = bed.path(&format!("misleading-{format}.iso"));
        fs::copy(&path, &renamed).unwrap();
        let doc = inspect_json(&bed, &renamed);
        assert_eq!(doc["format"], format);
        assert_eq!(doc["raw_size"], 9 * MIB + 77);
        assert_eq!(doc["compressed_size"], fs::metadata(&path).unwrap().len());
        assert_eq!(doc["sha256"], sha.as_str(), "{format}");
    }
    let human = bed.flashbay(&["image", "inspect", raw.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("format:     raw") && text.contains(&sha), "{text}");
}

#[test]
fn concatenated_streams_are_one_image() {
    let bed = bed!();
    let a = bed.random_image("a", 3 * MIB, 12);
    let b = bed.random_image("b", 2 * MIB + 5, 13);
    let mut whole = fs::read(&a).unwrap();
    whole.extend(fs::read(&b).unwrap());
    let whole_path = bed.path("whole");
    fs::write(&whole_path, &whole).unwrap();
    for ext in ["xz", "gz", "zst"] {
        let mut cat = fs::read(bed.compress(&a, ext)).unwrap();
        cat.extend(fs::read(bed.compress(&b, ext)).unwrap());
        let path = bed.path(&format!("cat.{ext}"));
        fs::write(&path, cat).unwrap();
        let doc = inspect_json(&bed, &path);
        assert_eq!(doc["raw_size"], whole.len() as u64, "{ext}");
        assert_eq!(doc["sha256"], bed::sha256(&whole_path).as_str(), "{ext}");
    }
}

#[test]
fn unsupported_empty_and_garbage_trailed_images_are_errors() {
    let bed = bed!();
    let raw = bed.random_image("r.img", MIB, 14);
    bed::run("bzip2", &["-k", "-f", raw.to_str().unwrap()]);
    let cases = [
        (bed.path("r.img.bz2"), "bzip2-compressed image: decompress it first"),
        (bed.path("empty.img"), "image is empty"),
        (bed.path("trailing.xz"), "unexpected data after the end of the stream"),
    ];
    fs::write(&cases[1].0, b"").unwrap();
    let mut trailing = fs::read(bed.compress(&raw, "xz")).unwrap();
    trailing.extend_from_slice(b"garbage!");
    fs::write(&cases[2].0, trailing).unwrap();
    for (path, message) in &cases {
        let out = bed.flashbay(&["image", "inspect", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
        assert!(stderr.starts_with(&format!("error: {}: ", path.display())), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(message), "{}: {stderr}", path.display());
    }
}

/// A minimal valid Android sparse image (what img2simg writes): a 28-byte
/// file header, then one raw chunk of one 4 KiB block and one "don't care"
/// chunk of one block.
fn android_sparse(path: &std::path::Path) {
    const BLOCK: u32 = 4096;
    let mut out = Vec::new();
    out.extend(0xED26_FF3A_u32.to_le_bytes());
    for half in [1u16, 0, 28, 12] {
        // major, minor version; file and chunk header sizes
        out.extend(half.to_le_bytes());
    }
    for word in [BLOCK, 2, 2, 0] {
        // block size, blocks, chunks, checksum (0: none)
        out.extend(word.to_le_bytes());
    }
    out.extend([0xc1, 0xca, 0, 0]); // raw chunk
    out.extend(1u32.to_le_bytes());
    out.extend((12 + BLOCK).to_le_bytes());
    out.extend(std::iter::repeat_n(0x5a, BLOCK as usize));
    out.extend([0xc3, 0xca, 0, 0]); // don't care chunk
    out.extend(1u32.to_le_bytes());
    out.extend(12u32.to_le_bytes());
    fs::write(path, out).unwrap();
}

/// Images whose compression decodes fine but that hold no disk image (a
/// tar archive, a VM disk, a sparse image, a second compressor), and a raw
/// tar archive: `image inspect` and `write` refuse them in one line with a
/// hint, exit non-zero, and the card keeps every byte.
#[test]
fn archives_and_vm_disks_inside_compressors_are_refused_and_the_card_is_untouched() {
    let bed = bed!(needs & ["tar", "qemu-img"]);
    let disk = bed.random_image("os.img", 3 * MIB, 21);
    let dir = bed.dir.path().to_str().unwrap();
    let tar_xz = bed.path("os.img.tar.xz");
    bed::run("tar", &["-cJf", tar_xz.to_str().unwrap(), "-C", dir, "os.img"]);
    let tar = bed.path("os.img.tar");
    bed::run("tar", &["-cf", tar.to_str().unwrap(), "--format=gnu", "-C", dir, "os.img"]);
    let qcow2 = bed.path("os.qcow2");
    bed::run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", disk.to_str().unwrap(), qcow2.to_str().unwrap()]);
    let sparse = bed.path("os.simg");
    android_sparse(&sparse);
    let cases = [
        (tar_xz, "xz-compressed tar archive: extract the disk image first (tar -xJf)"),
        (tar, "tar archive: extract the disk image first (tar -xf)"),
        (
            bed.compress(&qcow2, "gz"),
            "gzip-compressed qcow2 disk image: decompress it, then convert it (gunzip, then qemu-img convert -O raw)",
        ),
        (
            bed.compress(&sparse, "zst"),
            "zstd-compressed Android sparse image: decompress it, then convert it (unzstd, then simg2img)",
        ),
        (
            bed.compress(&bed.compress(&disk, "gz"), "xz"),
            "xz-compressed gzip stream: decompress it twice (unxz, then gunzip)",
        ),
    ];

    let card = bed.card("card", 16 * MIB);
    let before = bed::sha256(&card);
    let dev = bed.attach(&card);
    for (path, hint) in &cases {
        let path = path.to_str().unwrap();
        for args in [&["image", "inspect", path][..], &["write", path, dev.path()]] {
            let out = bed.flashbay(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
            assert_eq!(stderr.trim_end(), format!("error: {path}: {hint}"), "{args:?}");
        }
    }
    drop(dev);
    assert_eq!(bed::sha256(&card), before, "the card was written to");
}

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

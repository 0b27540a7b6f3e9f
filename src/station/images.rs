//! Images prepared once and shared by every slot that writes them.
//!
//! Preparing an image means one full pass: its raw size, its SHA-256 and,
//! for a compressed image, a decompressed copy in `cache_dir`. Cards are
//! then written from the raw copy, so N cards cost one decompression, not
//! N, and each card's verification compares against a raw file in the page
//! cache: no CPU per card beyond `memcmp`. A damaged image fails here,
//! before any card is touched.
//!
//! The result is remembered in `cache_dir` keyed by the source's identity
//! (device, inode, size, modification time), so a restart does not hash or
//! decompress an unchanged image again. When the cache cannot hold the raw
//! copy, cards are decoded from the source, one decoder per card.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::status::ImageStatus;
use crate::blockdev::AlignedBuf;
use crate::image::{Format, Image, hex};

/// A prepared image, ready to be written to any number of cards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// The image as configured.
    pub source: PathBuf,
    pub format: Format,
    pub raw_size: u64,
    pub sha256: String,
    /// What jobs read: the raw copy in the cache, or the source itself.
    pub raw: PathBuf,
}

impl Prepared {
    pub fn cached(&self) -> bool {
        self.raw != self.source
    }
}

#[derive(Debug, Clone)]
pub(super) enum ImageState {
    Preparing,
    Ready(std::sync::Arc<Prepared>),
    Failed(String),
}

/// The images the current configuration uses, by configured path.
#[derive(Debug, Default)]
pub(super) struct ImageStore {
    states: HashMap<PathBuf, ImageState>,
}

impl ImageStore {
    pub(super) fn get(&self, path: &Path) -> Option<&ImageState> {
        self.states.get(path)
    }

    /// Marks `path` as being prepared; false if it already is or was.
    pub(super) fn begin(&mut self, path: &Path) -> bool {
        if self.states.contains_key(path) {
            return false;
        }
        self.states.insert(path.to_owned(), ImageState::Preparing);
        true
    }

    pub(super) fn finish(&mut self, path: &Path, result: Result<Prepared, String>) {
        if let Some(state) = self.states.get_mut(path) {
            *state = match result {
                Ok(p) => ImageState::Ready(std::sync::Arc::new(p)),
                Err(e) => ImageState::Failed(e),
            };
        }
    }

    /// Forgets every prepared or failed image (not those being prepared),
    /// so a reload looks at the files again: an image replaced under the
    /// same name is prepared anew, an unchanged one is found in the cache.
    pub(super) fn forget_finished(&mut self) {
        self.states.retain(|_, s| matches!(s, ImageState::Preparing));
    }

    /// Forgets images no longer configured.
    pub(super) fn retain(&mut self, paths: &[&Path]) {
        self.states.retain(|p, _| paths.contains(&p.as_path()));
    }

    /// Forgets a failed image so the next card tries again (it may have
    /// been fixed on disk).
    pub(super) fn forget_failed(&mut self, path: &Path) {
        if matches!(self.states.get(path), Some(ImageState::Failed(_))) {
            self.states.remove(path);
        }
    }

    pub(super) fn status(&self, order: &[&Path]) -> Vec<ImageStatus> {
        order
            .iter()
            .filter_map(|path| {
                let state = self.states.get(*path)?;
                let mut s = ImageStatus {
                    path: path.to_path_buf(),
                    state: "preparing",
                    format: None,
                    raw_size: None,
                    sha256: None,
                    cached: false,
                    error: None,
                };
                match state {
                    ImageState::Preparing => {}
                    ImageState::Ready(p) => {
                        s.state = "ready";
                        s.format = Some(p.format);
                        s.raw_size = Some(p.raw_size);
                        s.sha256 = Some(p.sha256.clone());
                        s.cached = p.cached();
                    }
                    ImageState::Failed(e) => {
                        s.state = "failed";
                        s.error = Some(e.clone());
                    }
                }
                Some(s)
            })
            .collect()
    }
}

/// One full pass over `source` (blocking): see the module docs. Errors read
/// `image <path>: <what is wrong>`, which is what a failed slot shows.
pub fn prepare(source: &Path, cache_dir: &Path) -> Result<Prepared, String> {
    prepare_inner(source, cache_dir).map_err(|e| format!("image {e}"))
}

fn prepare_inner(source: &Path, cache_dir: &Path) -> Result<Prepared, String> {
    let image = Image::open(source).map_err(|e| e.to_string())?;
    let key = cache_key(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let meta_path = cache_dir.join(format!("{key}.json"));
    if let Some(known) = load_meta(&meta_path)
        && (!known.cached() || fs::metadata(&known.raw).is_ok_and(|m| m.len() == known.raw_size))
    {
        tracing::info!(image = %source.display(), sha256 = %known.sha256, "image already prepared");
        return Ok(known);
    }

    // Cards read the source itself: measure it where it is.
    let in_place = || -> Result<Prepared, String> {
        let m = image.measure().map_err(|e| e.to_string())?;
        Ok(Prepared {
            source: source.to_owned(),
            format: image.format,
            raw_size: m.raw_size,
            sha256: m.sha256,
            raw: source.to_owned(),
        })
    };
    let prepared = if image.format == Format::Raw {
        in_place()?
    } else {
        let raw = cache_dir.join(format!("{key}.img"));
        match decompress(&image, &raw) {
            Ok((raw_size, sha256)) => {
                Prepared { source: source.to_owned(), format: image.format, raw_size, sha256, raw }
            }
            Err(Unpack::Image(e)) => return Err(e),
            Err(Unpack::Cache(e)) => {
                let dir = cache_dir.display();
                tracing::warn!(image = %source.display(), "cannot keep a decompressed copy in {dir}: {e}; every card will decode the image");
                in_place()?
            }
        }
    };
    if let Err(e) = save_meta(&meta_path, &prepared) {
        tracing::warn!("cannot remember prepared image in {}: {e}", meta_path.display());
    }
    Ok(prepared)
}

/// Removes cache entries that belong to none of `keep` (configured images).
pub fn prune_cache(cache_dir: &Path, keep: &[&Path]) {
    let keys: Vec<String> = keep.iter().filter_map(|p| cache_key(p).ok()).collect();
    let Ok(entries) = fs::read_dir(cache_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (stem, ext) = name.split_once('.').unwrap_or_default();
        let ours = ["json", "img", "img.tmp", "json.tmp"].contains(&ext) && stem.len() == 16;
        if ours && !keys.iter().any(|k| k == stem) {
            tracing::info!("removing stale cache file {}", entry.path().display());
            let _ = fs::remove_file(entry.path());
        }
    }
}

enum Unpack {
    /// The image is bad: no card may be written from it.
    Image(String),
    /// The cache is unusable: fall back to decoding per card.
    Cache(std::io::Error),
}

/// Decompresses into `raw` (via a temporary file, renamed when complete
/// and durable); returns the raw size and SHA-256.
fn decompress(image: &Image, raw: &Path) -> Result<(u64, String), Unpack> {
    let dir = raw.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(Unpack::Cache)?;
    if let Some(size) = image.raw_size {
        let free = nix::sys::statvfs::statvfs(dir).map_err(|e| Unpack::Cache(e.into()))?;
        let avail = free.blocks_available() * free.fragment_size();
        if avail < size + (64 << 20) {
            return Err(Unpack::Cache(std::io::Error::other(format!(
                "{} free, image needs {}",
                crate::units::Bytes(avail),
                crate::units::Bytes(size)
            ))));
        }
    }
    let tmp = raw.with_extension("img.tmp");
    let result = (|| {
        let mut out = File::create(&tmp).map_err(Unpack::Cache)?;
        let mut reader = image.reader().map_err(|e| Unpack::Image(e.to_string()))?;
        let mut hasher = Sha256::new();
        let mut buf = AlignedBuf::new(4 << 20);
        loop {
            let n = reader.fill(&mut buf).map_err(|e| Unpack::Image(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(Unpack::Cache)?;
        }
        out.sync_all().map_err(Unpack::Cache)?;
        fs::rename(&tmp, raw).map_err(Unpack::Cache)?;
        Ok((reader.position(), hex(&hasher.finalize())))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// 16 hex digits identifying this version of the file at `path`.
fn cache_key(path: &Path) -> std::io::Result<String> {
    let m = fs::metadata(path)?;
    let id = format!("{}\0{}:{}:{}:{}.{}", path.display(), m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
    Ok(hex(&Sha256::digest(id.as_bytes()))[..16].to_owned())
}

fn load_meta(path: &Path) -> Option<Prepared> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn save_meta(path: &Path, prepared: &Prepared) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(prepared).map_err(std::io::Error::other)?)?;
    fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_image_is_decompressed_once_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let src = dir.path().join("os.img.zst");
        fs::write(&src, zstd::bulk::compress(&data, 1).unwrap()).unwrap();
        let cache = dir.path().join("cache");

        let p = prepare(&src, &cache).unwrap();
        assert_eq!(p.format, Format::Zstd);
        assert_eq!(p.raw_size, data.len() as u64);
        assert_eq!(p.sha256, hex(&Sha256::digest(&data)));
        assert!(p.cached());
        assert_eq!(fs::read(&p.raw).unwrap(), data);

        // Second time: from the remembered metadata, same answer.
        assert_eq!(prepare(&src, &cache).unwrap(), p);

        // Stale entries go; current ones stay.
        fs::write(cache.join("0123456789abcdef.img"), b"old").unwrap();
        prune_cache(&cache, &[&src]);
        assert!(!cache.join("0123456789abcdef.img").exists());
        assert!(p.raw.exists());
    }

    #[test]
    fn damaged_image_fails_preparation() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 2_000_000];
        let mut z = zstd::bulk::compress(&data, 1).unwrap();
        z.truncate(z.len() / 2);
        let src = dir.path().join("bad.zst");
        fs::write(&src, z).unwrap();
        let err = prepare(&src, &dir.path().join("cache")).unwrap_err();
        assert!(err.contains("bad.zst") && err.contains("zstd"), "{err}");
        let leftovers = fs::read_dir(dir.path().join("cache")).map_or(0, Iterator::count);
        assert_eq!(leftovers, 0, "no half-written cache left");
    }
}

//! Images prepared once and shared by every slot that writes them.
//!
//! Preparing an image means one full pass over its decoded stream: its raw
//! size, its SHA-256, a digest per block (the image's identity, see
//! [`crate::image::blocks`]) and, for a compressed image, a decompressed
//! copy in `cache_dir`. Cards are then written from the raw copy, so N
//! cards cost one decompression, not N. A damaged image fails here, before
//! any card is touched.
//!
//! Nothing prepared is trusted blindly: every chunk a job reads from the
//! prepared copy is checked against the block digests before the card gets
//! it, and the card is verified against the digests, not against the copy.
//! A copy that rotted fails its card and is rebuilt ([`Rebuild`]); an image
//! replaced under the same name is noticed before the next card
//! ([`Prepared::changed`]) and prepared again, while jobs already running
//! keep the file they opened.
//!
//! The result is remembered in `cache_dir` keyed by the source's identity
//! (device, inode, size, modification time), so a restart does not hash or
//! decompress an unchanged image again; the cached copy's own identity is
//! recorded too, so a copy changed behind our back is rebuilt. When the
//! cache cannot hold the raw copy, cards are decoded from the source, one
//! decoder per card.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::catalog::Rebuild;
use crate::config::{Config, ImageSite};
use crate::image::{BlockDigests, Format, Image, hex};

/// A prepared image, ready to be written to any number of cards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    /// The image as configured.
    pub source: PathBuf,
    /// The source's identity when it was prepared ([`cache_key`]).
    pub key: String,
    pub format: Format,
    pub raw_size: u64,
    pub sha256: String,
    /// What jobs read: the raw copy in the cache, or the source itself.
    pub raw: PathBuf,
    /// Identity of the raw copy as written (a copy changed since is rebuilt).
    raw_key: String,
    /// The decoded source stream's digests, block by block.
    pub blocks: Arc<BlockDigests>,
    /// The raw copy, held open: jobs read the very file that was prepared,
    /// whatever happens to its name.
    #[serde(skip)]
    pub file: Option<Image>,
}

impl Prepared {
    pub fn cached(&self) -> bool {
        self.raw != self.source
    }

    /// Whether the configured file is no longer the one prepared (replaced,
    /// rewritten, gone): the next card waits for a new preparation.
    pub fn changed(&self) -> bool {
        cache_key(&self.source).map_or(true, |key| key != self.key)
    }
}

/// A first look at every configured image (opens each and reads its head,
/// so blocking), as warnings at the line that names it: a missing or
/// unusable image fails only its slots' cards, and is tried again for the
/// next card once fixed, so it does not stop the station. Saying so at
/// start turns "the first card failed" into a pointer at the line to fix.
pub fn check_images(config: &Config) -> Vec<String> {
    let at = |s: &ImageSite| format!("{}:{}:{}", config.file.display(), s.line, s.column);
    config
        .image_sites
        .iter()
        .filter_map(|s| Image::open(&s.image).err().map(|e| format!("{}: image {e}", at(s))))
        .collect()
}

/// One full pass over `source` (blocking): see the module docs. Errors read
/// `image <path>: <what is wrong>`, which is what a failed slot shows.
pub fn prepare(source: &Path, cache_dir: &Path, rebuild: Rebuild) -> Result<Prepared, String> {
    prepare_inner(source, cache_dir, rebuild).map_err(|e| format!("image {e}"))
}

fn prepare_inner(source: &Path, cache_dir: &Path, rebuild: Rebuild) -> Result<Prepared, String> {
    let image = Image::open(source).map_err(|e| e.to_string())?;
    let key = cache_key(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let meta_path = cache_dir.join(format!("{key}.json"));
    if rebuild == Rebuild::Always {
        tracing::warn!(image = %source.display(), "preparing the image again: its prepared copy was damaged");
        let _ = fs::remove_file(&meta_path);
    } else if let Some(mut known) = load_meta(&meta_path)
        && known.key == key
        && cache_key(&known.raw).is_ok_and(|k| k == known.raw_key)
        && let Ok(file) = open_raw(&known)
    {
        tracing::info!(image = %source.display(), sha256 = %known.sha256, "image already prepared");
        known.file = Some(file);
        return Ok(known);
    }

    // Cards read the source itself: measure it where it is.
    let in_place = || -> Result<Prepared, String> {
        let m = image.measure().map_err(|e| e.to_string())?;
        let raw_key = key.clone();
        Ok(Prepared {
            source: source.to_owned(),
            key: key.clone(),
            format: image.format,
            raw_size: m.raw_size,
            sha256: m.sha256,
            raw: source.to_owned(),
            raw_key,
            blocks: Arc::new(m.blocks),
            file: None,
        })
    };
    let mut prepared = if image.format == Format::Raw {
        in_place()?
    } else {
        let raw = cache_dir.join(format!("{key}.img"));
        match decompress(&image, &raw) {
            Ok(m) => Prepared {
                source: source.to_owned(),
                key: key.clone(),
                format: image.format,
                raw_size: m.raw_size,
                sha256: m.sha256,
                raw_key: cache_key(&raw).map_err(|e| format!("{}: {e}", raw.display()))?,
                raw,
                blocks: Arc::new(m.blocks),
                file: None,
            },
            Err(Unpack::Image(e)) => return Err(e),
            Err(Unpack::Cache(e)) => {
                let dir = cache_dir.display();
                tracing::warn!(image = %source.display(), "cannot keep a decompressed copy in {dir}: {e}; every card will decode the image");
                in_place()?
            }
        }
    };
    prepared.file = Some(open_raw(&prepared)?);
    if let Err(e) = save_meta(&meta_path, &prepared) {
        tracing::warn!("cannot remember prepared image in {}: {e}", meta_path.display());
    }
    Ok(prepared)
}

/// Opens what jobs will read, sized from preparation.
fn open_raw(prepared: &Prepared) -> Result<Image, String> {
    let mut image = Image::open(&prepared.raw).map_err(|e| e.to_string())?;
    image.raw_size = Some(prepared.raw_size);
    Ok(image)
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
/// and durable), measuring the decoded stream on the way.
fn decompress(image: &Image, raw: &Path) -> Result<crate::image::Measured, Unpack> {
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
        let measured = image.decode(|chunk| out.write_all(chunk.data()).map_err(Unpack::Cache))?;
        out.sync_all().map_err(Unpack::Cache)?;
        fs::rename(&tmp, raw).map_err(Unpack::Cache)?;
        Ok(measured)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl From<crate::image::ImageError> for Unpack {
    fn from(e: crate::image::ImageError) -> Self {
        Unpack::Image(e.to_string())
    }
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
    fn a_missing_image_is_a_warning_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.yaml");
        let c = Config::parse(&file, "image: gone.img\nslots:\n  - {name: A1, port: usb-1}\n").unwrap();
        let gone = dir.path().join("gone.img");
        assert_eq!(
            check_images(&c),
            [format!("{}:1:8: image {}: No such file or directory (os error 2)", file.display(), gone.display())]
        );
        fs::write(&gone, [0u8; 4096]).unwrap();
        assert_eq!(check_images(&c), Vec::<String>::new());
    }

    #[test]
    fn compressed_image_is_decompressed_once_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let src = dir.path().join("os.img.zst");
        fs::write(&src, zstd::bulk::compress(&data, 1).unwrap()).unwrap();
        let cache = dir.path().join("cache");

        let p = prepare(&src, &cache, Rebuild::IfNeeded).unwrap();
        assert_eq!(p.format, Format::Zstd);
        assert_eq!(p.raw_size, data.len() as u64);
        assert_eq!(p.sha256, hex(&Sha256::digest(&data)));
        assert!(p.cached());
        assert_eq!(fs::read(&p.raw).unwrap(), data);

        // Second time: from the remembered metadata, same answer.
        let again = prepare(&src, &cache, Rebuild::IfNeeded).unwrap();
        assert_eq!((&again.sha256, &again.raw, &again.blocks), (&p.sha256, &p.raw, &p.blocks));

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
        let err = prepare(&src, &dir.path().join("cache"), Rebuild::IfNeeded).unwrap_err();
        assert!(err.contains("bad.zst") && err.contains("zstd"), "{err}");
        let leftovers = fs::read_dir(dir.path().join("cache")).map_or(0, Iterator::count);
        assert_eq!(leftovers, 0, "no half-written cache left");
    }
}

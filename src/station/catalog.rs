//! Which images the station has prepared, is preparing, or could not use:
//! the core's plain-data view of them. The prepared files themselves
//! (open descriptors, block digests) stay with the shell, which tells the
//! core what it learnt ([`ImageFacts`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::status::ImageStatus;
use crate::image::Format;

/// What the core needs to know of a prepared image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub format: Format,
    pub raw_size: u64,
    pub sha256: String,
    /// Cards are written from a decompressed copy in the cache.
    pub cached: bool,
}

/// Whether a preparation may reuse what the cache remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// Reuse a remembered preparation whose copy is unchanged.
    IfNeeded,
    /// A job found the copy damaged: decode the source again.
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ImageState {
    Preparing,
    Ready(ImageFacts),
    Failed(String),
}

/// The images the current configuration uses, by configured path.
#[derive(Debug, Default)]
pub(super) struct Catalog {
    states: HashMap<PathBuf, ImageState>,
}

impl Catalog {
    pub(super) fn get(&self, path: &Path) -> Option<&ImageState> {
        self.states.get(path)
    }

    /// Forgets `path`'s preparation (its copy is damaged, or the file
    /// changed), unless it is being prepared again already.
    pub(super) fn forget(&mut self, path: &Path) {
        if !matches!(self.states.get(path), Some(ImageState::Preparing)) {
            self.states.remove(path);
        }
    }

    /// Marks `path` as being prepared; false if it already is or was.
    pub(super) fn begin(&mut self, path: &Path) -> bool {
        if self.states.contains_key(path) {
            return false;
        }
        self.states.insert(path.to_owned(), ImageState::Preparing);
        true
    }

    /// A preparation ended; ignored for an image no longer configured.
    pub(super) fn finish(&mut self, path: &Path, result: Result<ImageFacts, String>) {
        if let Some(state) = self.states.get_mut(path) {
            *state = match result {
                Ok(facts) => ImageState::Ready(facts),
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
                        s.cached = p.cached;
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

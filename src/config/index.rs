//! Where each node of a YAML document starts, so that a validation error
//! can name its line and column: an index of the document built with
//! yaml-rust2's event parser, and the positions serde gives.

use std::collections::HashMap;

use super::ConfigError;

/// Dotted path (`slots.1.port`) of a node, as the index keys it.
pub(super) fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => join(&key_path(parent), &index.to_string()),
        P::Map { parent, key } => join(&key_path(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => key_path(parent),
    }
}

fn join(parent: &str, segment: &str) -> String {
    if parent.is_empty() { segment.to_owned() } else { format!("{parent}.{segment}") }
}

pub(super) fn yaml_error(e: &serde_yaml::Error) -> ConfigError {
    let message = e.to_string();
    match e.location() {
        Some(loc) => {
            // serde_yaml appends the location to the message; we print it first.
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            let message = message.replace(&suffix, "");
            ConfigError { line: loc.line(), column: loc.column(), message }
        }
        None => ConfigError { line: 0, column: 0, message },
    }
}

/// Where each node of a YAML document starts, by dotted path, with 1-based
/// lines and columns: values for "bad value" errors, keys for "unknown key".
#[derive(Debug, Default)]
pub(super) struct Index {
    values: HashMap<String, (usize, usize)>,
    keys: HashMap<String, (usize, usize)>,
}

impl Index {
    pub(super) fn build(text: &str) -> Self {
        let mut builder = IndexBuilder::default();
        // A document that serde_yaml accepted parses here too; if not, errors
        // just lose their positions.
        let _ = yaml_rust2::parser::Parser::new_from_str(text).load(&mut builder, false);
        builder.index
    }

    /// Where the value at `path` starts, or its nearest located ancestor.
    pub(super) fn locate(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(&pos) = self.values.get(p) {
                return pos;
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return self.values.get("").copied().unwrap_or((1, 1)),
            }
        }
    }

    /// The first key (in the document) whose path starts with `prefix`.
    pub(super) fn first_key_under(&self, prefix: &str) -> Option<(usize, usize)> {
        self.keys.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, &p)| p).min()
    }

    pub(super) fn locate_key(&self, path: &str) -> (usize, usize) {
        self.keys.get(path).copied().unwrap_or_else(|| self.locate(path))
    }
}

#[derive(Default)]
struct IndexBuilder {
    index: Index,
    /// Open containers: for a mapping, the key awaiting its value.
    stack: Vec<Frame>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

impl IndexBuilder {
    /// Path of the node that starts now, advancing the parent past it.
    /// `None` when the node is a mapping key (recorded, not a value).
    fn next_node(&mut self, scalar: Option<&str>, pos: (usize, usize)) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = join(path, &next.to_string());
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => {
                if let Some(k) = key.take() {
                    return Some(join(path, &k));
                }
                let k = scalar.unwrap_or_default().to_owned();
                self.index.keys.insert(join(path, &k), pos);
                *key = Some(k);
                None
            }
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::parser::Event;
        // yaml-rust2 columns are 0-based (despite its docs); ours are 1-based.
        let pos = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(path) = self.next_node(Some(&value), pos) {
                    self.index.values.insert(path, pos);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.next_node(None, pos).unwrap_or_default();
                self.index.values.insert(path.clone(), pos);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                let _ = self.next_node(None, pos);
            }
            _ => {}
        }
    }
}

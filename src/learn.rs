//! `flashbay learn`: build the port map without a screen. The operator
//! inserts a card (or stick) into each port in turn; every port not yet in
//! the configuration gets the next name (`A1`, `A2`, … or another prefix)
//! and is printed with its `ID_PATH`, model and size. With `--write` the
//! slots are added to the configuration file by editing its text, so the
//! operator's comments and layout stay, and the result is validated first.

use std::collections::HashSet;
use std::fmt::Write;
use std::future::Future;
use std::path::Path;

use serde_yaml::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::udev::{Action, DeviceEvent};
use crate::units::Bytes;

/// A port seen during learning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    pub name: String,
    pub port: String,
}

/// Learns ports until `stop`; with `write`, adds them to `config_path`.
pub async fn run(
    config_path: &Path,
    write: bool,
    prefix: &str,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Vec<Learned>> {
    let text = match std::fs::read_to_string(config_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("{}: {e}", config_path.display()),
    };
    let configured = configured_slots(&text);
    let mut next = next_number(configured.iter().map(|s| s.name.as_str()), prefix);
    let mut ports: Vec<(String, String)> = configured.into_iter().map(|s| (s.port, s.name)).collect();

    let (tx, mut events) = mpsc::channel(64);
    let (_requests, requests) = mpsc::channel(1);
    let (ready_tx, ready) = oneshot::channel();
    let cancel = CancellationToken::new();
    let thread = crate::udev::spawn(tx, requests, ready_tx, cancel.clone())?;
    ready.await??;
    eprintln!("insert a card into each port in turn; Ctrl-C when done");

    let mut learned = Vec::new();
    let mut seen_media: HashSet<(String, Option<u64>)> = HashSet::new();
    tokio::pin!(stop);
    loop {
        let ev: DeviceEvent = tokio::select! {
            () = &mut stop => break,
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
        };
        let Some(port) = ev.id_path.clone() else { continue };
        // Cards already in at the start are not being pointed at a port.
        if ev.action == Action::Existing || ev.is_removal() || !seen_media.insert((port.clone(), ev.diskseq)) {
            continue;
        }
        let what = [
            ev.vendor.clone(),
            ev.model.clone(),
            Some(Bytes(ev.size).to_string()),
            Some(ev.devnode.display().to_string()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        if let Some((_, name)) = ports.iter().find(|(p, _)| *p == port) {
            eprintln!("{port}: already slot {name} ({what})");
            continue;
        }
        let name = format!("{prefix}{next}");
        next += 1;
        println!("{name}  {port}  ({what})");
        ports.push((port.clone(), name.clone()));
        learned.push(Learned { name, port });
    }
    cancel.cancel();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;

    if learned.is_empty() {
        eprintln!("no new ports");
    } else if write {
        let updated = append_slots(&text, &learned).map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        check_edit(config_path, &text, &updated)?;
        write_atomic(config_path, &updated)?;
        eprintln!(
            "added {} slots to {}; then: flashbay udev-rules > /etc/udev/rules.d/90-flashbay.rules && systemctl reload flashbay",
            learned.len(),
            config_path.display()
        );
    } else {
        print!("slots:\n{}", slot_lines(&learned, 2));
    }
    Ok(learned)
}

/// Slots already in the file, read leniently: the file may be incomplete.
fn configured_slots(text: &str) -> Vec<Learned> {
    let doc: Value = serde_yaml::from_str(text).unwrap_or(Value::Null);
    let Some(slots) = doc.get("slots").and_then(Value::as_sequence) else { return Vec::new() };
    slots
        .iter()
        .filter_map(|s| {
            let name = s.get("name")?.as_str()?.to_owned();
            let port = s.get("port")?.as_str()?;
            Some(Learned { name, port: port.strip_prefix("/dev/disk/by-path/").unwrap_or(port).to_owned() })
        })
        .collect()
}

/// One more than the highest `<prefix><n>` in use.
fn next_number<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> u32 {
    names.filter_map(|n| n.strip_prefix(prefix)?.parse::<u32>().ok()).max().map_or(1, |n| n + 1)
}

fn slot_lines(slots: &[Learned], indent: usize) -> String {
    let pad = " ".repeat(indent);
    slots.iter().fold(String::new(), |mut out, s| {
        let _ = write!(out, "{pad}- name: {}\n{pad}  port: {}\n", s.name, s.port);
        out
    })
}

/// Adds slot entries to the `slots:` list of a YAML document's text,
/// creating the list if needed, touching nothing else.
pub fn append_slots(text: &str, slots: &[Learned]) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.starts_with("slots:")) else {
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        return Ok(format!("{out}slots:\n{}", slot_lines(slots, 2)));
    };
    let after_key = lines[start]["slots:".len()..].split('#').next().unwrap_or_default().trim();
    match after_key {
        "" => {}
        "[]" => {
            let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            "slots:".clone_into(&mut out[start]);
            out.insert(start + 1, slot_lines(slots, 2).trim_end().to_owned());
            return Ok(out.join("\n") + "\n");
        }
        _ => return Err("the slots list is in flow style ([...]); write it as a block list to add slots".to_owned()),
    }
    // The list runs until the next top-level key; new items go after its
    // last entry line, at the indentation its items use.
    let body_end = lines[start + 1..]
        .iter()
        .position(|l| !l.is_empty() && !l.starts_with([' ', '\t', '-', '#']))
        .map_or(lines.len(), |i| start + 1 + i);
    let last =
        (start + 1..body_end).rev().find(|&i| !lines[i].trim().is_empty() && !lines[i].trim_start().starts_with('#'));
    let indent = lines[start + 1..body_end]
        .iter()
        .find(|l| l.trim_start().starts_with("- "))
        .map_or(2, |l| l.len() - l.trim_start().len());
    let insert_at = last.map_or(start + 1, |i| i + 1);
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    out.insert(insert_at, slot_lines(slots, indent).trim_end().to_owned());
    Ok(out.join("\n") + "\n")
}

/// Refuses an edit that makes the configuration worse; reports what was
/// already wrong with it as warnings.
fn check_edit(path: &Path, before: &str, after: &str) -> anyhow::Result<()> {
    let errors = |text: &str| -> Vec<String> {
        match Config::parse(path, text) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(|l| l.split_once(": ").map_or(l, |(_, m)| m).to_owned()).collect(),
        }
    };
    let old: Vec<String> = errors(before);
    let new: Vec<String> = errors(after).into_iter().filter(|e| !old.contains(e)).collect();
    if let Some(first) = new.first() {
        anyhow::bail!("{}: adding the slots would make it invalid: {first}", path.display());
    }
    for e in old.iter().filter(|e| !e.contains("no slots configured")) {
        eprintln!("warning: {}: {e}", path.display());
    }
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.learn");
    std::fs::write(&tmp, text).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(names: &[(&str, &str)]) -> Vec<Learned> {
        names.iter().map(|(n, p)| Learned { name: (*n).into(), port: (*p).into() }).collect()
    }

    #[test]
    fn appends_to_a_block_list_keeping_comments_and_layout() {
        let text = "# station\nimage: x.img\nslots:\n  - name: A1\n    port: p1   # left port\n\n  # more to come\nhttp: {listen: 0.0.0.0:8088}\n";
        let out = append_slots(text, &slots(&[("A2", "p2")])).unwrap();
        assert_eq!(
            out,
            "# station\nimage: x.img\nslots:\n  - name: A1\n    port: p1   # left port\n  - name: A2\n    port: p2\n\n  # more to come\nhttp: {listen: 0.0.0.0:8088}\n"
        );
        let flush = "slots:\n- name: A1\n  port: p1\n";
        assert_eq!(
            append_slots(flush, &slots(&[("A2", "p2")])).unwrap(),
            "slots:\n- name: A1\n  port: p1\n- name: A2\n  port: p2\n"
        );
    }

    #[test]
    fn creates_the_list_when_missing_or_empty() {
        assert_eq!(
            append_slots("image: x\n", &slots(&[("A1", "p1")])).unwrap(),
            "image: x\nslots:\n  - name: A1\n    port: p1\n"
        );
        assert_eq!(
            append_slots("slots: []\nimage: x\n", &slots(&[("A1", "p1")])).unwrap(),
            "slots:\n  - name: A1\n    port: p1\nimage: x\n"
        );
        assert!(append_slots("slots: [{name: A1, port: p1}]\n", &slots(&[("A2", "p2")])).is_err());
    }

    #[test]
    fn numbers_continue_after_existing_names() {
        let text =
            "slots:\n  - {name: A1, port: p1}\n  - {name: A7, port: /dev/disk/by-path/p7}\n  - {name: B3, port: p9}\n";
        let c = configured_slots(text);
        assert_eq!(c[1].port, "p7");
        assert_eq!(next_number(c.iter().map(|s| s.name.as_str()), "A"), 8);
        assert_eq!(next_number(c.iter().map(|s| s.name.as_str()), "C"), 1);
    }
}

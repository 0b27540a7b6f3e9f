//! `flashbay status`: the station as a table, from the daemon's HTTP API,
//! or from its status file when the daemon is not listening.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use flashbay::config::{Config, DEFAULT_LISTEN};
use flashbay::units::{Bytes, Clock, Rate};

/// Where the station's state came from.
#[derive(Debug)]
pub(crate) enum Source {
    /// The daemon answered.
    Api,
    /// The daemon did not answer (the reason), so the file was read.
    File { path: std::path::PathBuf, reason: String },
}

/// Fetches the station: from `url` (or the configured listen address),
/// else from the configured status file.
pub(crate) fn fetch(url: Option<&str>, config_path: &Path) -> anyhow::Result<(Value, Source)> {
    let config = Config::load(config_path).ok();
    let url = match url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => base_url(config.as_ref().and_then(|c| c.http.as_ref()).map(|h| h.listen)),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(3))).build().into();
    let reason = match agent.get(&format!("{url}/api/status")).call() {
        Ok(mut response) => match response
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
        {
            Ok(doc) => return Ok((doc, Source::Api)),
            Err(e) => format!("{url}: unreadable answer: {e}"),
        },
        Err(e) => format!("{url}: {e}"),
    };
    let path = config.map_or_else(|| "/run/flashbay/status.json".into(), |c| c.status_file);
    let text = std::fs::read(&path)
        .map_err(|e| anyhow::anyhow!("daemon not reachable ({reason}) and no status file: {}: {e}", path.display()))?;
    let doc = serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((doc, Source::File { path, reason }))
}

/// `http://` address to reach a listen address from this machine.
fn base_url(listen: Option<SocketAddr>) -> String {
    let mut addr =
        listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8088))));
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

/// The slots as an aligned table, with the summary line first.
pub(crate) fn table(doc: &Value) -> String {
    let s = &doc["summary"];
    let mut out = format!(
        "{} writing, {} queued, {} done, {} failed, {} refused\n",
        s["writing"], s["queued"], s["done"], s["failed"], s["refused"]
    );
    let rows: Vec<[String; 7]> =
        doc["slots"].as_array().map(|slots| slots.iter().map(row).collect()).unwrap_or_default();
    let header = ["SLOT", "STATE", "CARD", "PROGRESS", "RATE", "ETA", "ERROR"].map(str::to_owned);
    let mut widths = [0usize; 7];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r.iter().zip(widths).map(|(cell, w)| format!("{cell:w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn row(slot: &Value) -> [String; 7] {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let state = text(&slot["state"]);
    let active = matches!(state.as_str(), "writing" | "verifying" | "expanding" | "resizing" | "ejecting");
    let card = [
        text(&slot["vendor"]),
        text(&slot["model"]),
        slot["size"].as_u64().map(|s| Bytes(s).to_string()).unwrap_or_default(),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    let card = if card.is_empty() { text(&slot["device"]) } else { card };
    let (progress, rate, eta) = if active {
        (
            format!("{:.0}%", slot["progress"].as_f64().unwrap_or_default() * 100.0),
            Rate(slot["rate"].as_f64().unwrap_or_default()).to_string(),
            slot["eta_seconds"]
                .as_f64()
                .map(|s| Clock(Duration::from_secs_f64(s.max(0.0))).to_string())
                .unwrap_or_default(),
        )
    } else {
        Default::default()
    };
    [text(&slot["name"]), state, card, progress, rate, eta, text(&slot["error"])]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_slots_and_shows_progress_only_while_active() {
        let doc = serde_json::json!({
            "summary": {"writing": 1, "queued": 0, "done": 2, "failed": 0, "refused": 0},
            "slots": [
                {"name": "A1", "state": "writing", "vendor": "SanDisk", "model": "Ultra", "size": 32u64 << 30,
                 "progress": 0.5, "rate": 20_971_520.0, "eta_seconds": 65.0, "error": null},
                {"name": "A2", "state": "failed", "device": "/dev/sdc", "progress": 0.0, "error": "card removed during writing"}
            ]
        });
        let t = table(&doc);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "1 writing, 0 queued, 2 done, 0 failed, 0 refused");
        assert!(lines[1].starts_with("SLOT  STATE    CARD"), "{t}");
        assert!(
            lines[2].contains("SanDisk Ultra 32.0 GiB")
                && lines[2].contains("50%")
                && lines[2].contains("20.0 MiB/s")
                && lines[2].contains("1:05"),
            "{t}"
        );
        assert!(
            lines[3].contains("/dev/sdc")
                && lines[3].ends_with("card removed during writing")
                && !lines[3].contains('%'),
            "{t}"
        );
    }

    #[test]
    fn unspecified_listen_address_is_reached_on_loopback() {
        assert_eq!(base_url(Some("0.0.0.0:9000".parse().unwrap())), "http://127.0.0.1:9000");
        assert_eq!(base_url(None), "http://127.0.0.1:8088");
    }
}

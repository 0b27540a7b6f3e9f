//! Headless Chromium for testing the status page: DOM dumps, screenshots and
//! pixel counts.
//!
//! Chromium's one-shot mode (`--dump-dom --virtual-time-budget=N`) cannot be
//! used for the page: virtual time does not advance while a network fetch is
//! pending, and an open EventSource is a fetch that never ends, so Chromium
//! never reaches the budget and never prints anything. (Without a budget it
//! dumps at the `load` event, before the first server-sent event arrived.)
//!
//! So each call starts its own browser and drives it over the DevTools
//! protocol on a pipe (`--remote-debugging-pipe`: requests on fd 3, replies
//! on fd 4, NUL-terminated JSON): navigate, wait for `load`, let the page run
//! for the budget in real time, then serialise the DOM or capture the
//! viewport. Each browser has a fresh profile directory and its own process
//! group, which is SIGKILLed when the call ends; every wait is bounded by a
//! 30 s deadline.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Upper bound for one whole call (browser start, load, budget, capture).
const DEADLINE: Duration = Duration::from_secs(30);

/// Path of a usable chromium binary, or None (the caller prints SKIPPED, or
/// fails under CI). `$CHROMIUM` overrides the search of `$PATH`.
pub fn chromium() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let explicit = std::env::var_os("CHROMIUM").map(PathBuf::from);
            let path = std::env::var_os("PATH").unwrap_or_default();
            let searched = ["chromium", "chromium-browser", "google-chrome-stable", "google-chrome"]
                .into_iter()
                .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)));
            explicit.into_iter().chain(searched).find(|bin| {
                bin.is_file()
                    && Command::new(bin)
                        .arg("--version")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            })
        })
        .clone()
}

/// Loads `url` in headless Chromium, lets its JS run for `budget_ms` (real
/// time, counted from the `load` event; see the module docs for why not
/// virtual time), returns the serialized DOM like `--dump-dom` does.
pub fn dump_dom(url: &str, budget_ms: u32) -> String {
    let mut browser = Browser::open(url, budget_ms, 1000, 700);
    let reply = browser.call(
        "Runtime.evaluate",
        json!({
            "expression": "(document.doctype ? new XMLSerializer().serializeToString(document.doctype) + '\\n' : '') \
                           + document.documentElement.outerHTML",
            "returnByValue": true,
        }),
    );
    match reply["result"]["value"].as_str() {
        Some(dom) => dom.to_owned(),
        None => panic!("chromium: no DOM from {url}: {reply}"),
    }
}

/// Same page, screenshot of a `width`x`height` viewport as PNG at `path`.
pub fn screenshot(url: &str, budget_ms: u32, path: &Path, width: u32, height: u32) {
    let mut browser = Browser::open(url, budget_ms, width, height);
    let reply = browser.call("Page.captureScreenshot", json!({ "format": "png" }));
    let data = reply["data"].as_str().unwrap_or_else(|| panic!("chromium: no screenshot of {url}: {reply}"));
    std::fs::write(path, base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data).unwrap()).unwrap();
}

/// Number of pixels in a PNG that have exactly this RGB colour (alpha ignored).
pub fn count_pixels(png: &Path, rgb: [u8; 3]) -> usize {
    let mut decoder = png::Decoder::new(BufReader::new(File::open(png).unwrap()));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let pixels = &buf[..info.buffer_size()];
    let rgb_of = |px: &[u8]| match info.color_type {
        png::ColorType::Rgb | png::ColorType::Rgba => [px[0], px[1], px[2]],
        png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha => [px[0]; 3],
        png::ColorType::Indexed => unreachable!("normalize_to_color8 expands palettes"),
    };
    pixels.chunks_exact(info.color_type.samples()).filter(|px| rgb_of(px) == rgb).count()
}

/// The `data-state` of every element with class "slot", in document order,
/// as (id, state); a missing attribute is an empty string.
pub fn slot_states(dom: &str) -> Vec<(String, String)> {
    let html = scraper::Html::parse_document(dom);
    let slots = scraper::Selector::parse(".slot").unwrap();
    html.select(&slots)
        .map(|e| {
            let attr = |name: &str| e.value().attr(name).unwrap_or_default().to_owned();
            (attr("id"), attr("data-state"))
        })
        .collect()
}

/// One browser with one page, for one call.
struct Browser {
    child: Child,
    /// The DevTools pipe into Chromium (its fd 3).
    requests: ChildStdin,
    /// Messages from Chromium (its fd 4), one JSON value each, from a reader
    /// thread; disconnected when Chromium closes the pipe.
    replies: Receiver<Value>,
    /// Events received while waiting for a reply.
    events: Vec<Value>,
    next_id: u64,
    session: Option<String>,
    deadline: Instant,
    url: String,
    /// Profile directory; Chromium's stderr goes to a file in it, for errors.
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium, opens a `width`x`height` page, loads `url` and lets
    /// it run for `budget_ms` after its `load` event.
    fn open(url: &str, budget_ms: u32, width: u32, height: u32) -> Self {
        let bin = chromium().expect("no chromium binary (check browser::chromium() first)");
        let profile = tempfile::Builder::new().prefix("flashbay-chromium-").tempdir().unwrap();
        let stderr = File::create(profile.path().join("stderr.log")).unwrap();
        // The shell moves the pipes to fds 3 and 4 and then execs Chromium in
        // its place, so the child's pid is Chromium's (and its process group).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >&2"#)
            .arg(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-crash-reporter",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                "--force-device-scale-factor=1",
                "--run-all-compositor-stages-before-draw",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().join("profile").display()),
                "about:blank",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let requests = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let mut message = Vec::new();
            while stdout.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                if message.pop() != Some(0) {
                    break; // EOF in the middle of a message
                }
                if tx.send(serde_json::from_slice(&message).unwrap_or(Value::Null)).is_err() {
                    break;
                }
                message.clear();
            }
        });
        let mut browser = Self {
            child,
            requests,
            replies,
            events: Vec::new(),
            next_id: 0,
            session: None,
            deadline: Instant::now() + DEADLINE,
            url: url.to_owned(),
            profile,
        };

        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached =
            browser.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }));
        browser.session = attached["sessionId"].as_str().map(str::to_owned);
        browser.call("Page.enable", json!({}));
        browser.call("Page.setLifecycleEventsEnabled", json!({ "enabled": true }));
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let nav = browser.call("Page.navigate", json!({ "url": url }));
        if let Some(error) = nav["errorText"].as_str() {
            browser.fail(&format!("navigation failed: {error}"));
        }
        // The `load` of this navigation, not a late one of about:blank.
        let loader = nav["loaderId"].clone();
        browser.wait_event("load", |e| {
            e["method"] == "Page.lifecycleEvent" && e["params"]["name"] == "load" && e["params"]["loaderId"] == loader
        });
        std::thread::sleep(Duration::from_millis(budget_ms.into()));
        browser
    }

    /// Sends a command (to the page's session once attached) and returns its
    /// result; events that arrive meanwhile are kept for `wait_event`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            request["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&request).unwrap();
        bytes.push(0);
        if let Err(e) = self.requests.write_all(&bytes) {
            self.fail(&format!("{method}: cannot write to the DevTools pipe: {e}"));
        }
        loop {
            let message = self.next_message(method);
            if message["id"] == id {
                if !message["error"].is_null() {
                    self.fail(&format!("{method}: {}", message["error"]));
                }
                return message["result"].clone();
            }
            if message["method"].is_string() {
                self.events.push(message);
            }
        }
    }

    /// Waits for (and consumes) an event matching `is_it`.
    fn wait_event(&mut self, what: &str, is_it: impl Fn(&Value) -> bool) {
        loop {
            if let Some(i) = self.events.iter().position(&is_it) {
                self.events.remove(i);
                return;
            }
            let message = self.next_message(what);
            self.events.push(message);
        }
    }

    fn next_message(&mut self, waiting_for: &str) -> Value {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.replies.recv_timeout(left) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => {
                self.fail(&format!("timed out after {DEADLINE:?} waiting for {waiting_for}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.fail(&format!("chromium exited while waiting for {waiting_for}"))
            }
        }
    }

    /// Panics with the reason and the tail of Chromium's stderr (the browser
    /// is killed by `Drop` during unwinding).
    fn fail(&self, reason: &str) -> ! {
        let mut log = String::new();
        if let Ok(mut f) = File::open(self.profile.path().join("stderr.log")) {
            let _ = f.read_to_string(&mut log);
        }
        // Without a session bus Chromium logs D-Bus failures; they are noise.
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains(":ERROR:dbus/")).collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        panic!("chromium ({}): {reason}\n--- stderr (tail) ---\n{tail}", self.url);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Kill the whole group (browser, zygotes, renderers, GPU process) in
        // one go; the browser is not reaped yet, so the group id is still ours.
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

//! The HTTP endpoint: the status page, the station as JSON, live events
//! (Server-Sent Events), Prometheus metrics, and (with a token) control.
//!
//! Every handler reads the station's published state or sends it a
//! message; none can block the station. An SSE client that falls behind
//! the event stream is dropped (its browser reconnects and starts again
//! from a snapshot), and a client that stops reading altogether only
//! stalls its own connection, which the kernel closes after
//! `TCP_USER_TIMEOUT`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures_util::{Stream, StreamExt, stream};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::config::Config;
use crate::station::Msg;
use crate::station::status::{Event, LogLine, Snapshot};

const PAGE: &str = include_str!("page.html");
/// Recent log lines kept per slot for `GET /api/slots/{name}`.
const LOG_LINES: usize = 50;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A peer that acknowledges nothing for this long is disconnected by the kernel.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handlers share.
#[derive(Clone)]
pub struct Http {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Never read: each SSE client and the log buffer `resubscribe()` to it.
    events: Arc<broadcast::Receiver<Event>>,
    pub station: mpsc::Sender<Msg>,
    /// The running configuration (for the control token, which a reload may change).
    pub config: watch::Receiver<Arc<Config>>,
    pub metrics: Arc<Metrics>,
    logs: Arc<Mutex<HashMap<String, VecDeque<Arc<LogLine>>>>>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http").finish_non_exhaustive()
    }
}

impl Http {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        events: broadcast::Receiver<Event>,
        station: mpsc::Sender<Msg>,
        config: watch::Receiver<Arc<Config>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { snapshots, events: Arc::new(events), station, config, metrics, logs: Arc::default() }
    }
}

/// Binds the listening socket; a taken port is a startup error that says so.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("http: cannot listen on {addr}: {e}"))
}

pub fn router(http: Http) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/slots/{name}", get(slot))
        .route("/api/slots/{name}/cancel", post(cancel))
        .route("/api/slots/{name}/retry", post(retry))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(|uri: axum::http::Uri| async move {
            error(StatusCode::NOT_FOUND, &format!("no such path: {}", uri.path()))
        })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") })
        .layer(DefaultBodyLimit::max(4096))
        .with_state(http)
}

/// Serves until `shutdown`; keeps the per-slot log buffers on the side.
pub async fn serve(listener: TcpListener, http: Http, shutdown: CancellationToken) -> anyhow::Result<()> {
    let logs = Arc::clone(&http.logs);
    let mut events = http.events.resubscribe();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = events.recv() => match event {
                    Ok(Event::Log(line)) => {
                        if let Ok(mut logs) = logs.lock() {
                            let lines = logs.entry(line.slot.clone()).or_default();
                            if lines.len() == LOG_LINES {
                                lines.pop_front();
                            }
                            lines.push_back(line);
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let listener = listener.tap_io(|tcp| {
        let timeout = u32::try_from(USER_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
        if let Err(e) = nix::sys::socket::setsockopt(&*tcp, nix::sys::socket::sockopt::TcpUserTimeout, &timeout) {
            tracing::debug!("TCP_USER_TIMEOUT: {e}");
        }
    });
    axum::serve(listener, router(http)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn status(State(http): State<Http>) -> Json<Arc<Snapshot>> {
    Json(Arc::clone(&http.snapshots.borrow()))
}

async fn slot(State(http): State<Http>, Path(name): Path<String>) -> Response {
    let snapshot = Arc::clone(&http.snapshots.borrow());
    let Some(slot) = snapshot.slots.iter().find(|s| s.name == name) else {
        return error(StatusCode::NOT_FOUND, &format!("no slot named {name}"));
    };
    let mut doc = serde_json::to_value(slot).unwrap_or_default();
    let log: Vec<Arc<LogLine>> = http
        .logs
        .lock()
        .map(|l| l.get(&name).map(|q| q.iter().cloned().collect()).unwrap_or_default())
        .unwrap_or_default();
    doc["log"] = serde_json::to_value(log).unwrap_or_default();
    Json(doc).into_response()
}

/// First the whole station, then every slot change and log line. A client
/// that lags behind the stream is dropped rather than allowed to hold
/// events back for everyone.
async fn events(State(http): State<Http>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // Subscribe before taking the snapshot: a change in between arrives
    // twice, never not at all.
    let rx = http.events.resubscribe();
    let snapshot = Arc::clone(&http.snapshots.borrow());
    let first = stream::iter(sse("snapshot", &*snapshot).map(Ok));
    let rest = stream::unfold(rx, |mut rx| async move {
        loop {
            let event = match rx.recv().await {
                Ok(Event::Slot(slot)) => sse("slot", &*slot),
                Ok(Event::Log(line)) => sse("log", &*line),
                Ok(Event::Finished(_)) => continue,
                Err(_) => return None,
            };
            if let Some(event) = event {
                return Some((Ok(event), rx));
            }
        }
    });
    Sse::new(first.chain(rest)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn sse(name: &str, data: &impl serde::Serialize) -> Option<SseEvent> {
    SseEvent::default().event(name).json_data(data).ok()
}

async fn metrics(State(http): State<Http>) -> Response {
    let snapshot = Arc::clone(&http.snapshots.borrow());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], http.metrics.render(&snapshot))
        .into_response()
}

async fn cancel(State(http): State<Http>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    control(&http, &headers, |reply| Msg::Cancel { slot: name, reply }).await
}

async fn retry(State(http): State<Http>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    control(&http, &headers, |reply| Msg::Retry { slot: name, reply }).await
}

/// Control needs `http.control_token` configured and presented as
/// `Authorization: Bearer <token>`; anything else is 403.
async fn control(
    http: &Http,
    headers: &HeaderMap,
    msg: impl FnOnce(oneshot::Sender<Result<String, String>>) -> Msg,
) -> Response {
    let token = http.config.borrow().http.as_ref().and_then(|h| h.control_token.clone());
    let Some(token) = token else {
        return error(StatusCode::FORBIDDEN, "control is disabled: set http.control_token");
    };
    let presented =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p.trim().as_bytes(), token.as_bytes())) {
        return error(StatusCode::FORBIDDEN, "missing or wrong bearer token");
    }
    let (reply, answer) = oneshot::channel();
    if http.station.send(msg(reply)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the station is stopping");
    }
    match answer.await {
        Ok(Ok(message)) => Json(json!({ "ok": message })).into_response(),
        Ok(Err(message)) if message.starts_with("no slot named") => error(StatusCode::NOT_FOUND, &message),
        Ok(Err(message)) => error(StatusCode::CONFLICT, &message),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the station is stopping"),
    }
}

/// Compares secrets without an early exit that would time the mismatch.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

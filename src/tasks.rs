//! Named, supervised long-lived tasks.
//!
//! Every long-lived part of the daemon runs as a named task here. When one
//! ends while the daemon is not shutting down, that is a failure: it is
//! logged with its name, the others are asked to stop, and the daemon exits
//! non-zero so that systemd restarts it.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long the remaining tasks get to finish once shutdown starts.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    /// Task names by id, to name a task that panicked.
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { set: JoinSet::new(), names: std::collections::HashMap::new(), shutdown }
    }

    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let id = self.set.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Waits for shutdown (or the first unexpected end), then for the rest.
    pub async fn supervise(mut self) -> anyhow::Result<()> {
        let mut failure: Option<anyhow::Error> = None;
        while let Some(joined) = self.set.join_next_with_id().await {
            let (id, result) = match joined {
                Ok((id, result)) => (id, result),
                Err(e) => (e.id(), Err(anyhow::anyhow!("task panicked: {e}"))),
            };
            let name = self.names.get(&id).copied().unwrap_or("?");
            match result {
                Err(e) if failure.is_none() => {
                    tracing::error!("task {name} failed: {e:#}");
                    failure = Some(e.context(format!("task {name} failed")));
                }
                Ok(()) if !self.shutdown.is_cancelled() && failure.is_none() => {
                    tracing::error!("task {name} ended unexpectedly");
                    failure = Some(anyhow::anyhow!("task {name} ended unexpectedly"));
                }
                _ => {}
            }
            if !self.shutdown.is_cancelled() && failure.is_some() {
                self.shutdown.cancel();
            }
            if self.shutdown.is_cancelled() {
                break;
            }
        }
        if tokio::time::timeout(DRAIN, async { while self.set.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!("tasks still running {DRAIN:?} after shutdown; exiting anyway");
            self.set.abort_all();
        }
        failure.map_or(Ok(()), Err)
    }
}

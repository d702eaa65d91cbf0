//! REST calls spread over a list of server replicas, moving on to the next
//! address when one does not respond.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edgekeep_api::Client;
use edgekeep_api::client::{ApiResult, is_retryable};

/// How long an address that failed is passed over before it is tried again.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// How long one call keeps going around the list while every address fails.
pub const RETRY_WINDOW: Duration = Duration::from_secs(60);

/// Pause between two rounds over the whole list.
const ROUND_PAUSE: Duration = Duration::from_secs(1);

/// REST clients of the server replicas, used in turn.
pub struct Servers {
    clients: Vec<Client>,
    /// Per address: milliseconds after `epoch` until which it counts as down.
    down_until: Vec<AtomicU64>,
    epoch: Instant,
    next: AtomicUsize,
    retried_calls: AtomicU64,
}

impl Servers {
    /// Creates one client per base URL, all with `token`.
    pub fn new(urls: &[String], token: &str) -> Self {
        Servers {
            clients: urls.iter().map(|url| Client::new(url, token)).collect(),
            down_until: urls.iter().map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            next: AtomicUsize::new(0),
            retried_calls: AtomicU64::new(0),
        }
    }

    /// Number of failed attempts that were repeated on another address.
    pub fn retried_calls(&self) -> u64 {
        self.retried_calls.load(Ordering::Relaxed)
    }

    /// Starts a walk over the addresses, beginning with the next one in turn.
    pub fn rotation(&self) -> Rotation<'_> {
        Rotation {
            servers: self,
            start: self.next.fetch_add(1, Ordering::Relaxed),
            tried: 0,
            started: Instant::now(),
        }
    }

    /// Runs `call` on the next address in turn. A transport error or a 5xx
    /// response moves it to the following address, for up to
    /// [`RETRY_WINDOW`]. Any other result is returned as it is. Use it only
    /// for calls that are safe to repeat.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> ApiResult<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = ApiResult<T>>,
    {
        let mut rotation = self.rotation();
        loop {
            let client = rotation.next().await;
            match call(client.clone()).await {
                Err(err) if is_retryable(&err) => rotation.failed(client, &err)?,
                result => return result,
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_down(&self, index: usize) -> bool {
        self.down_until[index].load(Ordering::Relaxed) > self.now_ms()
    }

    /// Marks the address of `client` as down for [`DOWN_FOR`], logging the
    /// change once.
    fn mark_down(&self, client: &Client, error: &edgekeep_api::ApiError) {
        let Some(index) = self
            .clients
            .iter()
            .position(|c| c.base_url() == client.base_url())
        else {
            return;
        };
        let until = self.now_ms() + DOWN_FOR.as_millis() as u64;
        let before = self.down_until[index].swap(until, Ordering::Relaxed);
        if before <= self.now_ms() {
            tracing::warn!(
                server = client.base_url(),
                status = error.status,
                error = %error,
                "server failed; using the other addresses for {} s",
                DOWN_FOR.as_secs()
            );
        }
    }
}

/// One call's walk over the addresses: up addresses first, then, when all are
/// down, every address in rounds with a pause between them.
pub struct Rotation<'a> {
    servers: &'a Servers,
    start: usize,
    tried: usize,
    started: Instant,
}

impl Rotation<'_> {
    /// Returns the client to try next. It waits [`ROUND_PAUSE`] before each
    /// new round over the whole list.
    pub async fn next(&mut self) -> Client {
        let count = self.servers.clients.len();
        loop {
            if self.tried > 0 && self.tried.is_multiple_of(count) {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            let index = (self.start + self.tried) % count;
            self.tried += 1;
            // Within a round, skip addresses known to be down unless every
            // address is, so a dead replica costs one failed attempt per
            // few seconds instead of one per call.
            let all_down = (0..count).all(|i| self.servers.is_down(i));
            if all_down || !self.servers.is_down(index) {
                return self.servers.clients[index].clone();
            }
        }
    }

    /// Records that `client` failed with `error`. Returns the error when
    /// the retry window has passed, so the caller gives up.
    pub fn failed(
        &mut self,
        client: Client,
        error: &edgekeep_api::ApiError,
    ) -> Result<(), edgekeep_api::ApiError> {
        self.servers.mark_down(&client, error);
        if self.started.elapsed() >= RETRY_WINDOW {
            return Err(edgekeep_api::ApiError {
                status: error.status,
                message: format!(
                    "{error} (no server address answered within {} s)",
                    RETRY_WINDOW.as_secs()
                ),
            });
        }
        self.servers.retried_calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

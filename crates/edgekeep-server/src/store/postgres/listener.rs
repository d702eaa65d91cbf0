//! The job listener: a dedicated PostgreSQL connection that runs `LISTEN`
//! on the jobs channel, so a long poll on this replica wakes when another
//! replica queues a job for its device.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{JOBS_CHANNEL, describe, describe_target};
use crate::store::JobWakeup;

/// Name the listener connection shows in `pg_stat_activity`.
pub const LISTENER_APPLICATION_NAME: &str = "edgekeep job listener";
/// First wait before a reconnect; it doubles after each failure.
const RETRY_DELAY_MIN: Duration = Duration::from_secs(1);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(30);
/// How often the listener checks that its connection still responds. A
/// connection lost without a TCP reset would otherwise go unnoticed.
const CHECK_INTERVAL: Duration = Duration::from_secs(30);
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the listener task and returns the wake-ups it sends, until
/// `shutdown`.
pub(super) fn spawn(
    config: tokio_postgres::Config,
    shutdown: CancellationToken,
) -> mpsc::Receiver<JobWakeup> {
    let (sender, receiver) = mpsc::channel(256);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = listen_forever(config, sender) => {}
        }
    });
    receiver
}

/// Listens, and reconnects with exponential backoff whenever the connection
/// fails. Returns when the receiver of the wake-ups is dropped.
async fn listen_forever(mut config: tokio_postgres::Config, sender: mpsc::Sender<JobWakeup>) {
    config.application_name(LISTENER_APPLICATION_NAME);
    let target = describe_target(&config);
    let mut delay = RETRY_DELAY_MIN;
    loop {
        match listen(&config, &sender, &mut delay).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(
                    database = %target,
                    error,
                    retry_secs = delay.as_secs(),
                    "job listener lost its PostgreSQL connection; long polls wake only for \
                     jobs queued through this server until it reconnects"
                );
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

/// Runs one listener connection until it fails (`Err` with the reason) or
/// the receiver is dropped (`Ok`). Resets `delay` once `LISTEN` succeeds.
async fn listen(
    config: &tokio_postgres::Config,
    sender: &mpsc::Sender<JobWakeup>,
    delay: &mut Duration,
) -> Result<(), String> {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("failed to connect: {}", describe(&e)))?;

    // The connection delivers notifications only while it is polled, so a
    // separate task drives it and forwards their payloads.
    let (payload_sender, mut payloads) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if payload_sender
                        .send(notification.payload().to_string())
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(error = describe(&error), "job listener connection ended");
                    return;
                }
            }
        }
    });
    let _abort_driver = AbortOnDrop(driver);

    client
        .batch_execute(&format!("LISTEN {JOBS_CHANNEL}"))
        .await
        .map_err(|e| format!("LISTEN failed: {}", describe(&e)))?;
    tracing::info!("job listener is listening for jobs queued through other servers");
    *delay = RETRY_DELAY_MIN;

    // A job queued while no connection listened sent a notification that no
    // replica received, so every waiting poll looks again.
    if sender.send(JobWakeup::All).await.is_err() {
        return Ok(());
    }

    let mut check = tokio::time::interval(CHECK_INTERVAL);
    check.tick().await;
    loop {
        tokio::select! {
            payload = payloads.recv() => {
                let Some(payload) = payload else {
                    return Err("the connection closed".to_string());
                };
                let Ok(device_id) = payload.parse::<i64>() else {
                    tracing::warn!(payload, "ignored a job notification that names no device id");
                    continue;
                };
                if sender.send(JobWakeup::Device(device_id)).await.is_err() {
                    return Ok(());
                }
            }
            _ = check.tick() => {
                match tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        return Err(format!("connection check failed: {}", describe(&error)));
                    }
                    Err(_) => {
                        return Err(format!(
                            "connection check timed out after {} seconds",
                            CHECK_TIMEOUT.as_secs()
                        ));
                    }
                }
            }
        }
    }
}

/// Aborts the task when dropped, so a failed connection stops its driver.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

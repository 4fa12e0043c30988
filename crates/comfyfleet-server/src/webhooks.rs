//! Webhooks: one signed `POST` per job that ends, to the URL its submitter gave, retried with
//! exponential backoff on network errors and non-2xx answers.
//!
//! Signature: `X-Comfyfleet-Signature: sha256=<hex HMAC-SHA256(secret, body)>`; the receiver
//! recomputes it over the raw body. `X-Comfyfleet-Delivery` is unique per job (retries repeat it,
//! so receivers can deduplicate).

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use comfyfleet_core::{Event, JobRecord};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deliveries at once; more wait their turn.
const CONCURRENCY: usize = 16;

/// Delivery settings.
#[derive(Debug, Clone)]
pub(crate) struct WebhookSettings {
    pub(crate) secret: SecretString,
    pub(crate) timeout: Duration,
    pub(crate) tries: usize,
    pub(crate) first_delay: Duration,
    pub(crate) max_delay: Duration,
}

/// Sends webhooks in the background.
pub(crate) struct Webhooks {
    settings: Option<WebhookSettings>,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("enabled", &self.settings.is_some())
            .finish_non_exhaustive()
    }
}

/// `sha256=<hex>` of the body under the secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

impl Webhooks {
    pub(crate) fn new(settings: Option<WebhookSettings>, stop: CancellationToken) -> Webhooks {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // Building a client without custom TLS roots only fails without a crypto provider,
            // which is installed on the line above.
            .unwrap_or_else(|e| panic!("building the webhook HTTP client: {e}"));
        Webhooks {
            settings,
            client,
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
            tasks: TaskTracker::new(),
            stop,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.settings.is_some()
    }

    /// Queues the delivery for a job that just ended (no-op without a URL or secret).
    pub(crate) fn deliver(&self, job: &JobRecord, event: &Event) {
        let (Some(url), Some(settings)) = (job.spec.webhook.clone(), self.settings.clone()) else {
            return;
        };
        let body = serde_json::json!({
            "job": job.summary(),
            "event": event,
        });
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "webhook body did not serialize");
                return;
            }
        };
        let sig = signature(settings.secret.expose_secret(), &body);
        let delivery = format!("{}-{}", job.id, event.id);
        let client = self.client.clone();
        let permits = self.permits.clone();
        let stop = self.stop.clone();
        let job_id = job.id;
        self.tasks.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let send = || async {
                let r = client
                    .post(&url)
                    .timeout(settings.timeout)
                    .header("content-type", "application/json")
                    .header("x-comfyfleet-signature", &sig)
                    .header("x-comfyfleet-delivery", &delivery)
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| format!("request failed: {}", e.without_url()))?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("answered {}", r.status()))
                }
            };
            let backoff = ExponentialBuilder::default()
                .with_min_delay(settings.first_delay)
                .with_max_delay(settings.max_delay)
                .with_max_times(settings.tries.saturating_sub(1))
                .with_jitter();
            let attempt = send
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .notify(|e: &String, d: Duration| {
                    tracing::info!(job = %job_id, error = %e, retry_in = ?d, "webhook delivery failed; retrying");
                });
            tokio::select! {
                _ = stop.cancelled() => {
                    tracing::warn!(job = %job_id, "webhook delivery abandoned at shutdown");
                }
                r = attempt => match r {
                    Ok(()) => tracing::debug!(job = %job_id, "webhook delivered"),
                    Err(e) => tracing::warn!(job = %job_id, error = %e, tries = settings.tries, "webhook delivery gave up"),
                }
            }
        });
    }

    /// Waits for deliveries in flight (bounded by the caller).
    pub(crate) async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

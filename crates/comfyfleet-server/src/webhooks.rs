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
    pub(crate) allow_private: bool,
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

/// Whether an address is on the public internet (not loopback, private, link-local, CGNAT,
/// unique-local, unspecified, multicast or documentation space).
pub(crate) fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (o[0] == 100 && (64..128).contains(&o[1])) // CGNAT
                || o[0] == 0)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80) // link local
        }
    }
}

/// Checks a webhook URL when a job is submitted: `http(s)`, a host, and — unless private
/// targets are allowed — not a literal private address or `localhost` (server-side request
/// forgery: a submitter must not make the service call its neighbours).
pub(crate) fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("webhook: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("webhook must be an http:// or https:// URL".into());
    }
    let host = u.host().ok_or("webhook URL has no host")?;
    if allow_private {
        return Ok(());
    }
    let private = match host {
        url::Host::Domain(d) => {
            d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => !is_public(ip.into()),
        url::Host::Ipv6(ip) => !is_public(ip.into()),
    };
    if private {
        return Err(
            "webhook points at a loopback or private address; the server refuses that unless webhook_allow_private is set"
                .into(),
        );
    }
    Ok(())
}

/// Resolves the webhook's host right before sending and refuses private addresses (a public
/// name may resolve to one).
async fn resolves_public(url: &str) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| e.to_string())?;
    let host = u
        .host_str()
        .ok_or("no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = u.port_or_known_default().unwrap_or(443);
    let addrs = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("resolving {host} timed out"))?
    .map_err(|e| format!("resolving {host}: {e}"))?;
    for a in addrs {
        if !is_public(a.ip()) {
            return Err(format!("{host} resolves to a private address ({})", a.ip()));
        }
    }
    Ok(())
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
                if !settings.allow_private {
                    resolves_public(&url).await?;
                }
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
    fn private_targets_are_refused_unless_allowed() {
        for bad in [
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://192.168.0.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
            assert!(check_url(bad, true).is_ok(), "{bad}");
        }
        for good in [
            "https://example.com/hook",
            "http://93.184.216.34/x",
            "https://[2606:4700::1]/",
        ] {
            assert!(check_url(good, false).is_ok(), "{good}");
        }
        assert!(check_url("ftp://example.com/", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

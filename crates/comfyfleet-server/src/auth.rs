//! Bearer-token auth for `/v1` and `/metrics`: constant-time comparison against every configured
//! token; `401` with the JSON error body otherwise. WebSocket clients in browsers cannot set
//! headers, so the WebSocket routes also accept the token as the `Sec-WebSocket-Protocol` value
//! `bearer.<token>` (never in the URL, which ends up in logs).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

fn matches(state: &AppState, presented: &str) -> bool {
    let mut ok = subtle::Choice::from(0u8);
    for t in &state.config.tokens {
        let t = t.expose_secret().as_bytes();
        // Lengths differ → not equal; ct_eq on slices handles that without early exit on content.
        ok |= t.ct_eq(presented.as_bytes());
    }
    bool::from(ok)
}

/// The token a request presents, if any.
fn presented(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
        && let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    {
        return Some(t.trim().to_owned());
    }
    if let Some(v) = req.headers().get(header::SEC_WEBSOCKET_PROTOCOL)
        && let Ok(v) = v.to_str()
    {
        for p in v.split(',') {
            if let Some(t) = p.trim().strip_prefix("bearer.") {
                return Some(t.to_owned());
            }
        }
    }
    None
}

/// `/v1/**` (including unknown paths, so route existence does not leak) and `/metrics`; the
/// dashboard's static files, `/healthz` and `/readyz` are open.
pub(crate) fn protected(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/metrics"
}

/// The middleware.
pub(crate) async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.config.tokens.is_empty() || !protected(req.uri().path()) {
        return next.run(req).await;
    }
    match presented(&req) {
        Some(t) if matches(&state, &t) => next.run(req).await,
        _ => {
            let mut r = ApiError::unauthorized().into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

/// Cross-site request forgery guard for state-changing requests and WebSocket upgrades (which
/// browsers send cross-site without CORS). Without a token the API trusts
/// anything on loopback, and a web page the user visits could otherwise `POST` a "simple"
/// request (a form: no preflight) to `127.0.0.1` — cancel jobs, submit multipart jobs. A `POST`
/// whose `Origin` is neither this server nor a configured CORS origin, or that the browser marks
/// `Sec-Fetch-Site: cross-site`, is refused with `403`.
pub(crate) async fn same_origin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // Without a token the server trusts loopback; a DNS-rebinding page reaches it under a
    // foreign host name, so only loopback host names are accepted then.
    if state.config.tokens.is_empty() && !loopback_host(&req) {
        return ApiError::forbidden(
            "this server has no token and answers only to loopback host names (localhost, 127.0.0.1, [::1])",
        )
        .into_response();
    }
    let websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if (req.method() == axum::http::Method::POST || websocket) && !allowed_origin(&state, &req) {
        return ApiError::forbidden(
            "cross-site request refused: the Origin is neither this server nor in cors_origins",
        )
        .into_response();
    }
    next.run(req).await
}

fn loopback_host(req: &Request) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
    else {
        // HTTP/1.0 without Host: not a browser.
        return true;
    };
    // Strip the port (`[::1]:8330`, `127.0.0.1:8330`, `localhost:8330`).
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn allowed_origin(state: &AppState, req: &Request) -> bool {
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let Some(origin) = origin else {
        // Not from a browser page (curl, the CLI) — or a same-origin GET-like request.
        return site != Some("cross-site");
    };
    if state.config.cors_origins.iter().any(|o| o == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::protected;

    #[test]
    fn protects_the_api_and_metrics_only() {
        for p in ["/v1", "/v1/jobs", "/v1/nope", "/v1/events", "/metrics"] {
            assert!(protected(p), "{p}");
        }
        for p in [
            "/",
            "/assets/app.js",
            "/healthz",
            "/readyz",
            "/v1x",
            "/metricsx",
        ] {
            assert!(!protected(p), "{p}");
        }
    }
}

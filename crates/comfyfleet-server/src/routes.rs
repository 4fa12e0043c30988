//! The routes. Every `/v1` handler is registered through `utoipa_axum::routes!`, so a route
//! cannot exist without its entry in the OpenAPI document.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use comfyfleet::engine::EngineError;
use comfyfleet_core::{
    CancelOutcome, Event, EventQuery, FleetEvent, JobFilter, JobId, JobPage, JobRecord, JobState,
    ReapOptions, ReapReport, Timestamp, Upload,
};
use futures::{SinkExt, StreamExt};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::api::*;
use crate::error::{ApiError, ErrorBody, Json, Path, Query};
use crate::events::{Item, Selector, client_stream};
use crate::installs::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "comfyfleet",
        description = "Run ComfyUI workflows reliably on a fleet of backends. Times are milliseconds since the Unix epoch; errors are `{code, message, details}` JSON.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, Event, FleetEvent)),
    tags(
        (name = "jobs", description = "Submit, inspect and cancel jobs"),
        (name = "events", description = "Live events (SSE and WebSocket) with resume"),
        (name = "backends", description = "The fleet's backends"),
        (name = "installs", description = "Custom-node installs on SSH instances"),
        (name = "maintenance", description = "Reaper, backups, pruning"),
        (name = "system", description = "Health, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The documented routes. Multipart routes get `max_upload` as their body limit, everything else
/// `max_body` (a layer applies to the routes present when it is added).
fn documented(max_body: usize, max_upload: usize) -> OpenApiRouter<AppState> {
    let uploads = OpenApiRouter::new()
        .routes(routes!(submit_job, list_jobs))
        .routes(routes!(upload_inputs))
        .layer(DefaultBodyLimit::max(max_upload));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(job_counts))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(cancel_jobs))
        .routes(routes!(job_events))
        .routes(routes!(job_output))
        .routes(routes!(events_sse))
        .routes(routes!(job_events_sse))
        .routes(routes!(events_ws))
        .routes(routes!(job_events_ws))
        .routes(routes!(create_install, list_installs))
        .routes(routes!(get_install))
        .routes(routes!(cancel_install))
        .routes(routes!(install_events))
        .routes(routes!(instance_packs))
        .routes(routes!(list_backends))
        .routes(routes!(get_backend))
        .routes(routes!(drain_backend))
        .routes(routes!(enable_backend))
        .routes(routes!(reap))
        .routes(routes!(backup))
        .routes(routes!(prune))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .layer(DefaultBodyLimit::max(max_body))
        .merge(uploads)
}

/// Adds the answers every operation can give (malformed input, auth, limits, timeouts) so the
/// document lists every status the server may send.
fn add_common_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};
    let err = |d: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(d)
                .content(
                    "application/json",
                    Content::new(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody")))),
                )
                .build(),
        )
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let open = path == "/healthz" || path == "/readyz";
        let ops = [(false, item.get.as_mut()), (true, item.post.as_mut())];
        for (post, op) in ops {
            let Some(op) = op else { continue };
            let has_input =
                op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || op.request_body.is_some();
            let has_body = op.request_body.is_some();
            let r = &mut op.responses.responses;
            // OpenAPI requires a description on every response; give the terse ones the
            // status's reason phrase.
            for (code, resp) in r.iter_mut() {
                if let RefOr::T(resp) = resp
                    && resp.description.trim().is_empty()
                {
                    resp.description = code
                        .parse::<u16>()
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .and_then(|c| c.canonical_reason())
                        .unwrap_or("Response")
                        .to_owned();
                }
            }
            let mut add = |code: &str, d: &str| {
                r.entry(code.to_owned()).or_insert_with(|| err(d));
            };
            if has_input {
                add("400", "Malformed path, query string or body");
            }
            if has_body {
                add("413", "Body over the size limit");
                add("415", "Wrong content type");
                add("422", "Well-formed but invalid");
            }
            if post {
                add("403", "Cross-site request refused");
            }
            if !open {
                add("401", "Missing or wrong bearer token");
                add(
                    "503",
                    "The store or a backend is unavailable, or the request timed out",
                );
            }
        }
    }
}

/// The OpenAPI document.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = documented(1, 1).split_for_parts().1;
    add_common_errors(&mut doc);
    doc
}

/// The whole application.
pub(crate) fn app(state: AppState) -> Router {
    use tower::ServiceBuilder;
    use tower_http::catch_panic::CatchPanicLayer;
    use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
    use tower_http::trace::TraceLayer;

    let (api, _doc) =
        documented(state.config.max_body_bytes, state.config.max_upload_bytes).split_for_parts();
    let mut app = api
        .route("/", axum::routing::get(dashboard_index))
        .route("/assets/app.js", axum::routing::get(dashboard_js))
        .route("/assets/app.css", axum::routing::get(dashboard_css))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::same_origin,
        ))
        .with_state(state.clone());
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .config
            .cors_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("last-event-id"),
                ]),
        );
    }
    app.layer(
        ServiceBuilder::new()
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                header::SEC_WEBSOCKET_PROTOCOL,
            ]))
            .layer(TraceLayer::new_for_http())
            .layer(CatchPanicLayer::custom(panic_response)),
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal("a handler panicked").into_response()
}

/// Non-streaming requests get `request_timeout_secs`; event streams and downloads are exempt
/// (they are long by design and end when the client or the server stops).
async fn request_timeout(
    State(state): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    // Streams, downloads and uploads take as long as the data does; maintenance may copy a big
    // database. They end with the client or the server instead.
    let exempt = path.ends_with("/stream")
        || path.ends_with("/ws")
        || path == "/v1/events"
        || (path.starts_with("/v1/installs/") && path.ends_with("/events"))
        || path.contains("/outputs/")
        || path == "/v1/inputs"
        || (path == "/v1/jobs" && req.method() == axum::http::Method::POST)
        || path.starts_with("/v1/maintenance/");
    if exempt {
        return next.run(req).await;
    }
    let limit = Duration::from_secs(state.config.request_timeout_secs.max(1));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::unavailable(format!(
            "the request did not finish within {}s",
            limit.as_secs()
        ))
        .into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

// ---------------------------------------------------------------------------------------------
// Dashboard

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn dashboard_index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

async fn dashboard_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

async fn dashboard_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// Submit a job.
///
/// Accepts the job as JSON (`SubmitRequest`), or as `multipart/form-data` with a `spec` part
/// holding that JSON and one file part per input file (the part's file name is the input's
/// name; it is added to `uploads`). Answers at once with the job id; the job runs in the
/// background.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body(content(
        (SubmitRequest = "application/json"),
        (String = "multipart/form-data")
    )),
    responses(
        (status = 202, description = "Stored; it will run", body = SubmitResponse),
        (status = 200, description = "The idempotency key matched an existing job", body = SubmitResponse),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "Invalid job (workflow, uploads, fields)", body = ErrorBody),
    )
)]
async fn submit_job(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (submit, files) = if ct.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &state).await?;
        let mut spec: Option<SubmitRequest> = None;
        let mut files: Vec<(String, bytes::Bytes)> = Vec::new();
        while let Some(field) = mp.next_field().await? {
            let name = field.name().unwrap_or("").to_owned();
            let file_name = field.file_name().map(str::to_owned);
            if name == "spec" && file_name.is_none() {
                let bytes = field.bytes().await?;
                if bytes.len() > state.config.max_body_bytes {
                    return Err(ApiError::too_large(format!(
                        "the spec part is over {} bytes",
                        state.config.max_body_bytes
                    )));
                }
                spec = Some(serde_json::from_slice(&bytes).map_err(|e| {
                    if e.is_data() {
                        ApiError::invalid(format!("spec: {e}"))
                    } else {
                        ApiError::bad_request(format!("spec: {e}"))
                    }
                })?);
            } else if let Some(file_name) = file_name {
                let bytes = field.bytes().await?;
                files.push((file_name, bytes));
            } else {
                return Err(ApiError::bad_request(format!(
                    "unexpected multipart field {name:?}: send `spec` (JSON) and file parts"
                )));
            }
        }
        let spec = spec.ok_or_else(|| {
            ApiError::bad_request("multipart submit needs a `spec` part with the job JSON")
        })?;
        (spec, files)
    } else if ct.starts_with("application/json") {
        let bytes = axum::body::to_bytes(req.into_body(), state.config.max_body_bytes)
            .await
            .map_err(|e| {
                // `to_bytes` fails on the limit (http-body-util's LengthLimitError) or on a
                // broken connection; only the first is the client's body being too big.
                let over =
                    std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                        e.source()
                    })
                    .any(|e| e.to_string().contains("length limit"));
                if over {
                    ApiError::too_large(format!(
                        "the body is over {} bytes (max_body_bytes)",
                        state.config.max_body_bytes
                    ))
                } else {
                    ApiError::bad_request(format!("could not read the body: {e}"))
                }
            })?;
        let spec: SubmitRequest = serde_json::from_slice(&bytes).map_err(|e| {
            if e.is_data() {
                ApiError::invalid(e.to_string())
            } else {
                ApiError::bad_request(e.to_string())
            }
        })?;
        (spec, Vec::new())
    } else {
        return Err(ApiError::unsupported_media_type(
            "send the job as application/json, or as multipart/form-data with a `spec` part",
        ));
    };
    if submit.webhook.is_some() && state.config.webhook_secret.is_none() {
        return Err(ApiError::invalid(
            "this server has no webhook_secret configured, so it cannot sign webhooks; submit without `webhook` or configure one",
        ));
    }
    if let Some(w) = &submit.webhook {
        crate::webhooks::check_url(w, state.config.webhook_allow_private)
            .map_err(ApiError::invalid)?;
    }
    let mut spec = submit.into_spec();
    // Check the spec before storing any file, so a bad job stores nothing.
    spec.validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    for (name, bytes) in files {
        comfyfleet_core::inputs::check_input_name(&name)
            .map_err(|e| ApiError::invalid(format!("file part {name:?}: {e}")))?;
        let up = state.engine.put_input(&name, bytes).await?;
        spec.uploads.retain(|u| u.name != up.name);
        spec.uploads.push(up);
    }
    let enq = state
        .engine
        .submit_job(comfyfleet_core::NewJob::new(spec))
        .await?;
    let job_state = if enq.created {
        JobState::Pending
    } else {
        state
            .engine
            .get(enq.id)
            .await?
            .map(|j| j.state)
            .unwrap_or(JobState::Pending)
    };
    let status = if enq.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut r = (
        status,
        Json(SubmitResponse {
            id: enq.id,
            created: enq.created,
            state: job_state,
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", enq.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

fn parse_states(s: &str) -> Result<Vec<JobState>, ApiError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            JobState::ALL
                .into_iter()
                .find(|st| st.as_str() == p)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown state {p:?}; one of {}",
                        JobState::ALL.map(|s| s.as_str()).join(", ")
                    ))
                })
        })
        .collect()
}

fn millis(field: &str, v: Option<u64>) -> Result<Option<Timestamp>, ApiError> {
    v.map(|ms| {
        i64::try_from(ms)
            .map(Timestamp::from_millis)
            .map_err(|_| ApiError::bad_request(format!("{field} is out of range")))
    })
    .transpose()
}

/// List jobs, newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses(
        (status = 200, body = JobPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
async fn list_jobs(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<JobPage>, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let label = match q.label.as_deref() {
        None => None,
        Some(l) => {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| ApiError::bad_request("label must be key=value"))?;
            Some((k.to_owned(), v.to_owned()))
        }
    };
    let filter = JobFilter {
        states: q
            .state
            .as_deref()
            .map(parse_states)
            .transpose()?
            .unwrap_or_default(),
        backend: q.backend.map(comfyfleet_core::BackendId::new),
        label,
        created_after: millis("created_after", q.created_after)?,
        created_before: millis("created_before", q.created_before)?,
        error_contains: q.error,
        before: q.before,
        limit,
    };
    Ok(Json(state.engine.store().list(&filter).await?))
}

/// Counts of jobs by state.
#[utoipa::path(
    get, path = "/v1/jobs/counts", tag = "jobs",
    responses((status = 200, body = CountsResponse), (status = 401, body = ErrorBody))
)]
async fn job_counts(State(state): State<AppState>) -> Result<Json<CountsResponse>, ApiError> {
    let c = state.engine.store().counts().await?;
    Ok(Json(CountsResponse {
        counts: JobState::ALL.into_iter().map(|s| (s, c.get(s))).collect(),
        total: c.total(),
    }))
}

async fn job_or_404(state: &AppState, id: JobId) -> Result<JobRecord, ApiError> {
    state
        .engine
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

/// One job: state, progress, attempts with per-node timings, artifacts, error.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = JobId, Path, description = "Job id")),
    responses(
        (status = 200, body = JobRecord),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<JobId>,
) -> Result<Json<JobRecord>, ApiError> {
    Ok(Json(job_or_404(&state, id).await?))
}

/// Cancel a job; `?force=true` also stops a running execution.
///
/// Without `force`, a pending or waiting job is cancelled and a running one is left alone
/// (`409`). With `force`, a running execution is stopped by the cancel ladder and the job ends
/// `cancelled` (unless it completes first).
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = JobId, Path, description = "Job id"), CancelQuery),
    responses(
        (status = 200, body = CancelResponse),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already terminal, or running without `force`", body = ErrorBody),
    )
)]
async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<JobId>,
    Query(q): Query<CancelQuery>,
) -> Result<Json<CancelResponse>, ApiError> {
    let outcome = if q.force {
        state.engine.force_cancel(id).await?
    } else {
        state.engine.cancel(id).await?
    };
    match outcome {
        CancelOutcome::AlreadyTerminal(s) => Err(ApiError::conflict(format!(
            "job {id} already ended: {}",
            s.as_str()
        ))
        .with_details(serde_json::json!({"state": s}))),
        CancelOutcome::Running => Err(ApiError::conflict(format!(
            "job {id} is running; cancel with ?force=true to stop the execution"
        ))
        .with_details(serde_json::json!({"state": "running"}))),
        outcome => Ok(Json(CancelResponse { id, outcome })),
    }
}

/// Cancel many jobs; one result per id, in order.
#[utoipa::path(
    post, path = "/v1/jobs/cancel", tag = "jobs",
    request_body = BatchCancelRequest,
    responses(
        (status = 200, body = BatchCancelResponse),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
async fn cancel_jobs(
    State(state): State<AppState>,
    Json(req): Json<BatchCancelRequest>,
) -> Result<Json<BatchCancelResponse>, ApiError> {
    if req.ids.len() > 1000 {
        return Err(ApiError::invalid("at most 1000 ids per batch"));
    }
    let results = state
        .engine
        .cancel_many(&req.ids, req.force)
        .await
        .into_iter()
        .map(|(id, r)| {
            let (result, message) = match r {
                Ok(CancelOutcome::Cancelled) => (BatchCancelResult::Cancelled, None),
                Ok(CancelOutcome::CancelRequested) => (BatchCancelResult::CancelRequested, None),
                Ok(CancelOutcome::AlreadyRequested) => (BatchCancelResult::AlreadyRequested, None),
                Ok(CancelOutcome::Running) => (
                    BatchCancelResult::Running,
                    Some("running; use force to stop it".to_owned()),
                ),
                Ok(CancelOutcome::AlreadyTerminal(s)) => (
                    BatchCancelResult::AlreadyTerminal,
                    Some(s.as_str().to_owned()),
                ),
                Err(EngineError::NotFound(_)) => (BatchCancelResult::NotFound, None),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "batch cancel failed for one job");
                    (
                        BatchCancelResult::Error,
                        Some("store error; retry".to_owned()),
                    )
                }
            };
            BatchCancelItem {
                id,
                result,
                message,
            }
        })
        .collect();
    Ok(Json(BatchCancelResponse { results }))
}

/// A job's stored events, oldest first.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "events",
    params(("id" = JobId, Path, description = "Job id"), EventsQuery),
    responses(
        (status = 200, body = Vec<Event>),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<JobId>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = q.limit.unwrap_or(1000);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    job_or_404(&state, id).await?;
    Ok(Json(
        state
            .engine
            .store()
            .events(&EventQuery {
                job: Some(id),
                after: q.after,
                limit,
            })
            .await?,
    ))
}

/// Download an output (`artifacts[index]` of the job), streamed from its backend.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/outputs/{index}", tag = "jobs",
    params(("id" = JobId, Path, description = "Job id"), ("index" = usize, Path, description = "Index into the job's artifacts")),
    responses(
        (status = 200, description = "The file, with its content type", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The backend holding it did not answer", body = ErrorBody),
    )
)]
async fn job_output(
    State(state): State<AppState>,
    Path((id, index)): Path<(JobId, usize)>,
) -> Result<Response, ApiError> {
    let job = job_or_404(&state, id).await?;
    let artifact = job.artifacts.get(index).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "job {id} has {} output(s); no index {index}",
            job.artifacts.len()
        ))
    })?;
    let stream = state
        .engine
        .fetch_artifact(&artifact)
        .await
        .map_err(|e| match e {
            EngineError::Backend(comfyfleet_core::BackendError::NotFound(what)) => {
                ApiError::not_found(format!("the backend no longer has it: {what}"))
            }
            e => e.into(),
        })?;
    let content_type = artifact.content_type.clone().unwrap_or_else(|| {
        comfyfleet_core::content_type_for(&artifact.filename)
            .unwrap_or("application/octet-stream")
            .to_owned()
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    let safe_name: String = artifact
        .filename
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{safe_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(size) = artifact.size {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    let body = Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other)));
    Ok((headers, body).into_response())
}

/// Store input files for jobs to use (multipart; each file part's file name is the input name).
#[utoipa::path(
    post, path = "/v1/inputs", tag = "jobs",
    request_body(content = String, content_type = "multipart/form-data", description = "One or more file parts"),
    responses(
        (status = 200, body = Vec<Upload>),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
async fn upload_inputs(
    State(state): State<AppState>,
    req: Request,
) -> Result<Json<Vec<Upload>>, ApiError> {
    let mut mp = Multipart::from_request(req, &state).await?;
    let mut files = Vec::new();
    while let Some(field) = mp.next_field().await? {
        let Some(name) = field.file_name().map(str::to_owned) else {
            return Err(ApiError::bad_request(
                "every part must be a file (with a file name)",
            ));
        };
        comfyfleet_core::inputs::check_input_name(&name)
            .map_err(|e| ApiError::invalid(format!("file part {name:?}: {e}")))?;
        files.push((name, field.bytes().await?));
    }
    if files.is_empty() {
        return Err(ApiError::bad_request("no file parts"));
    }
    let mut out = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        out.push(state.engine.put_input(&name, bytes).await?);
    }
    Ok(Json(out))
}

// ---------------------------------------------------------------------------------------------
// Live events

/// The resume point: the later of `?after=` and `Last-Event-ID` (a browser's `EventSource`
/// reconnects to the same URL, `?after=` included, with the header saying how far it got).
fn last_event_id(headers: &HeaderMap, after: Option<u64>) -> Result<Option<u64>, ApiError> {
    let header = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Last-Event-ID must be an event id (integer)")
                })?,
        ),
    };
    Ok(after.max(header))
}

fn sse_event(item: Item) -> Result<SseEvent, Infallible> {
    Ok(match item {
        Item::Job(p) => SseEvent::default()
            .id(p.event.id.to_string())
            .event("job")
            .data(&p.json),
        Item::Fleet(f) => SseEvent::default()
            .event("fleet")
            .json_data(&*f)
            .unwrap_or_else(|_| SseEvent::default().comment("unserializable event")),
        Item::Lagged(n) => SseEvent::default().event("lagged").data(format!(
            "{{\"missed\":{n},\"message\":\"fell behind; replaying from the store\"}}"
        )),
    })
}

fn sse(state: &AppState, sel: Selector) -> Response {
    let stream = client_stream(
        state.engine.store().clone(),
        state.hub.clone(),
        sel,
        state.stop.child_token(),
    )
    .map(sse_event);
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    // Tell reverse proxies not to buffer the stream.
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// All events, live (SSE): job events with ids (`event: job`), fleet events (`event: fleet`),
/// and `event: lagged` when the client fell behind (the gap is replayed). Resume with
/// `Last-Event-ID` or `?after=`.
#[utoipa::path(
    get, path = "/v1/events", tag = "events", params(StreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "`text/event-stream`", content_type = "text/event-stream", body = String),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
async fn events_sse(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers, q.after)?;
    Ok(sse(&state, Selector { job: None, after }))
}

/// One job's events, live (SSE), from its first event (or after `Last-Event-ID` / `?after=`);
/// the stream ends after the job's terminal event.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events/stream", tag = "events",
    params(("id" = JobId, Path, description = "Job id"), StreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "`text/event-stream`", content_type = "text/event-stream", body = String),
        (status = 204, description = "Resumed after the job's terminal event: nothing more will come"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn job_events_sse(
    State(state): State<AppState>,
    Path(id): Path<JobId>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers, q.after)?;
    let job = job_or_404(&state, id).await?;
    if job.state.is_terminal()
        && let Some(a) = after
        && state
            .engine
            .store()
            .events(&EventQuery {
                job: Some(id),
                after: Some(a),
                limit: 1,
            })
            .await?
            .is_empty()
    {
        // Nothing more will come: 204 tells an EventSource to stop reconnecting.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(sse(
        &state,
        Selector {
            job: Some(id),
            after,
        },
    ))
}

fn ws_rejection(r: WebSocketUpgradeRejection) -> ApiError {
    ApiError::bad_request(format!(
        "this route speaks WebSocket only: {}",
        r.body_text()
    ))
}

/// How long a WebSocket send may wait for a slow client before it is closed.
const WS_SEND_TIMEOUT: Duration = Duration::from_secs(10);

fn ws_response(
    state: &AppState,
    ws: WebSocketUpgrade,
    headers: &HeaderMap,
    sel: Selector,
) -> Response {
    // Browsers cannot set Authorization on WebSockets: they offer `comfyfleet` and
    // `bearer.<token>` as subprotocols (the token is checked by the auth layer); the server
    // selects `comfyfleet`, so the token is never sent back.
    let _ = headers;
    let store = state.engine.store().clone();
    let hub = state.hub.clone();
    let stop = state.stop.child_token();
    ws.protocols(["comfyfleet"])
        .max_message_size(64 << 10)
        .on_upgrade(move |socket| ws_session(socket, store, hub, sel, stop))
}

async fn ws_session(
    socket: WebSocket,
    store: std::sync::Arc<dyn comfyfleet_core::TaskStore>,
    hub: std::sync::Arc<crate::events::Hub>,
    sel: Selector,
    stop: tokio_util::sync::CancellationToken,
) {
    let (mut tx, mut rx) = socket.split();
    let mut last: u64 = sel.after.unwrap_or_else(|| hub.published());
    let events = client_stream(store, hub, sel, stop.clone());
    tokio::pin!(events);
    let mut terminal = false;
    loop {
        tokio::select! {
            // The client's messages: only Close matters (pings are answered by axum).
            m = rx.next() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            item = events.next() => {
                let Some(item) = item else {
                    // Why the stream ended: the job's end (1000), the server stopping (1001), or
                    // the store failing (1011: reconnect later with ?after=).
                    let (code, reason) = if terminal {
                        (1000, "done".to_owned())
                    } else if stop.is_cancelled() {
                        (1001, "server shutting down".to_owned())
                    } else {
                        (1011, format!("store unavailable: reconnect with ?after={last}"))
                    };
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))),
                    )
                    .await;
                    return;
                };
                let text = match &item {
                    Item::Job(p) => {
                        last = p.event.id;
                        terminal = p.event.kind.terminal_state().is_some();
                        format!("{{\"stream\":\"job\",\"event\":{}}}", p.json)
                    }
                    Item::Fleet(f) => serde_json::json!({"stream": "fleet", "event": &**f}).to_string(),
                    Item::Lagged(n) => serde_json::json!({"stream": "lagged", "missed": n}).to_string(),
                };
                match tokio::time::timeout(WS_SEND_TIMEOUT, tx.send(Message::Text(text.into()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let reason = format!("lagged: reconnect with ?after={last}");
                        tracing::info!(%reason, "closing a WebSocket client that stopped reading");
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            tx.send(Message::Close(Some(CloseFrame { code: 1008, reason: reason.into() }))),
                        )
                        .await;
                        return;
                    }
                }
            }
        }
    }
}

/// All events, live, as WebSocket text messages `{"stream":"job"|"fleet"|"lagged", ...}`.
#[utoipa::path(
    get, path = "/v1/events/ws", tag = "events", params(StreamQuery),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
async fn events_ws(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(ws_rejection)?;
    Ok(ws_response(
        &state,
        ws,
        &headers,
        Selector {
            job: None,
            after: q.after,
        },
    ))
}

/// One job's events as WebSocket messages; closed (1000) after the terminal event.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events/ws", tag = "events",
    params(("id" = JobId, Path, description = "Job id"), StreamQuery),
    responses(
        (status = 101, description = "Switching to WebSocket"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn job_events_ws(
    State(state): State<AppState>,
    Path(id): Path<JobId>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(ws_rejection)?;
    job_or_404(&state, id).await?;
    Ok(ws_response(
        &state,
        ws,
        &headers,
        Selector {
            job: Some(id),
            after: q.after,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Backends

fn backend_view(state: &AppState, id: &str) -> Result<BackendView, ApiError> {
    state
        .engine
        .backends()
        .into_iter()
        .find(|b| b.id.as_str() == id)
        .map(BackendView::from)
        .ok_or_else(|| ApiError::not_found(format!("backend {id} not found")))
}

/// The backends: health, capacity, in flight, availability, blocks.
#[utoipa::path(
    get, path = "/v1/backends", tag = "backends",
    responses((status = 200, body = Vec<BackendView>), (status = 401, body = ErrorBody))
)]
async fn list_backends(State(state): State<AppState>) -> Json<Vec<BackendView>> {
    Json(
        state
            .engine
            .backends()
            .into_iter()
            .map(BackendView::from)
            .collect(),
    )
}

/// One backend.
#[utoipa::path(
    get, path = "/v1/backends/{id}", tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    Ok(Json(backend_view(&state, &id)?))
}

fn set_availability(
    state: &AppState,
    id: &str,
    drain: bool,
) -> Result<Json<BackendView>, ApiError> {
    let backend = comfyfleet_core::BackendId::new(id);
    if drain {
        state.engine.drain(&backend)?;
    } else {
        state.engine.enable(&backend)?;
    }
    Ok(Json(backend_view(state, id)?))
}

/// Stop sending new work to a backend; running executions finish.
#[utoipa::path(
    post, path = "/v1/backends/{id}/drain", tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn drain_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    set_availability(&state, &id, true)
}

/// Send work to a drained or quarantined backend again.
#[utoipa::path(
    post, path = "/v1/backends/{id}/enable", tag = "backends",
    params(("id" = String, Path, description = "Backend id")),
    responses((status = 200, body = BackendView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn enable_backend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    set_availability(&state, &id, false)
}

// ---------------------------------------------------------------------------------------------
// Maintenance

async fn take_backup(state: &AppState) -> Result<String, ApiError> {
    let dir = state.config.backup_dir.as_ref().ok_or_else(|| {
        ApiError::conflict("this server has no backup_dir configured (the store may have no files)")
    })?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    let now = now();
    let dest = dir.join(format!(
        "comfyfleet-{}-{}.db",
        now.as_millis(),
        fastrand_suffix()
    ));
    state
        .engine
        .store()
        .backup(&dest)
        .await
        .map_err(|e| match e {
            comfyfleet_core::StoreError::NotSupported(_) => {
                ApiError::conflict("this store cannot be backed up by the service")
            }
            e => e.into(),
        })?;
    Ok(dest.display().to_string())
}

fn now() -> Timestamp {
    use comfyfleet_core::Clock;
    comfyfleet_core::SystemClock.now()
}

fn fastrand_suffix() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{n:08x}")
}

/// Run the reaper: requeue jobs of dead orchestrators, fail or cancel stuck ones. `dry_run`
/// (default `true`) only reports. A real run backs up the store first when a backup directory
/// is configured.
#[utoipa::path(
    post, path = "/v1/maintenance/reap", tag = "maintenance",
    request_body = ReapRequest,
    responses(
        (status = 200, body = ReapReport),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
async fn reap(
    State(state): State<AppState>,
    Json(req): Json<ReapRequest>,
) -> Result<Json<ReapReport>, ApiError> {
    let stuck_after = match req.stuck_after_secs {
        None => None,
        Some(s) if s >= 1.0 && Duration::try_from_secs_f64(s).is_ok() => {
            Duration::try_from_secs_f64(s).ok()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stuck_after_secs must be a number of seconds, at least 1",
            ));
        }
    };
    if !req.dry_run && state.config.backup_dir.is_some() {
        // Best effort: a store without files (memory) is reaped without one.
        match take_backup(&state).await {
            Ok(path) => tracing::info!(%path, "backup taken before reaping"),
            Err(e) if e.status() == StatusCode::CONFLICT => {
                tracing::info!("store cannot be backed up; reaping without a backup");
            }
            Err(e) => return Err(e),
        }
    }
    let report = state
        .engine
        .reap(&ReapOptions {
            dry_run: req.dry_run,
            stuck_after,
            max_crash_requeues: state.engine.config().max_crash_requeues,
        })
        .await?;
    Ok(Json(report))
}

/// Write a consistent copy of the store to the backup directory.
#[utoipa::path(
    post, path = "/v1/maintenance/backup", tag = "maintenance",
    request_body = BackupRequest,
    responses(
        (status = 200, body = BackupResponse),
        (status = 401, body = ErrorBody),
        (status = 409, description = "No backup directory, or the store has no files", body = ErrorBody),
    )
)]
async fn backup(
    State(state): State<AppState>,
    Json(_request): Json<BackupRequest>,
) -> Result<Json<BackupResponse>, ApiError> {
    Ok(Json(BackupResponse {
        path: take_backup(&state).await?,
    }))
}

/// Delete jobs that finished long ago (backs up first unless `no_backup`).
#[utoipa::path(
    post, path = "/v1/maintenance/prune", tag = "maintenance",
    request_body = PruneRequest,
    responses(
        (status = 200, body = PruneResponse),
        (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
async fn prune(
    State(state): State<AppState>,
    Json(req): Json<PruneRequest>,
) -> Result<Json<PruneResponse>, ApiError> {
    if req.older_than_secs < 60 {
        return Err(ApiError::invalid("older_than_secs must be at least 60"));
    }
    let backup = if req.no_backup {
        None
    } else {
        Some(take_backup(&state).await?)
    };
    let cutoff = now() - Duration::from_secs(req.older_than_secs);
    let pruned = state.engine.store().prune(cutoff).await?;
    Ok(Json(PruneResponse { pruned, backup }))
}

// ---------------------------------------------------------------------------------------------
// System

/// Liveness: the process answers.
#[utoipa::path(
    get, path = "/healthz", tag = "system", security(()),
    responses((status = 200, body = StatusResponse))
)]
async fn healthz() -> Json<StatusResponse> {
    Json(StatusResponse {
        status: "ok",
        reason: None,
        backends_healthy: None,
        backends_total: None,
    })
}

/// Readiness: the store answers (and how many backends are healthy).
#[utoipa::path(
    get, path = "/readyz", tag = "system", security(()),
    responses((status = 200, body = StatusResponse), (status = 503, body = StatusResponse))
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let backends = state.engine.backends();
    let healthy = backends.iter().filter(|b| b.health.healthy).count();
    let store = tokio::time::timeout(Duration::from_secs(5), state.engine.store().counts()).await;
    let (status, reason) = match store {
        Ok(Ok(_)) => ("ready", None),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store failed");
            (
                "not_ready",
                Some("the store failed; see the server log".to_owned()),
            )
        }
        Err(_) => (
            "not_ready",
            Some("store did not answer within 5s".to_owned()),
        ),
    };
    let code = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(StatusResponse {
            status,
            reason,
            backends_healthy: Some(healthy),
            backends_total: Some(backends.len()),
        }),
    )
        .into_response()
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, body = ErrorBody),
    )
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .render(&state.engine, state.hub.subscribers().saturating_sub(0))
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This document.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "system",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object), (status = 401, body = ErrorBody))
)]
async fn openapi_json() -> Response {
    match openapi().to_json() {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

//! The install routes: custom-node installs on the fleet's SSH instances through
//! [`SshInstaller`], and their live events.
//!
//! Records leave the server only as [`InstallView`]s (URLs redacted); stored events already
//! carry redacted URLs. A server started without an installer answers as for a fleet without
//! SSH instances: starting an install is refused as for an unknown instance, lists are empty,
//! ids are unknown. The job routes and their event hub live in `routes.rs` and `events.rs`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use comfyfleet::SshInstaller;
use comfyfleet_core::InstallId;
use comfyfleet_core::install::{
    InstallEvent, InstallEventKind, InstallFilter, InstallSpec, InstallState,
};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::api::*;
use crate::error::{ApiError, ErrorBody, Json, Path, Query};

/// Page size for store reads.
const PAGE: usize = 500;

/// How often an idle stream re-reads the store as a backstop.
const RECHECK: Duration = Duration::from_secs(15);

fn installer(state: &AppState) -> Option<&SshInstaller> {
    state.installer.as_ref()
}

async fn record_or_404(
    state: &AppState,
    id: InstallId,
) -> Result<(SshInstaller, comfyfleet_core::install::InstallRecord), ApiError> {
    let inst = installer(state)
        .ok_or_else(|| ApiError::not_found(format!("install {id} not found")))?
        .clone();
    let record = inst.get(id).await?;
    Ok((inst, record))
}

fn parse_install_states(s: &str) -> Result<Vec<InstallState>, ApiError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            InstallState::parse(p).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown state {p:?}; one of {}",
                    InstallState::ALL.map(InstallState::as_str).join(", ")
                ))
            })
        })
        .collect()
}

/// Start installing custom-node packs (and model files) on an SSH instance.
///
/// The spec is validated (names, URLs, refs; nothing reaches the instance as shell text) and
/// stored; the install then runs in the background. Follow it with
/// `GET /v1/installs/{id}/events`. An instance runs one install at a time.
#[utoipa::path(
    post, path = "/v1/installs", tag = "installs",
    request_body = InstallSpec,
    responses(
        (status = 202, description = "Stored and started", body = InstallView,
            headers(("Location" = String, description = "/v1/installs/{id}"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "The instance already has an active install (`details.install` names it)", body = ErrorBody),
        (status = 422, description = "Invalid spec, unknown registry pack or unknown instance (`details.field` names the field)", body = ErrorBody),
    )
)]
pub(crate) async fn create_install(
    State(state): State<AppState>,
    Json(spec): Json<InstallSpec>,
) -> Result<Response, ApiError> {
    let Some(inst) = installer(&state) else {
        // Same answers as an installer that does not know the instance: a bad field first.
        spec.validate()
            .map_err(|e| ApiError::from(comfyfleet::InstallError::InvalidSpec(e)))?;
        return Err(ApiError::from(comfyfleet::InstallError::UnknownInstance(
            spec.instance,
        )));
    };
    let record = inst.start(spec).await?;
    let mut r = (StatusCode::ACCEPTED, Json(InstallView::of(&record))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/installs/{}", record.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// List installs, newest first.
#[utoipa::path(
    get, path = "/v1/installs", tag = "installs", params(InstallListQuery),
    responses(
        (status = 200, body = InstallList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
pub(crate) async fn list_installs(
    State(state): State<AppState>,
    Query(q): Query<InstallListQuery>,
) -> Result<Json<InstallList>, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let filter = InstallFilter {
        instance: q.instance,
        states: q
            .state
            .as_deref()
            .map(parse_install_states)
            .transpose()?
            .unwrap_or_default(),
        before: q.before,
        limit: limit as usize,
    };
    let installs = match installer(&state) {
        Some(inst) => inst
            .list(&filter)
            .await?
            .iter()
            .map(InstallView::of)
            .collect(),
        None => Vec::new(),
    };
    Ok(Json(InstallList { installs }))
}

/// One install: state, phase, per-pack progress, models, log tail, and counts.
#[utoipa::path(
    get, path = "/v1/installs/{id}", tag = "installs",
    params(("id" = InstallId, Path, description = "Install id")),
    responses(
        (status = 200, body = InstallView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn get_install(
    State(state): State<AppState>,
    Path(id): Path<InstallId>,
) -> Result<Json<InstallView>, ApiError> {
    let (_, record) = record_or_404(&state, id).await?;
    Ok(Json(InstallView::of(&record)))
}

/// Cancel an install: the remote command's process group is killed and unfinished packs end
/// `cancelled`. Answers with the final record.
#[utoipa::path(
    post, path = "/v1/installs/{id}/cancel", tag = "installs",
    params(("id" = InstallId, Path, description = "Install id")),
    responses(
        (status = 200, body = InstallView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already finished (`details.state`)", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_install(
    State(state): State<AppState>,
    Path(id): Path<InstallId>,
) -> Result<Json<InstallView>, ApiError> {
    let inst =
        installer(&state).ok_or_else(|| ApiError::not_found(format!("install {id} not found")))?;
    let record = inst.cancel(id).await?;
    Ok(Json(InstallView::of(&record)))
}

/// What an instance has: the packs recorded as installed and verified there.
#[utoipa::path(
    get, path = "/v1/instances/{name}/packs", tag = "installs",
    params(("name" = String, Path, description = "Instance (SSH backend) name")),
    responses(
        (status = 200, body = InstancePacks),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn instance_packs(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<InstancePacks>, ApiError> {
    let inst = installer(&state)
        .filter(|i| i.instances().contains(&name))
        .ok_or_else(|| ApiError::not_found(format!("instance {name} not found")))?;
    Ok(Json(InstancePacks {
        packs: inst.inventory(&name).await?,
    }))
}

/// The resume point: the later of `?after=` and `Last-Event-ID`.
fn resume_point(headers: &HeaderMap, after: Option<u64>) -> Result<Option<u64>, ApiError> {
    let header = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Last-Event-ID must be an event seq (integer)")
                })?,
        ),
    };
    Ok(after.max(header))
}

/// Whether the client asked for the JSON page rather than the stream.
fn wants_json(headers: &HeaderMap, format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        Some("json") => return Ok(true),
        Some("sse") => return Ok(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format must be json or sse, not {other:?}"
            )));
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(accept.contains("application/json") && !accept.contains("text/event-stream"))
}

/// An install's events: live as Server-Sent Events (default), or one page of stored events as
/// JSON (`?format=json` or `Accept: application/json`).
///
/// The stream replays the stored events after `Last-Event-ID` / `?after=` (all of them
/// without), then follows live ones; each is `event: install` with `id:` its `seq` and the
/// `InstallEvent` JSON as data. It ends after the `finished` event. `event: lagged` says the
/// client fell behind (the gap is replayed from the store). Resuming after the `finished` event
/// answers 204, so an `EventSource` stops reconnecting.
#[utoipa::path(
    get, path = "/v1/installs/{id}/events", tag = "installs",
    params(("id" = InstallId, Path, description = "Install id"), InstallEventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this seq")),
    responses(
        (status = 200, description = "`text/event-stream`, or the JSON page",
            content((String = "text/event-stream"), (InstallEventPage = "application/json"))),
        (status = 204, description = "Resumed after the `finished` event: nothing more will come"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub(crate) async fn install_events(
    State(state): State<AppState>,
    Path(id): Path<InstallId>,
    headers: HeaderMap,
    Query(q): Query<InstallEventsQuery>,
) -> Result<Response, ApiError> {
    let after = resume_point(&headers, q.after)?;
    let json = wants_json(&headers, q.format.as_deref())?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let (inst, record) = record_or_404(&state, id).await?;
    if json {
        let events = inst.events(id, after.unwrap_or(0), limit as usize).await?;
        return Ok(Json(InstallEventPage { events }).into_response());
    }
    if record.state.is_terminal()
        && let Some(a) = after
        && inst.events(id, a, 1).await?.is_empty()
    {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let stream =
        install_stream(inst, id, after.unwrap_or(0), state.stop.child_token()).map(sse_event);
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// What an install stream carries.
#[derive(Debug)]
enum Item {
    Event(Box<InstallEvent>),
    Lagged(u64),
}

fn sse_event(item: Item) -> Result<SseEvent, Infallible> {
    Ok(match item {
        Item::Event(e) => SseEvent::default()
            .id(e.seq.to_string())
            .event("install")
            .json_data(&*e)
            .unwrap_or_else(|_| SseEvent::default().comment("unserializable event")),
        Item::Lagged(n) => SseEvent::default().event("lagged").data(format!(
            "{{\"missed\":{n},\"message\":\"fell behind; replaying from the store\"}}"
        )),
    })
}

fn is_finished(e: &InstallEvent) -> bool {
    matches!(e.kind, InstallEventKind::Finished { .. })
}

/// One install's events after `after`: replay from the store, then live, ending after the
/// `finished` event. Subscribes before the first read, so nothing falls between the replay and
/// the live events; live events are forwarded only when they continue the sequence (`seq` =
/// last + 1) — a gap (or a lag) is filled from the store, where every event is written before
/// it is published.
fn install_stream(
    installer: SshInstaller,
    id: InstallId,
    after: u64,
    stop: CancellationToken,
) -> impl Stream<Item = Item> + Send + 'static {
    async_stream::stream! {
        let mut rx = installer.subscribe();
        let mut cursor = after;
        let mut replay = true;
        let mut final_pass = false;
        loop {
            if replay {
                replay = false;
                loop {
                    let page = tokio::select! {
                        _ = stop.cancelled() => return,
                        p = installer.events(id, cursor, PAGE) => p,
                    };
                    let page = match page {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(install = %id, error = %e, "install event stream: store read failed; ending the stream");
                            return;
                        }
                    };
                    let n = page.len();
                    for e in page {
                        cursor = cursor.max(e.seq);
                        let finished = is_finished(&e);
                        yield Item::Event(Box::new(e));
                        if finished {
                            return;
                        }
                    }
                    if n < PAGE {
                        break;
                    }
                }
                // Finished without us seeing the event (resumed past it, or written between
                // the reads): one more pass picks up anything left, then the stream is over.
                match installer.get(id).await {
                    Ok(r) if r.state.is_terminal() => {
                        if final_pass {
                            return;
                        }
                        final_pass = true;
                        replay = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => r,
                _ = tokio::time::sleep(RECHECK) => {
                    replay = true;
                    continue;
                }
            };
            match next {
                Ok(e) if e.install != id || e.seq <= cursor => {}
                Ok(e) if cursor.checked_add(1) == Some(e.seq) => {
                    cursor = e.seq;
                    let finished = is_finished(&e);
                    yield Item::Event(Box::new(e));
                    if finished {
                        return;
                    }
                }
                // A gap: the missing events are in the store.
                Ok(_) => replay = true,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    yield Item::Lagged(n);
                    replay = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

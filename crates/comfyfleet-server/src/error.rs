//! [`ApiError`]: every error the API answers with, as `{code, message, details}` JSON and the
//! right status. Extractor rejections are mapped here too, so a malformed body or query string
//! is a 4xx with the same JSON shape, never axum's plain-text default.

use axum::extract::multipart::MultipartError;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use comfyfleet::engine::EngineError;
use comfyfleet_core::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// The JSON body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `conflict`, `payload_too_large`, `unsupported_media_type`,
    /// `invalid`, `internal`, `unavailable`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// More structure where there is some (e.g. the job's current state).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                code,
                message: message.into(),
                details: None,
            },
        }
    }

    /// 400: malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: missing or wrong token.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token>)",
        )
    }

    /// 403: refused whoever you are (e.g. a cross-site request).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    /// 409: the request is valid but the resource's state forbids it.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 415.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 422: well-formed but invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    /// 500. The message is logged; the client gets a generic one (no internals leak).
    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(error = %message, "internal error answering a request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.body.details = Some(details);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::not_found(format!("job {id} not found")),
            StoreError::InstallNotFound(id) => {
                ApiError::not_found(format!("install {id} not found"))
            }
            StoreError::InvalidInput(m) => ApiError::invalid(m),
            e @ StoreError::InvalidTransition { .. } => ApiError::conflict(e.to_string()),
            e @ StoreError::NotSupported(_) => ApiError::conflict(e.to_string()),
            StoreError::Conflict(m) => ApiError::conflict(m),
            e @ (StoreError::Unusable(_) | StoreError::Backend(_)) => {
                tracing::error!(error = %e, "store error answering a request");
                ApiError::unavailable("the store is unavailable; see the server log")
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidSpec(e) => ApiError::invalid(e.to_string()),
            EngineError::NotFound(id) => ApiError::not_found(format!("job {id} not found")),
            EngineError::UnknownBackend(id) => {
                ApiError::not_found(format!("backend {id} not found"))
            }
            EngineError::Store(e) => e.into(),
            EngineError::Backend(e) => ApiError::unavailable(format!("backend call failed: {e}")),
            e => ApiError::internal(e),
        }
    }
}

impl From<comfyfleet::InstallError> for ApiError {
    fn from(e: comfyfleet::InstallError) -> Self {
        use comfyfleet::InstallError as E;
        use comfyfleet_core::install::InstallSpecError;
        match e {
            E::InvalidSpec(spec) => {
                let field = match &spec {
                    InstallSpecError::Invalid { field, .. } => Some(field.clone()),
                    _ => None,
                };
                let err = ApiError::invalid(spec.to_string());
                match field {
                    Some(f) => err.with_details(serde_json::json!({ "field": f })),
                    None => err,
                }
            }
            e @ E::UnknownPack { index, .. } => ApiError::invalid(e.to_string())
                .with_details(serde_json::json!({ "field": format!("nodes[{index}].name") })),
            e @ E::UnknownInstance(_) => ApiError::invalid(e.to_string())
                .with_details(serde_json::json!({ "field": "instance" })),
            E::Conflict(message) => {
                // The stores name the active install last ("…: <id>").
                let active = message
                    .rsplit([' ', ':'])
                    .next()
                    .and_then(|s| s.parse::<comfyfleet_core::InstallId>().ok());
                let err = ApiError::conflict(message);
                match active {
                    Some(id) => err.with_details(serde_json::json!({ "install": id })),
                    None => err,
                }
            }
            E::NotFound(id) => ApiError::not_found(format!("install {id} not found")),
            e @ E::Finished { state, .. } => ApiError::conflict(e.to_string())
                .with_details(serde_json::json!({ "state": state })),
            E::Store(e) => e.into(),
            e => ApiError::internal(e),
        }
    }
}

fn body_rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(text)
    } else {
        ApiError::bad_request(text)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match &r {
            JsonRejection::JsonDataError(_) => ApiError::invalid(r.body_text()),
            JsonRejection::JsonSyntaxError(_) => ApiError::bad_request(r.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::unsupported_media_type(
                "expected a JSON body with `Content-Type: application/json`",
            ),
            _ => body_rejection(r.status(), r.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        body_rejection(r.status(), r.body_text())
    }
}

impl From<MultipartError> for ApiError {
    fn from(e: MultipartError) -> Self {
        body_rejection(e.status(), e.body_text())
    }
}

impl From<axum::extract::multipart::MultipartRejection> for ApiError {
    fn from(r: axum::extract::multipart::MultipartRejection) -> Self {
        let status = r.status();
        if status == StatusCode::BAD_REQUEST {
            ApiError::unsupported_media_type(r.body_text())
        } else {
            body_rejection(status, r.body_text())
        }
    }
}

/// `axum::Json` with [`ApiError`] rejections.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` with [`ApiError`] rejections.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path` with [`ApiError`] rejections.
#[derive(Debug, Clone, Copy, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

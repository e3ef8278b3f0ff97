//! The only module that knows axum: routes, the WebSocket upgrade, static pages, JSON errors.

mod api;
mod pages;
mod serve;
mod ws;

pub use serve::serve;

use crate::app::App;
use crate::limits::{HTTP_BODY_BYTES_MAX, HTTP_TIMEOUT_MS};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Duration;

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/api/guest", post(api::guest))
        .route("/api/me", get(api::me))
        .route("/api/catalog", get(api::catalog))
        .route("/api/streams/{id}", get(api::stream_info))
        .route("/api/streams/{id}/revenue", get(api::revenue))
        .route("/api/streams/{id}/queue", get(api::queue))
        .route("/api/streams/{id}/moderation", get(api::moderation))
        .route("/api/admin/credit", post(api::admin_credit))
        .route("/api/admin/audit", get(api::admin_audit))
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn(body_guard))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(HTTP_TIMEOUT_MS),
        ));
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/", get(pages::viewer))
        .route("/dashboard", get(pages::dashboard))
        .route("/overlay/{stream}", get(pages::overlay))
        .route("/static/{*path}", get(pages::asset))
        .merge(api)
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
        .with_state(app)
}

/// Every API request body is read whole (at most `HTTP_BODY_BYTES_MAX`, else 413) and, before
/// any handler parses it, checked to nest no deeper than `JSON_DEPTH_MAX` (else 400): serde
/// skips unknown fields without serde_json's recursion limit, so depth is bounded here.
async fn body_guard(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, HTTP_BODY_BYTES_MAX).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request bodies are at most {HTTP_BODY_BYTES_MAX} bytes"),
        )
        .into_response();
    };
    if !crate::protocol::json_depth_within(&bytes, crate::limits::JSON_DEPTH_MAX) {
        return ApiError::bad_request(format!(
            "JSON nested deeper than {} levels",
            crate::limits::JSON_DEPTH_MAX
        ))
        .into_response();
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// `{"error":{"code","message"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

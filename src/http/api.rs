//! The HTTP API handlers.

use super::ApiError;
use crate::app::{App, DurabilityStatus};
use crate::auth::{Claims, Role};
use crate::limits::{GUEST_TOKEN_TTL_SECS, ID_CHARS_MAX, NAME_CHARS_MAX, REFERENCE_CHARS_MAX};
use crate::money::AMOUNT_MAX;
use crate::protocol::{clean_text, valid_id, CreditRequest, GuestRequest};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

type ApiResult = Result<Response, ApiError>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Equal in time that does not depend on where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_admin(app: &App, headers: &HeaderMap) -> bool {
    match (&app.config.admin_token, bearer(headers)) {
        (Some(admin), Some(given)) => constant_time_eq(admin.as_bytes(), given.as_bytes()),
        _ => false,
    }
}

fn require_admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    if app.config.admin_token.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the admin API is off (no --admin-token)",
        ));
    }
    if bearer(headers).is_none() {
        return Err(ApiError::unauthorized("admin bearer token required"));
    }
    if !is_admin(app, headers) {
        return Err(ApiError::forbidden("not the admin token"));
    }
    Ok(())
}

fn user(app: &App, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let token = bearer(headers).ok_or_else(|| ApiError::unauthorized("bearer token required"))?;
    app.keys.verify(token).map_err(ApiError::unauthorized)
}

/// The stream's streamer or the admin.
fn require_owner(app: &App, headers: &HeaderMap, stream: &str) -> Result<(), ApiError> {
    if is_admin(app, headers) {
        return Ok(());
    }
    let claims = user(app, headers)?;
    if claims.role == Role::Streamer && *claims.sub == *stream {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only this stream's streamer (or the admin) may see this",
        ))
    }
}

/// A JSON body, or the refusal: 413 `too_large` over `HTTP_BODY_BYTES_MAX`, else 400 `invalid`
/// (not JSON, nested deeper than serde_json's 128 levels, wrong types, numbers out of range).
fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    payload.map(|Json(v)| v).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.body_text())
        } else {
            ApiError::bad_request(e.body_text())
        }
    })
}

fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let tail: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(12)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

pub async fn guest(
    State(app): State<Arc<App>>,
    payload: Result<Json<GuestRequest>, JsonRejection>,
) -> ApiResult {
    if !app.config.guest_signup {
        return Err(ApiError::forbidden("guest sign-up is off on this server"));
    }
    let req = body(payload)?;
    let name = clean_text(&req.name, NAME_CHARS_MAX)
        .ok_or_else(|| {
            ApiError::bad_request(format!("name must be 1-{NAME_CHARS_MAX} characters"))
        })?
        .to_string();
    let role: Role = match req.role.as_deref() {
        None => Role::Viewer,
        Some(r) => r.parse().map_err(ApiError::bad_request)?,
    };
    let user_id = match (role, req.stream.as_deref()) {
        (Role::Streamer, Some("demo")) => "demo".to_string(),
        (Role::Streamer, None) => random_id("s-"),
        (Role::Streamer, Some(_)) => {
            return Err(ApiError::bad_request(
                "a guest streamer may claim only the demo stream, or ask for a new one",
            ))
        }
        (Role::Viewer, _) => random_id("g-"),
    };
    let token = app.keys.mint(&user_id, &name, role, GUEST_TOKEN_TTL_SECS);
    if role == Role::Viewer && app.config.welcome_coins > 0 {
        let reference = format!("welcome:{user_id}");
        app.credit(&user_id, app.config.welcome_coins, &reference)
            .await
            .map_err(|(code, message)| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
            })?;
    }
    let mut out = json!({"token": token, "user_id": user_id, "name": name, "role": role.as_str()});
    if role == Role::Streamer {
        out["stream"] = user_id.clone().into();
    }
    tracing::info!(user = %user_id, role = role.as_str(), "guest signed up");
    Ok((StatusCode::OK, Json(out)).into_response())
}

pub async fn me(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult {
    let c = user(&app, &headers)?;
    let balance = app
        .balance(&c.sub)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    Ok(
        Json(
            json!({"user_id": c.sub, "name": c.name, "role": c.role.as_str(), "balance": balance}),
        )
        .into_response(),
    )
}

pub async fn catalog(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.catalog_json.clone(),
    )
        .into_response()
}

pub async fn stream_info(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult {
    if !valid_id(&id, ID_CHARS_MAX) {
        return Err(ApiError::bad_request("bad stream id"));
    }
    let (live, viewers, seq) = match app.hub.get(&id) {
        Some(r) => (r.is_live(), r.viewers(), r.seq()),
        None => (false, 0, 0),
    };
    Ok(Json(json!({"stream": id, "live": live, "viewers": viewers, "seq": seq, "epoch": app.hub.epoch()})).into_response())
}

pub async fn revenue(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    require_owner(&app, &headers, &id)?;
    if let Some(cluster) = app.cluster.get() {
        let report = cluster.revenue(&id).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
        return Ok(Json(report).into_response());
    }
    Ok(Json(app.ledger.revenue(&id)).into_response())
}

pub async fn queue(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    require_owner(&app, &headers, &id)?;
    if let Some(cluster) = app.cluster.get().filter(|c| !c.owns(&id)) {
        let answer = cluster
            .room_request(&id, crate::cluster::wire::RoomReq::Queue)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            })?;
        if let crate::cluster::wire::RoomResp::Queue(json) = answer {
            let gifts: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
            return Ok(Json(json!({"stream": id, "gifts": gifts})).into_response());
        }
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "unexpected answer from the stream's node",
        ));
    }
    let gifts = app.hub.get(&id).map(|r| r.queued()).unwrap_or_default();
    Ok(Json(json!({"stream": id, "gifts": gifts})).into_response())
}

/// The room's moderation state: moderators, bans, live timeouts, slow mode, blocked words.
pub async fn moderation(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    require_owner(&app, &headers, &id)?;
    let mut out = match app.hub.get(&id) {
        Some(r) => r.moderation().snapshot(crate::now_ms()),
        None => crate::hub::Moderation::default().snapshot(0),
    };
    out["stream"] = id.into();
    Ok(Json(out).into_response())
}

pub async fn admin_credit(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    payload: Result<Json<CreditRequest>, JsonRejection>,
) -> ApiResult {
    require_admin(&app, &headers)?;
    let req = body(payload)?;
    if !valid_id(&req.user_id, ID_CHARS_MAX) {
        return Err(ApiError::bad_request(
            "user_id must be 1-64 of [A-Za-z0-9_-]",
        ));
    }
    if req.coins == 0 || req.coins > AMOUNT_MAX {
        return Err(ApiError::bad_request(format!(
            "coins must be 1..={AMOUNT_MAX}"
        )));
    }
    if clean_text(&req.reference, REFERENCE_CHARS_MAX).is_none()
        || req.reference.trim() != req.reference
    {
        return Err(ApiError::bad_request(format!(
            "reference must be 1-{REFERENCE_CHARS_MAX} characters without surrounding spaces"
        )));
    }
    match app.credit(&req.user_id, req.coins, &req.reference).await {
        Ok(balance) => Ok(Json(json!({"balance": balance})).into_response()),
        Err(("conflict", m)) => Err(ApiError::new(StatusCode::CONFLICT, "conflict", m)),
        Err(("invalid", m)) => Err(ApiError::bad_request(m)),
        Err((code, m)) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, m)),
    }
}

pub async fn admin_audit(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult {
    require_admin(&app, &headers)?;
    if let Some(cluster) = app.cluster.get() {
        let audit = cluster.audit().await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
        return Ok(Json(audit).into_response());
    }
    Ok(Json(app.ledger.audit()).into_response())
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    metrics::gauge!("giftcast_gifts_in_flight")
        .set(app.gifts_in_flight.load(Ordering::Relaxed) as f64);
    // The process's own memory and CPU, the Prometheus process-collector names, so the load
    // harness (and any scraper) reads them without access to the host's /proc.
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| resident_bytes(&s))
    {
        metrics::gauge!("process_resident_memory_bytes").set(rss as f64);
    }
    if let Some(cpu) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_seconds(&s))
    {
        metrics::gauge!("process_cpu_seconds_total").set(cpu);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// Resident set size in bytes from `/proc/self/status` (`VmRSS: N kB`, the same number as
/// `/proc/self/statm`'s resident pages × page size, without needing the page size).
fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of the whole process (all threads) from `/proc/self/stat`: fields 14
/// and 15, in clock ticks of `USER_HZ`, which the Linux ABI fixes at 100.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

pub async fn healthz() -> Response {
    Json(json!({"ok": true})).into_response()
}

pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    if let Some(problem) = app.durability.as_ref().and_then(|d| d.problem()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": problem})),
        )
            .into_response();
    }
    Json(json!({"ready": true})).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_gauges_parse_proc() {
        let status = "Name:\tgiftcast\nVmPeak:\t  100 kB\nVmRSS:\t   27904 kB\nThreads:\t3\n";
        assert_eq!(resident_bytes(status), Some(27904 * 1024));
        let stat = "4242 (gift cast) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 37 0 0 20 0 3 0";
        assert_eq!(cpu_seconds(stat), Some(2.87));
        // The real files of this process parse too.
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(resident_bytes(&s).unwrap() > 0);
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_seconds(&s).is_some());
    }
}

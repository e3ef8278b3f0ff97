//! giftcast: a live-streaming gifting server.
pub mod app;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod http;
pub mod hub;
pub mod ledger;
pub mod limits;
pub mod money;
pub mod protocol;
pub mod record;
pub mod server;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

//! giftcast: a live-streaming gifting server.
//!
//! Layout, each module with one job:
//! - `config`: command line and environment, validated once.
//! - `limits`: every fixed limit, with its reason.
//! - `protocol`: the JSON wire types; the only module that knows the protocol's spelling.
//! - `auth`: HS256 user tokens.
//! - `catalog`: stickers and tiers.
//! - `money`: coins and the exact revenue split.
//! - `record`: the money records (ledger → journal → store).
//! - `ledger`: wallets, idempotency, revenue; synchronous, no I/O.
//! - `journal`: append-only CRC32C frames with group-commit fsync; recovery.
//! - `store`: SQLite or PostgreSQL, the flusher's target.
//! - `flusher`: durable records to storage in batches.
//! - `durable`: recovery at start, the journal as the ledger's sink, health, drain.
//! - `hub`: rooms, members, history, fan-out; never touches money.
//! - `app`: the chat, gift and thanks paths over hub and ledger.
//! - `moderate`: the moderation frames: who may act, each action, its room event.
//! - `daily_cap`: what each viewer spent today, for `--daily-cap`.
//! - `http`: axum routes, the WebSocket connection, pages, errors.
//! - `cluster`: NATS: room owners, mirrors, wallet owners.
//! - `server`: bind, build (with recovery), serve, drain.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod daily_cap;
pub mod durable;
pub mod flusher;
pub mod http;
pub mod hub;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod moderate;
pub mod money;
pub mod protocol;
pub mod record;
pub mod server;
pub mod store;

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

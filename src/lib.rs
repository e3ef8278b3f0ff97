//! giftcast: a live-streaming gifting server.
pub mod flusher;
pub mod journal;
pub mod money;
pub mod record;
pub mod store;

//! giftcast: a live-streaming gifting server.
pub mod money;
pub mod record;

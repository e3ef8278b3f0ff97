//! giftcast

//! Wire types: the JSON frames of `/ws` and the bodies of the HTTP API. The only module that
//! knows the protocol's spelling; inner types (ledger, hub) are not `Serialize`d directly.

use crate::catalog::Sticker;
use serde::{Deserialize, Serialize};

/// Frames a client sends. Unknown `type`s and ill-typed fields are `bad_frame`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Join {
        stream: String,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        since: Option<u64>,
    },
    Chat {
        text: String,
    },
    Gift {
        gift_id: String,
        sticker: String,
        count: u32,
        #[serde(default)]
        message: Option<String>,
    },
    Thanks {
        gift_id: String,
        #[serde(default)]
        text: Option<String>,
    },
    Ping {
        #[serde(default)]
        t: serde_json::Value,
    },
    RedPacket {
        packet_id: String,
        coins: u64,
        shares: u32,
        split: String,
        #[serde(default)]
        message: Option<String>,
    },
    Grab {
        packet_id: String,
    },
}

/// A user as shown to a room.
#[derive(Clone, Debug, Serialize)]
pub struct UserRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

#[derive(Serialize)]
pub struct ChatEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub from: UserRef<'a>,
    pub text: &'a str,
    pub ts: u64,
}

#[derive(Serialize)]
pub struct ShoutoutEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub gift_id: &'a str,
    pub from: UserRef<'a>,
    pub sticker: &'a str,
    pub count: u32,
    pub amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    pub combo: u32,
    pub tier: u8,
    pub ts: u64,
}

#[derive(Serialize)]
pub struct ThanksEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub gift_id: &'a str,
    pub to: UserRef<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    pub ts: u64,
}

#[derive(Serialize)]
pub struct Joined<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub stream: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<UserRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<u64>,
    pub seq: u64,
    pub viewers: usize,
    pub catalog: &'a [Sticker],
    pub epoch: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<bool>,
}

pub fn error_frame(code: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "code": code, "message": message}).to_string()
}

pub fn lagged_frame(last_seq: u64) -> String {
    serde_json::json!({
        "type": "error",
        "code": "lagged",
        "message": "this connection fell behind the room; rejoin with since=last_seq",
        "last_seq": last_seq,
    })
    .to_string()
}

pub fn pong_frame(t: &serde_json::Value) -> String {
    serde_json::json!({"type": "pong", "t": t}).to_string()
}

pub fn viewers_frame(count: usize) -> String {
    serde_json::json!({"type": "viewers", "count": count}).to_string()
}

pub fn gift_ok_frame(gift_id: &str, balance: u64, seq: u64) -> String {
    serde_json::json!({"type": "gift_ok", "gift_id": gift_id, "balance": balance, "seq": seq})
        .to_string()
}

pub fn gift_rejected_frame(gift_id: &str, code: &str, balance: Option<u64>) -> String {
    let mut v = serde_json::json!({"type": "gift_rejected", "gift_id": gift_id, "code": code});
    if let Some(b) = balance {
        v["balance"] = b.into();
    }
    v.to_string()
}

pub fn packet_ok_frame(packet_id: &str, balance: u64, seq: u64) -> String {
    serde_json::json!({"type": "red_packet_ok", "packet_id": packet_id, "balance": balance, "seq": seq}).to_string()
}

pub fn packet_rejected_frame(packet_id: &str, code: &str, balance: Option<u64>) -> String {
    let mut v =
        serde_json::json!({"type": "red_packet_rejected", "packet_id": packet_id, "code": code});
    if let Some(b) = balance {
        v["balance"] = b.into();
    }
    v.to_string()
}

pub fn grab_ok_frame(packet_id: &str, coins: u64, balance: u64) -> String {
    serde_json::json!({"type": "grab_ok", "packet_id": packet_id, "coins": coins, "balance": balance}).to_string()
}

pub fn grab_rejected_frame(packet_id: &str, code: &str) -> String {
    serde_json::json!({"type": "grab_rejected", "packet_id": packet_id, "code": code}).to_string()
}

/// `[A-Za-z0-9_-]{1,max}`: gift ids, user ids, stream ids, sticker ids.
pub fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Trimmed text of 1..=max characters, or `None`.
pub fn clean_text(s: &str, max_chars: usize) -> Option<&str> {
    let t = s.trim();
    if t.is_empty() || t.chars().count() > max_chars {
        None
    } else {
        Some(t)
    }
}

// ---- HTTP bodies ----

#[derive(Debug, Deserialize)]
pub struct GuestRequest {
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub stream: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CreditRequest {
    pub user_id: String,
    pub coins: u64,
    pub reference: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_text() {
        assert!(valid_id("abc-DEF_09", 64));
        assert!(!valid_id("", 64));
        assert!(!valid_id("a b", 64));
        assert!(!valid_id(&"a".repeat(65), 64));
        assert!(valid_id(&"a".repeat(64), 64));
        assert_eq!(clean_text("  hi ", 500), Some("hi"));
        assert_eq!(clean_text("   ", 500), None);
        assert!(clean_text(&"é".repeat(500), 500).is_some());
        assert!(clean_text(&"é".repeat(501), 500).is_none());
    }

    #[test]
    fn client_frames_parse() {
        let f: ClientFrame = serde_json::from_str(r#"{"type":"join","stream":"demo"}"#).unwrap();
        assert!(matches!(
            f,
            ClientFrame::Join {
                since: None,
                token: None,
                ..
            }
        ));
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":3}"#)
                .unwrap();
        assert!(matches!(f, ClientFrame::Gift { count: 3, .. }));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"chat","text":5}"#).is_err());
    }
}

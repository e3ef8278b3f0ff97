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
    // ---- moderation: the stream's streamer, or a moderator it named ----
    /// Delete a chat message (by its room seq).
    Delete {
        seq: u64,
    },
    /// `user_id` may not chat or gift in this room for `secs` seconds (0 lifts a timeout).
    Timeout {
        user_id: String,
        secs: u64,
    },
    /// Close `user_id`'s connections to this room (4010) and refuse its joins.
    Ban {
        user_id: String,
    },
    Unban {
        user_id: String,
    },
    /// One chat per user per `secs` seconds (0 = off); the streamer and moderators are exempt.
    SlowMode {
        secs: u64,
    },
    /// Replaces the room's blocked words (case-insensitive, whole words).
    BlockedWords {
        words: Vec<String>,
    },
    /// Name a moderator (the streamer only).
    Mod {
        user_id: String,
    },
    Unmod {
        user_id: String,
    },
}

/// Why a client frame could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    /// Always `bad_frame`: not JSON, too deep, not an object, unknown type, ill-typed field.
    pub code: &'static str,
    pub message: String,
    /// The `gift_id` of a malformed gift frame, when it has a string one, so the client can
    /// settle that gift (it gets `gift_rejected` with `invalid`).
    pub gift_id: Option<String>,
}

/// Decodes one client text frame with every structural limit: nesting depth at most
/// `JSON_DEPTH_MAX` (checked before the parser runs), then serde's typed decoding (numbers in
/// range for their type, no lone surrogates, strings bounded by the frame size). Never panics.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    if !json_depth_within(text.as_bytes(), crate::limits::JSON_DEPTH_MAX) {
        return Err(FrameError {
            code: "bad_frame",
            message: format!(
                "JSON nested deeper than {} levels",
                crate::limits::JSON_DEPTH_MAX
            ),
            gift_id: None,
        });
    }
    if let Some(frame) = decode_hot(text) {
        return Ok(frame);
    }
    serde_json::from_str(text).map_err(|e| {
        let gift_id = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .filter(|v| v["type"] == "gift")
            .and_then(|v| v["gift_id"].as_str().map(str::to_string));
        let mut message = e.to_string();
        truncate_chars(&mut message, 200);
        FrameError {
            code: "bad_frame",
            message,
            gift_id,
        }
    })
}

/// The hot frames (`gift`, `chat`) in one pass, when `type` is their first key, as every client
/// we know writes them: the derived decoder of an internally tagged enum first copies the whole
/// object into an owned tree (a `String` per key and value) and then decodes that tree, which
/// was 5% of the server's CPU at 70k gifts/s. `None` means "use the derived decoder": anything
/// else, a `type` that is not first or has escapes, a repeated `type`, and every error (so
/// errors, and what is accepted, are exactly the derived decoder's; `decode_hot_agrees` checks).
fn decode_hot(text: &str) -> Option<ClientFrame> {
    use serde::de::{self, MapAccess, Visitor};

    /// Whether a key was there at all (whatever its value, `null` too).
    #[derive(Default)]
    struct Present(bool);
    impl<'de> Deserialize<'de> for Present {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            de::IgnoredAny::deserialize(d).map(|_| Present(true))
        }
    }

    /// A `gift` frame's other fields; `again` catches a second `type` key.
    #[derive(Deserialize)]
    struct GiftBody {
        gift_id: String,
        sticker: String,
        count: u32,
        #[serde(default)]
        message: Option<String>,
        #[serde(rename = "type", default)]
        again: Present,
    }

    #[derive(Deserialize)]
    struct ChatBody {
        text: String,
        #[serde(rename = "type", default)]
        again: Present,
    }

    struct Hot;
    impl<'de> Visitor<'de> for Hot {
        type Value = Option<ClientFrame>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a client frame")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            if map.next_key::<&'de str>()? != Some("type") {
                return Ok(None);
            }
            let tag: &'de str = map.next_value()?;
            let rest = de::value::MapAccessDeserializer::new(map);
            Ok(match tag {
                "gift" => {
                    let b = GiftBody::deserialize(rest)?;
                    (!b.again.0).then_some(ClientFrame::Gift {
                        gift_id: b.gift_id,
                        sticker: b.sticker,
                        count: b.count,
                        message: b.message,
                    })
                }
                "chat" => {
                    let b = ChatBody::deserialize(rest)?;
                    (!b.again.0).then_some(ClientFrame::Chat { text: b.text })
                }
                _ => None,
            })
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    let frame = de::Deserializer::deserialize_map(&mut de, Hot).ok()??;
    de.end().ok()?;
    Some(frame)
}

/// A frame's JSON, written into a buffer sized for a shout-out (`serde_json::to_string` starts
/// at 128 bytes and grows: a reallocation and a copy for most shout-outs).
pub fn to_json_sized<T: Serialize>(frame: &T) -> String {
    let mut out = Vec::with_capacity(FRAME_JSON_BYTES_TYPICAL);
    serde_json::to_writer(&mut out, frame).expect("a frame serialises");
    // serde_json writes valid UTF-8 only.
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// A shout-out with short names and a short message.
const FRAME_JSON_BYTES_TYPICAL: usize = 384;

/// Cuts `s` to at most `max` characters (never inside a character).
fn truncate_chars(s: &mut String, max: usize) {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
    }
}

/// Whether the JSON text's `[`/`{` nesting stays within `max` (brackets inside strings do not
/// count). A linear scan with no allocation, run before the parser so a deep document never
/// reaches it. Text that is not JSON passes here and fails in the parser.
pub fn json_depth_within(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
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
    /// `true` when the joiner is the stream's streamer or one of its moderators (absent
    /// otherwise): the client may show moderation controls.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub moderator: bool,
    /// The room's slow-mode interval in seconds, when slow mode is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_mode: Option<u64>,
}

/// A chat message was deleted by the streamer or a moderator: clients hide `target_seq`.
#[derive(Serialize)]
pub struct DeletedEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub target_seq: u64,
    pub ts: u64,
}

/// A moderation action on a user: `timeout` (with `secs`; 0 lifts it), `ban`, `unban`, `mod`,
/// `unmod`. Clients hide the chat of a user timed out or banned.
#[derive(Serialize)]
pub struct ModActionEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub action: &'static str,
    pub user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secs: Option<u64>,
    pub ts: u64,
}

/// The room's chat settings changed: `slow_mode` seconds (0 = off) and how many blocked words
/// are set (the words themselves are not shown to the room).
#[derive(Serialize)]
pub struct RoomSettingsEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub seq: u64,
    pub slow_mode: u64,
    pub blocked_words: usize,
    pub ts: u64,
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

/// `gift_ok` / `gift_rejected`: one per gift, on the hot path, so serialised from a struct (no
/// intermediate `serde_json::Value` map).
#[derive(Serialize)]
struct GiftAnswerFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    gift_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    balance: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

pub fn gift_ok_frame(gift_id: &str, balance: u64, seq: u64) -> String {
    serde_json::to_string(&GiftAnswerFrame {
        kind: "gift_ok",
        gift_id,
        code: None,
        balance: Some(balance),
        seq: Some(seq),
    })
    .expect("gift_ok serialises")
}

pub fn gift_rejected_frame(gift_id: &str, code: &str, balance: Option<u64>) -> String {
    serde_json::to_string(&GiftAnswerFrame {
        kind: "gift_rejected",
        gift_id,
        code: Some(code),
        balance,
        seq: None,
    })
    .expect("gift_rejected serialises")
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
    use proptest::prelude::*;

    /// The derived decoder alone (what `decode_client_frame` did before `decode_hot`).
    fn derived(text: &str) -> Option<String> {
        serde_json::from_str::<ClientFrame>(text)
            .ok()
            .map(|f| format!("{f:?}"))
    }

    #[test]
    fn decode_hot_takes_the_hot_frames_and_leaves_the_rest() {
        for text in [
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":1}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":3,"message":"hi \"you\""}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":1,"message":null,"x":[1,{}]}"#,
            r#" {"type" : "chat", "text":"hello\u00e9"} "#,
        ] {
            let hot = decode_hot(text).map(|f| format!("{f:?}"));
            assert!(hot.is_some(), "{text} took the derived path");
            assert_eq!(hot, derived(text), "{text}");
        }
        for text in [
            // not first, escaped, other types: the derived decoder's (same result)
            r#"{"gift_id":"g1","type":"gift","sticker":"rose","count":1}"#,
            r#"{"\u0074ype":"gift","gift_id":"g1","sticker":"rose","count":1}"#,
            r#"{"type":"gif\u0074","gift_id":"g1","sticker":"rose","count":1}"#,
            r#"{"type":"thanks","gift_id":"g1"}"#,
            // errors: the derived decoder's error
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":1,"type":"chat"}"#,
            r#"{"type":"chat","text":"a","type":null}"#,
            r#"{"type":"gift","gift_id":"g1","gift_id":"g2","sticker":"rose","count":1}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":-1}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":4294967296}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":1.0}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose"}"#,
            r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":1} x"#,
            r#"{"type":"chat","text":7}"#,
            r#"{"type":"chat"}"#,
            r#"{"type":7,"text":"a"}"#,
            r#"{"type":"chat","text":"\ud800"}"#,
            r#"[{"type":"chat","text":"a"}]"#,
        ] {
            assert!(decode_hot(text).is_none(), "{text} took the hot path");
        }
    }

    /// An object of gift- or chat-frame fields in any order, some repeated, some missing, some
    /// ill-typed, some unknown.
    fn frame_text() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            Just("\"gift\"".to_string()),
            Just("\"chat\"".to_string()),
            Just("\"g\\u0031\"".to_string()),
            Just("null".to_string()),
            Just("1".to_string()),
            Just("4294967296".to_string()),
            Just("-3".to_string()),
            Just("2.5".to_string()),
            Just("[1,{\"a\":null}]".to_string()),
            "[a-z ]{0,6}".prop_map(|s| format!("\"{s}\"")),
        ];
        let key = prop_oneof![
            Just("type"),
            Just("gift_id"),
            Just("sticker"),
            Just("count"),
            Just("message"),
            Just("text"),
            Just("other"),
        ];
        let first = prop_oneof![Just("\"gift\""), Just("\"chat\""), Just("\"ping\"")];
        (
            any::<bool>(),
            first,
            proptest::collection::vec((key, value), 0..7),
        )
            .prop_map(|(type_first, first, fields)| {
                let mut parts: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                if type_first {
                    parts.insert(0, format!("\"type\":{first}"));
                }
                format!("{{{}}}", parts.join(","))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whenever the one-pass decoder answers, the derived decoder gives the same frame; and
        /// it never answers where the derived decoder refuses.
        #[test]
        fn decode_hot_agrees(text in frame_text()) {
            if let Some(hot) = decode_hot(&text) {
                prop_assert_eq!(Some(format!("{hot:?}")), derived(&text), "{}", text);
            }
        }

        /// And canonical gift frames, whatever their values, take the one-pass decoder.
        #[test]
        fn decode_hot_takes_every_well_formed_gift(
            id in "[A-Za-z0-9_-]{1,64}",
            sticker in "[a-z]{1,12}",
            count in any::<u32>(),
            message in proptest::option::of("[ -~]{0,40}"),
        ) {
            let text = format!(
                r#"{{"type":"gift","gift_id":{},"sticker":{},"count":{count},"message":{}}}"#,
                serde_json::to_string(&id).unwrap(),
                serde_json::to_string(&sticker).unwrap(),
                serde_json::to_string(&message).unwrap(),
            );
            let hot = decode_hot(&text).map(|f| format!("{f:?}"));
            prop_assert!(hot.is_some(), "{}", text);
            prop_assert_eq!(hot, derived(&text));
        }
    }

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
    fn depth_is_counted_outside_strings_only() {
        assert!(json_depth_within(b"{}", 1));
        assert!(!json_depth_within(b"{[]}", 1));
        assert!(json_depth_within(br#"{"a":"[[[[{{{{"}"#, 1));
        assert!(
            json_depth_within(br#"{"a":"\"[[["}"#, 1),
            "escaped quote stays in the string"
        );
        assert!(
            !json_depth_within(br#"{"a":"\\",[[]]}"#, 2),
            "an escaped backslash ends"
        );
        assert!(
            json_depth_within(b"]]]]", 0),
            "unbalanced closers never underflow"
        );
    }

    #[test]
    fn decode_names_the_gift_of_a_malformed_gift() {
        let e = decode_client_frame(r#"{"type":"gift","gift_id":"g9","count":"x"}"#).unwrap_err();
        assert_eq!((e.code, e.gift_id.as_deref()), ("bad_frame", Some("g9")));
        let e = decode_client_frame("nope").unwrap_err();
        assert_eq!((e.code, e.gift_id), ("bad_frame", None));
        let f = decode_client_frame(r#"{"type":"blocked_words","words":["a","b"]}"#).unwrap();
        assert!(matches!(f, ClientFrame::BlockedWords { words } if words.len() == 2));
        let f = decode_client_frame(r#"{"type":"slow_mode","secs":30}"#).unwrap();
        assert!(matches!(f, ClientFrame::SlowMode { secs: 30 }));
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

//! A fast path for the hot frames: room events (chat, shout-out, thanks) as the server writes
//! them (compact JSON). Scanning for the few fields the harness needs is several times cheaper
//! than a full parse, which matters when one 2-core machine runs both the server and millions
//! of deliveries per second of clients. Any frame holding another event type falls back to the
//! full parser, so correctness never depends on this path.

use std::sync::LazyLock;

use memchr::memmem::Finder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Shoutout,
    Thanks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastEv {
    pub kind: Kind,
    pub seq: Option<u64>,
    /// The harness timestamp (`lt <µs>`) at the start of the text (chat, thanks) or message
    /// (shout-out).
    pub stamp: Option<u64>,
}

static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"{\"type\":\""));
static OBJECT_SEP: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"},{\""));
static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"seq\":"));
static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":\"lt "));
static MESSAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"message\":\"lt "));

fn digits(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b.iter().take(20) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
        n += 1;
    }
    (n > 0).then_some(v)
}

/// Scan a frame (single event or batch) into `out`. Returns false when the frame holds anything
/// but chat / shoutout / thanks events (then `out` is meaningless and the caller parses fully).
///
/// Only frames whose every object starts with its `"type"` key are taken (else: false).
/// Sound because an unescaped `"` never occurs inside a JSON string, so `{"type":"` always
/// starts an object and `},{"` always separates two objects.
pub fn scan(frame: &str, out: &mut Vec<FastEv>) -> bool {
    const BATCH: &[u8] = b"{\"type\":\"batch\",\"events\":[";
    out.clear();
    let b = frame.as_bytes();
    let marks: Vec<usize> = TYPE.find_iter(b).collect();
    let events: &[usize] = if b.starts_with(BATCH) {
        // The batch itself, then its first event right at the start of the array.
        if marks.len() < 2 || marks[0] != 0 || marks[1] != BATCH.len() {
            return false;
        }
        &marks[1..]
    } else {
        if marks.len() != 1 || marks[0] != 0 {
            return false;
        }
        &marks[..]
    };
    for (i, &m) in events.iter().enumerate() {
        let start = m + 9;
        let end = events.get(i + 1).copied().unwrap_or(b.len());
        let body = &b[start..end];
        if OBJECT_SEP.find(body).is_some() {
            // Another object starts here without a leading "type": not our layout.
            return false;
        }
        let Some(q) = memchr::memchr(b'"', body) else {
            return false;
        };
        let kind = match &body[..q] {
            b"chat" => Kind::Chat,
            b"shoutout" => Kind::Shoutout,
            b"thanks" => Kind::Thanks,
            _ => return false,
        };
        let seq = SEQ.find(body).and_then(|p| digits(&body[p + 6..]));
        let stamp = match kind {
            Kind::Shoutout => MESSAGE.find(body).and_then(|p| digits(&body[p + 14..])),
            _ => TEXT.find(body).and_then(|p| digits(&body[p + 11..])),
        };
        out.push(FastEv { kind, seq, stamp });
    }
    true
}

static GIFT_ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"gift_id\":\""));
static BALANCE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"balance\":"));

/// A `gift_ok` frame's fields (the acknowledgement of each gift the harness sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastAck<'a> {
    pub gift_id: &'a str,
    pub balance: Option<i64>,
    pub seq: Option<u64>,
}

/// Where `key` occurs: `Ok(None)` when absent, `Err` when it occurs twice (a duplicate field,
/// which the full parser refuses).
fn only(b: &[u8], key: &Finder<'_>) -> Result<Option<usize>, ()> {
    let mut at = key.find_iter(b);
    match (at.next(), at.next()) {
        (first, None) => Ok(first.map(|i| i + key.needle().len())),
        _ => Err(()),
    }
}

/// A whole-number field: `Ok(None)` when the key is absent, `Err` when it is repeated or its
/// value is anything but digits followed by `,` or `}` (then the caller parses fully).
fn number(b: &[u8], key: &Finder<'_>) -> Result<Option<u64>, ()> {
    let Some(at) = only(b, key)? else {
        return Ok(None);
    };
    let rest = &b[at..];
    let len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    match (digits(rest), rest.get(len)) {
        (Some(v), Some(b',' | b'}')) if len < 20 => Ok(Some(v)),
        _ => Err(()),
    }
}

/// A single `gift_ok` frame as the server writes it (`{"type":"gift_ok",…}`, flat, no escapes),
/// or `None` for anything else (then the caller parses fully). Sound without a parser: with no
/// backslash in the frame, no string holds a quote, so `"gift_id":"`, `"balance":` and `"seq":`
/// can only be keys, and the id ends at the next quote.
pub fn scan_gift_ok(frame: &str) -> Option<FastAck<'_>> {
    const HEAD: &[u8] = b"{\"type\":\"gift_ok\",";
    let b = frame.as_bytes();
    if !b.starts_with(HEAD)
        || !b.ends_with(b"}")
        || memchr::memchr(b'\\', b).is_some()
        || memchr::memchr(b'{', &b[1..]).is_some()
    {
        return None;
    }
    let from = only(b, &GIFT_ID).ok()??;
    let to = from + memchr::memchr(b'"', &b[from..])?;
    if !matches!(b.get(to + 1), Some(b',' | b'}')) {
        return None;
    }
    Some(FastAck {
        gift_id: &frame[from..to],
        balance: number(b, &BALANCE)
            .ok()?
            .map(i64::try_from)
            .transpose()
            .ok()?,
        seq: number(b, &SEQ).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{for_each_event, parse, parse_stamp};

    fn slow(frame: &str) -> Vec<FastEv> {
        let ev = parse(frame).unwrap();
        let mut v = vec![];
        for_each_event(&ev, &mut |e| {
            let kind = match e.ty() {
                "chat" => Kind::Chat,
                "shoutout" => Kind::Shoutout,
                _ => Kind::Thanks,
            };
            let s = if kind == Kind::Shoutout {
                &e.message
            } else {
                &e.text
            };
            v.push(FastEv {
                kind,
                seq: e.seq,
                stamp: s.as_ref().and_then(|s| parse_stamp(s.as_str())),
            });
        });
        v
    }

    #[test]
    fn agrees_with_the_full_parser() {
        let frames = [
            r#"{"type":"chat","seq":12,"from":{"id":"u1","name":"A \"b\""},"text":"lt 1700000000000001 xxxx","ts":1}"#,
            r#"{"type":"batch","events":[{"type":"chat","seq":1,"from":{"id":"u","name":"n"},"text":"lt 5 {\"type\":\"gift_ok\"}","ts":2},{"type":"shoutout","seq":2,"gift_id":"g","from":{"id":"u","name":"n"},"sticker":"rose","count":1,"amount":1,"message":"lt 77 q1","combo":1,"ts":3},{"type":"thanks","seq":3,"gift_id":"g","to":{"id":"u","name":"n"},"text":"lt 99 thanks","ts":4}]}"#,
            r#"{"type":"chat","text":"hello","ts":1,"seq":4,"from":{"id":"x","name":"y"}}"#,
            r#"{"type":"shoutout","seq":9,"gift_id":"g","from":{"id":"u","name":"n"},"sticker":"rose","count":1,"amount":1,"combo":1,"ts":3}"#,
        ];
        let mut out = vec![];
        for f in frames {
            assert!(scan(f, &mut out), "{f}");
            assert_eq!(out, slow(f), "{f}");
        }
    }

    #[test]
    fn gift_ok_agrees_with_the_full_parser() {
        let frames = [
            r#"{"type":"gift_ok","gift_id":"lt1-w0-c0-17","balance":9999,"seq":41}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":0,"seq":0}"#,
            r#"{"type":"gift_ok","gift_id":"g seq","seq":7,"balance":1}"#,
            r#"{"type":"gift_ok","gift_id":"","balance":18446744073709551615,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":1.5,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":-3,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":null,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":5}"#,
            r#"{"type":"gift_ok","gift_id":"a"b","balance":5,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"a\"b","balance":5,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","gift_id":"h","balance":5,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":5,"balance":6,"seq":1}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":5,"seq":1,"seq":2}"#,
            r#"{"type":"gift_ok","gift_id":"g","balance":5,"seq":1,"x":{"seq":2}}"#,
            r#"{"type":"gift_rejected","gift_id":"g","code":"invalid","balance":5}"#,
            r#"{"type":"batch","events":[{"type":"gift_ok","gift_id":"g","balance":5,"seq":1}]}"#,
        ];
        let mut fast_taken = 0;
        for f in frames {
            let slow = parse(f).ok().filter(|e| e.ty() == "gift_ok").map(|e| {
                let id = e.gift_id.as_ref().map(|s| s.as_str().to_string());
                (id.unwrap_or_default(), e.balance, e.seq)
            });
            // Refused (None): the full parser decides, nothing to compare.
            if let Some(a) = scan_gift_ok(f) {
                fast_taken += 1;
                assert_eq!(Some((a.gift_id.to_string(), a.balance, a.seq)), slow, "{f}");
            }
        }
        assert_eq!(fast_taken, 4, "the server's layout takes the fast path");
    }

    #[test]
    fn falls_back_on_other_types() {
        let mut out = vec![];
        assert!(!scan(
            r#"{"type":"gift_ok","gift_id":"a","balance":1,"seq":2}"#,
            &mut out
        ));
        assert!(!scan(
            r#"{"type":"batch","events":[{"type":"chat","seq":1,"text":"lt 1"},{"type":"gift_ok","gift_id":"a","balance":1,"seq":2}]}"#,
            &mut out
        ));
        assert!(!scan(
            r#"{"type":"joined","stream":"s","seq":0,"viewers":1,"catalog":[]}"#,
            &mut out
        ));
        assert!(!scan("not json", &mut out));
        assert!(!scan(r#"{ "type": "chat", "seq": 1 }"#, &mut out));
        // Keys in another order (e.g. sorted): "type" is not first, so the scan must refuse.
        assert!(!scan(r#"{"seq":1,"text":"lt 1","type":"chat"}"#, &mut out));
        assert!(!scan(
            r#"{"type":"batch","events":[{"seq":1,"text":"lt 1","type":"chat"},{"seq":2,"text":"lt 1","type":"chat"}]}"#,
            &mut out
        ));
        assert!(!scan(
            r#"{"type":"batch","events":[{"type":"chat","seq":1,"text":"lt 1"},{"seq":2,"text":"lt 1","type":"chat"},{"type":"chat","seq":3}]}"#,
            &mut out
        ));
        assert!(!scan(
            r#"{"type":"batch","events":[{"type":"chat","seq":1,"text":"lt 1"},{"gift_id":"g","type":"gift_ok"}]}"#,
            &mut out
        ));
        assert!(!scan(
            r#"{"events":[{"type":"chat","seq":1,"text":"lt 1"}],"type":"batch"}"#,
            &mut out
        ));
        // A text holding "},{" is fine: no unescaped quote follows.
        assert!(scan(
            r#"{"type":"chat","seq":1,"text":"lt 1 },{ "x""}"#,
            &mut out
        ));
        assert_eq!(out.len(), 1);
    }
}

//! Safety end to end: moderation (each action seen by a second client), the daily spending cap,
//! input limits at their edges, heartbeats against half-open sockets, slowloris on HTTP, and a
//! fuzzer over the client-frame path of a real server. See docs/security.md for the map.

mod common;

use common::*;
use futures_util::SinkExt;
use giftcast::auth::Role;
use giftcast::limits::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// The streamer (and stream) of the moderation tests.
const S: &str = "s-mod";

/// Skips frames until one of type `ty`; panics on a close.
async fn until(c: &mut Client, ty: &str) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"] == ty {
            return v;
        }
        assert!(
            v["type"] != "__close" && v["type"] != "__closed",
            "closed while waiting for {ty}: {v}"
        );
    }
}

/// The code of the next `error` frame.
async fn error_code(c: &mut Client) -> String {
    until(c, "error").await["code"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The streamer in its own (now live) room, and an anonymous watcher of it.
async fn staffed_room(server: &TestServer) -> (Client, Client) {
    let (st, joined) = server.joined(S, Some((S, Role::Streamer))).await;
    assert_eq!(joined["moderator"], true, "the streamer moderates its room");
    let (w, _) = server.joined(S, None).await;
    (st, w)
}

async fn viewer(server: &TestServer, user: &str) -> Client {
    let (c, joined) = server.joined(S, Some((user, Role::Viewer))).await;
    assert!(joined.get("moderator").is_none(), "{joined}");
    c
}

// ---------------------------------------------------------------- moderation

#[tokio::test]
async fn delete_is_seen_by_the_room_and_happens_once() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    let mut v = viewer(&server, "vee").await;
    v.chat("something rude").await;
    let chat = until(&mut w, "chat").await;
    let target = chat["seq"].as_u64().unwrap();
    st.send(json!({"type": "delete", "seq": target})).await;
    let deleted = until(&mut w, "deleted").await;
    assert_eq!(deleted["target_seq"], target);
    assert!(deleted["seq"].as_u64().unwrap() > target, "its own seq");
    assert!(deleted["ts"].as_u64().is_some());
    // The author sees it too; a second delete is refused.
    assert_eq!(until(&mut v, "deleted").await["target_seq"], target);
    st.send(json!({"type": "delete", "seq": target})).await;
    assert_eq!(error_code(&mut st).await, "not_found");
    // Only chat can be deleted, and only what is in history.
    st.send(json!({"type": "delete", "seq": deleted["seq"]}))
        .await;
    assert_eq!(error_code(&mut st).await, "not_found");
    st.send(json!({"type": "delete", "seq": u64::MAX})).await;
    assert_eq!(error_code(&mut st).await, "not_found");
}

#[tokio::test]
async fn non_owners_are_forbidden_and_anonymous_is_read_only() {
    let server = TestServer::start().await;
    let (_st, _w) = staffed_room(&server).await;
    let mut v = viewer(&server, "vee").await;
    // A streamer of another stream has no say here either.
    let (mut other, _) = server.joined(S, Some(("s-other", Role::Streamer))).await;
    let (mut anon, _) = server.joined(S, None).await;
    let frames = [
        json!({"type": "delete", "seq": 1}),
        json!({"type": "timeout", "user_id": "x", "secs": 5}),
        json!({"type": "ban", "user_id": "x"}),
        json!({"type": "unban", "user_id": "x"}),
        json!({"type": "slow_mode", "secs": 5}),
        json!({"type": "blocked_words", "words": ["x"]}),
        json!({"type": "mod", "user_id": "x"}),
        json!({"type": "unmod", "user_id": "x"}),
    ];
    for f in &frames {
        v.send(f.clone()).await;
        assert_eq!(error_code(&mut v).await, "forbidden", "{f}");
        other.send(f.clone()).await;
        assert_eq!(error_code(&mut other).await, "forbidden", "{f}");
        anon.send(f.clone()).await;
        assert_eq!(error_code(&mut anon).await, "read_only", "{f}");
    }
    let (code, body) = server
        .get_json(
            &format!("/api/streams/{S}/moderation"),
            Some(&server.token("vee", Role::Viewer)),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
}

#[tokio::test]
async fn a_timeout_stops_chat_and_gifts_then_lapses() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    assert_eq!(server.credit("vee", 100, "fund-vee").await.status(), 200);
    let mut v = viewer(&server, "vee").await;
    st.send(json!({"type": "timeout", "user_id": "vee", "secs": 1}))
        .await;
    let ev = until(&mut w, "mod_action").await;
    assert_eq!(
        (
            ev["action"].as_str(),
            ev["user_id"].as_str(),
            ev["secs"].as_u64()
        ),
        (Some("timeout"), Some("vee"), Some(1))
    );
    v.chat("let me talk").await;
    assert_eq!(error_code(&mut v).await, "timed_out");
    v.gift("g-to", "rose", 1, None).await;
    let ans = v.gift_answer("g-to").await;
    assert_eq!(
        (
            ans["type"].as_str(),
            ans["code"].as_str(),
            ans["balance"].as_u64()
        ),
        (Some("gift_rejected"), Some("timed_out"), Some(100)),
        "nothing debited"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    v.chat("back again").await;
    assert_eq!(until(&mut w, "chat").await["text"], "back again");
    v.gift("g-to", "rose", 1, None).await;
    assert_eq!(v.gift_answer("g-to").await["type"], "gift_ok");
    // Edges: the longest timeout passes, one second more is refused; 0 lifts it.
    st.send(json!({"type": "timeout", "user_id": "vee", "secs": TIMEOUT_SECS_MAX}))
        .await;
    assert_eq!(until(&mut w, "mod_action").await["secs"], TIMEOUT_SECS_MAX);
    st.send(json!({"type": "timeout", "user_id": "vee", "secs": TIMEOUT_SECS_MAX + 1}))
        .await;
    assert_eq!(error_code(&mut st).await, "invalid");
    st.send(json!({"type": "timeout", "user_id": "vee", "secs": 0}))
        .await;
    assert_eq!(until(&mut w, "mod_action").await["secs"], 0);
    v.chat("free").await;
    assert_eq!(until(&mut w, "chat").await["text"], "free");
}

#[tokio::test]
async fn a_ban_closes_every_connection_with_4010_and_refuses_rejoin() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    let mut v1 = viewer(&server, "vee").await;
    let mut v2 = viewer(&server, "vee").await;
    st.send(json!({"type": "ban", "user_id": "vee"})).await;
    for v in [&mut v1, &mut v2] {
        assert_eq!(error_code(v).await, "banned");
        assert_eq!(v.closed().await, 4010);
    }
    let ev = until(&mut w, "mod_action").await;
    assert_eq!(
        (ev["action"].as_str(), ev["user_id"].as_str()),
        (Some("ban"), Some("vee"))
    );
    let mut again = server.client().await;
    again
        .send(json!({"type": "join", "stream": S, "token": server.token("vee", Role::Viewer)}))
        .await;
    assert_eq!(error_code(&mut again).await, "banned");
    assert_eq!(again.closed().await, 4010);
    // Only this room: another stream is fine.
    let (_elsewhere, joined) = server.joined("demo", Some(("vee", Role::Viewer))).await;
    assert_eq!(joined["type"], "joined");
    // Nobody bans the streamer.
    st.send(json!({"type": "ban", "user_id": S})).await;
    assert_eq!(error_code(&mut st).await, "forbidden");
    st.send(json!({"type": "unban", "user_id": "vee"})).await;
    assert_eq!(until(&mut w, "mod_action").await["action"], "unban");
    let _back = viewer(&server, "vee").await;
    let (code, m) = server
        .get_json(
            &format!("/api/streams/{S}/moderation"),
            Some(&server.token(S, Role::Streamer)),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(m["banned"], json!([]));
}

#[tokio::test]
async fn slow_mode_lets_one_chat_per_interval_and_exempts_the_streamer() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    let mut v = viewer(&server, "vee").await;
    st.send(json!({"type": "slow_mode", "secs": 2})).await;
    let ev = until(&mut w, "room_settings").await;
    assert_eq!(ev["slow_mode"], 2);
    let (_late, joined) = server.joined(S, None).await;
    assert_eq!(joined["slow_mode"], 2, "joiners learn the setting");
    v.chat("one").await;
    assert_eq!(until(&mut w, "chat").await["text"], "one");
    v.chat("two").await;
    assert_eq!(error_code(&mut v).await, "slow_mode");
    st.chat("streamer one").await;
    st.chat("streamer two").await;
    assert_eq!(until(&mut w, "chat").await["text"], "streamer one");
    assert_eq!(until(&mut w, "chat").await["text"], "streamer two");
    // Edges.
    st.send(json!({"type": "slow_mode", "secs": SLOW_MODE_SECS_MAX}))
        .await;
    assert_eq!(
        until(&mut w, "room_settings").await["slow_mode"],
        SLOW_MODE_SECS_MAX
    );
    st.send(json!({"type": "slow_mode", "secs": SLOW_MODE_SECS_MAX + 1}))
        .await;
    assert_eq!(error_code(&mut st).await, "invalid");
    st.send(json!({"type": "slow_mode", "secs": 0})).await;
    assert_eq!(until(&mut w, "room_settings").await["slow_mode"], 0);
    v.chat("three").await;
    assert_eq!(until(&mut w, "chat").await["text"], "three");
}

#[tokio::test]
async fn blocked_words_refuse_chat_and_gift_messages_whole_word_any_case() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    assert_eq!(server.credit("vee", 100, "fund-vee").await.status(), 200);
    let mut v = viewer(&server, "vee").await;
    st.send(json!({"type": "blocked_words", "words": ["Spoiler"]}))
        .await;
    assert_eq!(until(&mut w, "room_settings").await["blocked_words"], 1);
    v.chat("no SPOILER, please!").await;
    assert_eq!(error_code(&mut v).await, "blocked");
    v.chat("spoilers are a different word").await;
    assert_eq!(
        until(&mut w, "chat").await["text"],
        "spoilers are a different word"
    );
    v.gift("g-b", "rose", 1, Some("a spoiler")).await;
    let ans = v.gift_answer("g-b").await;
    assert_eq!(
        (ans["code"].as_str(), ans["balance"].as_u64()),
        (Some("blocked"), Some(100))
    );
    // Edges: the list's size and a word's length.
    let max: Vec<String> = (0..BLOCKED_WORDS_MAX).map(|i| format!("w{i}")).collect();
    st.send(json!({"type": "blocked_words", "words": max}))
        .await;
    assert_eq!(
        until(&mut w, "room_settings").await["blocked_words"],
        BLOCKED_WORDS_MAX
    );
    let mut over = max.clone();
    over.push("one-more".into());
    st.send(json!({"type": "blocked_words", "words": over}))
        .await;
    assert_eq!(error_code(&mut st).await, "invalid");
    st.send(json!({"type": "blocked_words", "words": ["x".repeat(BLOCKED_WORD_CHARS_MAX)]}))
        .await;
    assert_eq!(until(&mut w, "room_settings").await["blocked_words"], 1);
    st.send(json!({"type": "blocked_words", "words": ["x".repeat(BLOCKED_WORD_CHARS_MAX + 1)]}))
        .await;
    assert_eq!(error_code(&mut st).await, "invalid");
    st.send(json!({"type": "blocked_words", "words": []})).await;
    assert_eq!(until(&mut w, "room_settings").await["blocked_words"], 0);
    v.chat("spoiler").await;
    assert_eq!(until(&mut w, "chat").await["text"], "spoiler");
}

#[tokio::test]
async fn moderators_moderate_but_not_the_streamer_nor_each_other() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    let mut v = viewer(&server, "vee").await;
    st.send(json!({"type": "mod", "user_id": "al"})).await;
    let ev = until(&mut w, "mod_action").await;
    assert_eq!(
        (ev["action"].as_str(), ev["user_id"].as_str()),
        (Some("mod"), Some("al"))
    );
    st.send(json!({"type": "mod", "user_id": "cat"})).await;
    until(&mut w, "mod_action").await;
    let (mut al, joined) = server.joined(S, Some(("al", Role::Viewer))).await;
    assert_eq!(joined["moderator"], true);
    v.chat("spam").await;
    let target = until(&mut w, "chat").await["seq"].clone();
    al.send(json!({"type": "delete", "seq": target})).await;
    assert_eq!(until(&mut w, "deleted").await["target_seq"], target);
    al.send(json!({"type": "timeout", "user_id": "vee", "secs": 60}))
        .await;
    assert_eq!(until(&mut w, "mod_action").await["user_id"], "vee");
    al.send(json!({"type": "slow_mode", "secs": 1})).await;
    assert_eq!(until(&mut w, "room_settings").await["slow_mode"], 1);
    for f in [
        json!({"type": "ban", "user_id": "cat"}),
        json!({"type": "timeout", "user_id": "cat", "secs": 5}),
        json!({"type": "ban", "user_id": S}),
        json!({"type": "mod", "user_id": "vee"}),
        json!({"type": "unmod", "user_id": "cat"}),
    ] {
        al.send(f.clone()).await;
        assert_eq!(error_code(&mut al).await, "forbidden", "{f}");
    }
    st.chat("streamer speaks").await;
    let target = until(&mut w, "chat").await["seq"].clone();
    al.send(json!({"type": "delete", "seq": target})).await;
    assert_eq!(error_code(&mut al).await, "forbidden");
    st.send(json!({"type": "unmod", "user_id": "al"})).await;
    assert_eq!(until(&mut w, "mod_action").await["action"], "unmod");
    al.send(json!({"type": "ban", "user_id": "vee"})).await;
    assert_eq!(error_code(&mut al).await, "forbidden");
    let (code, m) = server
        .get_json(&format!("/api/streams/{S}/moderation"), Some(ADMIN))
        .await;
    assert_eq!(code, 200);
    assert_eq!(m["moderators"], json!(["cat"]));
    assert_eq!(m["timeouts"][0]["user_id"], "vee");
    assert_eq!(m["slow_mode"], 1);
}

#[tokio::test]
async fn moderators_per_room_are_bounded_at_the_edge() {
    let server = TestServer::start().await;
    let (mut st, mut w) = staffed_room(&server).await;
    for i in 0..ROOM_MODERATORS_MAX {
        st.send(json!({"type": "mod", "user_id": format!("m{i}")}))
            .await;
    }
    for _ in 0..ROOM_MODERATORS_MAX {
        until(&mut w, "mod_action").await;
    }
    st.send(json!({"type": "mod", "user_id": "one-more"})).await;
    assert_eq!(error_code(&mut st).await, "limit_reached");
    st.send(json!({"type": "unmod", "user_id": "m0"})).await;
    st.send(json!({"type": "mod", "user_id": "one-more"})).await;
    until(&mut w, "mod_action").await;
    let ev = until(&mut w, "mod_action").await;
    assert_eq!(
        (ev["action"].as_str(), ev["user_id"].as_str()),
        (Some("mod"), Some("one-more"))
    );
}

// ---------------------------------------------------------------- spending

#[tokio::test]
async fn the_daily_cap_refuses_the_gift_over_it_and_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let server = TestServer::start_with(|c| {
        c.daily_cap = 100;
        c.data_dir = dir.clone();
    })
    .await;
    assert_eq!(server.credit("vee", 1000, "fund-vee").await.status(), 200);
    assert_eq!(server.credit("zed", 1000, "fund-zed").await.status(), 200);
    let (mut v, _) = server.joined("demo", Some(("vee", Role::Viewer))).await;
    v.gift("a", "star", 1, None).await; // 50
    assert_eq!(v.gift_answer("a").await["balance"], 950);
    v.gift("b", "coffee", 5, None).await; // 50: exactly the cap
    assert_eq!(v.gift_answer("b").await["balance"], 900);
    v.gift("c", "rose", 1, None).await; // one coin over
    let ans = v.gift_answer("c").await;
    assert_eq!(
        (
            ans["type"].as_str(),
            ans["code"].as_str(),
            ans["balance"].as_u64()
        ),
        (Some("gift_rejected"), Some("daily_cap"), Some(900))
    );
    // A retry of an accepted gift still gets its answer.
    v.gift("a", "star", 1, None).await;
    let again = v.gift_answer("a").await;
    assert_eq!(
        (again["type"].as_str(), again["balance"].as_u64()),
        (Some("gift_ok"), Some(950))
    );
    // Per viewer.
    let (mut z, _) = server.joined("demo", Some(("zed", Role::Viewer))).await;
    z.gift("z1", "crown", 1, None).await;
    assert_eq!(z.gift_answer("z1").await["type"], "gift_ok");
    assert_eq!(server.audit().await["ok"], true);
    drop((v, z));
    server.stop().await.unwrap();
    // After a restart, today's gifts still count.
    let server = TestServer::start_with(|c| {
        c.daily_cap = 100;
        c.data_dir = dir.clone();
    })
    .await;
    let (mut v, joined) = server.joined("demo", Some(("vee", Role::Viewer))).await;
    assert_eq!(joined["balance"], 900);
    v.gift("d", "rose", 1, None).await;
    assert_eq!(v.gift_answer("d").await["code"], "daily_cap");
    server.stop().await.unwrap();
}

// ---------------------------------------------------------------- input limits

#[tokio::test]
async fn json_nesting_edge() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // The frame object is one level; `t` adds the rest.
    let nest = |n: usize| {
        format!(
            r#"{{"type":"ping","t":{}{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    c.send_text(&nest(JSON_DEPTH_MAX - 1)).await;
    assert_eq!(c.next().await["type"], "pong");
    c.send_text(&nest(JSON_DEPTH_MAX)).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    // Brackets inside strings do not count.
    let in_string = format!(r#"{{"type":"ping","t":"{}"}}"#, "[".repeat(1000));
    c.send_text(&in_string).await;
    assert_eq!(c.next().await["type"], "pong");
    // Far beyond: still one error, the connection lives.
    c.send_text(&nest(5000)).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"type": "ping", "t": 1})).await;
    assert_eq!(c.next().await["t"], 1);
}

#[tokio::test]
async fn number_edges_are_refused_not_wrapped() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.send_text(r#"{"type":"join","stream":"demo","since":18446744073709551616}"#)
        .await;
    assert_eq!(c.next().await["code"], "bad_frame", "u64::MAX + 1");
    c.send_text(r#"{"type":"join","stream":"demo","since":-1}"#)
        .await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send_text(r#"{"type":"join","stream":"demo","since":1.5}"#)
        .await;
    assert_eq!(c.next().await["code"], "bad_frame");
    let joined = c
        .join(
            "demo",
            Some(&server.token("vee", Role::Viewer)),
            Some(u64::MAX),
        )
        .await;
    assert_eq!(
        joined["resumed"], false,
        "u64::MAX is read, and is in the future"
    );
    c.send_text(r#"{"type":"gift","gift_id":"g1","sticker":"rose","count":4294967296}"#)
        .await;
    let ans = c.gift_answer("g1").await;
    assert_eq!(
        (ans["type"].as_str(), ans["code"].as_str()),
        (Some("gift_rejected"), Some("invalid"))
    );
    c.send_text(r#"{"type":"gift","gift_id":"g2","sticker":"rose","count":1e300}"#)
        .await;
    assert_eq!(c.gift_answer("g2").await["code"], "invalid");
    c.send_text(r#"{"type":"delete","seq":-5}"#).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send_text(r#"{"type":"timeout","user_id":"x","secs":18446744073709551615}"#)
        .await;
    assert_eq!(
        c.next().await["code"],
        "forbidden",
        "decoded, then refused by authority"
    );
}

#[tokio::test]
async fn stream_id_edges() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for bad in ["", " ", "a b", "é", "../x", &"a".repeat(ID_CHARS_MAX + 1)] {
        c.send(json!({"type": "join", "stream": bad})).await;
        assert_eq!(c.next().await["code"], "invalid", "{bad:?}");
    }
    let longest = "a".repeat(ID_CHARS_MAX);
    assert_eq!(
        c.join(&longest, None, None).await["stream"],
        longest.as_str()
    );
    let (code, _) = server
        .get_json(&format!("/api/streams/{longest}"), None)
        .await;
    assert_eq!(code, 200);
    let (code, _) = server
        .get_json(&format!("/api/streams/{longest}a"), None)
        .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let bad = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(c.closed().await, 1007);
}

#[tokio::test]
async fn http_bodies_and_heads_are_bounded() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let guest = |body: String| {
        http.post(server.url("/api/guest"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let name = "n".repeat(NAME_CHARS_MAX);
    assert_eq!(
        guest(json!({"name": name}).to_string())
            .await
            .unwrap()
            .status(),
        200
    );
    let r = guest(json!({"name": format!("{name}n")}).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Body size: just under passes the limit (and fails on content), just over is 413.
    let pad = |n: usize| format!(r#"{{"name":"x","pad":"{}"}}"#, "p".repeat(n));
    let under = pad(HTTP_BODY_BYTES_MAX - 30);
    assert!(under.len() <= HTTP_BODY_BYTES_MAX);
    assert_eq!(guest(under).await.unwrap().status(), 200);
    assert_eq!(guest(pad(HTTP_BODY_BYTES_MAX)).await.unwrap().status(), 413);
    // Depth, numbers, types, missing content type.
    let deep = format!(
        r#"{{"name":"x","pad":{}{}}}"#,
        "[".repeat(500),
        "]".repeat(500)
    );
    assert_eq!(guest(deep).await.unwrap().status(), 400);
    let r = http
        .post(server.url("/api/guest"))
        .body(r#"{"name":"x"}"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let credit = |body: String| {
        http.post(server.url("/api/admin/credit"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for coins in ["18446744073709551616", "-1", "1e30", "\"5\"", "0"] {
        let body = format!(r#"{{"user_id":"u","coins":{coins},"reference":"r-{coins}"}}"#);
        assert_eq!(credit(body).await.unwrap().status(), 400, "{coins}");
    }
    let max = giftcast::money::AMOUNT_MAX;
    let body = json!({"user_id": "u", "coins": max + 1, "reference": "over"}).to_string();
    assert_eq!(credit(body).await.unwrap().status(), 400);
    // Request head size.
    let r = http
        .get(server.url("/healthz"))
        .header("x-pad", "h".repeat(HTTP_HEADER_BYTES_MAX / 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(server.url("/healthz"))
        .header("x-pad", "h".repeat(HTTP_HEADER_BYTES_MAX + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
}

#[tokio::test]
async fn a_request_without_headers_gets_an_answer_and_breaks_nothing() {
    let server = TestServer::start_with(|c| c.http_header_read_timeout_ms = 1000).await;
    for (raw, answered) in [
        ("GET /healthz HTTP/1.1\r\n\r\n", true),
        ("GET /healthz HTTP/1.0\r\n\r\n", true),
        ("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", true),
        ("NOT HTTP AT ALL\r\n\r\n", true),
        // Empty lines before a request line are skipped; then nothing comes: timed out.
        ("\r\n\r\n", false),
    ] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    return;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{raw:?}: neither answered nor closed");
        let head = String::from_utf8_lossy(&buf);
        if answered {
            assert!(head.starts_with("HTTP/1."), "{raw:?} → {head:?}");
        }
    }
    assert_eq!(server.get_json("/healthz", None).await.0, 200);
}

// ---------------------------------------------------------------- slow and silent peers

/// Opens a raw WebSocket (handshake done) and then stays silent: never a frame, never a Pong.
async fn silent_websocket(server: &TestServer) -> TcpStream {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

#[tokio::test]
async fn a_silent_socket_is_pinged_then_closed_with_4011() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 700;
    })
    .await;
    let mut tcp = silent_websocket(&server).await;
    let started = Instant::now();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut bytes))
        .await
        .expect("the server closes a silent socket")
        .unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    // Server frames are unmasked, short: [0x80 | opcode, len, payload…].
    let (mut pings, mut close_code, mut at) = (0, None, 0);
    while at + 2 <= bytes.len() {
        let (op, len) = (bytes[at] & 0x0f, bytes[at + 1] as usize);
        if op == 0x9 {
            pings += 1;
        }
        if op == 0x8 && len >= 2 {
            close_code = Some(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        }
        at += 2 + len;
    }
    assert!(pings >= 2, "pinged before giving up: {pings}");
    assert_eq!(close_code, Some(4011));
}

#[tokio::test]
async fn a_client_that_answers_pings_stays() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 700;
    })
    .await;
    let (mut c, _) = server.joined("demo", Some(("vee", Role::Viewer))).await;
    // tungstenite answers each Ping while it reads; nothing else is sent for 3 timeouts.
    let deadline = Instant::now() + Duration::from_millis(2100);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if let Some(v) = c.try_recv(left).await {
            assert!(v["type"] != "__close" && v["type"] != "__closed", "{v}");
        }
    }
    c.chat("still here").await;
    assert_eq!(until(&mut c, "chat").await["text"], "still here");
}

#[tokio::test]
async fn slowloris_is_closed_within_the_header_timeout() {
    let bound = Duration::from_millis(1500);
    let server = TestServer::start_with(|c| c.http_header_read_timeout_ms = 1500).await;
    assert_eq!(
        giftcast::config::Config::for_tests(server.dir.as_ref().unwrap().path().into())
            .http_header_read_timeout_ms,
        HTTP_HEADER_READ_TIMEOUT_MS
    );
    let started = Instant::now();
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for b in head {
        if tcp.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(250), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) => {} // a 408 or similar before the close
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("the dribbling client was never closed");
    assert!(
        closed_after >= bound - Duration::from_millis(100),
        "{closed_after:?}"
    );
    assert!(
        closed_after <= bound + Duration::from_secs(1),
        "{closed_after:?}"
    );
    // A connection that never sends a byte is closed too.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection that never sent a byte is still open"
    );
    // Meanwhile everyone else is served.
    assert_eq!(server.get_json("/healthz", None).await.0, 200);
}

// ---------------------------------------------------------------- fuzz

/// Arbitrary JSON, nested at most `depth` levels.
fn any_json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Structured but wrong: a real frame type with fields of any shape, or an unknown type.
fn structured_frame() -> impl Strategy<Value = String> {
    let types = prop_oneof![
        Just("join"),
        Just("chat"),
        Just("gift"),
        Just("thanks"),
        Just("ping"),
        Just("delete"),
        Just("timeout"),
        Just("ban"),
        Just("unban"),
        Just("slow_mode"),
        Just("blocked_words"),
        Just("mod"),
        Just("unmod"),
        Just("batch"),
        Just(""),
    ];
    let fields = prop::collection::btree_map(
        prop_oneof![
            Just("stream".to_string()),
            Just("token".to_string()),
            Just("since".to_string()),
            Just("text".to_string()),
            Just("gift_id".to_string()),
            Just("sticker".to_string()),
            Just("count".to_string()),
            Just("message".to_string()),
            Just("seq".to_string()),
            Just("secs".to_string()),
            Just("user_id".to_string()),
            Just("words".to_string()),
            Just("t".to_string()),
        ],
        any_json(4),
        0..6,
    );
    (types, fields).prop_map(|(ty, fields)| {
        let mut v = json!({"type": ty});
        for (k, f) in fields {
            v[k] = f;
        }
        v.to_string()
    })
}

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,300}",
        "[\\[\\]{}\",:0-9a-z\\\\ ]{0,300}",
        structured_frame(),
        any_json(12).prop_map(|v| v.to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, .. ProptestConfig::default() })]

    /// The decoder alone, many cases: never panics; a refusal is `bad_frame` with a bounded
    /// message, and nesting beyond the limit never reaches the parser.
    #[test]
    fn fuzz_the_client_frame_decoder(text in hostile_text()) {
        match giftcast::protocol::decode_client_frame(&text) {
            Ok(_) => prop_assert!(giftcast::protocol::json_depth_within(text.as_bytes(), JSON_DEPTH_MAX)),
            Err(e) => {
                prop_assert_eq!(e.code, "bad_frame");
                prop_assert!(e.message.chars().count() <= 200);
            }
        }
    }

    /// Arbitrary bytes, as the decoder would see them after a lossy UTF-8 read.
    #[test]
    fn fuzz_the_decoder_with_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = giftcast::protocol::decode_client_frame(&text);
    }
}

/// The whole client-frame path of a real server: every hostile frame gets only valid frames
/// back, the connection stays open, and a ping after it is answered.
#[test]
fn fuzz_client_frames_through_a_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // chat_rate 0 turns off the flood guard, so the fuzzer is never cut off for speed.
    let server = rt.block_on(TestServer::start_with(|c| c.chat_rate_per_min = 0));
    let client = rt.block_on(async {
        let (c, _) = server.joined("demo", Some(("fuzzer", Role::Viewer))).await;
        c
    });
    let client = std::cell::RefCell::new(client);
    let known = [
        "error",
        "pong",
        "chat",
        "gift_ok",
        "gift_rejected",
        "viewers",
        "shoutout",
        "thanks",
        "joined",
        "deleted",
        "mod_action",
        "room_settings",
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let n = std::cell::Cell::new(0u64);
    runner
        .run(&hostile_text(), |text| {
            n.set(n.get() + 1);
            let marker = format!("fuzz-{}", n.get());
            let mut c = client.borrow_mut();
            rt.block_on(async {
                c.send_text(&text).await;
                c.send(json!({"type": "ping", "t": marker})).await;
                loop {
                    let v = c.recv().await;
                    let ty = v["type"].as_str().unwrap_or("");
                    prop_assert!(known.contains(&ty), "unexpected answer {v} to {text:?}");
                    if ty == "error" {
                        prop_assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
                    }
                    if ty == "pong" && v["t"] == marker.as_str() {
                        return Ok(());
                    }
                }
            })
        })
        .unwrap();
    drop(client);
    rt.block_on(server.stop()).unwrap();
}

/// New connections per address are rate limited (while the per-address cap is on): the burst
/// passes, a storm beyond it is refused with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storms_from_one_address_are_refused() {
    let server = TestServer::start().await;
    let burst = giftcast::limits::CONN_ATTEMPTS_PER_IP_BURST as usize;
    let mut refused_at = None;
    for i in 0..burst + 100 {
        match tokio_tungstenite::connect_async(server.ws_url()).await {
            Ok((ws, _)) => drop(ws),
            Err(e) => {
                assert!(e.to_string().contains("429"), "{e}");
                refused_at = Some(i);
                break;
            }
        }
    }
    let at = refused_at.expect("a storm beyond the burst is refused");
    assert!(at >= burst, "refused at {at}, inside the burst of {burst}");
    // Off with the per-address cap (load tests).
    let open = TestServer::start_with(|c| c.max_conns_per_ip = 0).await;
    for _ in 0..burst + 50 {
        let (ws, _) = tokio_tungstenite::connect_async(open.ws_url())
            .await
            .unwrap();
        drop(ws);
    }
}

/// A connection does not outlive its token.
#[tokio::test]
async fn a_connection_closes_when_its_token_expires() {
    let server = TestServer::start().await;
    let token = server
        .app
        .keys
        .mint("shorty", "Shorty", giftcast::auth::Role::Viewer, 2);
    let mut c = server.client().await;
    let joined = c.join("demo", Some(&token), None).await;
    assert_eq!(joined["user"]["id"], "shorty");
    assert_eq!(c.closed().await, 4003);
}

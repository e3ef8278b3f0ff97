//! The room hub end to end: a real server on port 0, real WebSocket clients.

mod common;

use common::*;
use futures_util::SinkExt;
use giftcast::auth::Role;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn fan_out_reaches_every_member_in_seq_order() {
    let server = TestServer::start_with(|c| c.chat_rate_per_min = 0).await;
    let mut members = Vec::new();
    for _ in 0..20 {
        members.push(server.joined("demo", None).await.0);
    }
    let (mut sender, joined) = server.joined("demo", Some(("alice", Role::Viewer))).await;
    assert_eq!(joined["user"]["id"], "alice");
    let start_seq = joined["seq"].as_u64().unwrap();
    for i in 0..50 {
        sender.chat(&format!("hello {i}")).await;
    }
    for m in members.iter_mut().chain(std::iter::once(&mut sender)) {
        for i in 0..50u64 {
            let ev = m.recv_type("chat").await;
            assert_eq!(
                ev["seq"].as_u64().unwrap(),
                start_seq + 1 + i,
                "gap or reorder"
            );
            assert_eq!(ev["text"], format!("hello {i}"));
            assert_eq!(ev["from"]["id"], "alice");
        }
    }
}

#[tokio::test]
async fn anonymous_join_is_read_only() {
    let server = TestServer::start().await;
    let (mut c, joined) = server.joined("demo", None).await;
    assert!(joined.get("user").is_none() && joined.get("balance").is_none());
    assert!(joined["catalog"].as_array().unwrap().len() >= 8);
    c.chat("hi").await;
    assert_eq!(c.next().await["code"], "read_only");
    c.gift("g1", "rose", 1, None).await;
    let ans = c.gift_answer("g1").await;
    assert_eq!(
        (ans["type"].as_str(), ans["code"].as_str()),
        (Some("gift_rejected"), Some("unauthorized"))
    );
}

#[tokio::test]
async fn resume_with_since_gets_exactly_the_missed_events() {
    let server = TestServer::start_with(|c| c.chat_rate_per_min = 0).await;
    let (mut sender, _) = server.joined("demo", Some(("bob", Role::Viewer))).await;
    let (mut reader, joined) = server.joined("demo", None).await;
    sender.chat("before").await;
    let seen = reader.recv_type("chat").await["seq"].as_u64().unwrap();
    assert_eq!(seen, joined["seq"].as_u64().unwrap() + 1);
    drop(reader);
    for i in 0..5 {
        sender.chat(&format!("missed {i}")).await;
    }
    // Wait until the sender has seen its own five, so they are in history.
    for _ in 0..6 {
        sender.recv_type("chat").await;
    }
    let mut back = server.client().await;
    let joined = back.join("demo", None, Some(seen)).await;
    assert_eq!(joined["resumed"], true);
    for i in 0..5u64 {
        let ev = back.recv_type("chat").await;
        assert_eq!(ev["seq"].as_u64().unwrap(), seen + 1 + i);
        assert_eq!(ev["text"], format!("missed {i}"));
    }
    sender.chat("live").await;
    assert_eq!(back.recv_type("chat").await["text"], "live");
}

#[tokio::test]
async fn since_beyond_history_says_not_resumed() {
    let server = TestServer::start_with(|c| c.chat_rate_per_min = 0).await;
    let (mut sender, _) = server.joined("demo", Some(("bob", Role::Viewer))).await;
    let n = giftcast::limits::ROOM_HISTORY_EVENTS_MAX + 10;
    for i in 0..n {
        sender.chat(&format!("m{i}")).await;
    }
    for _ in 0..n {
        sender.recv_type("chat").await;
    }
    let mut c = server.client().await;
    assert_eq!(c.join("demo", None, Some(1)).await["resumed"], false);
    let mut c = server.client().await;
    assert_eq!(
        c.join("demo", None, Some(10_000_000)).await["resumed"],
        false
    );
    // Exactly at the edge: the oldest kept event is seq n-HISTORY+1, so since = n-HISTORY resumes.
    let edge = (n - giftcast::limits::ROOM_HISTORY_EVENTS_MAX) as u64;
    let mut c = server.client().await;
    assert_eq!(c.join("demo", None, Some(edge)).await["resumed"], true);
    assert_eq!(c.recv_type("chat").await["seq"].as_u64().unwrap(), edge + 1);
    let mut c = server.client().await;
    assert_eq!(c.join("demo", None, Some(edge - 1)).await["resumed"], false);
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_lives() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.send_text("not json").await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"type": "chat", "text": "x"})).await;
    assert_eq!(c.next().await["code"], "not_joined");
    c.join("demo", Some(&server.token("ann", Role::Viewer)), None)
        .await;
    c.send(json!({"type": "dance"})).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"type": "chat", "text": 42})).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"type": "chat", "text": "   "})).await;
    assert_eq!(c.next().await["code"], "invalid");
    c.send(json!({"type": "join", "stream": "demo"})).await;
    assert_eq!(c.next().await["code"], "already_joined");
    c.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"type": "ping", "t": {"any": [1, "x"]}}))
        .await;
    let pong = c.next().await;
    assert_eq!(pong, json!({"type": "pong", "t": {"any": [1, "x"]}}));
}

#[tokio::test]
async fn chat_length_edge() {
    let server = TestServer::start().await;
    let (mut c, _) = server.joined("demo", Some(("ann", Role::Viewer))).await;
    let max = giftcast::limits::CHAT_CHARS_MAX;
    c.chat(&"é".repeat(max)).await;
    assert_eq!(c.next().await["type"], "chat");
    c.chat(&"é".repeat(max + 1)).await;
    assert_eq!(c.next().await["code"], "invalid");
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let server = TestServer::start().await;
    let (mut c, _) = server.joined("demo", Some(("ann", Role::Viewer))).await;
    // Just under the limit is fine (an invalid chat, but read and answered).
    let under = format!(
        r#"{{"type":"chat","text":"{}"}}"#,
        "a".repeat(giftcast::limits::FRAME_BYTES_MAX - 40)
    );
    assert!(under.len() <= giftcast::limits::FRAME_BYTES_MAX);
    c.send_text(&under).await;
    assert_eq!(c.next().await["code"], "invalid");
    let over = "a".repeat(giftcast::limits::FRAME_BYTES_MAX + 1);
    c.send_text(&over).await;
    assert_eq!(c.closed().await, 1009);
}

#[tokio::test]
async fn chat_over_the_rate_limit_is_refused() {
    let server = TestServer::start_with(|c| c.chat_rate_per_min = 5).await;
    let (mut c, _) = server.joined("demo", Some(("ann", Role::Viewer))).await;
    for i in 0..5 {
        c.chat(&format!("m{i}")).await;
        assert_eq!(c.next().await["type"], "chat");
    }
    c.chat("one too many").await;
    assert_eq!(c.next().await["code"], "rate_limited");
    // The limit is per user: a second connection of the same user is limited too.
    let (mut c2, _) = server.joined("demo", Some(("ann", Role::Viewer))).await;
    c2.chat("again").await;
    assert_eq!(c2.next().await["code"], "rate_limited");
}

#[tokio::test]
async fn flooding_closes_with_4008() {
    let server = TestServer::start().await;
    assert!(
        server.app.config.chat_rate_per_min > 0,
        "the flood guard is on with the chat limit"
    );
    let mut c = server.client().await;
    for _ in 0..(giftcast::limits::FLOOD_BURST_FRAMES + 50) {
        if c.ws
            .send(Message::text(r#"{"type":"ping","t":1}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(c.closed().await, 4008);
}

#[tokio::test]
async fn a_bad_token_closes_with_4003() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.send(json!({"type": "join", "stream": "demo", "token": "nope"}))
        .await;
    assert_eq!(c.next().await["code"], "unauthorized");
    assert_eq!(c.closed().await, 4003);
    let other_key = giftcast::auth::TokenKeys::new(b"another-secret");
    let mut c = server.client().await;
    c.send(json!({"type": "join", "stream": "demo", "token": other_key.mint("x", "X", Role::Viewer, 60)})).await;
    assert_eq!(c.closed().await, 4003);
}

#[tokio::test]
async fn no_join_in_time_closes_with_4001() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let started = Instant::now();
    assert_eq!(c.closed().await, 4001);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(giftcast::limits::JOIN_TIMEOUT_MS - 100),
        "{waited:?}"
    );
}

#[tokio::test]
async fn viewers_counts_follow_joins() {
    let server = TestServer::start().await;
    let (mut a, joined) = server.joined("room-v", None).await;
    assert_eq!(joined["viewers"], 1);
    let (_b, joined) = server.joined("room-v", None).await;
    assert_eq!(joined["viewers"], 2);
    // Counts go out every VIEWERS_INTERVAL_MS when changed: a tick between the two joins tells
    // `a` about itself alone first.
    let mut count = a.recv_type("viewers").await["count"].clone();
    if count == 1 {
        count = a.recv_type("viewers").await["count"].clone();
    }
    assert_eq!(count, 2);
}

#[tokio::test]
async fn origin_is_checked_on_upgrade() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server =
        TestServer::start_with(|c| c.allowed_origins = vec!["https://partner.example".into()])
            .await;
    let try_origin = |origin: &'static str| {
        let url = server.ws_url();
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("origin", origin.parse().unwrap());
            tokio_tungstenite::connect_async(req)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert!(try_origin("https://evil.example")
        .await
        .unwrap_err()
        .contains("403"));
    try_origin("http://localhost:3000").await.unwrap();
    try_origin("https://partner.example").await.unwrap();
}

#[tokio::test]
async fn connections_per_ip_are_capped() {
    let server = TestServer::start_with(|c| c.max_conns_per_ip = 2).await;
    let _a = server.client().await;
    let b = server.client().await;
    let third = tokio_tungstenite::connect_async(server.ws_url()).await;
    assert!(third.unwrap_err().to_string().contains("429"));
    drop(b);
    // The slot frees when the connection ends.
    let mut ok = false;
    for _ in 0..50 {
        if tokio_tungstenite::connect_async(server.ws_url())
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);
}

/// A member that never reads is cut off at its outbox bound; everyone else keeps getting every
/// event promptly. The stalled member's outbox fills after `OUTBOX_FRAMES_MAX` frames plus what
/// the socket buffers hold.
#[tokio::test]
async fn a_stalled_reader_never_delays_the_others() {
    // A long write timeout, so the cut-off seen here is the outbox bound (`lagged`), not the
    // write timeout, however slow the machine running the test is.
    let server = TestServer::start_with(|c| {
        c.chat_rate_per_min = 0;
        c.write_timeout_ms = 120_000;
    })
    .await;
    let (mut stalled, _) = server.joined("demo", None).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(server.joined("demo", None).await.0);
    }
    let (mut sender, _) = server.joined("demo", Some(("loud", Role::Viewer))).await;
    let room = server.app.hub.get("demo").unwrap();
    let members = room.viewers();
    assert_eq!(members, 5);
    let text = "x".repeat(giftcast::limits::CHAT_CHARS_MAX);
    let mut latencies = Vec::new();
    let mut sent = 0;
    // Bounded: the stalled member must be dropped long before this many events.
    // Bursts of BURST chats: a burst leaves in about one batch frame per fan-out tick, so the
    // stalled member's outbox fills within seconds, long before the 10 s write timeout.
    const BURST: usize = 10;
    while room.viewers() == members && sent < 50_000 {
        let started = Instant::now();
        for _ in 0..BURST {
            sender.chat(&text).await;
        }
        for o in others.iter_mut() {
            for _ in 0..BURST {
                assert_eq!(o.recv_type("chat").await["type"], "chat");
            }
        }
        latencies.push(started.elapsed());
        for _ in 0..BURST {
            sender.recv_type("chat").await;
        }
        sent += BURST;
    }
    assert_eq!(
        room.viewers(),
        members - 1,
        "the stalled member was never dropped"
    );
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "{sent} events until the stalled member was dropped; p99 {p99:?}, max {:?}",
        latencies.last().unwrap()
    );
    // Generous bound: the point is that nobody waits for the stalled socket (10 s write timeout).
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    // It gets what was queued, then `lagged` with where to resume from, then close 4009.
    let mut saw_lagged = false;
    let mut last_seq = 0;
    loop {
        let v = stalled
            .try_recv(Duration::from_secs(30))
            .await
            .expect("stalled member is closed");
        if let Some(seq) = v["seq"].as_u64() {
            assert!(seq > last_seq);
            last_seq = seq;
        }
        if v["code"] == "lagged" {
            saw_lagged = true;
            assert_eq!(
                v["last_seq"].as_u64(),
                Some(last_seq),
                "resume point is the last event delivered"
            );
        }
        if v["type"] == "__close" {
            assert_eq!(v["code"], 4009);
            break;
        }
        assert_ne!(v["type"], "__closed");
    }
    assert!(saw_lagged);
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let server = TestServer::start().await;
    let (mut c, _) = server.joined("demo", None).await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(c.closed().await, 1001);
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_giftcast"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let mut up = false;
    for _ in 0..200 {
        if reqwest::get(&url).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "server did not come up");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(code.code(), Some(0));
}

#[tokio::test]
async fn bad_config_stops_the_start_with_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_giftcast"))
        .args(["--split", "store=1,streamer=2,platform=3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("10000"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_giftcast"))
        .args(["--listen", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn token_command_mints_a_token_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_giftcast"))
        .args([
            "token",
            "--user",
            "carol",
            "--name",
            "Carol",
            "--role",
            "streamer",
            "--token-secret",
            "0123456789abcdef",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let keys = giftcast::auth::TokenKeys::new(b"0123456789abcdef");
    let claims = keys.verify(&token).unwrap();
    assert_eq!((&*claims.sub, claims.role), ("carol", Role::Streamer));
}

/// The write timeout at its edge: a socket that accepts nothing for longer than the write
/// timeout is closed (before its outbox ever fills), and the others never notice.
#[tokio::test]
async fn a_write_blocked_past_the_write_timeout_closes_the_socket() {
    let server = TestServer::start_with(|c| {
        c.chat_rate_per_min = 0;
        c.write_timeout_ms = 300;
    })
    .await;
    let (mut stalled, _) = server.joined("demo", None).await;
    let (mut other, _) = server.joined("demo", None).await;
    let (mut sender, _) = server.joined("demo", Some(("loud", Role::Viewer))).await;
    let room = server.app.hub.get("demo").unwrap();
    let text = "y".repeat(giftcast::limits::CHAT_CHARS_MAX);
    let started = Instant::now();
    let mut sent = 0;
    // Fill the stalled socket's kernel buffers, then keep the room busy until it is dropped.
    while room.viewers() == 3 && started.elapsed() < Duration::from_secs(60) {
        for _ in 0..10 {
            sender.chat(&text).await;
        }
        for _ in 0..10 {
            other.recv_type("chat").await;
            sender.recv_type("chat").await;
        }
        sent += 10;
    }
    eprintln!(
        "{sent} events until the blocked socket was closed ({:?})",
        started.elapsed()
    );
    assert_eq!(room.viewers(), 2, "the blocked socket was closed");
    // The stalled client reads what reached it, then finds the connection gone, with no
    // `lagged`: it was the write timeout, not the outbox bound (that path says `lagged`).
    loop {
        let v = stalled
            .try_recv(Duration::from_secs(30))
            .await
            .expect("the connection ends");
        assert_ne!(v["code"], "lagged");
        if v["type"] == "__closed" || v["type"] == "__close" {
            break;
        }
    }
}

/// `--fanout-tick-ms` is what it says: with a long tick, a lone event goes at once and by
/// itself, and the events sent back to back behind it go together in the next round, as one
/// batch frame, in order.
#[tokio::test]
async fn the_fanout_tick_coalesces_back_to_back_events() {
    let server = TestServer::start_with(|c| {
        c.chat_rate_per_min = 0;
        c.fanout_tick_ms = giftcast::limits::FANOUT_TICK_MS_MAX;
    })
    .await;
    let (mut viewer, _) = server.joined("demo", None).await;
    let (mut sender, _) = server.joined("demo", Some(("tick", Role::Viewer))).await;
    // The viewers count (2) goes out within `VIEWERS_INTERVAL_MS`; after it nothing else is
    // published while the count stays, so only the chats below are room events.
    loop {
        let v = viewer.recv().await;
        if v["type"] == "viewers" && v["count"] == 2 {
            break;
        }
    }
    viewer.batches = 0;
    sender.chat("first").await;
    assert_eq!(viewer.recv_type("chat").await["text"], "first");
    assert_eq!(viewer.batches, 0, "a lone event goes by itself");
    for i in 0..5 {
        sender.chat(&format!("next {i}")).await;
    }
    for i in 0..5 {
        assert_eq!(viewer.recv_type("chat").await["text"], format!("next {i}"));
    }
    assert_eq!(viewer.batches, 1, "the five went as one batch frame");
}

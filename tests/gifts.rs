//! Gifts end to end: every rejection code, idempotency, shout-outs, combos, thanks, the
//! thanks queue, revenue, credits and the audit, against a real server.

mod common;

use common::*;
use giftcast::auth::Role;
use serde_json::{json, Value};

async fn funded(server: &TestServer, user: &str, coins: u64) -> Client {
    assert_eq!(
        server
            .credit(user, coins, &format!("fund-{user}"))
            .await
            .status(),
        200
    );
    server.joined("demo", Some((user, Role::Viewer))).await.0
}

#[tokio::test]
async fn a_gift_is_debited_announced_and_acknowledged_once() {
    let server = TestServer::start().await;
    let (mut room, _) = server.joined("demo", None).await;
    let mut v = funded(&server, "vic", 100).await;
    v.gift("g-1", "coffee", 3, Some("What game is next?")).await;
    let ok = v.gift_answer("g-1").await;
    assert_eq!(ok["type"], "gift_ok");
    assert_eq!(ok["balance"], 70);
    let shout = room.recv_type("shoutout").await;
    assert_eq!(shout["gift_id"], "g-1");
    assert_eq!(shout["from"], json!({"id": "vic", "name": "name-vic"}));
    assert_eq!(
        (
            shout["sticker"].as_str(),
            shout["count"].as_u64(),
            shout["amount"].as_u64()
        ),
        (Some("coffee"), Some(3), Some(30))
    );
    assert_eq!(shout["message"], "What game is next?");
    assert_eq!(shout["combo"], 1);
    assert_eq!(ok["seq"], shout["seq"]);
    // A retry answers the same gift_ok and debits nothing.
    v.gift("g-1", "coffee", 3, Some("What game is next?")).await;
    assert_eq!(v.gift_answer("g-1").await, ok);
    // Also from another connection of the same user.
    let (mut v2, _) = server.joined("demo", Some(("vic", Role::Viewer))).await;
    v2.gift("g-1", "coffee", 3, Some("What game is next?"))
        .await;
    assert_eq!(v2.gift_answer("g-1").await, ok);
    let (_, me) = server
        .get_json("/api/me", Some(&server.token("vic", Role::Viewer)))
        .await;
    assert_eq!(me["balance"], 70);
    let audit = server.audit().await;
    assert_eq!(
        audit,
        json!({"credited": 100, "balances": 70, "gifted": 30, "held": 0, "ok": true})
    );
}

#[tokio::test]
async fn every_rejection_code() {
    let server = TestServer::start_with(|c| c.gift_rate_per_min = 5).await;
    let mut v = funded(&server, "rita", 10).await;
    let expect = |id: &'static str, code: &'static str| (id, code);
    let cases: Vec<(Value, (&str, &str))> = vec![
        (
            json!({"type":"gift","gift_id":"a1","sticker":"crown","count":1}),
            expect("a1", "insufficient_funds"),
        ),
        (
            json!({"type":"gift","gift_id":"a2","sticker":"nope","count":1}),
            expect("a2", "unknown_sticker"),
        ),
        (
            json!({"type":"gift","gift_id":"a3","sticker":"rose","count":0}),
            expect("a3", "invalid"),
        ),
        (
            json!({"type":"gift","gift_id":"a4","sticker":"rose","count":100}),
            expect("a4", "invalid"),
        ),
        (
            json!({"type":"gift","gift_id":"a5","sticker":"rose","count":-1}),
            expect("a5", "invalid"),
        ),
        (
            json!({"type":"gift","gift_id":"bad id!","sticker":"rose","count":1}),
            expect("bad id!", "invalid"),
        ),
        (
            json!({"type":"gift","gift_id":"x".repeat(65),"sticker":"rose","count":1}),
            ("", "invalid"),
        ),
        (
            json!({"type":"gift","gift_id":"a6","sticker":"rose","count":1,"message":"m".repeat(201)}),
            expect("a6", "invalid"),
        ),
    ];
    for (frame, (id, code)) in cases {
        let id = if id.is_empty() {
            frame["gift_id"].as_str().unwrap().to_string()
        } else {
            id.to_string()
        };
        v.send(frame).await;
        let ans = v.gift_answer(&id).await;
        assert_eq!(
            (ans["type"].as_str(), ans["code"].as_str()),
            (Some("gift_rejected"), Some(code)),
            "{id}"
        );
    }
    // Insufficient funds says the balance.
    v.gift("a7", "crown", 1, None).await;
    assert_eq!(v.gift_answer("a7").await["balance"], 10);
    // At the edges: a 64-char id, count 99, a 200-char message are fine.
    v.send(json!({"type":"gift","gift_id":"y".repeat(64),"sticker":"rose","count":1,"message":"m".repeat(200)})).await;
    assert_eq!(v.gift_answer(&"y".repeat(64)).await["type"], "gift_ok");
    // conflict: same id, other contents.
    v.gift("c1", "rose", 1, None).await;
    assert_eq!(v.gift_answer("c1").await["type"], "gift_ok");
    v.gift("c1", "rose", 2, None).await;
    assert_eq!(v.gift_answer("c1").await["code"], "conflict");
    // rate_limited: 5 per minute; 2 accepted + 5 checked above… fill up and go over.
    let mut limited = false;
    for i in 0..10 {
        let id = format!("r{i}");
        v.gift(&id, "rose", 1, None).await;
        if v.gift_answer(&id).await["code"] == "rate_limited" {
            limited = true;
            break;
        }
    }
    assert!(limited);
    // unauthorized: no token.
    let (mut anon, _) = server.joined("demo", None).await;
    anon.gift("u1", "rose", 1, None).await;
    assert_eq!(anon.gift_answer("u1").await["code"], "unauthorized");
    // not_found: a stream that is not live.
    let (mut off, _) = server
        .joined("nobody-streams-here", Some(("rita", Role::Viewer)))
        .await;
    off.gift("n1", "rose", 1, None).await;
    assert_eq!(off.gift_answer("n1").await["code"], "not_found");
    // Nothing rejected changed the money.
    assert_eq!(server.audit().await["ok"], true);
}

#[tokio::test]
async fn a_rejected_id_can_succeed_after_a_top_up() {
    let server = TestServer::start().await;
    let mut v = funded(&server, "tom", 5).await;
    v.gift("t1", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("t1").await["code"], "insufficient_funds");
    server.credit("tom", 5, "top-up-1").await;
    v.gift("t1", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("t1").await["balance"], 0);
}

#[tokio::test]
async fn combo_counts_a_streak() {
    let server = TestServer::start().await;
    let (mut room, _) = server.joined("demo", None).await;
    let mut v = funded(&server, "cy", 100).await;
    for (i, sticker) in ["rose", "rose", "rose", "heart", "rose"].iter().enumerate() {
        let id = format!("k{i}");
        v.gift(&id, sticker, 1, None).await;
        v.gift_answer(&id).await;
    }
    let combos: Vec<u64> = {
        let mut out = Vec::new();
        for _ in 0..5 {
            out.push(room.recv_type("shoutout").await["combo"].as_u64().unwrap());
        }
        out
    };
    assert_eq!(combos, vec![1, 2, 3, 1, 4]);
}

#[tokio::test]
async fn thanks_only_from_the_streamer_and_the_queue_clears() {
    let server = TestServer::start().await;
    let (mut streamer, _) = server
        .joined("star1", Some(("star1", Role::Streamer)))
        .await;
    let mut v = {
        server.credit("fan", 1000, "fund-fan").await;
        server.joined("star1", Some(("fan", Role::Viewer))).await.0
    };
    v.gift("q1", "star", 2, Some("Favourite song?")).await;
    assert_eq!(v.gift_answer("q1").await["type"], "gift_ok");
    v.gift("q2", "rose", 1, None).await;
    assert_eq!(v.gift_answer("q2").await["type"], "gift_ok");
    let streamer_token = server.token("star1", Role::Streamer);
    let (status, queue) = server
        .get_json("/api/streams/star1/queue", Some(&streamer_token))
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = queue["gifts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gift_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["q1", "q2"]);
    assert_eq!(queue["gifts"][0]["message"], "Favourite song?");
    // Another user's or another streamer's token may not see it.
    assert_eq!(
        server
            .get_json(
                "/api/streams/star1/queue",
                Some(&server.token("fan", Role::Viewer))
            )
            .await
            .0,
        403
    );
    assert_eq!(
        server
            .get_json(
                "/api/streams/star1/queue",
                Some(&server.token("star2", Role::Streamer))
            )
            .await
            .0,
        403
    );
    assert_eq!(
        server.get_json("/api/streams/star1/queue", None).await.0,
        401
    );
    assert_eq!(
        server
            .get_json("/api/streams/star1/queue", Some(ADMIN))
            .await
            .0,
        200
    );
    // A viewer cannot thank.
    v.send(json!({"type":"thanks","gift_id":"q1"})).await;
    loop {
        let f = v.next().await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "forbidden");
            break;
        }
    }
    // The streamer can, once; the room sees it.
    streamer
        .send(json!({"type":"thanks","gift_id":"q1","text":"Thank you! It's Clair de Lune"}))
        .await;
    let thanks = loop {
        let f = v.next().await;
        if f["type"] == "thanks" {
            break f;
        }
    };
    assert_eq!(thanks["gift_id"], "q1");
    assert_eq!(thanks["to"], json!({"id":"fan","name":"name-fan"}));
    assert_eq!(thanks["text"], "Thank you! It's Clair de Lune");
    streamer.send(json!({"type":"thanks","gift_id":"q1"})).await;
    loop {
        let f = streamer.next().await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "not_found");
            break;
        }
    }
    let (_, queue) = server
        .get_json("/api/streams/star1/queue", Some(&streamer_token))
        .await;
    assert_eq!(queue["gifts"].as_array().unwrap().len(), 1);
    // A streamer does not tip their own stream.
    server.credit("star1", 10, "fund-star1").await;
    streamer.gift("self", "rose", 1, None).await;
    assert_eq!(streamer.gift_answer("self").await["code"], "invalid");
}

#[tokio::test]
async fn revenue_is_split_exactly_and_only_shown_to_its_streamer() {
    let server = TestServer::start().await;
    let mut a = funded(&server, "amy", 10_000).await;
    let mut b = funded(&server, "ben", 10_000).await;
    a.gift("1", "crown", 3, None).await; // 300
    a.gift_answer("1").await;
    b.gift("1", "rose", 7, None).await; // 7
    b.gift_answer("1").await;
    a.gift("2", "rose", 1, None).await; // 1
    a.gift_answer("2").await;
    let (status, rev) = server
        .get_json(
            "/api/streams/demo/revenue",
            Some(&server.token("demo", Role::Streamer)),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            rev["gifts"].as_u64(),
            rev["gross"].as_u64(),
            rev["unit"].as_u64()
        ),
        (Some(3), Some(308), Some(10_000))
    );
    assert_eq!(rev["store"], 308 * 3000);
    assert_eq!(rev["streamer"], 308 * 5000);
    assert_eq!(rev["platform"], 308 * 2000);
    assert_eq!(rev["top_gifters"][0]["user_id"], "amy");
    assert_eq!(rev["top_gifters"][0]["gross"], 301);
    assert_eq!(rev["by_sticker"][0]["sticker"], "crown");
    assert_eq!(
        server
            .get_json(
                "/api/streams/demo/revenue",
                Some(&server.token("amy", Role::Viewer))
            )
            .await
            .0,
        403
    );
    assert_eq!(
        server
            .get_json("/api/streams/demo/revenue", Some(ADMIN))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn admin_credit_is_idempotent_and_guarded() {
    let server = TestServer::start().await;
    let r = server.credit("zed", 50, "order-1").await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"balance": 50}));
    let r = server.credit("zed", 50, "order-1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"balance": 50}));
    let r = server.credit("zed", 51, "order-1").await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "conflict"
    );
    for bad in [
        json!({"user_id":"zed","coins":0,"reference":"x"}),
        json!({"user_id":"z z","coins":1,"reference":"x"}),
        json!({"user_id":"zed","coins":1,"reference":""}),
        json!({"user_id":"zed"}),
    ] {
        let r = reqwest::Client::new()
            .post(server.url("/api/admin/credit"))
            .bearer_auth(ADMIN)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "invalid");
    }
    let r = reqwest::Client::new()
        .post(server.url("/api/admin/credit"))
        .json(&json!({"user_id":"zed","coins":1,"reference":"y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = reqwest::Client::new()
        .post(server.url("/api/admin/credit"))
        .bearer_auth("wrong-token")
        .json(&json!({"user_id":"zed","coins":1,"reference":"y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(server.get_json("/api/admin/audit", None).await.0, 401);
    assert_eq!(
        server.audit().await,
        json!({"credited": 50, "balances": 50, "gifted": 0, "held": 0, "ok": true})
    );
}

#[tokio::test]
async fn guests_get_welcome_coins_once() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let g: Value = http
        .post(server.url("/api/guest"))
        .json(&json!({"name": "Gus"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (_, me) = server
        .get_json("/api/me", Some(g["token"].as_str().unwrap()))
        .await;
    assert_eq!(me["balance"], 1000);
    assert_eq!(me["role"], "viewer");
    let s: Value = http
        .post(server.url("/api/guest"))
        .json(&json!({"name": "Host", "role": "streamer", "stream": "demo"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (s["user_id"].as_str(), s["stream"].as_str()),
        (Some("demo"), Some("demo"))
    );
    let (_, me) = server
        .get_json("/api/me", Some(s["token"].as_str().unwrap()))
        .await;
    assert_eq!(me["balance"], 0);
    let r = http
        .post(server.url("/api/guest"))
        .json(&json!({"name": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(server.url("/api/guest"))
        .json(&json!({"name": "x".repeat(33)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(server.get_json("/api/me", Some("junk")).await.0, 401);
    let off = TestServer::start_with(|c| c.guest_signup = false).await;
    let r = http
        .post(off.url("/api/guest"))
        .json(&json!({"name": "Gus"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// Many connections of one user spend one wallet at once: exactly floor(balance/price) gifts
/// succeed and the balance never goes below zero.
#[tokio::test]
async fn concurrent_gifts_from_many_connections_never_overspend() {
    let server = TestServer::start_with(|c| c.gift_rate_per_min = 0).await;
    server.credit("whale", 1000, "fund").await;
    let price = 50; // star
    let mut tasks = Vec::new();
    for c in 0..10 {
        let (mut client, _) = server.joined("demo", Some(("whale", Role::Viewer))).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                client.gift(&format!("c{c}-{i}"), "star", 1, None).await;
            }
            let mut ok = 0;
            for i in 0..10 {
                let ans = client.gift_answer(&format!("c{c}-{i}")).await;
                match ans["type"].as_str() {
                    Some("gift_ok") => ok += 1,
                    _ => assert_eq!(ans["code"], "insufficient_funds"),
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 1000 / price);
    let (_, me) = server
        .get_json("/api/me", Some(&server.token("whale", Role::Viewer)))
        .await;
    assert_eq!(me["balance"], 1000 % price);
    assert_eq!(server.audit().await["ok"], true);
}

/// `CONN_GIFTS_IN_FLIGHT_MAX` at its edge. While the journal holds every gift (each fsync first
/// waits 1.5 s here), one connection may have exactly that many gifts waiting: the next is
/// refused `rate_limited` at once (before any waiting gift is answered) and debits nothing; once
/// the journal answers, every waiting gift is acknowledged and the connection may send again.
#[tokio::test]
async fn gifts_in_flight_per_connection_are_bounded_at_the_edge() {
    use giftcast::limits::CONN_GIFTS_IN_FLIGHT_MAX as MAX;
    let server = TestServer::start_with(|c| {
        c.gift_rate_per_min = 0;
        c.journal.sync_delay_ms = 1500;
    })
    .await;
    assert_eq!(
        server.credit("pipeliner", 1000, "top-up").await.status(),
        200
    );
    let (mut v, _) = server
        .joined("demo", Some(("pipeliner", Role::Viewer)))
        .await;
    for i in 0..=MAX {
        v.gift(&format!("f{i}"), "rose", 1, None).await;
    }
    // The first gift answer of all is the refusal of the one over the bound.
    let first = loop {
        let f = v.recv().await;
        if f["type"] == "gift_ok" || f["type"] == "gift_rejected" {
            break f;
        }
    };
    assert_eq!(first["type"], "gift_rejected", "{first}");
    assert_eq!(first["gift_id"], format!("f{MAX}"));
    assert_eq!(first["code"], "rate_limited");
    for i in 0..MAX {
        let answer = v.gift_answer(&format!("f{i}")).await;
        assert_eq!(answer["type"], "gift_ok", "{answer}");
    }
    // The permits are back: the refused id goes through now, debited once.
    v.gift(&format!("f{MAX}"), "rose", 1, None).await;
    let answer = v.gift_answer(&format!("f{MAX}")).await;
    assert_eq!(answer["type"], "gift_ok", "{answer}");
    assert_eq!(answer["balance"], 1000 - (MAX as u64 + 1));
    assert_eq!(server.audit().await["ok"], true);
}

/// A retry of a gift that is still waiting for the journal (each fsync first waits 800 ms here),
/// from the same connection and from another connection of the same user, is answered by the
/// first gift's completion: the same `gift_ok` (balance and seq) three times, one debit, one
/// shout-out.
#[tokio::test]
async fn a_retry_of_a_gift_in_flight_gets_the_same_answer_and_debits_once() {
    let server = TestServer::start_with(|c| {
        c.gift_rate_per_min = 0;
        c.journal.sync_delay_ms = 800;
    })
    .await;
    assert_eq!(server.credit("twice", 100, "top-up").await.status(), 200);
    let (mut a, _) = server.joined("demo", Some(("twice", Role::Viewer))).await;
    let (mut b, _) = server.joined("demo", Some(("twice", Role::Viewer))).await;
    a.gift("same", "rose", 1, None).await;
    a.gift("same", "rose", 1, None).await;
    b.gift("same", "rose", 1, None).await;
    let first = a.gift_answer("same").await;
    let second = a.gift_answer("same").await;
    let other = b.gift_answer("same").await;
    assert_eq!(first["type"], "gift_ok", "{first}");
    assert_eq!(first["balance"], 99);
    assert!(first["seq"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(second, first);
    assert_eq!(other, first);
    let (_, me) = server
        .get_json("/api/me", Some(&server.token("twice", Role::Viewer)))
        .await;
    assert_eq!(me["balance"], 99);
    let revenue = server
        .get_json("/api/streams/demo/revenue", Some(common::ADMIN))
        .await
        .1;
    assert_eq!(revenue["gifts"], 1, "{revenue}");
    assert_eq!(server.audit().await["ok"], true);
}

/// Polls `f` until it holds (10 s at most).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn stored_everything(server: &TestServer) -> bool {
    let d = server.app.durability.as_ref().expect("durable server");
    d.flusher.status().pending_records == 0
}

/// Guarantee 2 with a bounded gift-id memory: ids leave memory once stored (here at once:
/// resident max 0, resident time 0) and a retry of one is still answered from storage, before
/// and after a restart; the balance moves once per gift id.
#[tokio::test]
async fn gift_ids_that_left_memory_are_still_debited_once_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let evict_at_once = |c: &mut giftcast::config::Config| {
        c.idempotency.resident_max = 0;
        c.idempotency.resident_ms = 0;
    };
    let server = TestServer::start_in(dir.path().to_path_buf(), evict_at_once).await;
    let mut v = funded(&server, "ida", 100).await;
    let mut first = Vec::new();
    for i in 1..=4 {
        let id = format!("e-{i}");
        v.gift(&id, "coffee", 1, None).await;
        let ok = v.gift_answer(&id).await;
        assert_eq!(ok["type"], "gift_ok");
        first.push(ok);
    }
    assert_eq!(first[3]["balance"], 60);
    eventually("the four gifts are stored", || stored_everything(&server)).await;
    // The next gift's completion evicts the stored ones; only the new, unstored one stays.
    v.gift("e-5", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("e-5").await["balance"], 50);
    eventually("the stored ids left memory", || {
        server.app.ledger.resident_gifts() == 1
    })
    .await;
    assert!(
        !server.app.ledger.has_gift("ida", "e-1"),
        "e-1 is not in memory"
    );
    // A retry of an evicted id: its original gift_ok (seq unknown now: 0), nothing debited.
    v.gift("e-1", "coffee", 1, None).await;
    let again = v.gift_answer("e-1").await;
    assert_eq!(again["type"], "gift_ok");
    assert_eq!(again["balance"], first[0]["balance"]);
    assert_eq!(again["seq"], 0);
    // Other contents under an evicted id: conflict, nothing debited.
    v.gift("e-2", "rose", 1, None).await;
    assert_eq!(v.gift_answer("e-2").await["code"], "conflict");
    // A new id still goes through.
    v.gift("e-6", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("e-6").await["balance"], 40);
    assert_eq!(server.app.ledger.balance("ida"), 40);
    assert_eq!(server.audit().await["ok"], true);
    drop(v);
    server.stop().await.unwrap();

    // After a restart every stored id is older than the resident time: all in the filter.
    let server = TestServer::start_in(dir.path().to_path_buf(), evict_at_once).await;
    assert_eq!(server.app.ledger.resident_gifts(), 0);
    assert!(server.app.ledger.evicted_filter_bytes() > 0);
    let (mut v, _) = server.joined("demo", Some(("ida", Role::Viewer))).await;
    for (i, ok) in first.iter().enumerate() {
        let id = format!("e-{}", i + 1);
        v.gift(&id, "coffee", 1, None).await;
        let again = v.gift_answer(&id).await;
        assert_eq!(
            (&again["type"], &again["balance"]),
            (&ok["type"], &ok["balance"]),
            "{id}"
        );
    }
    v.gift("e-7", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("e-7").await["balance"], 30);
    assert_eq!(server.app.ledger.balance("ida"), 30);
    assert_eq!(server.audit().await["ok"], true);
}

/// A new gift id the evicted-id filter cannot rule out (a false positive, made here by putting
/// the id in the filter without a stored gift behind it) is looked up in the store and, not
/// found, goes through as a new gift, debited once.
#[tokio::test]
async fn a_filter_false_positive_is_looked_up_and_goes_through_as_new() {
    let server = TestServer::start().await;
    let mut v = funded(&server, "fp", 100).await;
    server
        .app
        .ledger
        .restore_evicted("fp", "x-1", giftcast::now_ms());
    v.gift("x-1", "coffee", 1, None).await;
    let ok = v.gift_answer("x-1").await;
    assert_eq!(
        (&ok["type"], &ok["balance"]),
        (&json!("gift_ok"), &json!(90))
    );
    assert_ne!(ok["seq"], 0, "a new gift, announced now");
    v.gift("x-1", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("x-1").await, ok, "and now an ordinary retry");
    assert_eq!(server.app.ledger.balance("fp"), 90);
    assert_eq!(server.audit().await["ok"], true);
}

/// A gift id is recognised for the retention (7 days; here 4 s). Past it, the same id is a
/// new gift: debited, acknowledged, and stored and counted as such, so the store still balances
/// (credited = balances + gifted) and a restart holds the same money. Until 2026-12-07 the store
/// kept one gift per id and dropped the second one's row and its value from the totals while
/// keeping its debit: the restart refused the ledger ("recovered ledger does not balance").
async fn an_id_reused_past_the_retention_is_a_new_gift(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let short_retention = |c: &mut giftcast::config::Config| {
        c.idempotency.resident_max = 0;
        c.idempotency.resident_ms = 0;
        c.idempotency.retention_ms = 4_000;
        c.database_url = database_url.clone();
    };
    let server = TestServer::start_in(dir.path().to_path_buf(), short_retention).await;
    let mut v = funded(&server, "old", 100).await;
    v.gift("r-1", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("r-1").await["balance"], 90);
    eventually("r-1 is stored", || stored_everything(&server)).await;
    // Past the retention and the filter's span beyond it (4 s / 7 = 572 ms), r-1 is unknown:
    // a new gift.
    tokio::time::sleep(std::time::Duration::from_millis(5_000)).await;
    v.gift("r-2", "coffee", 1, None).await;
    assert_eq!(v.gift_answer("r-2").await["balance"], 80);
    eventually("r-1 left memory", || {
        !server.app.ledger.has_gift("old", "r-1")
    })
    .await;
    v.gift("r-1", "rose", 1, Some("again")).await;
    let again = v.gift_answer("r-1").await;
    assert_eq!(again["type"], "gift_ok", "{again}");
    assert_ne!(again["seq"], 0, "a new gift, announced now");
    let balance = again["balance"].as_u64().unwrap();
    assert!(balance < 80, "debited: {again}");
    eventually("everything is stored", || stored_everything(&server)).await;
    assert_eq!(server.audit().await["ok"], true);
    drop(v);
    server.stop().await.unwrap();

    let server = TestServer::start_in(dir.path().to_path_buf(), short_retention).await;
    assert_eq!(server.app.ledger.balance("old"), balance);
    let audit = server.audit().await;
    assert_eq!(audit["ok"], true, "{audit}");
    // Within its retention (the restart takes well under its 4 s) the new r-1 is recognised
    // again: a retry answers, debits nothing.
    let (mut v, _) = server.joined("demo", Some(("old", Role::Viewer))).await;
    v.gift("r-1", "rose", 1, Some("again")).await;
    let retry = v.gift_answer("r-1").await;
    assert_eq!(
        (&retry["type"], &retry["balance"]),
        (&again["type"], &again["balance"])
    );
    assert_eq!(server.app.ledger.balance("old"), balance);
}

#[tokio::test]
async fn an_id_reused_past_the_retention_is_a_new_gift_sqlite() {
    an_id_reused_past_the_retention_is_a_new_gift(None).await;
}

#[tokio::test]
async fn an_id_reused_past_the_retention_is_a_new_gift_postgres() {
    let schema = Schema::create().await;
    an_id_reused_past_the_retention_is_a_new_gift(Some(schema.url("127.0.0.1:5432"))).await;
}

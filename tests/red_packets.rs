//! Red packets end to end: debit, announce, grabs (first `shares` win, exactly), expiry
//! refunds, audit with coins held, restart from the journal.

mod common;

use common::*;
use giftcast::auth::Role;
use serde_json::{json, Value};

async fn send_packet(c: &mut Client, id: &str, coins: u64, shares: u32, split: &str) -> Value {
    c.send(json!({"type":"red_packet","packet_id":id,"coins":coins,"shares":shares,"split":split,"message":"lucky!"}))
        .await;
    loop {
        let v = c.recv().await;
        if (v["type"] == "red_packet_ok" || v["type"] == "red_packet_rejected")
            && v["packet_id"] == id
        {
            return v;
        }
    }
}

async fn grab(c: &mut Client, id: &str) -> Value {
    c.send(json!({"type":"grab","packet_id":id})).await;
    loop {
        let v = c.recv().await;
        if (v["type"] == "grab_ok" || v["type"] == "grab_rejected") && v["packet_id"] == id {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_grabbers_on_ten_shares_get_exactly_ten_winners() {
    let server = TestServer::start_with(|c| {
        c.gift_rate_per_min = 0;
        c.max_conns_per_ip = 0;
        c.chat_rate_per_min = 0;
    })
    .await;
    server.credit("boss", 1000, "fund").await;
    let (mut boss, _) = server.joined("demo", Some(("boss", Role::Viewer))).await;
    let (mut watcher, _) = server.joined("demo", None).await;
    let ok = send_packet(&mut boss, "p1", 500, 10, "random").await;
    assert_eq!(ok["type"], "red_packet_ok", "{ok}");
    assert_eq!(ok["balance"], 500);
    let ev = watcher.recv_type_skipping("red_packet").await;
    assert_eq!(
        (
            ev["coins"].as_u64(),
            ev["shares"].as_u64(),
            ev["split"].as_str()
        ),
        (Some(500), Some(10), Some("random"))
    );
    assert_eq!(
        server.audit().await,
        json!({"credited": 1000, "balances": 500, "gifted": 0, "held": 500, "ok": true})
    );

    // 1000 grabbers over 50 connections (20 users each, one connection per user at a time is
    // not required: each user grabs once).
    let mut tasks = Vec::new();
    for c in 0..50 {
        let url = server.ws_url();
        let tokens: Vec<String> = (0..20)
            .map(|u| server.token(&format!("g{c}x{u}"), Role::Viewer))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for t in tokens {
                let mut cl = Client::connect(&url).await;
                cl.join("demo", Some(&t), None).await;
                results.push(grab(&mut cl, "p1").await);
            }
            results
        }));
    }
    let mut winners = Vec::new();
    let mut gone = 0;
    for t in tasks {
        for r in t.await.unwrap() {
            match r["type"].as_str() {
                Some("grab_ok") => winners.push(r["coins"].as_u64().unwrap()),
                _ => {
                    assert_eq!(r["code"], "gone", "{r}");
                    gone += 1;
                }
            }
        }
    }
    assert_eq!(winners.len(), 10);
    assert_eq!(gone, 990);
    assert_eq!(winners.iter().sum::<u64>(), 500, "the shares sum exactly");
    assert!(winners.iter().all(|c| *c >= 1));
    let audit = server.audit().await;
    assert_eq!(
        audit,
        json!({"credited": 1000, "balances": 1000, "gifted": 0, "held": 0, "ok": true})
    );
}

#[tokio::test]
async fn grabs_are_once_per_viewer_and_announced() {
    let server = TestServer::start().await;
    server.credit("amy", 100, "fund").await;
    let (mut amy, _) = server.joined("demo", Some(("amy", Role::Viewer))).await;
    assert_eq!(
        send_packet(&mut amy, "eq", 9, 3, "equal").await["type"],
        "red_packet_ok"
    );
    let (mut bob, _) = server.joined("demo", Some(("bob", Role::Viewer))).await;
    let first = grab(&mut bob, "eq").await;
    assert_eq!(first["type"], "grab_ok");
    assert_eq!(first["coins"], 3);
    assert_eq!(first["balance"], 3);
    // Again: the same answer, nothing more.
    assert_eq!(grab(&mut bob, "eq").await, first);
    let grabbed = amy.recv_type_skipping("grabbed").await;
    assert_eq!(grabbed["to"]["id"], "bob");
    assert_eq!(grabbed["left"], 2);
    // Idempotent create; conflicting contents; other rejections.
    assert_eq!(
        send_packet(&mut amy, "eq", 9, 3, "equal").await["balance"],
        91
    );
    assert_eq!(
        send_packet(&mut amy, "eq", 10, 3, "equal").await["code"],
        "conflict"
    );
    assert_eq!(
        send_packet(&mut amy, "big", 1000, 3, "equal").await["code"],
        "insufficient_funds"
    );
    assert_eq!(
        send_packet(&mut amy, "few", 2, 3, "equal").await["code"],
        "invalid"
    );
    assert_eq!(
        send_packet(&mut amy, "odd", 5, 1, "lottery").await["code"],
        "invalid"
    );
    assert_eq!(
        send_packet(&mut amy, "many", 500, 101, "equal").await["code"],
        "invalid"
    );
    assert_eq!(grab(&mut bob, "nope").await["code"], "not_found");
    let (mut anon, _) = server.joined("demo", None).await;
    assert_eq!(grab(&mut anon, "eq").await["code"], "unauthorized");
    assert_eq!(server.audit().await["ok"], true);
}

#[tokio::test]
async fn unclaimed_coins_go_back_at_expiry() {
    let server = TestServer::start_with(|c| c.red_packet_ttl_ms = 1_000).await;
    server.credit("cy", 100, "fund").await;
    let (mut cy, _) = server.joined("demo", Some(("cy", Role::Viewer))).await;
    assert_eq!(
        send_packet(&mut cy, "x", 40, 4, "random").await["type"],
        "red_packet_ok"
    );
    let (mut dee, _) = server.joined("demo", Some(("dee", Role::Viewer))).await;
    let got = grab(&mut dee, "x").await["coins"].as_u64().unwrap();
    let closed = cy.recv_type_skipping("red_packet_closed").await;
    assert_eq!(closed["refunded"].as_u64(), Some(40 - got));
    assert_eq!(
        grab(&mut dee, "x").await["coins"].as_u64(),
        Some(got),
        "a winner's retry still answers"
    );
    let (mut eve, _) = server.joined("demo", Some(("eve", Role::Viewer))).await;
    assert_eq!(grab(&mut eve, "x").await["code"], "expired");
    let (_, me) = server
        .get_json("/api/me", Some(&server.token("cy", Role::Viewer)))
        .await;
    assert_eq!(me["balance"].as_u64(), Some(100 - got));
    assert_eq!(
        server.audit().await,
        json!({"credited": 100, "balances": 100, "gifted": 0, "held": 0, "ok": true})
    );
}

#[tokio::test]
async fn the_host_cut_is_revenue_split_exactly() {
    let server = TestServer::start_with(|c| c.red_packet_host_cut_bp = 1000).await;
    server.credit("fay", 1000, "fund").await;
    let (mut fay, _) = server.joined("demo", Some(("fay", Role::Viewer))).await;
    let (mut watcher, _) = server.joined("demo", None).await;
    assert_eq!(
        send_packet(&mut fay, "h", 100, 5, "equal").await["balance"],
        900
    );
    let ev = watcher.recv_type_skipping("red_packet").await;
    assert_eq!(ev["host_cut"], 10);
    let (_, rev) = server
        .get_json("/api/streams/demo/revenue", Some(ADMIN))
        .await;
    assert_eq!(rev["gross"], 10);
    assert_eq!(rev["streamer"], 10 * 5000);
    assert_eq!(
        server.audit().await,
        json!({"credited": 1000, "balances": 900, "gifted": 10, "held": 90, "ok": true})
    );
}

/// Restart in the middle of a packet: the packet, its grabs and its held coins come back from
/// storage and the journal, grabbing goes on, nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_in_flight_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "packet-restart-secret";
    let start = |dir: std::path::PathBuf| async move {
        TestServer::start_in(dir, |c| {
            c.token_secret = Some(secret.into());
            c.red_packet_ttl_ms = 60_000;
        })
        .await
    };
    let server = start(dir.path().to_path_buf()).await;
    server.credit("gus", 100, "fund").await;
    let (mut gus, _) = server.joined("demo", Some(("gus", Role::Viewer))).await;
    assert_eq!(
        send_packet(&mut gus, "r", 50, 5, "random").await["type"],
        "red_packet_ok"
    );
    let mut won = Vec::new();
    for u in 0..2 {
        let (mut c, _) = server
            .joined("demo", Some((&format!("w{u}"), Role::Viewer)))
            .await;
        won.push(grab(&mut c, "r").await);
    }
    drop(gus);
    server.stop().await.unwrap();
    let server = start(dir.path().to_path_buf()).await;
    let audit = server.audit().await;
    let held_before: u64 = 50
        - won
            .iter()
            .map(|w| w["coins"].as_u64().unwrap())
            .sum::<u64>();
    assert_eq!(
        audit,
        json!({"credited": 100, "balances": 100 - held_before, "gifted": 0, "held": held_before, "ok": true})
    );
    // The sender's retry of the create answers the same, not `conflict`.
    let (mut gus, _) = server.joined("demo", Some(("gus", Role::Viewer))).await;
    assert_eq!(
        send_packet(&mut gus, "r", 50, 5, "random").await["balance"],
        50
    );
    assert_eq!(
        send_packet(&mut gus, "r", 51, 5, "random").await["code"],
        "conflict"
    );
    // Winners' retries answer the same; three more shares are left, then it is gone.
    for (u, w) in won.iter().enumerate() {
        let (mut c, _) = server
            .joined("demo", Some((&format!("w{u}"), Role::Viewer)))
            .await;
        assert_eq!(grab(&mut c, "r").await["coins"], w["coins"]);
    }
    let mut rest = 0;
    for u in 2..6 {
        let (mut c, _) = server
            .joined("demo", Some((&format!("w{u}"), Role::Viewer)))
            .await;
        let g = grab(&mut c, "r").await;
        if u < 5 {
            rest += g["coins"].as_u64().unwrap();
        } else {
            assert_eq!(g["code"], "gone");
        }
    }
    assert_eq!(rest, held_before);
    assert_eq!(server.audit().await["held"], 0);
    assert_eq!(server.audit().await["ok"], true);
}

#[tokio::test]
async fn red_packets_count_against_the_daily_cap() {
    let server = TestServer::start_with(|c| c.daily_cap = 100).await;
    server.credit("hal", 1000, "fund").await;
    let (mut hal, _) = server.joined("demo", Some(("hal", Role::Viewer))).await;
    assert_eq!(
        send_packet(&mut hal, "a", 80, 2, "equal").await["type"],
        "red_packet_ok"
    );
    // A retry is not spending again.
    assert_eq!(
        send_packet(&mut hal, "a", 80, 2, "equal").await["type"],
        "red_packet_ok"
    );
    assert_eq!(
        send_packet(&mut hal, "b", 21, 1, "equal").await["code"],
        "daily_cap"
    );
    hal.gift("g", "crown", 1, None).await;
    assert_eq!(hal.gift_answer("g").await["code"], "daily_cap");
    assert_eq!(
        send_packet(&mut hal, "c", 20, 1, "equal").await["type"],
        "red_packet_ok",
        "exactly the cap passes"
    );
    assert_eq!(server.audit().await["ok"], true);
}

/// kill -9 between the packet's debit and its last grab: after the restart every acknowledged
/// create and grab is there once, the coins still held come back with the packet, the rest of
/// the shares can still be grabbed, and nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_the_debit_and_the_last_grab_loses_and_doubles_nothing() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "packet-kill-secret";
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_giftcast"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token-secret",
                secret,
                "--admin-token",
                ADMIN,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let base = format!("http://127.0.0.1:{port}");
    let ready = || async {
        for _ in 0..400 {
            if reqwest::get(format!("{base}/readyz"))
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("server did not come up");
    };
    let keys = giftcast::auth::TokenKeys::new(secret.as_bytes());
    let client = |user: &str| {
        let token = keys.mint(user, user, Role::Viewer, 3600);
        let url = format!("ws://127.0.0.1:{port}/ws");
        async move {
            let mut c = Client::connect(&url).await;
            c.join("demo", Some(&token), None).await;
            c
        }
    };
    let audit = || async {
        reqwest::Client::new()
            .get(format!("{base}/api/admin/audit"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let mut child = spawn();
    ready().await;
    let r = reqwest::Client::new()
        .post(format!("{base}/api/admin/credit"))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": "ivy", "coins": 1000, "reference": "fund"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ivy = client("ivy").await;
    assert_eq!(
        send_packet(&mut ivy, "k", 600, 6, "random").await["balance"],
        400
    );
    // Three grabs acknowledged, then grabs in flight at the kill.
    let mut acked = Vec::new();
    for u in 0..3 {
        let mut c = client(&format!("k{u}")).await;
        let g = grab(&mut c, "k").await;
        assert_eq!(g["type"], "grab_ok");
        acked.push((format!("k{u}"), g["coins"].as_u64().unwrap()));
    }
    let mut in_flight = Vec::new();
    for u in 3..5 {
        let mut c = client(&format!("k{u}")).await;
        c.send(json!({"type": "grab", "packet_id": "k"})).await;
        in_flight.push(c);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(in_flight);

    let mut child = spawn();
    ready().await;
    let a = audit().await;
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["credited"], 1000);
    // Acknowledged grabs answer the same; everyone else gets what is left, exactly.
    for (user, coins) in &acked {
        let mut c = client(user).await;
        assert_eq!(grab(&mut c, "k").await["coins"].as_u64(), Some(*coins));
    }
    let mut total: u64 = acked.iter().map(|(_, c)| c).sum();
    let mut winners = acked.len();
    for u in 3..9 {
        let mut c = client(&format!("k{u}")).await;
        let g = grab(&mut c, "k").await;
        if g["type"] == "grab_ok" {
            total += g["coins"].as_u64().unwrap();
            winners += 1;
        } else {
            assert_eq!(g["code"], "gone", "{g}");
        }
    }
    assert_eq!(
        winners, 6,
        "exactly six shares, whatever the kill interrupted"
    );
    assert_eq!(total, 600, "the shares sum exactly to the packet");
    let a = audit().await;
    assert_eq!(
        a,
        json!({"credited": 1000, "balances": 1000, "gifted": 0, "held": 0, "ok": true})
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_timed_out_member_can_neither_drop_nor_grab() {
    let server = TestServer::start().await;
    server.credit("rich", 100, "f1").await;
    server.credit("bad", 100, "f2").await;
    let (mut host, _) = server.joined("demo", Some(("demo", Role::Streamer))).await;
    let (mut rich, _) = server.joined("demo", Some(("rich", Role::Viewer))).await;
    let (mut bad, _) = server.joined("demo", Some(("bad", Role::Viewer))).await;
    assert_eq!(
        send_packet(&mut rich, "t", 10, 2, "equal").await["type"],
        "red_packet_ok"
    );
    host.send(json!({"type": "timeout", "user_id": "bad", "secs": 60}))
        .await;
    host.recv_type_skipping("mod_action").await;
    assert_eq!(grab(&mut bad, "t").await["code"], "timed_out");
    assert_eq!(
        send_packet(&mut bad, "u", 10, 2, "equal").await["code"],
        "timed_out"
    );
    let (_, me) = server
        .get_json("/api/me", Some(&server.token("bad", Role::Viewer)))
        .await;
    assert_eq!(me["balance"], 100);
    assert_eq!(server.audit().await["ok"], true);
}

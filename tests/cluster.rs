//! Cluster mode: three nodes on loopback over the real NATS server (127.0.0.1:4222).
//! Fails, never skips, when NATS is down.

mod common;

use common::*;
use giftcast::auth::Role;
use giftcast::config::ClusterConfig;
use serde_json::{json, Value};

const NATS: &str = "nats://127.0.0.1:4222";
const SECRET: &str = "cluster-test-secret";

/// Three nodes of a cluster with a fresh id (several test clusters share one NATS server).
async fn cluster3() -> Vec<TestServer> {
    let id: String = format!("t{}", rand_suffix());
    let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|n| n.to_string()).collect();
    let mut out = Vec::new();
    for n in &nodes {
        let nodes = nodes.clone();
        let id = id.clone();
        let n = n.clone();
        out.push(
            TestServer::start_with(move |c| {
                c.token_secret = Some(SECRET.into());
                c.gift_rate_per_min = 0;
                c.chat_rate_per_min = 0;
                c.cluster = Some(ClusterConfig {
                    nats_url: NATS.into(),
                    cluster_id: id,
                    node_id: n,
                    nodes,
                });
            })
            .await,
        );
    }
    out
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}{}", n % 1_000_000_000, std::process::id())
}

#[tokio::test]
async fn viewers_on_every_node_see_the_same_events_in_the_same_order() {
    let nodes = cluster3().await;
    let mut viewers = Vec::new();
    for n in &nodes {
        for _ in 0..3 {
            viewers.push(n.joined("demo", None).await.0);
        }
    }
    let mut senders = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        senders.push(
            n.joined("demo", Some((&format!("talker{i}"), Role::Viewer)))
                .await
                .0,
        );
    }
    let per_sender = 30;
    for round in 0..per_sender {
        for (i, s) in senders.iter_mut().enumerate() {
            s.chat(&format!("s{i} m{round}")).await;
        }
    }
    let total = per_sender * senders.len();
    let mut reference: Option<Vec<(u64, String)>> = None;
    for v in viewers.iter_mut().chain(senders.iter_mut()) {
        let mut seen = Vec::new();
        while seen.len() < total {
            let ev = v.next().await;
            assert_ne!(ev["type"], "error", "{ev}");
            if ev["type"] == "chat" {
                seen.push((
                    ev["seq"].as_u64().unwrap(),
                    ev["text"].as_str().unwrap().to_string(),
                ));
            }
        }
        for w in seen.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "gap or reorder");
        }
        match &reference {
            None => reference = Some(seen),
            Some(r) => assert_eq!(&seen, r, "two viewers saw different orders"),
        }
    }
    // Each sender's own messages are in the order sent.
    let r = reference.unwrap();
    for i in 0..3 {
        let mine: Vec<&String> = r
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with(&format!("s{i} ")))
            .collect();
        let expected: Vec<String> = (0..per_sender).map(|m| format!("s{i} m{m}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn one_wallet_spent_through_three_nodes_never_overspends() {
    let nodes = cluster3().await;
    // The credit goes to the wallet's owner whichever node takes it.
    assert_eq!(nodes[1].credit("spender", 1000, "c1").await.status(), 200);
    assert_eq!(
        nodes[2].credit("spender", 1000, "c1").await.status(),
        200,
        "idempotent across nodes"
    );
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for c in 0..2 {
            let (mut client, joined) = n.joined("demo", Some(("spender", Role::Viewer))).await;
            // The balance comes from the wallet's node, whichever node this is.
            assert!(joined["balance"].as_u64().unwrap() <= 1000);
            tasks.push(tokio::spawn(async move {
                let ids: Vec<String> = (0..10).map(|g| format!("n{i}c{c}g{g}")).collect();
                for id in &ids {
                    client.gift(id, "star", 1, None).await;
                }
                let mut oks = Vec::new();
                for id in &ids {
                    let a = client.gift_answer(id).await;
                    if a["type"] == "gift_ok" {
                        oks.push((id.clone(), a));
                    } else {
                        assert_eq!(a["code"], "insufficient_funds", "{a}");
                    }
                }
                (client, oks)
            }));
        }
    }
    let mut acked: Vec<(String, Value)> = Vec::new();
    let mut clients = Vec::new();
    for t in tasks {
        let (c, oks) = t.await.unwrap();
        clients.push(c);
        acked.extend(oks);
    }
    assert_eq!(
        acked.len(),
        1000 / 50,
        "exactly floor(balance / price) gifts succeed"
    );
    let mut balances: Vec<u64> = acked
        .iter()
        .map(|(_, a)| a["balance"].as_u64().unwrap())
        .collect();
    balances.sort();
    assert_eq!(
        balances,
        (0..20).map(|k| k * 50).collect::<Vec<_>>(),
        "every debit saw its own balance"
    );
    for n in &nodes {
        let audit = n.audit().await;
        assert_eq!(
            audit,
            json!({"credited": 1000, "balances": 0, "gifted": 1000, "ok": true})
        );
        let (status, rev) = n.get_json("/api/streams/demo/revenue", Some(ADMIN)).await;
        assert_eq!(status, 200);
        assert_eq!(rev["gross"], 1000);
        assert_eq!(rev["streamer"], 1000 * 5000);
    }
    // A retry through another node answers the same gift_ok and debits nothing.
    let (id, first) = &acked[0];
    let (mut other, _) = nodes[2]
        .joined("demo", Some(("spender", Role::Viewer)))
        .await;
    other.gift(id, "star", 1, None).await;
    let again = other.gift_answer(id).await;
    assert_eq!(again["balance"], first["balance"]);
    assert_eq!(again["type"], "gift_ok");
    assert_eq!(nodes[0].audit().await["gifted"], 1000);
}

#[tokio::test]
async fn a_gift_on_any_node_is_shouted_out_everywhere_and_thanked_across_nodes() {
    let nodes = cluster3().await;
    let (mut streamer, _) = nodes[0]
        .joined("star", Some(("star", Role::Streamer)))
        .await;
    let (mut watcher, _) = nodes[1].joined("star", None).await;
    nodes[2].credit("fan", 100, "f").await;
    let (mut fan, joined) = nodes[2].joined("star", Some(("fan", Role::Viewer))).await;
    assert_eq!(joined["balance"], 100);
    fan.gift("q1", "coffee", 1, Some("hello from node 3")).await;
    let ok = fan.gift_answer("q1").await;
    assert_eq!(ok["type"], "gift_ok", "{ok}");
    let shout = watcher.recv_type("shoutout").await;
    assert_eq!(shout["message"], "hello from node 3");
    assert_eq!(shout["seq"], ok["seq"]);
    assert_eq!(streamer.recv_type("shoutout").await["gift_id"], "q1");
    let token = nodes[1].token("star", Role::Streamer);
    let (status, queue) = nodes[1]
        .get_json("/api/streams/star/queue", Some(&token))
        .await;
    assert_eq!(status, 200);
    assert_eq!(queue["gifts"][0]["gift_id"], "q1");
    streamer
        .send(json!({"type": "thanks", "gift_id": "q1", "text": "thanks!"}))
        .await;
    let thanks = loop {
        let f = fan.next().await;
        if f["type"] == "thanks" {
            break f;
        }
    };
    assert_eq!(thanks["to"]["id"], "fan");
    // Chat from a viewer on another node than the room's owner reaches everyone.
    fan.chat("great stream").await;
    let chat = loop {
        let f = watcher.next().await;
        if f["type"] == "chat" {
            break f;
        }
    };
    assert_eq!(chat["text"], "great stream");
}

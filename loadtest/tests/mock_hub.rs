//! End-to-end tests of the harness against a tiny in-process hub that speaks the protocol
//! subset the harness uses (join, chat, gift, thanks; HTTP catalog, credit, audit, revenue, me).
//! The hub can be told to cheat, to prove that the money check catches it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "mock-hub-secret";
const ADMIN: &str = "mock-admin";

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<mpsc::UnboundedSender<String>>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    balances: HashMap<String, i64>,
    credit_refs: HashMap<String, i64>,
    credited: i64,
    gifted: i64,
    gross: HashMap<String, i64>,
    /// (user, gift_id) → (contents, balance, seq)
    gifts: HashMap<(String, String), (String, i64, u64)>,
    /// Cheat: the revenue counts every gift twice.
    double_revenue: bool,
}

type Shared = Arc<Mutex<State>>;

fn price(sticker: &str) -> Option<i64> {
    match sticker {
        "rose" => Some(1),
        "heart" => Some(5),
        _ => None,
    }
}

fn broadcast(room: &mut Room, ev: &Value) {
    let s = ev.to_string();
    room.members.retain(|m| m.send(s.clone()).is_ok());
}

async fn ws_conn(stream: TcpStream, st: Shared) {
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut src) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Coalesce what is queued into one batch frame, as a real hub may.
            let mut evs = vec![first];
            while let Ok(more) = rx.try_recv() {
                evs.push(more);
                if evs.len() >= 50 {
                    break;
                }
            }
            let frame = if evs.len() == 1 {
                evs.pop().unwrap_or_default()
            } else {
                format!("{{\"type\":\"batch\",\"events\":[{}]}}", evs.join(","))
            };
            if sink.send(Message::text(frame)).await.is_err() {
                break;
            }
        }
    });
    let mut room_id: Option<String> = None;
    let mut user: Option<(String, String)> = None;
    while let Some(Ok(msg)) = src.next().await {
        let Message::Text(t) = msg else { continue };
        let Ok(m) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        let mut s = st.lock();
        match m["type"].as_str().unwrap_or("") {
            "join" => {
                if let Some(tok) = m["token"].as_str() {
                    let v = Validation::new(Algorithm::HS256);
                    match decode::<Value>(tok, &DecodingKey::from_secret(SECRET.as_bytes()), &v) {
                        Ok(d) => {
                            user = Some((
                                d.claims["sub"].as_str().unwrap_or("").into(),
                                d.claims["name"].as_str().unwrap_or("").into(),
                            ))
                        }
                        Err(_) => break,
                    }
                }
                let id = m["stream"].as_str().unwrap_or("").to_string();
                let room = s.rooms.entry(id.clone()).or_default();
                room.members.push(tx.clone());
                let _ = tx.send(json!({"type":"joined","stream":id,"seq":room.seq,"viewers":room.members.len(),"catalog":[]}).to_string());
                room_id = Some(id);
            }
            "chat" => {
                let (Some(r), Some((uid, name))) = (&room_id, &user) else {
                    continue;
                };
                let room = s.rooms.get_mut(r).expect("room");
                room.seq += 1;
                let ev = json!({"type":"chat","seq":room.seq,"from":{"id":uid,"name":name},"text":m["text"],"ts":1});
                broadcast(room, &ev);
            }
            "gift" => {
                let (Some(r), Some((uid, name))) = (room_id.clone(), user.clone()) else {
                    continue;
                };
                let gid = m["gift_id"].as_str().unwrap_or("").to_string();
                let contents = format!("{}|{}|{}|{}", r, m["sticker"], m["count"], m["message"]);
                if let Some((c, bal, seq)) = s.gifts.get(&(uid.clone(), gid.clone())) {
                    let ans = if *c == contents {
                        json!({"type":"gift_ok","gift_id":gid,"balance":bal,"seq":seq})
                    } else {
                        json!({"type":"gift_rejected","gift_id":gid,"code":"conflict"})
                    };
                    let _ = tx.send(ans.to_string());
                    continue;
                }
                let Some(p) = m["sticker"].as_str().and_then(price) else {
                    let _ = tx.send(
                        json!({"type":"gift_rejected","gift_id":gid,"code":"unknown_sticker"})
                            .to_string(),
                    );
                    continue;
                };
                let amount = p * m["count"].as_i64().unwrap_or(1);
                let bal = *s.balances.get(&uid).unwrap_or(&0);
                if bal < amount {
                    let _ = tx.send(json!({"type":"gift_rejected","gift_id":gid,"code":"insufficient_funds","balance":bal}).to_string());
                    continue;
                }
                s.balances.insert(uid.clone(), bal - amount);
                s.gifted += amount;
                let mult = if s.double_revenue { 2 } else { 1 };
                *s.gross.entry(r.clone()).or_default() += amount * mult;
                let room = s.rooms.get_mut(&r).expect("room");
                room.seq += 1;
                let seq = room.seq;
                let mut ev = json!({"type":"shoutout","seq":seq,"gift_id":gid,"from":{"id":uid,"name":name},"sticker":m["sticker"],"count":m["count"],"amount":amount,"combo":1,"ts":1});
                if m["message"].is_string() {
                    ev["message"] = m["message"].clone();
                }
                let _ = tx.send(
                    json!({"type":"gift_ok","gift_id":gid,"balance":bal - amount,"seq":seq})
                        .to_string(),
                );
                broadcast(room, &ev);
                s.gifts.insert((uid, gid), (contents, bal - amount, seq));
            }
            "thanks" => {
                let Some(r) = &room_id else { continue };
                let room = s.rooms.get_mut(r).expect("room");
                room.seq += 1;
                let ev = json!({"type":"thanks","seq":room.seq,"gift_id":m["gift_id"],"to":{"id":"?","name":"?"},"text":m["text"],"ts":1});
                broadcast(room, &ev);
            }
            "ping" => {
                let _ = tx.send(json!({"type":"pong","t":m["t"]}).to_string());
            }
            _ => {
                let _ =
                    tx.send(json!({"type":"error","code":"bad_frame","message":"?"}).to_string());
            }
        }
    }
    drop(tx);
    writer.abort();
}

async fn http_conn(mut stream: TcpStream, st: Shared) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    // Read the head and a Content-Length body.
    let (head, body) = loop {
        let Ok(n) = stream.read(&mut tmp).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < p + 4 + len {
                let Ok(n) = stream.read(&mut tmp).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            break (head, buf[p + 4..p + 4 + len].to_vec());
        }
    };
    let first = head.lines().next().unwrap_or("").to_string();
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let auth = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("authorization:")
                .then(|| {
                    l.split_once(':')
                        .map(|x| x.1.trim().trim_start_matches("Bearer ").to_string())
                        .unwrap_or_default()
                })
        })
        .unwrap_or_default();
    let (status, out) = {
        let mut s = st.lock();
        match (method, path) {
            ("GET", "/api/catalog") => (
                200,
                json!({"stickers":[{"id":"rose","name":"Rose","price":1,"emoji":"r"},{"id":"heart","name":"Heart","price":5,"emoji":"h"}]}),
            ),
            ("POST", "/api/admin/credit") if auth == ADMIN => {
                let b: Value = serde_json::from_slice(&body).unwrap_or_default();
                let user = b["user_id"].as_str().unwrap_or("").to_string();
                let reference = b["reference"].as_str().unwrap_or("").to_string();
                if let Some(bal) = s.credit_refs.get(&reference) {
                    (200, json!({"balance": bal}))
                } else {
                    let coins = b["coins"].as_i64().unwrap_or(0);
                    let bal = s.balances.entry(user).or_default();
                    *bal += coins;
                    let bal = *bal;
                    s.credited += coins;
                    s.credit_refs.insert(reference, bal);
                    (200, json!({"balance": bal}))
                }
            }
            ("GET", "/api/admin/audit") if auth == ADMIN => {
                let balances: i64 = s.balances.values().sum();
                (
                    200,
                    json!({"credited": s.credited, "balances": balances, "gifted": s.gifted, "ok": s.credited == balances + s.gifted}),
                )
            }
            ("GET", "/api/me") => match decode::<Value>(
                &auth,
                &DecodingKey::from_secret(SECRET.as_bytes()),
                &Validation::new(Algorithm::HS256),
            ) {
                Ok(d) => {
                    let uid = d.claims["sub"].as_str().unwrap_or("").to_string();
                    (
                        200,
                        json!({"user_id": uid, "name": d.claims["name"], "role": d.claims["role"], "balance": s.balances.get(&uid).copied().unwrap_or(0)}),
                    )
                }
                Err(_) => (
                    401,
                    json!({"error":{"code":"unauthorized","message":"bad token"}}),
                ),
            },
            ("GET", p)
                if p.starts_with("/api/streams/") && p.ends_with("/revenue") && auth == ADMIN =>
            {
                let id = p
                    .trim_start_matches("/api/streams/")
                    .trim_end_matches("/revenue");
                let gross = s.gross.get(id).copied().unwrap_or(0);
                (
                    200,
                    json!({"stream": id, "gifts": 0, "gross": gross, "store": gross * 3000, "streamer": gross * 5000, "platform": gross * 2000, "unit": 10000, "by_sticker": [], "top_gifters": []}),
                )
            }
            _ => (404, json!({"error":{"code":"not_found","message":"?"}})),
        }
    };
    let body = out.to_string();
    let resp = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

struct Hub {
    http: SocketAddr,
    ws: SocketAddr,
    state: Shared,
}

async fn start_hub() -> Hub {
    let state: Shared = Arc::new(Mutex::new(State::default()));
    let hl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub = Hub {
        http: hl.local_addr().unwrap(),
        ws: wl.local_addr().unwrap(),
        state: state.clone(),
    };
    let st = state.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hl.accept().await {
            tokio::spawn(http_conn(s, st.clone()));
        }
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = wl.accept().await {
            tokio::spawn(ws_conn(s, state.clone()));
        }
    });
    hub
}

fn args(hub: &Hub, scenario: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["loadtest".into()];
    v.extend(scenario.iter().map(|s| s.to_string()));
    v.extend(
        [
            "--url",
            &format!("http://{}", hub.http),
            "--ws-url",
            &format!("ws://{}/ws", hub.ws),
            "--token-secret",
            SECRET,
            "--admin-token",
            ADMIN,
            "--no-progress",
            "--duration-secs",
            "1",
            "--drain-secs",
            "2",
            "--sample-ms",
            "250",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_every_delivery() {
    let hub = start_hub().await;
    let r = loadtest::run_from_args(args(
        &hub,
        &[
            "fanout",
            "--viewers",
            "20",
            "--senders",
            "3",
            "--rate",
            "30,60",
        ],
    ))
    .await
    .unwrap();
    let sent = r.counters["chats_sent"];
    assert!(sent >= 60, "{sent}");
    // Every chat reaches every member of the room: 20 viewers + 3 senders + the streamer.
    assert_eq!(r.counters["deliveries"], sent * 24, "{:#?}", r.counters);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!r.counters.contains_key("seq_gaps"));
    assert_eq!(r.connections.joined, 24);
    assert_eq!(r.steps.len(), 2);
    assert!(r.latency_ms["chat"].count == sent * 24);
    assert!(r.money.is_none());
    assert!(r.to_text().contains("load steps"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_money_check_passes_on_an_honest_hub() {
    let hub = start_hub().await;
    let dir = std::env::temp_dir().join(format!("lt-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("g.json");
    let svg_path = dir.join("g.svg");
    let mut a = args(
        &hub,
        &[
            "gifts",
            "--wallets",
            "4",
            "--inflight",
            "2",
            "--sticker",
            "mix",
            "--retry-every",
            "5",
            "--viewers",
            "2",
            "--coins",
            "400",
        ],
    );
    a.extend([
        "--json".to_string(),
        json_path.display().to_string(),
        "--svg".to_string(),
        svg_path.display().to_string(),
    ]);
    let r = loadtest::run_from_args(a).await.unwrap();
    let m = r.money.as_ref().unwrap();
    assert!(m.ok, "{:#?}", m);
    assert!(m.tally.acked_gifts > 0, "{}", r.to_text());
    assert!(
        r.counters.get("retry_ok").copied().unwrap_or(0) > 0,
        "{:?}",
        r.counters
    );
    assert_eq!(m.tally.wallets_checked, 4);
    assert_eq!(m.streams[0].gross_after, m.acked_coins as i64);
    // 400 coins each: the wallets run dry and see insufficient_funds, which is no failure.
    assert!(
        r.errors.contains_key("gift_rejected:insufficient_funds"),
        "{:?}",
        r.errors
    );
    assert!(r.latency_ms["gift_ack"].count > 0);
    assert!(r.latency_ms["shoutout"].count > 0);
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(j["money"]["ok"], true);
    assert!(std::fs::read_to_string(&svg_path).unwrap().contains("<svg"));
    let st = hub.state.lock();
    assert_eq!(st.credited, 1600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_money_check_catches_a_cheating_hub() {
    let hub = start_hub().await;
    hub.state.lock().double_revenue = true;
    let r = loadtest::run_from_args(args(&hub, &["gifts", "--wallets", "2", "--rate", "20"]))
        .await
        .unwrap();
    let m = r.money.as_ref().unwrap();
    assert!(!m.ok);
    assert!(
        m.failures.iter().any(|f| f.contains("gross grew by")),
        "{:?}",
        m.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_has_chat_gifts_and_thanks() {
    let hub = start_hub().await;
    let r = loadtest::run_from_args(args(
        &hub,
        &[
            "mixed",
            "--viewers",
            "10",
            "--chatters",
            "3",
            "--chat-rate",
            "30",
            "--gifters",
            "3",
            "--gift-rate",
            "30",
            "--thank-ratio",
            "1",
            "--sticker",
            "heart",
        ],
    ))
    .await
    .unwrap();
    assert!(r.money.as_ref().unwrap().ok, "{:#?}", r.money);
    assert!(r.counters["thanks_sent"] > 0);
    assert!(r.counters["thanks_recv"] > 0);
    assert!(r.latency_ms.contains_key("thanks"));
    assert!(r.latency_ms.contains_key("chat"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_and_soak_run() {
    let hub = start_hub().await;
    let r = loadtest::run_from_args(args(
        &hub,
        &[
            "churn",
            "--clients",
            "10",
            "--hold-ms",
            "20",
            "--viewers",
            "5",
            "--senders",
            "1",
            "--rate",
            "10",
        ],
    ))
    .await
    .unwrap();
    assert!(r.counters["churn_cycles"] > 10, "{:?}", r.counters);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let r = loadtest::run_from_args(args(
        &hub,
        &[
            "soak",
            "--viewers",
            "5",
            "--chatters",
            "2",
            "--gifters",
            "2",
            "--gift-rate",
            "10",
            "--window-secs",
            "0.5",
        ],
    ))
    .await
    .unwrap();
    assert!(!r.drift.is_empty());
    assert!(r.money.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procs_merge_child_reports() {
    let hub = start_hub().await;
    let mut a = args(
        &hub,
        &["gifts", "--wallets", "4", "--rate", "40", "--viewers", "3"],
    );
    a.extend([
        "--procs".into(),
        "2".into(),
        "--threads".into(),
        "1".into(),
        "--exe".into(),
        env!("CARGO_BIN_EXE_loadtest").into(),
    ]);
    let r = loadtest::run_from_args(a).await.unwrap();
    assert_eq!(r.procs, 2);
    assert_eq!(
        r.client_threads, 1,
        "--threads reaches the worker processes"
    );
    assert_eq!(r.connections.joined, 1 + 3 + 4);
    let m = r.money.unwrap();
    assert!(m.ok, "{:#?}", m);
    assert_eq!(m.tally.wallets_checked, 4);
}

//! Shared test harness: a real giftcast server on port 0 and tokio-tungstenite clients.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use giftcast::app::App;
use giftcast::auth::Role;
use giftcast::config::Config;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const ADMIN: &str = "test-admin-token";
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
pub const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// The real PostgreSQL on 127.0.0.1:5432; a test that needs it FAILS when it is unreachable.
pub async fn pg_admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must be reachable at 127.0.0.1:5432 for this test (it is not skipped)");
    tokio::spawn(connection);
    client
}

/// A fresh PostgreSQL schema, dropped (with everything in it) on drop.
pub struct Schema(pub String);

impl Schema {
    pub async fn create() -> Schema {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "gc_it_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand::Rng::random_range(&mut rand::rng(), 0..1_000_000u32)
        );
        pg_admin()
            .await
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Schema(name)
    }

    pub fn url(&self, host_port: &str) -> String {
        format!(
            "postgres://postgres@{host_port}/test?options=-csearch_path%3D{}",
            self.0
        )
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((c, conn)) =
                    tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await;
                }
            })
        })
        .join();
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut s = TestServer::start_in(dir.path().to_path_buf(), f).await;
        s.dir = Some(dir);
        s
    }

    /// A server on a data dir the caller keeps (to restart on it).
    pub async fn start_in(data_dir: std::path::PathBuf, f: impl FnOnce(&mut Config)) -> TestServer {
        let dir: Option<tempfile::TempDir> = None;
        let mut config = Config::for_tests(data_dir);
        config.admin_token = Some(ADMIN.into());
        f(&mut config);
        let listener = giftcast::server::bind(config.listen).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = giftcast::server::build(config).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(giftcast::server::serve(app.clone(), listener, async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            app,
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn token(&self, user: &str, role: Role) -> String {
        self.app
            .keys
            .mint(user, &format!("name-{user}"), role, 3600)
    }

    pub async fn credit(&self, user: &str, coins: u64, reference: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url("/api/admin/credit"))
            .bearer_auth(ADMIN)
            .json(&json!({"user_id": user, "coins": coins, "reference": reference}))
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(self.url(path));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn audit(&self) -> Value {
        self.get_json("/api/admin/audit", Some(ADMIN)).await.1
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// A client joined to `stream`, with a token for `user` if given.
    pub async fn joined(&self, stream: &str, user: Option<(&str, Role)>) -> (Client, Value) {
        let mut c = self.client().await;
        let token = user.map(|(u, r)| self.token(u, r));
        let joined = c.join(stream, token.as_deref(), None).await;
        (c, joined)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    buf: VecDeque<Value>,
    /// Batch frames received (to check coalescing).
    pub batches: usize,
    /// Gift answers read while waiting for another one (answers may come in any order).
    answers: Vec<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Client {
            ws,
            buf: VecDeque::new(),
            batches: 0,
            answers: Vec::new(),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_string())).await.unwrap();
    }

    /// Next event, batches flattened. Panics after `RECV_TIMEOUT`.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(RECV_TIMEOUT)
            .await
            .expect("timed out waiting for a frame")
    }

    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(v) = self.buf.pop_front() {
                return Some(v);
            }
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("server sends JSON");
                    if v["type"] == "batch" {
                        self.batches += 1;
                        for e in v["events"].as_array().expect("batch has events") {
                            self.buf.push_back(e.clone());
                        }
                    } else {
                        self.buf.push_back(v);
                    }
                }
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Some(json!({"type": "__close", "code": code, "reason": reason}));
                }
                Ok(_) => continue,
                Err(_) => return Some(json!({"type": "__closed"})),
            }
        }
    }

    /// The next frame of type `ty`, skipping `viewers` counts.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
            if v["type"] == "viewers" {
                continue;
            }
            panic!("expected {ty}, got {v}");
        }
    }

    /// The next frame of type `ty`, skipping everything else.
    pub async fn recv_type_skipping(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// The next frame that is not a `viewers` count.
    pub async fn next(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] != "viewers" {
                return v;
            }
        }
    }

    pub async fn join(&mut self, stream: &str, token: Option<&str>, since: Option<u64>) -> Value {
        let mut j = json!({"type": "join", "stream": stream});
        if let Some(t) = token {
            j["token"] = t.into();
        }
        if let Some(s) = since {
            j["since"] = s.into();
        }
        self.send(j).await;
        self.recv_type("joined").await
    }

    pub async fn chat(&mut self, text: &str) {
        self.send(json!({"type": "chat", "text": text})).await;
    }

    pub async fn gift(&mut self, gift_id: &str, sticker: &str, count: u32, message: Option<&str>) {
        let mut g = json!({"type": "gift", "gift_id": gift_id, "sticker": sticker, "count": count});
        if let Some(m) = message {
            g["message"] = m.into();
        }
        self.send(g).await;
    }

    /// Waits for this gift's `gift_ok` or `gift_rejected`, skipping room events.
    pub async fn gift_answer(&mut self, gift_id: &str) -> Value {
        if let Some(i) = self.answers.iter().position(|a| a["gift_id"] == gift_id) {
            return self.answers.remove(i);
        }
        loop {
            let v = self.recv().await;
            if v["type"] == "gift_ok" || v["type"] == "gift_rejected" {
                if v["gift_id"] == gift_id {
                    return v;
                }
                self.answers.push(v);
                continue;
            }
            if v["type"] == "__close" || v["type"] == "__closed" {
                panic!("closed while waiting for gift answer: {v}");
            }
        }
    }

    /// Waits for the close frame; returns its code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            let v = self
                .try_recv(RECV_TIMEOUT * 2)
                .await
                .expect("timed out waiting for close");
            if v["type"] == "__close" {
                return v["code"].as_u64().unwrap() as u16;
            }
            if v["type"] == "__closed" {
                return 1006;
            }
        }
    }
}

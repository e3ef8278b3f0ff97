//! Cluster mode with real processes: a wallet's node is killed (SIGKILL) mid-load and
//! restarted. Gifts for its wallets are refused `unavailable` meanwhile (never taken over, so
//! never spent twice), and every gift acknowledged before the kill is still there, once.

mod common;

use common::*;
use giftcast::auth::{Role, TokenKeys};
use serde_json::Value;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECRET: &str = "failover-test-secret";

struct Node {
    id: String,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Node {
    fn spawn(&mut self, cluster: &str, nodes: &str) {
        let child = Command::new(env!("CARGO_BIN_EXE_giftcast"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--token-secret",
                SECRET,
                "--admin-token",
                ADMIN,
                "--gift-rate",
                "0",
                "--chat-rate",
                "0",
            ])
            .args([
                "--nats-url",
                "nats://127.0.0.1:4222",
                "--cluster-id",
                cluster,
                "--node-id",
                &self.id,
                "--nodes",
                nodes,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    async fn wait_ready(&self) {
        for _ in 0..400 {
            if let Ok(r) = reqwest::get(self.url("/readyz")).await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {} did not become ready", self.id);
    }

    async fn client(&self) -> Client {
        Client::connect(&format!("ws://127.0.0.1:{}/ws", self.port)).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn admin_get(node: &Node, path: &str) -> Value {
    reqwest::Client::new()
        .get(node.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_wallet_node_loses_no_acknowledged_gift_and_nothing_is_spent_twice() {
    let cluster = format!(
        "fo{}x{}",
        std::process::id(),
        giftcast::now_ms() % 1_000_000
    );
    let ids = ["n1", "n2", "n3"];
    let nodes_arg = ids.join(",");
    let dirs: Vec<tempfile::TempDir> = ids.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Node> = ids
        .iter()
        .zip(&dirs)
        .map(|(id, d)| Node {
            id: id.to_string(),
            port: free_port(),
            dir: d.path().to_path_buf(),
            child: None,
        })
        .collect();
    for n in nodes.iter_mut() {
        n.spawn(&cluster, &nodes_arg);
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    // A wallet owned by n2, a room owned by another node, clients on n1 and n3.
    let owned: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    let user = (0..)
        .map(|i| format!("victim{i}"))
        .find(|u| giftcast::cluster::owner_of(&owned, u) == "n2")
        .unwrap();
    let room = "demo";
    let http = reqwest::Client::new();
    let r = http
        .post(nodes[0].url("/api/admin/credit"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"user_id": user, "coins": 100_000, "reference": "fund"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = TokenKeys::new(SECRET.as_bytes()).mint(&user, "Victim", Role::Viewer, 3600);
    let mut client = nodes[0].client().await;
    let joined = client.join(room, Some(&token), None).await;
    assert_eq!(joined["balance"], 100_000);

    // Gifts go out in pipelined bursts of 10; n2 is killed right after a burst is sent, so
    // gifts are in flight at the kill. Bursts continue while it is down.
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut refused: Vec<String> = Vec::new();
    for burst in 0..10 {
        let ids: Vec<String> = (0..10).map(|i| format!("b{burst}g{i}")).collect();
        for id in &ids {
            client.gift(id, "crown", 1, None).await;
        }
        if burst == 4 {
            nodes[1].kill9();
        }
        for id in &ids {
            let a = client.gift_answer(id).await;
            match a["type"].as_str() {
                Some("gift_ok") => {
                    acked.insert(id.clone(), a["balance"].as_u64().unwrap());
                }
                _ => {
                    assert_eq!(a["code"], "unavailable", "{a}");
                    assert!(burst >= 4, "refused while the wallet's node was up: {a}");
                    refused.push(id.clone());
                }
            }
        }
    }
    assert!(acked.len() >= 40, "gifts before the kill were acknowledged");
    assert!(
        !refused.is_empty(),
        "gifts for the dead node's wallets are refused, not taken over"
    );
    // The cluster-wide audit cannot be made while a node is down.
    let r = http
        .get(nodes[0].url("/api/admin/audit"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    // Restart n2 on its data dir: every acknowledged gift is there, once.
    nodes[1].spawn(&cluster, &nodes_arg);
    nodes[1].wait_ready().await;
    let mut retry = nodes[2].client().await;
    retry.join(room, Some(&token), None).await;
    for (id, balance) in &acked {
        retry.gift(id, "crown", 1, None).await;
        let a = retry.gift_answer(id).await;
        assert_eq!(a["type"], "gift_ok", "{a}");
        assert_eq!(
            a["balance"].as_u64(),
            Some(*balance),
            "a retry answers the same balance"
        );
    }
    // A refused gift may have been durable (the node died before answering): its retry tells.
    // Either way it is debited at most once.
    for id in &refused {
        retry.gift(id, "crown", 1, None).await;
        assert_eq!(retry.gift_answer(id).await["type"], "gift_ok");
    }
    let audit = admin_get(&nodes[0], "/api/admin/audit").await;
    assert_eq!(audit["ok"], true, "{audit}");
    let gifted = audit["gifted"].as_u64().unwrap();
    assert_eq!(
        gifted,
        (acked.len() + refused.len()) as u64 * 100,
        "every gift id debited exactly once"
    );
    assert_eq!(audit["credited"], 100_000);
    let me: Value = http
        .get(nodes[2].url("/api/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["balance"].as_u64().unwrap(), 100_000 - gifted);
    let rev = admin_get(&nodes[0], &format!("/api/streams/{room}/revenue")).await;
    assert_eq!(rev["gross"].as_u64(), Some(gifted));
}

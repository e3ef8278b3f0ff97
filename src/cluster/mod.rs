//! Cluster mode over NATS: several nodes serve the same rooms.
//!
//! - Each room has one owner node (rendezvous hash of the room id over `--nodes`). The owner
//!   stamps the room's seq; every fan-out round of an owned room is also published to
//!   `….room.<room>`. A node with local members of a room it does not own keeps a *mirror*:
//!   it subscribes to that subject, starts from the owner's history (`Sync`), and applies the
//!   rounds in seq order; a gap (NATS core is at-most-once) triggers a resync, and when history
//!   no longer covers it, the local members are told they lagged.
//! - Each wallet has one owner node (rendezvous hash of the user id). Only it debits, journals and
//!   remembers gift ids, so never-below-zero and at-most-once hold across nodes exactly as on
//!   one node. A gift on another node is a NATS request to the owner.
//! - Subjects are prefixed `gc.v1.<cluster id>`. Requests go to
//!   `….node.<node>.{room,wallet,admin}`; bodies are bincode in a versioned
//!   envelope (`wire`). No consensus of our own: a node that is down is simply unreachable, and
//!   what it owns is refused with `unavailable` until it is back (never taken over, so never
//!   spent twice).

pub mod wire;

use crate::app::{App, GiftReply};
use crate::auth::{Claims, Role};
use crate::hub::{Forward, Room};
use crate::ledger::Totals;
use crate::record::GiftRecord;
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::Duration;
use wire::{AdminReq, AdminResp, Events, RevenueParts, RoomReq, RoomResp, WalletReq, WalletResp};

/// How long a node waits for another node's answer. Long enough that a live node under load
/// answers, short enough that a person is told "unavailable" promptly when a node is down.
pub const CLUSTER_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Rounds of owned rooms waiting to be published to NATS; beyond it rounds are dropped and the
/// other nodes resync from history.
pub const FORWARD_QUEUE_MAX: usize = 65_536;
/// Self-requests at start (20 ms apart) waiting for our subscription to be active.
const SUBSCRIBE_CHECKS_MAX: usize = 250;
/// Nodes in one cluster.
pub const NODES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node {0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("bad answer from node {0}: {1}")]
    Bad(String, String),
}

pub struct Cluster {
    /// Subject prefix: `gc.v1.<cluster id>`.
    prefix: String,
    pub node_id: String,
    pub nodes: Vec<String>,
    client: async_nats::Client,
    /// Mirrors set up (or being set up) on this node.
    mirrors: DashMap<String, Arc<tokio::sync::OnceCell<()>>>,
}

/// Rendezvous (highest random weight) hashing with CRC32C: stable across processes and
/// versions, and removing a node moves only what it owned.
pub fn owner_of<'a>(nodes: &'a [String], key: &str) -> &'a str {
    nodes
        .iter()
        .map(|n| {
            let mut h = crc32c::crc32c(n.as_bytes());
            h = crc32c::crc32c_append(h, b"/");
            h = crc32c::crc32c_append(h, key.as_bytes());
            (h, n)
        })
        .max()
        .map(|(_, n)| n.as_str())
        .expect("at least one node")
}

impl Cluster {
    pub async fn connect(
        url: &str,
        cluster_id: &str,
        node_id: &str,
        nodes: &[String],
    ) -> anyhow::Result<Arc<Cluster>> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("giftcast-{node_id}"))
            .request_timeout(Some(Duration::from_millis(CLUSTER_REQUEST_TIMEOUT_MS)))
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {url}: {e}"))?;
        Ok(Arc::new(Cluster {
            prefix: format!("gc.v1.{cluster_id}"),
            node_id: node_id.to_string(),
            nodes: nodes.to_vec(),
            client,
            mirrors: DashMap::new(),
        }))
    }

    fn node_subject(&self, node: &str, kind: &str) -> String {
        format!("{}.node.{node}.{kind}", self.prefix)
    }

    fn room_subject(&self, room: &str) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    pub fn owner(&self, key: &str) -> &str {
        owner_of(&self.nodes, key)
    }

    pub fn owns(&self, key: &str) -> bool {
        self.owner(key) == self.node_id
    }

    async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        node: &str,
        kind: &str,
        req: &Req,
    ) -> Result<Resp, ClusterError> {
        let subject = self.node_subject(node, kind);
        let msg = tokio::time::timeout(
            Duration::from_millis(CLUSTER_REQUEST_TIMEOUT_MS),
            self.client.request(subject, wire::encode(req)),
        )
        .await
        .map_err(|_| ClusterError::Unreachable(node.into(), "timed out".into()))?
        .map_err(|e| ClusterError::Unreachable(node.into(), e.to_string()))?;
        wire::decode(&msg.payload).map_err(|e| ClusterError::Bad(node.into(), e))
    }

    pub async fn room_request(&self, room: &str, req: RoomReq) -> Result<RoomResp, ClusterError> {
        let owner = self.owner(room).to_string();
        self.request(&owner, "room", &(room.to_string(), req)).await
    }

    async fn wallet_request(
        &self,
        user_id: &str,
        req: WalletReq,
    ) -> Result<WalletResp, ClusterError> {
        let owner = self.owner(user_id).to_string();
        self.request(&owner, "wallet", &req).await
    }

    /// Asks every node (this one too, through NATS, so all answers are alike).
    async fn admin_all(&self, req: AdminReq) -> Result<Vec<AdminResp>, ClusterError> {
        let asks = self
            .nodes
            .iter()
            .map(|n| self.request::<_, AdminResp>(n, "admin", &req));
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .collect()
    }

    pub async fn remote_gift(
        &self,
        user: &Claims,
        stream: &str,
        gift_id: &str,
        sticker: &str,
        count: u32,
        message: Option<&str>,
    ) -> GiftReply {
        let req = WalletReq::Gift {
            user_id: user.sub.to_string(),
            user_name: user.name.to_string(),
            gift_id: gift_id.into(),
            stream: stream.into(),
            sticker: sticker.into(),
            count,
            message: message.map(str::to_string),
        };
        match self.wallet_request(&user.sub, req).await {
            Ok(WalletResp::GiftOk { balance, seq }) => GiftReply::Ok { balance, seq },
            Ok(WalletResp::GiftRejected { code, balance }) => GiftReply::Rejected {
                code: static_code(&code),
                balance,
            },
            Ok(other) => {
                tracing::warn!(?other, "unexpected wallet answer");
                GiftReply::Rejected {
                    code: "unavailable",
                    balance: None,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "gift: wallet node unreachable");
                GiftReply::Rejected {
                    code: "unavailable",
                    balance: None,
                }
            }
        }
    }

    pub async fn remote_announce(&self, record: &GiftRecord, tier: u8) -> u64 {
        match self
            .room_request(
                &record.stream,
                RoomReq::Announce {
                    gift: record.clone(),
                    tier,
                },
            )
            .await
        {
            Ok(RoomResp::Seq(seq)) => seq,
            other => {
                tracing::warn!(stream = %record.stream, gift = %record.gift_id, ?other, "shout-out not announced: room node unreachable");
                0
            }
        }
    }

    pub async fn remote_balance(&self, user_id: &str) -> Result<u64, String> {
        match self
            .wallet_request(
                user_id,
                WalletReq::Balance {
                    user_id: user_id.into(),
                },
            )
            .await
        {
            Ok(WalletResp::Balance(b)) => Ok(b),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn remote_credit(
        &self,
        user_id: &str,
        coins: u64,
        reference: &str,
    ) -> Result<u64, (&'static str, String)> {
        let req = WalletReq::Credit {
            user_id: user_id.into(),
            coins,
            reference: reference.into(),
        };
        match self.wallet_request(user_id, req).await {
            Ok(WalletResp::Credited { balance }) => Ok(balance),
            Ok(WalletResp::CreditRefused { code, message }) => Err((static_code(&code), message)),
            Ok(other) => Err(("unavailable", format!("unexpected answer {other:?}"))),
            Err(e) => Err(("unavailable", e.to_string())),
        }
    }

    /// Chat or thanks on a mirror: the owner decides (and applies its limits and rules).
    pub async fn forward_room_action(
        &self,
        room: &str,
        req: RoomReq,
    ) -> Result<u64, (&'static str, String)> {
        match self.room_request(room, req).await {
            Ok(RoomResp::Seq(seq)) => Ok(seq),
            Ok(RoomResp::Refused { code, message }) => Err((static_code(&code), message)),
            Ok(other) => Err(("unavailable", format!("unexpected answer {other:?}"))),
            Err(e) => Err(("unavailable", e.to_string())),
        }
    }

    /// Sums every node's audit: `credited == balances + gifted` across the cluster.
    pub async fn audit(&self) -> Result<crate::ledger::Audit, ClusterError> {
        let (mut credited, mut balances, mut gifted, mut held) = (0u64, 0u64, 0u64, 0u64);
        for a in self.admin_all(AdminReq::Audit).await? {
            if let AdminResp::Audit {
                credited: c,
                balances: b,
                gifted: g,
                held: h,
            } = a
            {
                credited += c;
                balances += b;
                gifted += g;
                held += h;
            }
        }
        Ok(crate::ledger::Audit {
            credited,
            balances,
            gifted,
            held,
            ok: credited == balances + gifted + held,
        })
    }

    /// A stream's revenue over every node's wallets.
    pub async fn revenue(
        &self,
        stream: &str,
    ) -> Result<crate::ledger::RevenueReport, ClusterError> {
        let mut merged = crate::ledger::StreamRevenue::default();
        for a in self
            .admin_all(AdminReq::Revenue {
                stream: stream.into(),
            })
            .await?
        {
            if let AdminResp::Revenue(p) = a {
                merged.merge(p.total, p.by_sticker, p.by_gifter);
            }
        }
        Ok(merged.report(stream))
    }

    /// Sets up the mirror of a room another node owns (once per room): subscribe to its rounds,
    /// start from the owner's history, then apply rounds in order.
    pub async fn ensure_mirror(self: &Arc<Self>, room: &Arc<Room>) -> Result<(), ClusterError> {
        let cell = self.mirrors.entry(room.id.to_string()).or_default().clone();
        cell.get_or_try_init(|| async {
            let mut sub = self
                .client
                .subscribe(self.room_subject(&room.id))
                .await
                .map_err(|e| ClusterError::Unreachable("nats".into(), e.to_string()))?;
            self.resync(room, None).await?;
            let this = self.clone();
            let room = room.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let ev: Events = match wire::decode(&msg.payload) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(room = %room.id, error = %e, "undecodable room round");
                            continue;
                        }
                    };
                    let events = ev.events.into_iter().map(|(s, t)| (s, t.into())).collect();
                    if let Err(gap) = room.apply_remote(&ev.epoch, ev.live, events) {
                        metrics::counter!("giftcast_cluster_resyncs_total").increment(1);
                        if let Err(e) = this.resync(&room, Some(gap.last)).await {
                            tracing::warn!(room = %room.id, error = %e, "mirror resync failed");
                        }
                    }
                }
            });
            Ok::<(), ClusterError>(())
        })
        .await
        .map(|_| ())
    }

    async fn resync(&self, room: &Arc<Room>, since: Option<u64>) -> Result<(), ClusterError> {
        match self.room_request(&room.id, RoomReq::Sync { since }).await? {
            RoomResp::Sync {
                epoch,
                live,
                seq,
                complete,
                events,
            } => {
                let events: Vec<(u64, crate::hub::Text)> =
                    events.into_iter().map(|(s, t)| (s, t.into())).collect();
                if since.is_some() && complete && *room.epoch() == *epoch {
                    if room.apply_remote(&epoch, live, events).is_ok() {
                        return Ok(());
                    }
                    // Still a gap: start over from the owner's whole history.
                    return Box::pin(self.resync(room, None)).await;
                }
                room.install_mirror(&epoch, live, seq, events, since.is_some());
                Ok(())
            }
            other => Err(ClusterError::Bad(
                self.owner(&room.id).into(),
                format!("{other:?}"),
            )),
        }
    }

    /// Starts publishing owned rooms' rounds and answering other nodes' requests.
    pub async fn start(self: &Arc<Self>, app: Arc<App>) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Forward>(FORWARD_QUEUE_MAX);
        let me = self.clone();
        app.hub
            .set_cluster(tx, Arc::new(move |room: &str| me.owns(room)));
        let client = self.client.clone();
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let ev = Events {
                    room: f.room.clone(),
                    epoch: f.epoch.to_string(),
                    live: f.live,
                    events: f
                        .events
                        .into_iter()
                        .map(|(s, t)| (s, String::from_utf8_lossy(&t).into_owned()))
                        .collect(),
                };
                if let Err(e) = client
                    .publish(this.room_subject(&f.room), wire::encode(&ev))
                    .await
                {
                    tracing::warn!(error = %e, "cannot publish a room round");
                }
            }
        });
        let mut sub = self
            .client
            .subscribe(self.node_subject(&self.node_id, "*"))
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe on NATS: {e}"))?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let app = app.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let Some(reply) = msg.reply.clone() else {
                        return;
                    };
                    let kind = msg.subject.rsplit('.').next().unwrap_or("").to_string();
                    let answer = match kind.as_str() {
                        "room" => match wire::decode::<(String, RoomReq)>(&msg.payload) {
                            Ok((room, req)) => wire::encode(&serve_room(&app, &room, req).await),
                            Err(e) => wire::encode(&RoomResp::Refused {
                                code: "invalid".into(),
                                message: e,
                            }),
                        },
                        "wallet" => match wire::decode::<WalletReq>(&msg.payload) {
                            Ok(req) => wire::encode(&serve_wallet(&app, req).await),
                            Err(e) => wire::encode(&WalletResp::CreditRefused {
                                code: "invalid".into(),
                                message: e,
                            }),
                        },
                        "admin" => match wire::decode::<AdminReq>(&msg.payload) {
                            Ok(req) => wire::encode(&serve_admin(&app, req)),
                            Err(_) => return,
                        },
                        _ => return,
                    };
                    if let Err(e) = client.publish(reply, answer).await {
                        tracing::warn!(error = %e, "cannot answer a node");
                    }
                });
            }
        });
        self.client
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("NATS flush: {e}"))?;
        // A flush only sends our SUB; ask ourselves until the NATS server routes requests to
        // us, so no other node meets "no responders" once we report ready.
        let mut answered = false;
        for _ in 0..SUBSCRIBE_CHECKS_MAX {
            if self
                .request::<_, AdminResp>(&self.node_id, "admin", &AdminReq::Audit)
                .await
                .is_ok()
            {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::ensure!(
            answered,
            "this node's NATS subscription never became active"
        );
        tracing::info!(node = %self.node_id, nodes = ?self.nodes, "cluster mode on");
        Ok(())
    }
}

/// Codes cross the wire as strings; map them back to the protocol's static names.
fn static_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "insufficient_funds",
        "unknown_sticker",
        "invalid",
        "conflict",
        "rate_limited",
        "unauthorized",
        "not_found",
        "unavailable",
        "forbidden",
        "read_only",
        "timed_out",
        "banned",
        "blocked",
        "daily_cap",
        "slow_mode",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("unavailable")
}

fn claims(user_id: String, name: String, role: Role) -> Claims {
    Claims {
        sub: user_id.into(),
        name: name.into(),
        role,
        exp: u64::MAX,
    }
}

async fn serve_room(app: &Arc<App>, room_id: &str, req: RoomReq) -> RoomResp {
    let refused = |code: &str, message: &str| RoomResp::Refused {
        code: code.into(),
        message: message.into(),
    };
    let Ok(room) = app.hub.room(room_id) else {
        return refused("unavailable", "too many rooms");
    };
    match req {
        RoomReq::Chat {
            user_id,
            name,
            text,
        } => match app.chat(&claims(user_id, name, Role::Viewer), &room, &text) {
            Ok(seq) => RoomResp::Seq(seq),
            Err((code, message)) => refused(code, message),
        },
        RoomReq::Announce { gift, tier } => RoomResp::Seq(app.announce_local(&gift, tier)),
        RoomReq::Thanks {
            user_id,
            is_streamer,
            gift_id,
            text,
        } => {
            let role = if is_streamer {
                Role::Streamer
            } else {
                Role::Viewer
            };
            let name = user_id.clone();
            match app.thanks(
                &claims(user_id, name, role),
                &room,
                &gift_id,
                text.as_deref(),
            ) {
                Ok(seq) => RoomResp::Seq(seq),
                Err((code, message)) => refused(code, message),
            }
        }
        RoomReq::StreamerSeen => {
            room.mark_streamer_seen();
            RoomResp::Seq(0)
        }
        RoomReq::Sync { since } => {
            let (events, seq, complete) = room.history_since(since);
            RoomResp::Sync {
                epoch: room.epoch().to_string(),
                live: room.is_live(),
                seq,
                complete,
                events: events
                    .into_iter()
                    .map(|(s, t)| (s, String::from_utf8_lossy(&t).into_owned()))
                    .collect(),
            }
        }
        RoomReq::Queue => {
            RoomResp::Queue(serde_json::to_string(&room.queued()).unwrap_or_else(|_| "[]".into()))
        }
    }
}

async fn serve_wallet(app: &Arc<App>, req: WalletReq) -> WalletResp {
    match req {
        WalletReq::Gift {
            user_id,
            user_name,
            gift_id,
            stream,
            sticker,
            count,
            message,
        } => {
            let Some(sticker) = app.config.catalog.get(&sticker).cloned() else {
                return WalletResp::GiftRejected {
                    code: "unknown_sticker".into(),
                    balance: None,
                };
            };
            let gift = crate::app::OwnedWalletGift {
                user_id: user_id.into(),
                user_name: user_name.into(),
                gift_id,
                stream: stream.into(),
                sticker,
                count,
                message,
            };
            match app.gift_wallet_reply(&gift.as_gift()).await {
                GiftReply::Ok { balance, seq } => WalletResp::GiftOk { balance, seq },
                GiftReply::Rejected { code, balance } => WalletResp::GiftRejected {
                    code: code.into(),
                    balance,
                },
            }
        }
        WalletReq::Credit {
            user_id,
            coins,
            reference,
        } => match app.credit_local(&user_id, coins, &reference).await {
            Ok(balance) => WalletResp::Credited { balance },
            Err((code, message)) => WalletResp::CreditRefused {
                code: code.into(),
                message,
            },
        },
        WalletReq::Balance { user_id } => WalletResp::Balance(app.ledger.balance(&user_id)),
    }
}

fn serve_admin(app: &Arc<App>, req: AdminReq) -> AdminResp {
    match req {
        AdminReq::Audit => {
            let a = app.ledger.audit();
            AdminResp::Audit {
                credited: a.credited,
                balances: a.balances,
                gifted: a.gifted,
                held: a.held,
            }
        }
        AdminReq::Revenue { stream } => {
            let (total, by_sticker, by_gifter): (Totals, _, _) = app.ledger.revenue_parts(&stream);
            AdminResp::Revenue(RevenueParts {
                total,
                by_sticker,
                by_gifter,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_stable_and_spread() {
        let nodes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = format!("user-{i}");
            let o = owner_of(&nodes, &key);
            assert_eq!(o, owner_of(&nodes, &key));
            *counts.entry(o).or_insert(0) += 1;
        }
        for n in ["a", "b", "c"] {
            let c = counts[n];
            assert!((700..1300).contains(&c), "{n}: {c}");
        }
        // Removing a node moves only its keys.
        let two: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        for i in 0..1000 {
            let key = format!("user-{i}");
            let before = owner_of(&nodes, &key);
            if before != "c" {
                assert_eq!(owner_of(&two, &key), before);
            }
        }
    }
}

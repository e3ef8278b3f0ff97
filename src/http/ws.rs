//! One WebSocket connection: a reader (this task) and a writer task joined by a bounded outbox.
//!
//! The writer drains everything queued, feeds it to the socket and flushes once: many frames,
//! one write. Every write has a deadline, so a stalled client costs a bounded time and memory
//! and never slows anyone else (the room only ever `try_send`s to its outbox).

use crate::app::{is_streamer, App, ConnRefusal, ConnSlot, GiftReply};
use crate::auth::{Claims, Role};
use crate::cluster::wire::RoomReq;
use crate::hub::{outbox, ConnShared, MemberHandle, Out, OutboxReceiver, OutboxSender, Room};
use crate::limits::*;
use crate::protocol::{self, ClientFrame, UserRef};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use governor::{Quota, RateLimiter};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// The close reason when the writer stopped first (lagged, write timeout, close sent).
const WRITER_ENDED: &str = "writer ended";

/// Gifts one connection may have waiting for the journal at once.
pub const CONN_GIFTS_IN_FLIGHT_MAX: usize = 64;

/// Same origin, loopback, or listed. No `Origin` (not a browser) is allowed: CSWSH needs a
/// browser, and browsers always send it.
fn origin_allowed(app: &App, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    if !host.is_empty() && origin_host == host {
        return true;
    }
    let hostname = origin_host
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(origin_host);
    if matches!(hostname, "localhost" | "127.0.0.1" | "[::1]") {
        return true;
    }
    app.config.allowed_origins.iter().any(|a| a == origin)
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&app, &headers) {
        tracing::warn!(%peer, "websocket refused: origin not allowed");
        return refuse(StatusCode::FORBIDDEN, "forbidden", "origin not allowed");
    }
    if app.shutting_down.load(Ordering::SeqCst) {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "server shutting down",
        );
    }
    let slot = match app.open_conn(peer.ip()) {
        Ok(s) => s,
        Err(ConnRefusal::Rate) => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many new connections from this address; slow down",
            )
        }
        Err(ConnRefusal::PerIp) => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many connections from this address",
            )
        }
        Err(ConnRefusal::Total) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "server is at its connection limit",
            )
        }
    };
    ws.read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER_BYTES)
        .max_message_size(FRAME_BYTES_MAX)
        .max_frame_size(FRAME_BYTES_MAX)
        .on_upgrade(move |socket| connection(app, socket, peer, slot))
}

async fn connection(app: Arc<App>, socket: WebSocket, peer: SocketAddr, slot: ConnSlot) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = outbox(OUTBOX_FRAMES_MAX);
    let shared = Arc::new(ConnShared::default());
    let write_timeout = Duration::from_millis(app.config.write_timeout_ms);
    let mut writer = tokio::spawn(writer(sink, rx, shared.clone(), write_timeout));
    tracing::info!(%peer, "connection opened");
    let mut conn = Conn {
        app: &app,
        tx: tx.clone(),
        shared: shared.clone(),
        user: None,
        joined: None,
        gifts: Arc::new(Semaphore::new(CONN_GIFTS_IN_FLIGHT_MAX)),
    };
    let reason = conn.run(&mut stream, &mut writer).await;
    let user = conn
        .user
        .as_ref()
        .map(|u| u.sub.clone())
        .unwrap_or_default();
    let stream_id = conn
        .joined
        .as_ref()
        .map(|(r, _)| r.id.clone())
        .unwrap_or_default();
    // Leave the room before the writer finishes, so no more events are queued.
    drop(conn);
    drop(tx);
    if reason != WRITER_ENDED {
        let _ = tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), &mut writer).await;
        writer.abort();
    }
    drop(slot);
    tracing::info!(%peer, user = %user, stream = %stream_id, reason, "connection closed");
}

struct Conn<'a> {
    app: &'a Arc<App>,
    tx: OutboxSender,
    shared: Arc<ConnShared>,
    user: Option<Claims>,
    joined: Option<(Arc<Room>, MemberHandle)>,
    gifts: Arc<Semaphore>,
}

impl Conn<'_> {
    fn send(&self, text: String) {
        if self
            .tx
            .try_send(Out::Frame {
                seq: 0,
                text: text.into(),
            })
            .is_err()
        {
            self.shared.mark_lagged();
        }
    }

    fn error(&self, code: &str, message: &str) {
        self.send(protocol::error_frame(code, message));
    }

    fn close(&self, code: u16, reason: &'static str) {
        // The close goes behind what is queued; if the outbox is full the client is lagging
        // anyway and the writer closes it.
        if self.tx.try_send(Out::Close { code, reason }).is_err() {
            self.shared.mark_lagged();
        }
    }

    async fn run(
        &mut self,
        stream: &mut futures_util::stream::SplitStream<WebSocket>,
        writer: &mut tokio::task::JoinHandle<()>,
    ) -> &'static str {
        let mut shutdown = self.app.shutdown.subscribe();
        let join_deadline = tokio::time::sleep(Duration::from_millis(JOIN_TIMEOUT_MS));
        tokio::pin!(join_deadline);
        // Heartbeat: a Ping every interval; a peer silent for the timeout (no frame, no Pong)
        // is half-open and is closed.
        let ping_every = Duration::from_millis(self.app.config.heartbeat_interval_ms.max(1));
        let silence_max = Duration::from_millis(self.app.config.heartbeat_timeout_ms);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = tokio::time::Instant::now();
        // The flood guard is on while chat is rate limited; `--chat-rate 0` (benchmarks) turns
        // it off with the chat limit, so a load generator is never cut off.
        let flood = (self.app.config.chat_rate_per_min > 0).then(|| {
            RateLimiter::direct(
                Quota::per_second(NonZeroU32::new(FLOOD_FRAMES_PER_SEC).expect("nonzero"))
                    .allow_burst(NonZeroU32::new(FLOOD_BURST_FRAMES).expect("nonzero")),
            )
        });
        // A signed-in connection closes when its token expires: one timer, armed at join.
        let expiry = tokio::time::sleep(Duration::from_secs(0));
        tokio::pin!(expiry);
        let mut expiry_armed = false;
        loop {
            if !expiry_armed {
                if let Some(u) = &self.user {
                    let left_ms = u.exp.saturating_mul(1000).saturating_sub(crate::now_ms());
                    expiry
                        .as_mut()
                        .reset(tokio::time::Instant::now() + Duration::from_millis(left_ms));
                    expiry_armed = true;
                }
            }
            let msg = tokio::select! {
                _ = &mut join_deadline, if self.joined.is_none() => {
                    self.close(4001, "no join in time");
                    return "join timeout";
                }
                _ = shutdown.wait_for(|s| *s) => {
                    self.close(1001, "server shutting down");
                    return "shutdown";
                }
                _ = &mut *writer => return WRITER_ENDED,
                _ = &mut expiry, if expiry_armed => {
                    self.error("unauthorized", "token expired");
                    self.close(4003, "token expired");
                    return "token expired";
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() >= silence_max {
                        self.close(4011, "heartbeat timeout");
                        return "heartbeat timeout";
                    }
                    if self.tx.try_send(Out::Ping).is_err() {
                        self.shared.mark_lagged();
                    }
                    continue;
                }
                msg = stream.next() => msg,
            };
            let msg = match msg {
                None => return "peer went away",
                Some(Err(e)) => {
                    let text = e.to_string();
                    if text.contains("too long")
                        || text.contains("Space limit")
                        || text.contains("too big")
                    {
                        self.close(1009, "frame too big");
                        return "frame too big";
                    }
                    if text.contains("UTF-8") {
                        // RFC 6455: a text frame that is not UTF-8 fails the connection with 1007.
                        self.close(1007, "invalid UTF-8");
                        return "invalid UTF-8";
                    }
                    return "read error";
                }
                Some(Ok(m)) => m,
            };
            last_heard = tokio::time::Instant::now();
            if flood.as_ref().is_some_and(|f| f.check().is_err()) {
                self.close(4008, "flooding");
                return "flooding";
            }
            match msg {
                Message::Text(text) => {
                    // Boxed: the frame's future (join, cluster round trips) is far bigger than
                    // the loop's own state, and every idle connection would carry its size.
                    if let Err(reason) = Box::pin(self.frame(&text)).await {
                        return reason;
                    }
                }
                Message::Binary(_) => self.error(
                    "bad_frame",
                    "binary frames are not accepted; send JSON text",
                ),
                Message::Close(_) => return "peer closed",
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
    }

    /// One client frame. `Err` carries the reason when the connection must close.
    async fn frame(&mut self, text: &str) -> Result<(), &'static str> {
        let frame = match protocol::decode_client_frame(text) {
            Ok(f) => f,
            Err(e) => {
                // A gift we can name gets its own rejection, so the client can settle it.
                if let Some(id) = e.gift_id {
                    self.send(protocol::gift_rejected_frame(&id, "invalid", None));
                    return Ok(());
                }
                // A red packet or grab we can name gets its own rejection too.
                let named = protocol::json_depth_within(text.as_bytes(), JSON_DEPTH_MAX)
                    .then(|| serde_json::from_str::<serde_json::Value>(text).ok())
                    .flatten();
                match named
                    .as_ref()
                    .and_then(|v| Some((v["type"].as_str()?, v["packet_id"].as_str()?)))
                {
                    Some(("red_packet", id)) => {
                        self.send(protocol::packet_rejected_frame(id, "invalid", None))
                    }
                    Some(("grab", id)) => self.send(protocol::grab_rejected_frame(id, "invalid")),
                    _ => self.error(e.code, &e.message),
                }
                return Ok(());
            }
        };
        match frame {
            ClientFrame::Ping { t } => self.send(protocol::pong_frame(&t)),
            ClientFrame::Join {
                stream,
                token,
                since,
            } => return self.join(&stream, token.as_deref(), since).await,
            _ if self.joined.is_none() => self.error("not_joined", "send join first"),
            ClientFrame::Chat { text } => {
                let (room, _) = self.joined.as_ref().expect("joined");
                match &self.user {
                    None => self.error("read_only", "sign in to chat"),
                    Some(user) => {
                        if let (true, Some(cluster)) = (room.is_mirror(), self.app.cluster.get()) {
                            let req = RoomReq::Chat {
                                user_id: user.sub.clone(),
                                name: user.name.clone(),
                                text,
                            };
                            if let Err((code, message)) =
                                cluster.forward_room_action(&room.id, req).await
                            {
                                self.error(code, &message);
                            }
                        } else if let Err((code, message)) = self.app.chat(user, room, &text) {
                            self.error(code, message);
                        }
                    }
                }
            }
            ClientFrame::Thanks { gift_id, text } => {
                let (room, _) = self.joined.as_ref().expect("joined");
                match &self.user {
                    None => self.error("read_only", "sign in to thank"),
                    Some(user) => {
                        if let (true, Some(cluster)) = (room.is_mirror(), self.app.cluster.get()) {
                            let req = RoomReq::Thanks {
                                user_id: user.sub.clone(),
                                is_streamer: user.role == Role::Streamer,
                                gift_id,
                                text,
                            };
                            if let Err((code, message)) =
                                cluster.forward_room_action(&room.id, req).await
                            {
                                self.error(code, &message);
                            }
                        } else if let Err((code, message)) =
                            self.app.thanks(user, room, &gift_id, text.as_deref())
                        {
                            self.error(code, message);
                        }
                    }
                }
            }
            ClientFrame::RedPacket {
                packet_id,
                coins,
                shares,
                split,
                message,
            } => {
                let Some(user) = self.user.clone() else {
                    self.send(protocol::packet_rejected_frame(
                        &packet_id,
                        "unauthorized",
                        None,
                    ));
                    return Ok(());
                };
                let Ok(permit) = self.gifts.clone().try_acquire_owned() else {
                    self.send(protocol::packet_rejected_frame(
                        &packet_id,
                        "rate_limited",
                        None,
                    ));
                    return Ok(());
                };
                let room = self.joined.as_ref().expect("joined").0.clone();
                let (app, tx, shared) = (self.app.clone(), self.tx.clone(), self.shared.clone());
                tokio::spawn(async move {
                    let reply = app
                        .red_packet(
                            &user,
                            &room,
                            &packet_id,
                            coins,
                            shares,
                            &split,
                            message.as_deref(),
                        )
                        .await;
                    let text = match reply {
                        crate::app::PacketReply::Ok { balance, seq } => {
                            protocol::packet_ok_frame(&packet_id, balance, seq)
                        }
                        crate::app::PacketReply::Rejected { code, balance } => {
                            protocol::packet_rejected_frame(&packet_id, code, balance)
                        }
                    };
                    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Out::Frame {
                        seq: 0,
                        text: text.into(),
                    }) {
                        shared.mark_lagged();
                    }
                    drop(permit);
                });
            }
            ClientFrame::Grab { packet_id } => {
                let Some(user) = self.user.clone() else {
                    self.send(protocol::grab_rejected_frame(&packet_id, "unauthorized"));
                    return Ok(());
                };
                let Ok(permit) = self.gifts.clone().try_acquire_owned() else {
                    self.send(protocol::grab_rejected_frame(&packet_id, "rate_limited"));
                    return Ok(());
                };
                let room = self.joined.as_ref().expect("joined").0.clone();
                let (app, tx, shared) = (self.app.clone(), self.tx.clone(), self.shared.clone());
                tokio::spawn(async move {
                    let text = match app.grab(&user, &room, &packet_id).await {
                        crate::app::GrabReply::Ok { coins, balance } => {
                            protocol::grab_ok_frame(&packet_id, coins, balance)
                        }
                        crate::app::GrabReply::Rejected(code) => {
                            protocol::grab_rejected_frame(&packet_id, code)
                        }
                    };
                    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Out::Frame {
                        seq: 0,
                        text: text.into(),
                    }) {
                        shared.mark_lagged();
                    }
                    drop(permit);
                });
            }
            ClientFrame::Delete { .. }
            | ClientFrame::Timeout { .. }
            | ClientFrame::Ban { .. }
            | ClientFrame::Unban { .. }
            | ClientFrame::SlowMode { .. }
            | ClientFrame::BlockedWords { .. }
            | ClientFrame::Mod { .. }
            | ClientFrame::Unmod { .. } => {
                let (room, _) = self.joined.as_ref().expect("joined");
                match &self.user {
                    None => self.error("read_only", "sign in to moderate"),
                    // Cluster mode: moderation state lives on the room's own node only.
                    Some(_) if room.is_mirror() => self.error(
                        "unavailable",
                        "moderate this stream from a connection to its own node",
                    ),
                    Some(user) => {
                        if let Err((code, message)) = self.app.moderate(user, room, &frame) {
                            self.error(code, &message);
                        }
                    }
                }
            }
            ClientFrame::Gift {
                gift_id,
                sticker,
                count,
                message,
            } => {
                let Some(user) = self.user.clone() else {
                    self.send(protocol::gift_rejected_frame(
                        &gift_id,
                        "unauthorized",
                        None,
                    ));
                    return Ok(());
                };
                let Ok(permit) = self.gifts.clone().try_acquire_owned() else {
                    self.send(protocol::gift_rejected_frame(
                        &gift_id,
                        "rate_limited",
                        None,
                    ));
                    return Ok(());
                };
                let room = self.joined.as_ref().expect("joined").0.clone();
                let app = self.app.clone();
                let tx = self.tx.clone();
                let shared = self.shared.clone();
                // Gifts of one connection proceed concurrently; each answer comes when durable.
                tokio::spawn(async move {
                    let reply = app
                        .gift(&user, &room, &gift_id, &sticker, count, message.as_deref())
                        .await;
                    let text = match reply {
                        GiftReply::Ok { balance, seq } => {
                            protocol::gift_ok_frame(&gift_id, balance, seq)
                        }
                        GiftReply::Rejected { code, balance } => {
                            protocol::gift_rejected_frame(&gift_id, code, balance)
                        }
                    };
                    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Out::Frame {
                        seq: 0,
                        text: text.into(),
                    }) {
                        shared.mark_lagged();
                    }
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    async fn join(
        &mut self,
        stream: &str,
        token: Option<&str>,
        since: Option<u64>,
    ) -> Result<(), &'static str> {
        if self.joined.is_some() {
            self.error(
                "already_joined",
                "this connection has joined a stream already",
            );
            return Ok(());
        }
        if !protocol::valid_id(stream, ID_CHARS_MAX) {
            self.error("invalid", "stream must be 1-64 of [A-Za-z0-9_-]");
            return Ok(());
        }
        if let Some(token) = token {
            match self.app.keys.verify(token) {
                Ok(c) => self.user = Some(c),
                Err(why) => {
                    self.error("unauthorized", why);
                    self.close(4003, "bad token");
                    return Err("bad token");
                }
            }
        }
        let room = match self.app.hub.room(stream) {
            Ok(r) => r,
            Err(_) => {
                self.error("unavailable", "too many rooms on this server");
                return Ok(());
            }
        };
        let cluster = self.app.cluster.get().filter(|c| !c.owns(&room.id));
        if let Some(cluster) = cluster {
            if let Err(e) = cluster.ensure_mirror(&room).await {
                tracing::warn!(room = %room.id, error = %e, "cannot mirror a room");
                self.error(
                    "unavailable",
                    &format!("this stream's node is unreachable ({e}); try again soon"),
                );
                return Ok(());
            }
        }
        if let Some(u) = &self.user {
            if u.role == Role::Streamer && u.sub == room.id {
                room.mark_streamer_seen();
                if let Some(cluster) = cluster {
                    let _ = cluster
                        .forward_room_action(&room.id, RoomReq::StreamerSeen)
                        .await;
                }
            }
        }
        let app = self.app;
        let balance = match &self.user {
            Some(u) => app.balance(&u.sub).await.ok(),
            None => None,
        };
        let user = self.user.as_ref();
        let (moderator, slow_mode) = {
            let m = room.moderation();
            let moderator = user.is_some_and(|u| is_streamer(u, &room) || m.is_moderator(&u.sub));
            (moderator, Some(m.slow_mode_secs()).filter(|s| *s > 0))
        };
        let outcome = room.join(
            &self.tx,
            self.shared.clone(),
            user.map(|u| u.sub.as_str()),
            since,
            |seq, viewers, resumed, epoch| {
                serde_json::to_string(&protocol::Joined {
                    kind: "joined",
                    stream: &room.id,
                    user: user.map(|u| UserRef {
                        id: &u.sub,
                        name: &u.name,
                    }),
                    balance,
                    seq,
                    viewers,
                    catalog: &app.config.catalog.stickers,
                    epoch,
                    resumed,
                    moderator,
                    slow_mode,
                })
                .expect("joined serialises")
            },
        );
        match outcome {
            Ok(outcome) => {
                self.joined = Some((room, outcome.member));
                Ok(())
            }
            Err(gate) => {
                self.error(gate.code(), crate::app::gate_message(gate));
                self.close(4010, "banned");
                Err("banned")
            }
        }
    }
}

/// Runs `fut` to completion within `deadline`, arming the timer only when the first poll does
/// not finish it: almost every write to a healthy client completes at once, and a timer per
/// write (registered in and removed from the runtime's timer wheel) was a measurable share of
/// the fan-out's CPU.
async fn within<F: std::future::Future>(deadline: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let std::task::Poll::Ready(out) = futures_util::poll!(fut.as_mut()) {
        return Some(out);
    }
    tokio::time::timeout(deadline, fut).await.ok()
}

async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: OutboxReceiver,
    shared: Arc<ConnShared>,
    deadline: Duration,
) {
    let mut buf: Vec<Out> = Vec::new();
    let mut last_seq = 0u64;
    loop {
        let n = rx.recv_many(&mut buf, 256).await;
        if n == 0 {
            let _ = within(deadline, sink.close()).await;
            return;
        }
        if shared.lagged.load(Ordering::SeqCst) {
            // What was queued before the overflow is in order: deliver it, then say where to
            // resume from.
            while let Ok(out) = rx.try_recv() {
                buf.push(out);
            }
            let _ = within(deadline, async {
                for out in buf.drain(..) {
                    if let Out::Frame { seq, text } = out {
                        sink.feed(Message::Text(text)).await?;
                        if seq > 0 {
                            last_seq = seq;
                        }
                    }
                }
                sink.feed(Message::Text(protocol::lagged_frame(last_seq).into()))
                    .await?;
                sink.send(Message::Close(Some(CloseFrame {
                    code: 4009,
                    reason: Utf8Bytes::from_static("lagged"),
                })))
                .await
            })
            .await;
            return;
        }
        let mut close = None;
        let result = within(deadline, async {
            for out in buf.drain(..) {
                match out {
                    Out::Frame { seq, text } => {
                        sink.feed(Message::Text(text)).await?;
                        if seq > 0 {
                            last_seq = seq;
                        }
                    }
                    Out::Close { code, reason } => {
                        close = Some((code, reason));
                        break;
                    }
                    Out::Ping => sink.feed(Message::Ping(Default::default())).await?,
                    Out::Wake => {}
                }
            }
            sink.flush().await
        })
        .await;
        buf.clear();
        // A burst grew the buffer; an idle connection should not keep that.
        if buf.capacity() > 32 {
            buf = Vec::new();
        }
        if !matches!(result, Some(Ok(()))) {
            metrics::counter!("giftcast_write_failures_total").increment(1);
            return;
        }
        if let Some((code, reason)) = close {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = within(deadline, sink.send(Message::Close(Some(frame)))).await;
            return;
        }
    }
}

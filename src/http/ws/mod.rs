//! One WebSocket connection, in one task: the upgrade, then a loop that reads client frames,
//! handles them, and writes the connection's outbox, on the upgraded socket itself.
//!
//! The socket is ours after the upgrade (`wire.rs`: reading into a stack buffer, writing the
//! shared payloads with `writev`; `codec.rs`: RFC 6455 framing), so an idle connection costs
//! its task, its socket and its outbox, and no buffers. Every write has a deadline, so a
//! stalled client costs a bounded time and memory and never slows anyone else (the room only
//! ever `try_send`s to its outbox).

mod codec;
mod wire;

use crate::app::{is_streamer, App, ConnRefusal, ConnSlot, GiftReply};
use crate::auth::{Claims, Role};
use crate::cluster::wire::RoomReq;
use crate::hub::{outbox, ConnShared, MemberHandle, Out, OutboxSender, Room};
use crate::limits::*;
use crate::protocol::{self, ClientFrame, UserRef};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use codec::{Decoder, Message};
use governor::{Quota, RateLimiter};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use wire::{ReadEnd, WriteEnd, Writer};

/// The close reason when the writing side ended the connection (lagged, stalled, closed).
const WRITER_ENDED: &str = "writer ended";

/// RFC 6455 1.3: the GUID a server appends to the client's key to prove it speaks WebSocket.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

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

/// Whether header `name` lists `token` (comma-separated, any case).
fn lists_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 4.2.2).
fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// `GET /ws`: checks the handshake (RFC 6455 4.2.1), the origin and the connection limits,
/// answers 101 and runs the connection on the upgraded socket.
pub async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if !lists_token(headers, header::CONNECTION, "upgrade")
        || !lists_token(headers, header::UPGRADE, "websocket")
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid",
            "expected a WebSocket handshake (Connection: upgrade, Upgrade: websocket)",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "invalid",
            "only WebSocket version 13 is spoken",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| accept_key(k.as_bytes()))
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the WebSocket handshake has no Sec-WebSocket-Key",
        );
    };
    if !origin_allowed(&app, headers) {
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
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "invalid",
            "this connection cannot be upgraded",
        );
    };
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
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "websocket upgrade failed");
                return;
            }
        };
        // The accept loop (`serve.rs`) serves every connection as `TokioIo<TcpStream>`.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                // `read_buf` may be a slice of the HTTP layer's whole read buffer (8 KiB and
                // more): keep a copy of what it holds, never the buffer.
                let early = parts.read_buf.to_vec();
                drop(parts.read_buf);
                connection(app, parts.io.into_inner(), early, peer, slot).await
            }
            Err(_) => tracing::error!(%peer, "upgraded connection is not a TCP stream"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&key).expect("base64 is a header value"),
    );
    response
}

/// `early`: bytes the client sent right behind its handshake, already read by the HTTP layer.
async fn connection(
    app: Arc<App>,
    tcp: TcpStream,
    early: Vec<u8>,
    peer: SocketAddr,
    slot: ConnSlot,
) {
    let (tx, rx) = outbox(OUTBOX_FRAMES_MAX);
    let shared = Arc::new(ConnShared::default());
    let write_timeout = Duration::from_millis(app.config.write_timeout_ms);
    let mut writer = Writer::new(rx, shared.clone(), write_timeout);
    let mut decoder = Decoder::new(FRAME_BYTES_MAX);
    tracing::info!(%peer, "connection opened");
    let mut conn = Conn {
        app: &app,
        tx: tx.clone(),
        shared,
        user: None,
        joined: None,
        gifts: None,
    };
    let (reason, end) = conn.run(&tcp, &mut decoder, &mut writer, early).await;
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
    // Leave the room before the last writes, so no more events are queued.
    drop(conn);
    drop(tx);
    writer.finish(tcp, end).await;
    drop(slot);
    tracing::info!(%peer, user = %user, stream = %stream_id, reason, "connection closed");
}

/// Queues a money frame's answer for its connection; a full outbox marks it lagged (the writer
/// then closes it), as for any frame.
fn queue_answer(tx: &OutboxSender, shared: &ConnShared, text: String) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Out::Frame {
        seq: 0,
        text: text.into(),
    }) {
        shared.mark_lagged();
    }
}

struct Conn<'a> {
    app: &'a Arc<App>,
    tx: OutboxSender,
    shared: Arc<ConnShared>,
    user: Option<Claims>,
    joined: Option<(Arc<Room>, MemberHandle)>,
    /// Permits for gifts (and red packets, grabs) waiting for the journal; made at the first.
    gifts: Option<Arc<Semaphore>>,
}

/// Runs `fut` while the writer keeps writing: a frame that waits (a join, a cluster round
/// trip) never holds up this connection's deliveries. `Err` when the writer ended first.
async fn while_writing<T>(
    fut: impl std::future::Future<Output = T>,
    writer: &mut Writer,
    tcp: &TcpStream,
) -> Result<T, WriteEnd> {
    tokio::pin!(fut);
    tokio::select! {
        biased;
        out = &mut fut => Ok(out),
        end = writer.pump(tcp) => Err(end),
    }
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

    /// A permit for one more gift in flight, or `None` at `CONN_GIFTS_IN_FLIGHT_MAX`.
    fn gift_permit(&mut self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.gifts
            .get_or_insert_with(|| Arc::new(Semaphore::new(CONN_GIFTS_IN_FLIGHT_MAX)))
            .clone()
            .try_acquire_owned()
            .ok()
    }

    /// The gate of every money frame (gift, red packet, grab): refused with `refuse(code)` as
    /// `unauthorized` without a signed-in user, or `rate_limited` beyond
    /// `CONN_GIFTS_IN_FLIGHT_MAX` waiting; else the way its answer reaches this connection,
    /// which holds one of those permits until it is used.
    fn money_answer(
        &mut self,
        refuse: impl FnOnce(&'static str) -> String,
    ) -> Option<impl FnOnce(String) + Send + 'static> {
        if self.user.is_none() {
            self.send(refuse("unauthorized"));
            return None;
        }
        let Some(permit) = self.gift_permit() else {
            self.send(refuse("rate_limited"));
            return None;
        };
        let (tx, shared) = (self.tx.clone(), self.shared.clone());
        Some(move |text: String| {
            queue_answer(&tx, &shared, text);
            drop(permit);
        })
    }

    /// A red packet or grab: past the gate, `work` runs in its own task (a connection's money
    /// frames proceed concurrently, each answered when durable).
    fn spawn_money<Fut>(
        &mut self,
        refuse: impl FnOnce(&'static str) -> String,
        work: impl FnOnce(Arc<App>, Claims, Arc<Room>) -> Fut,
    ) where
        Fut: std::future::Future<Output = String> + Send + 'static,
    {
        let Some(reply) = self.money_answer(refuse) else {
            return;
        };
        let user = self.user.clone().expect("the gate checked it");
        let room = self.joined.as_ref().expect("joined").0.clone();
        let answer = work(self.app.clone(), user, room);
        tokio::spawn(async move { reply(answer.await) });
    }

    /// A gift frame: past the gate, no task of its own: the app answers at once (a refusal) or
    /// from the journal's settle thread once the gift is durable.
    fn gift(&mut self, gift_id: String, sticker: &str, count: u32, message: Option<&str>) {
        let Some(reply) =
            self.money_answer(|code| protocol::gift_rejected_frame(&gift_id, code, None))
        else {
            return;
        };
        let id = gift_id.clone();
        let answer: crate::app::GiftAnswer = Box::new(move |r| {
            reply(match r {
                GiftReply::Ok { balance, seq } => protocol::gift_ok_frame(&id, balance, seq),
                GiftReply::Rejected { code, balance } => {
                    protocol::gift_rejected_frame(&id, code, balance)
                }
            })
        });
        let user = self.user.as_ref().expect("the gate checked it");
        let room = &self.joined.as_ref().expect("joined").0;
        self.app
            .gift(user, room, &gift_id, sticker, count, message, answer);
    }

    /// The connection's loop, until it must end: the reason (for the log) and, when the writing
    /// side ended it, how.
    async fn run(
        &mut self,
        tcp: &TcpStream,
        decoder: &mut Decoder,
        writer: &mut Writer,
        mut early: Vec<u8>,
    ) -> (&'static str, Option<WriteEnd>) {
        let mut shutdown = self.app.shutdown.subscribe();
        let started = Instant::now();
        let join_deadline = started + Duration::from_millis(JOIN_TIMEOUT_MS);
        // Heartbeat: a Ping every interval; a peer silent for the timeout (no frame, no Pong)
        // is half-open and is closed.
        let ping_every = Duration::from_millis(self.app.config.heartbeat_interval_ms.max(1));
        let silence_max = Duration::from_millis(self.app.config.heartbeat_timeout_ms);
        let mut next_ping = started + ping_every;
        let mut last_heard = started;
        // The flood guard is on while chat is rate limited; `--chat-rate 0` (benchmarks) turns
        // it off with the chat limit, so a load generator is never cut off.
        let flood = (self.app.config.chat_rate_per_min > 0).then(|| {
            RateLimiter::direct(
                Quota::per_second(NonZeroU32::new(FLOOD_FRAMES_PER_SEC).expect("nonzero"))
                    .allow_burst(NonZeroU32::new(FLOOD_BURST_FRAMES).expect("nonzero")),
            )
        });
        // A signed-in connection closes when its token expires: set at join.
        let mut expires: Option<Instant> = None;
        // One timer for the join deadline, the heartbeat and the token's expiry.
        let timer = tokio::time::sleep_until(join_deadline.min(next_ping));
        tokio::pin!(timer);
        let mut messages: Vec<Message> = Vec::new();
        let mut read = if early.is_empty() {
            Ok(())
        } else {
            let read = decoder.feed(&mut early, &mut messages);
            drop(early);
            read.map_err(ReadEnd::Fault)
        };
        loop {
            if !messages.is_empty() {
                last_heard = Instant::now();
            }
            for message in std::mem::take(&mut messages) {
                if flood.as_ref().is_some_and(|f| f.check().is_err()) {
                    self.close(4008, "flooding");
                    return ("flooding", None);
                }
                match message {
                    Message::Text(text) => {
                        // Boxed: the frame's future (join, cluster round trips) is far bigger
                        // than the loop's own state, and every idle connection would carry it.
                        match while_writing(Box::pin(self.frame(&text)), writer, tcp).await {
                            Ok(Ok(())) => {}
                            Ok(Err(reason)) => return (reason, None),
                            Err(end) => return (WRITER_ENDED, Some(end)),
                        }
                    }
                    Message::Binary => self.error(
                        "bad_frame",
                        "binary frames are not accepted; send JSON text",
                    ),
                    Message::Close(_) => {
                        // The closing handshake: answer with a close of our own.
                        self.close(1000, "");
                        return ("peer closed", None);
                    }
                    Message::Ping(payload) => {
                        if self.tx.try_send(Out::Pong(payload.into())).is_err() {
                            self.shared.mark_lagged();
                        }
                    }
                    Message::Pong => {}
                }
            }
            // What came before a fault in the same read has been handled; now the fault.
            match std::mem::replace(&mut read, Ok(())) {
                Ok(()) => {}
                Err(ReadEnd::Eof) => return ("peer went away", None),
                Err(ReadEnd::Fault(fault)) => {
                    self.close(fault.close_code(), fault.reason());
                    return (fault.reason(), None);
                }
            }
            if expires.is_none() {
                if let Some(u) = &self.user {
                    let left_ms = u.exp.saturating_mul(1000).saturating_sub(crate::now_ms());
                    expires = Some(Instant::now() + Duration::from_millis(left_ms));
                }
            }
            let mut wake_at = next_ping;
            if self.joined.is_none() {
                wake_at = wake_at.min(join_deadline);
            }
            if let Some(at) = expires {
                wake_at = wake_at.min(at);
            }
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            tokio::select! {
                biased;
                end = writer.pump(tcp) => return (WRITER_ENDED, Some(end)),
                ready = tcp.readable() => {
                    read = match ready {
                        Ok(()) => wire::read(tcp, decoder, &mut messages),
                        Err(_) => Err(ReadEnd::Eof),
                    };
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if self.joined.is_none() && now >= join_deadline {
                        self.close(4001, "no join in time");
                        return ("join timeout", None);
                    }
                    if expires.is_some_and(|at| now >= at) {
                        self.error("unauthorized", "token expired");
                        self.close(4003, "token expired");
                        return ("token expired", None);
                    }
                    if now >= next_ping {
                        if now.duration_since(last_heard) >= silence_max {
                            self.close(4011, "heartbeat timeout");
                            return ("heartbeat timeout", None);
                        }
                        if self.tx.try_send(Out::Ping).is_err() {
                            self.shared.mark_lagged();
                        }
                        next_ping = now + ping_every;
                    }
                }
                _ = shutdown.wait_for(|s| *s) => {
                    self.close(1001, "server shutting down");
                    return ("shutdown", None);
                }
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
                                user_id: user.sub.to_string(),
                                name: user.name.to_string(),
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
                                user_id: user.sub.to_string(),
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
                let id = packet_id.clone();
                self.spawn_money(
                    move |code| protocol::packet_rejected_frame(&id, code, None),
                    move |app, user, room| async move {
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
                        match reply {
                            crate::app::PacketReply::Ok { balance, seq } => {
                                protocol::packet_ok_frame(&packet_id, balance, seq)
                            }
                            crate::app::PacketReply::Rejected { code, balance } => {
                                protocol::packet_rejected_frame(&packet_id, code, balance)
                            }
                        }
                    },
                );
            }
            ClientFrame::Grab { packet_id } => {
                let id = packet_id.clone();
                self.spawn_money(
                    move |code| protocol::grab_rejected_frame(&id, code),
                    move |app, user, room| async move {
                        match app.grab(&user, &room, &packet_id).await {
                            crate::app::GrabReply::Ok { coins, balance } => {
                                protocol::grab_ok_frame(&packet_id, coins, balance)
                            }
                            crate::app::GrabReply::Rejected(code) => {
                                protocol::grab_rejected_frame(&packet_id, code)
                            }
                        }
                    },
                );
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
            } => self.gift(gift_id, &sticker, count, message.as_deref()),
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
        let Ok(room) = self.app.hub.room(stream) else {
            self.error("unavailable", "too many rooms on this server");
            return Ok(());
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
            user.map(|u| &*u.sub),
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

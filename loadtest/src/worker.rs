//! A worker: the clients of one process. Connects them, waits for the go, drives the load
//! steps, drains, closes, checks its wallets and reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{stream, FutureExt, SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::api::{proc_sample, Api};
use crate::client::{self, for_each_event, parse_stamp, short_err, Target, Ws};
use crate::fast::{self, FastEv, Kind as FastKind};
use crate::pacing::Pacer;
use crate::plan::{owns, Shape, WorkerPlan};
use crate::report::{MoneyTally, Report, Sample};
use crate::stats::{counters_map, now_us, summarize, HistData, Shard, Stats, C, M, METRIC_NAMES};
use crate::token;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Phase {
    Connect,
    Run,
    Drain,
    Stop,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Run => "run",
            Phase::Drain | Phase::Stop => "drain",
        }
    }
}

/// Messages from a worker to the coordinator.
pub enum WorkerMsg {
    /// All clients joined (or failed); waiting for the go.
    Ready,
    /// One timeline interval (without raw histograms), for the live display.
    Progress(Sample),
}

struct Ctx {
    target: Target,
    stats: Stats,
    phase: watch::Receiver<Phase>,
    connect_sem: Arc<Semaphore>,
    max_reconnects: u32,
    pad: String,
}

/// The timeline: intervals cut by a ticker and at every phase change.
struct Timeline {
    st: Mutex<TlState>,
}
struct TlState {
    phase: Phase,
    step: usize,
    started: Instant,
    last: Instant,
    samples: Vec<Sample>,
    peak_open: i64,
}

impl Timeline {
    fn new() -> Self {
        let now = Instant::now();
        Timeline {
            st: Mutex::new(TlState {
                phase: Phase::Connect,
                step: 0,
                started: now,
                last: now,
                samples: vec![],
                peak_open: 0,
            }),
        }
    }
    /// Close the current interval; returns it without raw histograms (for progress).
    fn cut(&self, stats: &Stats) -> Sample {
        let iv = stats.take_interval();
        let mut st = self.st.lock();
        let now = Instant::now();
        let open = stats.open_now();
        st.peak_open = st.peak_open.max(open);
        let mut raw = std::collections::BTreeMap::new();
        let mut lat = std::collections::BTreeMap::new();
        for (i, h) in iv.hists.iter().enumerate() {
            if !h.is_empty() {
                raw.insert(METRIC_NAMES[i].to_string(), HistData::from_hist(h));
                lat.insert(METRIC_NAMES[i].to_string(), summarize(h));
            }
        }
        let s = Sample {
            phase: st.phase.name().to_string(),
            step: st.step,
            t_secs: (now - st.started).as_secs_f64(),
            secs: (now - st.last).as_secs_f64(),
            open,
            counters: counters_map(&iv.counters),
            errors: iv.errors_total,
            latency_ms: lat,
            server_rss_bytes: None,
            raw,
        };
        st.last = now;
        let mut light = s.clone();
        light.raw.clear();
        st.samples.push(s);
        light
    }
    fn set(&self, phase: Phase, step: usize) {
        let mut st = self.st.lock();
        st.phase = phase;
        st.step = step;
    }
}

/// Tiny xorshift generator (no need for cryptographic randomness here).
#[derive(Clone)]
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A `gift` frame, serialised from a struct: the harness sends one per gift, so it avoids the
/// `serde_json::Value` map a `json!` literal builds.
#[derive(serde::Serialize)]
struct GiftFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    gift_id: &'a str,
    sticker: &'a str,
    count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

struct Pending {
    sent: Instant,
    amount: u64,
    /// The frame as sent (shared with the outgoing queue, not copied), for a retry or a re-send
    /// after a reconnect.
    frame: Utf8Bytes,
    /// For a retry of an acknowledged gift: the (balance, seq) of the first gift_ok.
    expect: Option<(i64, Option<u64>)>,
}

struct GiftCfg {
    stickers: Vec<(String, u64)>,
    count: u32,
    retry_every: u64,
    inflight: usize,
    as_fast: bool,
    message: bool,
}

/// As fast as acknowledged, a sender whose gifts were refused with `rate_limited` or
/// `unavailable` waits this long before it sends again. Without it, a sender whose every gift in
/// flight was refused (the server's journal backlog full, say) had no answer left to wake it and
/// sent nothing more for the rest of the run.
pub const REFUSED_BACKOFF_MS: u64 = 50;

struct Gifter {
    cfg: Arc<GiftCfg>,
    /// As fast as acknowledged: when to send again after a refusal (`REFUSED_BACKOFF_MS`).
    resume_at: Option<tokio::time::Instant>,
    user: String,
    room: String,
    prefix: String,
    n: u64,
    /// Gifts in flight by their number: the id is `{prefix}-{n}`, so an answer's id is matched
    /// by parsing its number (`number_of`), not by hashing and comparing the whole string.
    pending: HashMap<u64, Pending, foldhash::fast::RandomState>,
    acked_amount: u64,
    acked_count: u64,
    rejected: u64,
    exhausted: bool,
    rng: Rng,
    tally: MoneyTally,
    last_balance: Option<i64>,
}

impl Gifter {
    fn new(cfg: Arc<GiftCfg>, user: String, room: String, prefix: String, seed: u64) -> Gifter {
        Gifter {
            cfg,
            resume_at: None,
            user,
            room,
            prefix,
            n: 0,
            pending: HashMap::default(),
            acked_amount: 0,
            acked_count: 0,
            rejected: 0,
            exhausted: false,
            rng: Rng::new(seed),
            tally: MoneyTally::default(),
            last_balance: None,
        }
    }

    fn new_gift(&mut self, shard: &mut Shard, stats: &Stats, out: &mut Vec<Utf8Bytes>) {
        let (sticker, price) = {
            let i = (self.rng.next() % self.cfg.stickers.len() as u64) as usize;
            self.cfg.stickers[i].clone()
        };
        let number = self.n;
        let mut digits = itoa::Buffer::new();
        let n = digits.format(number);
        let mut id = String::with_capacity(self.prefix.len() + 1 + n.len());
        id.push_str(&self.prefix);
        id.push('-');
        id.push_str(n);
        self.n += 1;
        let message = self
            .cfg
            .message
            .then(|| format!("lt {} q{}", now_us(), self.n));
        let frame = serde_json::to_string(&GiftFrame {
            kind: "gift",
            gift_id: &id,
            sticker: &sticker,
            count: self.cfg.count,
            message: message.as_deref(),
        })
        .expect("a gift frame serialises");
        let frame = Utf8Bytes::from(frame);
        self.pending.insert(
            number,
            Pending {
                sent: Instant::now(),
                amount: price * self.cfg.count as u64,
                frame: frame.clone(),
                expect: None,
            },
        );
        stats.pending_gifts.fetch_add(1, Ordering::Relaxed);
        shard.inc(C::GiftsSent, 1);
        out.push(frame);
    }

    fn top_up(&mut self, phase: Phase, shard: &mut Shard, stats: &Stats, out: &mut Vec<Utf8Bytes>) {
        self.resume_at = None;
        if !self.cfg.as_fast || phase != Phase::Run {
            return;
        }
        while !self.exhausted && self.pending.len() < self.cfg.inflight {
            self.new_gift(shard, stats, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_ok(
        &mut self,
        id: &str,
        balance: Option<i64>,
        seq: Option<u64>,
        phase: Phase,
        shard: &mut Shard,
        stats: &Stats,
        out: &mut Vec<Utf8Bytes>,
    ) {
        let Some((number, p)) = self.take_pending(id) else {
            shard.inc(C::UnexpectedAck, 1);
            return;
        };
        stats.pending_gifts.fetch_sub(1, Ordering::Relaxed);
        let bal = balance.unwrap_or(i64::MIN);
        if bal < 0 {
            self.tally.negative_balances += 1;
            self.note(format!("gift_ok for {id} carries balance {balance:?}"));
        }
        if let Some((b, s)) = p.expect {
            if b == bal && s == seq {
                shard.inc(C::RetryOk, 1);
            } else {
                shard.inc(C::RetryMismatch, 1);
                self.tally.retry_mismatches += 1;
                self.note(format!("retry of {id}: first gift_ok balance {b} seq {s:?}, retry balance {bal} seq {seq:?}"));
            }
            return;
        }
        shard.rec(M::GiftAck, p.sent.elapsed().as_micros() as u64);
        shard.inc(C::GiftsOk, 1);
        self.acked_amount += p.amount;
        self.acked_count += 1;
        self.last_balance = Some(bal);
        if self.cfg.retry_every > 0
            && self.acked_count.is_multiple_of(self.cfg.retry_every)
            && phase == Phase::Run
        {
            out.push(p.frame.clone());
            self.pending.insert(
                number,
                Pending {
                    sent: Instant::now(),
                    amount: p.amount,
                    frame: p.frame,
                    expect: Some((bal, seq)),
                },
            );
            stats.pending_gifts.fetch_add(1, Ordering::Relaxed);
            shard.inc(C::GiftRetries, 1);
        }
        self.top_up(phase, shard, stats, out);
    }

    fn on_rejected(
        &mut self,
        id: &str,
        code: &str,
        phase: Phase,
        shard: &mut Shard,
        stats: &Stats,
        out: &mut Vec<Utf8Bytes>,
    ) {
        shard.err(&format!("gift_rejected:{code}"));
        let Some((_, p)) = self.take_pending(id) else {
            shard.inc(C::UnexpectedAck, 1);
            return;
        };
        stats.pending_gifts.fetch_sub(1, Ordering::Relaxed);
        if p.expect.is_some() {
            if code != "rate_limited" && code != "unavailable" {
                shard.inc(C::RetryMismatch, 1);
                self.tally.retry_mismatches += 1;
                self.note(format!(
                    "retry of acknowledged {id} was rejected with {code}"
                ));
            }
            return;
        }
        shard.inc(C::GiftsRejected, 1);
        self.rejected += 1;
        if code == "insufficient_funds" {
            self.exhausted = true;
        }
        if code == "rate_limited" || code == "unavailable" {
            // Back off: no immediate top-up. Paced, the next tick resumes; as fast as
            // acknowledged, the next answer or `resume_at`, whichever comes first.
            if self.cfg.as_fast && self.resume_at.is_none() {
                self.resume_at =
                    Some(tokio::time::Instant::now() + Duration::from_millis(REFUSED_BACKOFF_MS));
            }
            return;
        }
        self.top_up(phase, shard, stats, out);
    }

    /// The number of one of this gifter's ids (`{prefix}-{n}`, `n` as written by `new_gift`,
    /// without leading zeros); `None` for any other string.
    fn number_of(&self, id: &str) -> Option<u64> {
        let digits = id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        let n: u64 = digits.parse().ok()?;
        (itoa::Buffer::new().format(n) == digits).then_some(n)
    }

    /// Takes the gift in flight with this id.
    fn take_pending(&mut self, id: &str) -> Option<(u64, Pending)> {
        let n = self.number_of(id)?;
        self.pending.remove(&n).map(|p| (n, p))
    }

    fn note(&mut self, s: String) {
        if self.tally.details.len() < 5 {
            self.tally.details.push(format!("{}: {s}", self.user));
        }
    }
}

enum Kind {
    Viewer,
    Streamer { thank_ratio: f64 },
    Chatter,
    Gifter(Box<Gifter>),
}

struct Member {
    g: usize,
    room: String,
    token: Option<String>,
    kind: Kind,
    rx: Option<mpsc::Receiver<()>>,
    rng: Rng,
    last_seq: Option<u64>,
    ever_joined: bool,
    scratch: Vec<FastEv>,
}

fn seq_check(last_seq: &mut Option<u64>, s: u64, sh: &mut Shard) {
    match *last_seq {
        Some(l) if s == l + 1 => {}
        Some(l) if s <= l => sh.inc(C::SeqReorders, 1),
        Some(l) => sh.inc(C::SeqGaps, s - l - 1),
        None => {}
    }
    if last_seq.is_none_or(|l| s > l) {
        *last_seq = Some(s);
    }
}

/// What a wallet connection hands back at the end.
struct WalletOut {
    user: String,
    token: Option<String>,
    room: String,
    acked_amount: u64,
    unknown_amount: u64,
    acked_count: u64,
    rejected: u64,
    tally: MoneyTally,
}

enum End {
    Stop,
    Lost(String),
}

impl Member {
    fn join_frame(&self) -> String {
        let mut j = json!({"type": "join", "stream": self.room});
        if let Some(t) = &self.token {
            j["token"] = json!(t);
        }
        if let Some(s) = self.last_seq {
            j["since"] = json!(s);
        }
        j.to_string()
    }

    async fn run(mut self, ctx: Arc<Ctx>) -> Option<WalletOut> {
        let mut phase_rx = ctx.phase.clone();
        let mut reconnects = 0u32;
        let shard_i = self.g;
        loop {
            if *phase_rx.borrow() == Phase::Stop {
                break;
            }
            let permit = if self.ever_joined {
                None
            } else {
                ctx.connect_sem.clone().acquire_owned().await.ok()
            };
            let t0 = Instant::now();
            let ws = ctx.target.open(self.g).await;
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(code) => {
                    ctx.stats.shard(shard_i).err(&code);
                    if !self.ever_joined {
                        ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    reconnects += 1;
                    if reconnects > ctx.max_reconnects || *phase_rx.borrow() >= Phase::Drain {
                        break;
                    }
                    tokio::time::sleep(backoff(reconnects)).await;
                    continue;
                }
            };
            ctx.stats
                .shard(shard_i)
                .rec(M::Connect, t0.elapsed().as_micros() as u64);
            ctx.stats.open.fetch_add(1, Ordering::Relaxed);
            let (end, _joined) = self.session(&mut ws, &ctx, &mut phase_rx, t0, permit).await;
            ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Stop => break,
                End::Lost(code) => {
                    {
                        let mut sh = ctx.stats.shard(shard_i);
                        sh.err(&code);
                        sh.inc(C::Disconnects, 1);
                    }
                    if !self.ever_joined {
                        ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    let gifts_pending =
                        matches!(&self.kind, Kind::Gifter(g) if !g.pending.is_empty());
                    if *phase_rx.borrow() >= Phase::Drain && !gifts_pending {
                        break;
                    }
                    reconnects += 1;
                    if reconnects > ctx.max_reconnects {
                        break;
                    }
                    ctx.stats.shard(shard_i).inc(C::Reconnects, 1);
                    tokio::time::sleep(backoff(reconnects)).await;
                }
            }
        }
        match self.kind {
            Kind::Gifter(g) => {
                let unknown_amount = g
                    .pending
                    .values()
                    .filter(|p| p.expect.is_none())
                    .map(|p| p.amount)
                    .sum();
                let g = *g;
                Some(WalletOut {
                    user: g.user,
                    token: self.token,
                    room: g.room,
                    acked_amount: g.acked_amount,
                    unknown_amount,
                    acked_count: g.acked_count,
                    rejected: g.rejected,
                    tally: g.tally,
                })
            }
            _ => None,
        }
    }

    /// One connection's life: join, then events and commands until stop or loss.
    async fn session(
        &mut self,
        ws: &mut Ws,
        ctx: &Ctx,
        phase_rx: &mut watch::Receiver<Phase>,
        t0: Instant,
        mut permit: Option<OwnedSemaphorePermit>,
    ) -> (End, bool) {
        let mut joined = false;
        if let Err(e) = ws.send(Message::text(self.join_frame())).await {
            return (End::Lost(format!("ws:{}", short_err(&e))), false);
        }
        let join_deadline = tokio::time::sleep(Duration::from_secs(15));
        tokio::pin!(join_deadline);
        let mut out: Vec<Utf8Bytes> = Vec::new();
        loop {
            let phase = *phase_rx.borrow();
            let resume_at = match &self.kind {
                Kind::Gifter(g) => g.resume_at,
                _ => None,
            };
            tokio::select! {
                biased;
                r = phase_rx.changed() => {
                    let p = if r.is_err() { Phase::Stop } else { *phase_rx.borrow_and_update() };
                    if p == Phase::Stop {
                        let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
                        return (End::Stop, joined);
                    }
                    if p == Phase::Run && joined {
                        if let Kind::Gifter(g) = &mut self.kind {
                            let mut sh = ctx.stats.shard(self.g);
                            g.top_up(p, &mut sh, &ctx.stats, &mut out);
                        }
                    }
                }
                _ = &mut join_deadline, if !joined => {
                    return (End::Lost("join:timeout".into()), false);
                }
                _ = tokio::time::sleep_until(resume_at.unwrap_or_else(tokio::time::Instant::now)),
                    if joined && resume_at.is_some() =>
                {
                    if let Kind::Gifter(g) = &mut self.kind {
                        let mut sh = ctx.stats.shard(self.g);
                        g.top_up(phase, &mut sh, &ctx.stats, &mut out);
                    }
                }
                c = next_cmd(&mut self.rx), if joined => {
                    match c {
                        None => self.rx = None,
                        Some(()) => self.on_cmd(ctx, phase, &mut out),
                    }
                }
                m = ws.next() => {
                    // Handle this frame and whatever else is already buffered (up to 64),
                    // without going back through the select; what they call for (new gifts
                    // after acks, thanks) then goes out together, in one write.
                    let mut m = m;
                    let mut handled = 0;
                    loop {
                        match m {
                            None => return (End::Lost("ws:eof".into()), joined),
                            Some(Err(e)) => return (End::Lost(format!("ws:{}", short_err(&e))), joined),
                            Some(Ok(Message::Text(t))) => {
                                let was = joined;
                                self.on_text(t.as_str(), ctx, phase, &mut joined, t0, &mut out);
                                if joined && !was {
                                    permit.take();
                                    if !self.ever_joined {
                                        self.ever_joined = true;
                                        ctx.stats.joined.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            Some(Ok(Message::Close(cf))) => {
                                let code = cf.map(|c| u16::from(c.code)).unwrap_or(1005);
                                return (End::Lost(format!("close:{code}")), joined);
                            }
                            Some(Ok(Message::Binary(_))) => ctx.stats.shard(self.g).err("binary_frame"),
                            Some(Ok(_)) => {}
                        }
                        handled += 1;
                        if handled >= 64 {
                            break;
                        }
                        match ws.next().now_or_never() {
                            Some(next) => m = next,
                            None => break,
                        }
                    }
                }
            }
            if !out.is_empty() {
                for f in out.drain(..) {
                    if let Err(e) = ws.feed(Message::text(f)).await {
                        return (End::Lost(format!("ws:{}", short_err(&e))), joined);
                    }
                }
                if let Err(e) = ws.flush().await {
                    return (End::Lost(format!("ws:{}", short_err(&e))), joined);
                }
            }
        }
    }

    fn on_cmd(&mut self, ctx: &Ctx, phase: Phase, out: &mut Vec<Utf8Bytes>) {
        let mut n = 1;
        if let Some(rx) = &mut self.rx {
            while n < 256 && rx.try_recv().is_ok() {
                n += 1;
            }
        }
        if phase != Phase::Run {
            return;
        }
        let mut sh = ctx.stats.shard(self.g);
        match &mut self.kind {
            Kind::Chatter => {
                let t = now_us();
                for _ in 0..n {
                    out.push(
                        json!({"type": "chat", "text": format!("lt {t} {}", ctx.pad)})
                            .to_string()
                            .into(),
                    );
                }
                sh.inc(C::ChatsSent, n as u64);
            }
            Kind::Gifter(g) => {
                for _ in 0..n {
                    if g.exhausted {
                        break;
                    }
                    if g.pending.len() >= 10_000 {
                        sh.inc(C::PacerBacklog, 1);
                        continue;
                    }
                    g.new_gift(&mut sh, &ctx.stats, out);
                }
            }
            _ => {}
        }
    }

    fn on_text(
        &mut self,
        txt: &str,
        ctx: &Ctx,
        phase: Phase,
        joined: &mut bool,
        t0: Instant,
        out: &mut Vec<Utf8Bytes>,
    ) {
        let now = now_us();
        let mut sh = ctx.stats.shard(self.g);
        sh.inc(C::FramesRecv, 1);
        sh.inc(C::BytesRecv, txt.len() as u64);
        if *joined
            && !matches!(self.kind, Kind::Streamer { .. })
            && fast::scan(txt, &mut self.scratch)
        {
            if txt.starts_with("{\"type\":\"batch\"") {
                sh.inc(C::BatchFrames, 1);
            }
            for e in &self.scratch {
                if let Some(s) = e.seq {
                    seq_check(&mut self.last_seq, s, &mut sh);
                }
                let (c, m) = match e.kind {
                    FastKind::Chat => (C::Deliveries, M::Chat),
                    FastKind::Shoutout => (C::Shoutouts, M::Shoutout),
                    FastKind::Thanks => (C::ThanksRecv, M::Thanks),
                };
                sh.inc(c, 1);
                if let Some(ts) = e.stamp {
                    sh.rec_since(m, ts, now);
                }
            }
            return;
        }
        // Only a gifter gets acks: other members do not scan for them.
        if let Kind::Gifter(gf) = &mut self.kind {
            if let Some(ack) = fast::scan_gift_ok(txt) {
                gf.on_ok(
                    ack.gift_id,
                    ack.balance,
                    ack.seq,
                    phase,
                    &mut sh,
                    &ctx.stats,
                    out,
                );
                return;
            }
        }
        let Ok(ev) = client::parse(txt) else {
            sh.err("bad_json_from_server");
            return;
        };
        if ev.ty() == "batch" {
            sh.inc(C::BatchFrames, 1);
        }
        let kind = &mut self.kind;
        let last_seq = &mut self.last_seq;
        let rng = &mut self.rng;
        let g = self.g;
        let _ = g;
        for_each_event(&ev, &mut |e| {
            let ty = e.ty();
            match ty {
                "chat" | "shoutout" | "thanks" => {
                    if let Some(s) = e.seq {
                        seq_check(last_seq, s, &mut sh);
                    }
                    match ty {
                        "chat" => {
                            sh.inc(C::Deliveries, 1);
                            if let Some(ts) = e.text.as_ref().and_then(|t| parse_stamp(t.as_str()))
                            {
                                sh.rec_since(M::Chat, ts, now);
                            }
                        }
                        "shoutout" => {
                            sh.inc(C::Shoutouts, 1);
                            if let Some(ts) =
                                e.message.as_ref().and_then(|t| parse_stamp(t.as_str()))
                            {
                                sh.rec_since(M::Shoutout, ts, now);
                            }
                            if let Kind::Streamer { thank_ratio } = kind {
                                if phase == Phase::Run
                                    && *thank_ratio > 0.0
                                    && rng.unit() < *thank_ratio
                                {
                                    if let Some(id) = &e.gift_id {
                                        out.push(json!({"type": "thanks", "gift_id": id.as_str(), "text": format!("lt {now} thank you!")}).to_string().into());
                                        sh.inc(C::ThanksSent, 1);
                                    }
                                }
                            }
                        }
                        _ => {
                            sh.inc(C::ThanksRecv, 1);
                            if let Some(ts) = e.text.as_ref().and_then(|t| parse_stamp(t.as_str()))
                            {
                                sh.rec_since(M::Thanks, ts, now);
                            }
                        }
                    }
                }
                "joined" => {
                    if *joined {
                        sh.err("joined_twice");
                        return;
                    }
                    *joined = true;
                    sh.rec(M::Join, t0.elapsed().as_micros() as u64);
                    sh.inc(C::Joins, 1);
                    let resumed = e.resumed;
                    match (last_seq.is_some(), resumed) {
                        (true, Some(true)) => sh.inc(C::ResumedOk, 1),
                        (true, _) => {
                            sh.inc(C::ResumedMissed, 1);
                            *last_seq = e.seq;
                        }
                        (false, _) => *last_seq = e.seq,
                    }
                    if let Kind::Gifter(gf) = kind {
                        // Re-send every gift whose outcome we have not seen (same gift_id).
                        for p in gf.pending.values() {
                            out.push(p.frame.clone());
                        }
                        gf.top_up(phase, &mut sh, &ctx.stats, out);
                    }
                }
                "gift_ok" => {
                    if let Kind::Gifter(gf) = kind {
                        let id = e.gift_id.as_ref().map(|s| s.as_str()).unwrap_or("");
                        gf.on_ok(id, e.balance, e.seq, phase, &mut sh, &ctx.stats, out);
                    } else {
                        sh.err("gift_ok_to_non_gifter");
                    }
                }
                "gift_rejected" => {
                    let code = e.code.as_ref().map(|s| s.as_str()).unwrap_or("?");
                    if let Kind::Gifter(gf) = kind {
                        let id = e.gift_id.as_ref().map(|s| s.as_str()).unwrap_or("");
                        gf.on_rejected(id, code, phase, &mut sh, &ctx.stats, out);
                    } else {
                        sh.err(&format!("gift_rejected:{code}"));
                    }
                }
                "error" => {
                    let code = e.code.as_ref().map(|s| s.as_str()).unwrap_or("?");
                    if code == "lagged" {
                        sh.inc(C::Lagged, 1);
                    }
                    sh.err(&format!("error:{code}"));
                }
                "viewers" | "pong" => {}
                _ => sh.err(&format!(
                    "unknown_type:{}",
                    ty.chars().take(24).collect::<String>()
                )),
            }
        });
    }
}

/// 100 ms, 200 ms, 400 ms … at most 2 s between reconnect attempts.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.saturating_sub(1).min(5)).min(2000))
}

async fn next_cmd(rx: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands out send permits at the step's rate, round-robin over the senders.
async fn pacer_task(
    rates: Vec<f64>,
    txs: Vec<mpsc::Sender<()>>,
    mut phase: watch::Receiver<Phase>,
    step: Arc<AtomicUsize>,
    ctx: Arc<Ctx>,
) {
    if txs.is_empty() {
        return;
    }
    while *phase.borrow() < Phase::Run {
        if phase.changed().await.is_err() {
            return;
        }
    }
    let mut cur = usize::MAX;
    let mut p = Pacer::new(0.0, Instant::now(), 1);
    let mut rr = 0usize;
    while *phase.borrow() == Phase::Run {
        let s = step.load(Ordering::Relaxed);
        let now = Instant::now();
        if s != cur {
            cur = s;
            let r = *rates.get(s).or(rates.last()).unwrap_or(&0.0);
            p = Pacer::new(r, now, (r / 50.0).ceil().max(1.0) as u64);
        }
        let n = p.due(now);
        let mut backlog = 0;
        for _ in 0..n {
            if txs[rr % txs.len()].try_send(()).is_err() {
                backlog += 1;
            }
            rr += 1;
        }
        if backlog > 0 {
            ctx.stats.shard(rr).inc(C::PacerBacklog, backlog);
        }
        let wake = p
            .next_due()
            .map(|d| d.max(now + Duration::from_micros(500)))
            .unwrap_or(now + Duration::from_millis(50));
        let wake = wake.min(now + Duration::from_millis(50));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            r = phase.changed() => { if r.is_err() { return; } }
        }
    }
}

/// Churning client: connect, join, hold, leave, again, while the run phase lasts.
async fn churn_task(
    ctx: Arc<Ctx>,
    g: usize,
    room: String,
    token: Option<String>,
    hold_ms: u64,
    abrupt_ratio: f64,
) {
    let mut phase = ctx.phase.clone();
    while *phase.borrow() < Phase::Run {
        if phase.changed().await.is_err() {
            return;
        }
    }
    let mut rng = Rng::new(g as u64 + 7);
    let join = {
        let mut j = json!({"type": "join", "stream": room});
        if let Some(t) = &token {
            j["token"] = json!(t);
        }
        j.to_string()
    };
    let mut cycles = 0u64;
    while *phase.borrow() == Phase::Run && cycles < 1_000_000 {
        cycles += 1;
        let t0 = Instant::now();
        let mut ws = match ctx.target.open(g + cycles as usize).await {
            Ok(ws) => ws,
            Err(code) => {
                ctx.stats.shard(g).err(&code);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        ctx.stats
            .shard(g)
            .rec(M::Connect, t0.elapsed().as_micros() as u64);
        ctx.stats.open.fetch_add(1, Ordering::Relaxed);
        let ok = async {
            ws.send(Message::text(join.clone()))
                .await
                .map_err(|e| format!("ws:{}", short_err(&e)))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let m = tokio::time::timeout_at(deadline.into(), ws.next())
                    .await
                    .map_err(|_| "join:timeout".to_string())?;
                match m {
                    Some(Ok(Message::Text(t))) => {
                        let ev = client::parse(t.as_str())
                            .map_err(|_| "bad_json_from_server".to_string())?;
                        let mut joined = false;
                        let mut err = None;
                        for_each_event(&ev, &mut |e| match e.ty() {
                            "joined" => joined = true,
                            "error" => {
                                err = Some(format!(
                                    "error:{}",
                                    e.code.as_ref().map(|c| c.as_str()).unwrap_or("?")
                                ))
                            }
                            _ => {}
                        });
                        if joined {
                            return Ok(());
                        }
                        if let Some(e) = err {
                            return Err(e);
                        }
                    }
                    Some(Ok(Message::Close(cf))) => {
                        return Err(format!(
                            "close:{}",
                            cf.map(|c| u16::from(c.code)).unwrap_or(1005)
                        ))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("ws:{}", short_err(&e))),
                    None => return Err("ws:eof".to_string()),
                }
            }
        }
        .await;
        match ok {
            Ok(()) => {
                let mut sh = ctx.stats.shard(g);
                sh.rec(M::Join, t0.elapsed().as_micros() as u64);
                sh.inc(C::Joins, 1);
            }
            Err(code) => ctx.stats.shard(g).err(&code),
        }
        let hold = Duration::from_millis((rng.unit() * 2.0 * hold_ms as f64) as u64);
        let until = Instant::now() + hold;
        // Keep reading while holding, so the server never sees us as a stalled client.
        while Instant::now() < until && *phase.borrow() == Phase::Run {
            match tokio::time::timeout_at(until.into(), ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => {}
                Ok(_) => break,
            }
        }
        if rng.unit() < abrupt_ratio {
            drop(ws);
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
        ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
        ctx.stats.shard(g).inc(C::ChurnCycles, 1);
    }
}

struct Identity {
    user: String,
    token: Option<String>,
}

async fn identity(
    plan: &WorkerPlan,
    api: &Api,
    user: String,
    name: String,
    role: &str,
) -> Result<Identity> {
    match &plan.cli.common.token_secret {
        Some(secret) => Ok(Identity {
            token: Some(token::mint(secret, &user, &name, role, 24 * 3600)?),
            user,
        }),
        None => {
            let g = api.guest(&name, role).await?;
            Ok(Identity {
                user: g.user_id,
                token: Some(g.token),
            })
        }
    }
}

/// Run one worker: `ready` is told when all clients joined; the run starts when `go` fires.
pub async fn run_worker(
    plan: WorkerPlan,
    msgs: mpsc::UnboundedSender<WorkerMsg>,
    go: tokio::sync::oneshot::Receiver<()>,
) -> Result<Report> {
    let cli = &plan.cli;
    let c = &cli.common;
    let shape = Shape::of(cli);
    let api = Api::new(c.primary_url(), c.admin_token.clone())?;
    let target = Target::resolve(&c.ws_urls(), c.source_ips, c.read_buffer, c.sock_rcvbuf).await?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let ctx = Arc::new(Ctx {
        target,
        stats: Stats::new(64),
        phase: phase_rx.clone(),
        connect_sem: Arc::new(Semaphore::new(c.connect_concurrency.max(1))),
        max_reconnects: c.max_reconnects,
        pad: "x".repeat(shape.text_bytes),
    });
    let tl = Arc::new(Timeline::new());
    let (wi, wn) = (plan.index, plan.count.max(1));
    let run = &plan.run_id;
    let mut notes = vec![];

    // The gift catalog.
    let stickers: Vec<(String, u64)> = if shape.has_gifts() {
        if shape.sticker == "mix" || shape.sticker.is_empty() {
            plan.catalog.clone()
        } else {
            match plan.catalog.iter().find(|(id, _)| *id == shape.sticker) {
                Some(s) => vec![s.clone()],
                None => bail!(
                    "sticker {:?} is not in the catalog {:?}",
                    shape.sticker,
                    plan.catalog
                ),
            }
        }
    } else {
        vec![]
    };
    if shape.has_gifts() && stickers.is_empty() {
        bail!("the catalog is empty");
    }
    let gcfg = Arc::new(GiftCfg {
        stickers,
        count: shape.count,
        retry_every: shape.retry_every,
        inflight: shape.inflight,
        as_fast: shape.gifts_as_fast(),
        message: shape.gift_message,
    });

    // Build the members this worker owns. Global index g: streamers, viewers, chatters, wallets.
    let mut members: Vec<Member> = vec![];
    let mut g = 0usize;
    let nrooms = plan.rooms.len();
    let room_of = |i: usize| plan.rooms[i % nrooms].id.clone();
    let mut streamer_members = vec![];
    if shape.streamers {
        for (r, room) in plan.rooms.iter().enumerate() {
            if wi == 0 {
                streamer_members.push(Member {
                    g: g + r,
                    room: room.id.clone(),
                    token: room.streamer_token.clone(),
                    kind: Kind::Streamer {
                        thank_ratio: shape.thank_ratio,
                    },
                    rx: None,
                    rng: Rng::new(r as u64 + 1),
                    last_seq: None,
                    ever_joined: false,
                    scratch: Vec::new(),
                });
            }
        }
        g += nrooms;
    }
    for i in 0..shape.viewers {
        if owns(i, wi, wn) {
            let token = if shape.viewer_tokens {
                identity(
                    &plan,
                    &api,
                    format!("lt{run}-v{i}"),
                    format!("viewer {i}"),
                    "viewer",
                )
                .await?
                .token
            } else {
                None
            };
            members.push(Member {
                g: g + i,
                room: room_of(i),
                token,
                kind: Kind::Viewer,
                rx: None,
                rng: Rng::new(i as u64),
                last_seq: None,
                ever_joined: false,
                scratch: Vec::new(),
            });
        }
    }
    g += shape.viewers;
    let mut chat_txs = vec![];
    for i in 0..shape.chatters {
        if owns(i, wi, wn) {
            let id = identity(
                &plan,
                &api,
                format!("lt{run}-c{i}"),
                format!("chatter {i}"),
                "viewer",
            )
            .await?;
            let (tx, rx) = mpsc::channel(64);
            chat_txs.push(tx);
            members.push(Member {
                g: g + i,
                room: room_of(i),
                token: id.token,
                kind: Kind::Chatter,
                rx: Some(rx),
                rng: Rng::new(i as u64),
                last_seq: None,
                ever_joined: false,
                scratch: Vec::new(),
            });
        }
    }
    g += shape.chatters;
    // Wallets: all connections of a wallet live in the same worker.
    let mut wallets: Vec<(Identity, String)> = vec![];
    for w in 0..shape.wallets {
        if owns(w, wi, wn) {
            let id = identity(
                &plan,
                &api,
                format!("lt{run}-w{w}"),
                format!("wallet {w}"),
                "viewer",
            )
            .await?;
            wallets.push((id, room_of(w)));
        }
    }
    // Fund them (or read what they hold) and remember the starting balances.
    let who: Vec<(String, Option<String>)> = wallets
        .iter()
        .map(|(id, _)| (id.user.clone(), id.token.clone()))
        .collect();
    let coins = shape.coins;
    let starts: Vec<Result<i64>> = stream::iter(who)
        .map(|(user, tok)| {
            let api = api.clone();
            async move {
                if api.has_admin() && coins > 0 {
                    api.credit(&user, coins, &format!("{user}-fund")).await
                } else {
                    api.me_balance(tok.as_deref().unwrap_or("")).await
                }
            }
        })
        .buffered(16)
        .collect()
        .await;
    let mut start_balance: HashMap<String, i64> = HashMap::new();
    for ((id, _), b) in wallets.iter().zip(starts) {
        match b {
            Ok(b) => {
                start_balance.insert(id.user.clone(), b);
            }
            Err(e) => {
                if !start_balance.is_empty() || notes.is_empty() {
                    notes.push(format!("funding/reading wallet {} failed: {e:#}", id.user));
                }
            }
        }
    }
    let mut gift_txs = vec![];
    for (wl, (id, room)) in wallets.iter().enumerate() {
        let w = wl * wn + wi; // global wallet index
        for k in 0..shape.conns_per_wallet {
            let rx = if gcfg.as_fast {
                None
            } else {
                let (tx, rx) = mpsc::channel(64);
                gift_txs.push(tx);
                Some(rx)
            };
            let gifter = Gifter::new(
                gcfg.clone(),
                id.user.clone(),
                room.clone(),
                format!("lt{run}-{w}-{k}"),
                (w * 31 + k) as u64 + 3,
            );
            members.push(Member {
                g: g + w * shape.conns_per_wallet + k,
                room: room.clone(),
                token: id.token.clone(),
                kind: Kind::Gifter(Box::new(gifter)),
                rx,
                rng: Rng::new(w as u64),
                last_seq: None,
                ever_joined: false,
                scratch: Vec::new(),
            });
        }
    }
    g += shape.wallets * shape.conns_per_wallet;
    let mut churners = vec![];
    for i in 0..shape.churners {
        if owns(i, wi, wn) {
            let rng_pick = (i as f64 + 0.5) / shape.churners as f64;
            let token = if rng_pick < shape.token_ratio {
                identity(
                    &plan,
                    &api,
                    format!("lt{run}-h{i}"),
                    format!("churner {i}"),
                    "viewer",
                )
                .await?
                .token
            } else {
                None
            };
            churners.push((g + i * 1000, room_of(i), token));
        }
    }
    let target_clients = (streamer_members.len() + members.len()) as u64;

    // Sampler.
    let sampler = {
        let ctx = ctx.clone();
        let tl = tl.clone();
        let msgs = msgs.clone();
        let every = Duration::from_millis(c.sample_ms.max(100));
        tokio::spawn(async move {
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                iv.tick().await;
                let s = tl.cut(&ctx.stats);
                if msgs.send(WorkerMsg::Progress(s)).is_err() {
                    break;
                }
            }
        })
    };

    // Connect: streamers first (their join may bring the room to life), then the rest.
    let deadline = Instant::now() + Duration::from_secs_f64(c.connect_timeout_secs);
    let mut handles = vec![];
    let nstreamers = streamer_members.len() as u64;
    for m in streamer_members {
        handles.push(tokio::spawn(m.run(ctx.clone())));
    }
    wait_joined(&ctx, nstreamers, deadline).await;
    for m in members {
        handles.push(tokio::spawn(m.run(ctx.clone())));
    }
    wait_joined(&ctx, target_clients, deadline).await;
    let joined = ctx.stats.joined_count();
    if joined < target_clients {
        notes.push(format!(
            "worker {wi}: only {joined} of {target_clients} clients joined ({} failed)",
            ctx.stats.failed.load(Ordering::Relaxed)
        ));
    }
    let _ = msgs.send(WorkerMsg::Progress(tl.cut(&ctx.stats)));
    let _ = msgs.send(WorkerMsg::Ready);
    let _ = go.await;

    // Run.
    let step = Arc::new(AtomicUsize::new(0));
    let share = |total: usize, mine: usize| {
        if total == 0 {
            0.0
        } else {
            mine as f64 / total as f64
        }
    };
    let chat_share = share(shape.chatters, chat_txs.len());
    let chat_rates: Vec<f64> = (0..shape.steps)
        .map(|s| shape.chat_rate(s) * chat_share)
        .collect();
    let gift_share = share(shape.wallets * shape.conns_per_wallet, gift_txs.len());
    let gift_rates: Vec<f64> = (0..shape.steps)
        .map(|s| shape.gift_rate(s) * gift_share)
        .collect();
    let pacers = vec![
        tokio::spawn(pacer_task(
            chat_rates,
            chat_txs,
            phase_rx.clone(),
            step.clone(),
            ctx.clone(),
        )),
        tokio::spawn(pacer_task(
            gift_rates,
            gift_txs,
            phase_rx.clone(),
            step.clone(),
            ctx.clone(),
        )),
    ];
    let mut churn_handles = vec![];
    for (cg, room, token) in churners {
        churn_handles.push(tokio::spawn(churn_task(
            ctx.clone(),
            cg,
            room,
            token,
            shape.hold_ms,
            shape.abrupt_ratio,
        )));
    }
    tl.cut(&ctx.stats);
    tl.set(Phase::Run, 0);
    let run_start_t = tl.st.lock().last;
    let _ = phase_tx.send(Phase::Run);
    let step_len = Duration::from_secs_f64(c.duration_secs.max(0.0));
    for s in 0..shape.steps {
        if s > 0 {
            let _ = msgs.send(WorkerMsg::Progress(tl.cut(&ctx.stats)));
            tl.set(Phase::Run, s);
            step.store(s, Ordering::Relaxed);
        }
        tokio::time::sleep(step_len).await;
    }

    // Drain: no new sends; wait for outstanding gift answers (and in-flight deliveries).
    let _ = msgs.send(WorkerMsg::Progress(tl.cut(&ctx.stats)));
    tl.set(Phase::Drain, shape.steps.saturating_sub(1));
    let _ = phase_tx.send(Phase::Drain);
    let drain_end = Instant::now() + Duration::from_secs_f64(c.drain_secs.max(0.0));
    let min_drain = Instant::now() + Duration::from_secs_f64(c.drain_secs.clamp(0.0, 1.0));
    // Until every gift is answered and no room event arrived for 200 ms (at least a second,
    // at most --drain-secs).
    let received = || {
        ctx.stats.counter_sum(&[
            C::Deliveries,
            C::Shoutouts,
            C::ThanksRecv,
            C::GiftsOk,
            C::GiftsRejected,
        ])
    };
    let mut last_seen = received();
    let mut quiet_since = Instant::now();
    while Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now_seen = received();
        if now_seen != last_seen {
            last_seen = now_seen;
            quiet_since = Instant::now();
        }
        let settled = ctx.stats.pending_gifts.load(Ordering::Relaxed) <= 0
            && quiet_since.elapsed() >= Duration::from_millis(200);
        if Instant::now() >= min_drain && settled {
            break;
        }
    }
    let pending_left = ctx.stats.pending_gifts.load(Ordering::Relaxed);
    if pending_left > 0 {
        notes.push(format!(
            "{pending_left} gifts still unanswered after the drain"
        ));
    }
    let _ = msgs.send(WorkerMsg::Progress(tl.cut(&ctx.stats)));
    let _ = phase_tx.send(Phase::Stop);
    for p in pacers {
        p.abort();
    }
    let mut outs = vec![];
    let stop_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for h in handles.into_iter().chain(std::iter::empty()) {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(stop_deadline, h).await {
            Ok(Ok(Some(w))) => outs.push(w),
            Ok(_) => {}
            Err(_) => abort.abort(),
        }
    }
    for h in churn_handles {
        let abort = h.abort_handle();
        if tokio::time::timeout_at(stop_deadline, h).await.is_err() {
            abort.abort();
        }
    }
    sampler.abort();
    let last = tl.cut(&ctx.stats);
    let _ = msgs.send(WorkerMsg::Progress(last));

    // Money: per wallet, then the wallet balances as the server sees them now.
    let money_tally = if shape.has_gifts() {
        let mut tally = MoneyTally::default();
        let mut per_wallet: HashMap<String, (u64, u64, Option<String>)> = HashMap::new();
        for w in &outs {
            let mut t = w.tally.clone();
            *t.acked_by_stream.entry(w.room.clone()).or_default() += w.acked_amount;
            if w.unknown_amount > 0 {
                *t.unknown_by_stream.entry(w.room.clone()).or_default() += w.unknown_amount;
            }
            t.acked_gifts += w.acked_count;
            t.rejected_gifts += w.rejected;
            tally.merge(&t);
            let e = per_wallet
                .entry(w.user.clone())
                .or_insert((0, 0, w.token.clone()));
            e.0 += w.acked_amount;
            e.1 += w.unknown_amount;
        }
        type Check = (String, Option<i64>, Result<i64>, u64, u64);
        let checks: Vec<Check> = stream::iter(per_wallet)
            .map(|(user, (acked, unknown, tok))| {
                let api = api.clone();
                let start = start_balance.get(&user).copied();
                async move {
                    let b = api.me_balance(tok.as_deref().unwrap_or("")).await;
                    (user, start, b, acked, unknown)
                }
            })
            .buffered(16)
            .collect()
            .await;
        for (user, start, bal, acked, unknown) in checks {
            match (start, bal) {
                (Some(start), Ok(b)) => {
                    tally.wallets_checked += 1;
                    let hi = start - acked as i64;
                    let lo = hi - unknown as i64;
                    if b < 0 {
                        tally.negative_balances += 1;
                    }
                    if b < lo || b > hi {
                        tally.wallet_mismatches += 1;
                        if tally.details.len() < 20 {
                            tally.details.push(format!(
                                "wallet {user}: started {start}, acknowledged spend {acked} (+{unknown} unknown), server balance {b} (expected {})",
                                if unknown == 0 { hi.to_string() } else { format!("{lo}..={hi}") }
                            ));
                        }
                    }
                }
                (_, Err(e)) => {
                    if tally.details.len() < 20 {
                        tally
                            .details
                            .push(format!("wallet {user}: /api/me failed: {e:#}"));
                    }
                }
                (None, Ok(_)) => {}
            }
        }
        Some(tally)
    } else {
        None
    };

    let (counters, errors) = ctx.stats.totals();
    let mut timeline = std::mem::take(&mut tl.st.lock().samples);
    let t_run0 = (run_start_t - tl.st.lock().started).as_secs_f64();
    for s in &mut timeline {
        s.t_secs -= t_run0;
    }
    let me = proc_sample(std::process::id());
    let peak_open = tl.st.lock().peak_open;
    Ok(Report {
        scenario: cli.scenario.name().to_string(),
        run_id: plan.run_id.clone(),
        url: c.url.join(","),
        procs: 1,
        connections: crate::report::Connections {
            target: target_clients,
            joined: ctx.stats.joined_count(),
            failed: ctx.stats.failed.load(Ordering::Relaxed),
            peak_open,
        },
        counters,
        errors,
        timeline,
        money_tally,
        client_threads: tokio::runtime::Handle::current().metrics().num_workers(),
        client_cpu_secs: me.cpu_secs.unwrap_or(0.0),
        client_rss_bytes: me.rss_bytes.unwrap_or(0),
        notes,
        ..Default::default()
    })
}

async fn wait_joined(ctx: &Ctx, n: u64, deadline: Instant) {
    while Instant::now() < deadline {
        if ctx.stats.joined_count() + ctx.stats.failed.load(Ordering::Relaxed) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gifter(prefix: &str) -> Gifter {
        let cfg = Arc::new(GiftCfg {
            stickers: vec![("rose".into(), 1)],
            count: 1,
            retry_every: 0,
            inflight: 1,
            as_fast: true,
            message: false,
        });
        Gifter::new(cfg, "u".into(), "r".into(), prefix.into(), 1)
    }

    #[test]
    fn an_answer_is_matched_to_its_gift_by_the_exact_id() {
        let g = gifter("lt1-2-0");
        assert_eq!(g.number_of("lt1-2-0-0"), Some(0));
        assert_eq!(g.number_of("lt1-2-0-12345"), Some(12345));
        // Anything new_gift never writes is not one of ours: another gifter's prefix, leading
        // zeros, a sign, no number, trailing bytes.
        for other in [
            "lt1-2-1-5",
            "lt1-2-05",
            "lt1-2-0-05",
            "lt1-2-0-+5",
            "lt1-2-0-",
            "lt1-2-0",
            "lt1-2-0-5x",
            "lt1-2-0-5 ",
            "",
        ] {
            assert_eq!(g.number_of(other), None, "{other:?}");
        }
    }
}

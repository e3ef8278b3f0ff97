//! The application: hub, ledger, identity and limits wired together. The gift and chat paths
//! live here because they use both the hub and the ledger (the hub calls the ledger, never the
//! reverse).

use crate::auth::{Claims, Role, TokenKeys};
use crate::config::Config;
use crate::daily_cap::DailySpend;
use crate::hub::{Gate, Hub, QueuedGift, QueuedUser, Room};
use crate::ledger::{CreditStart, GiftRequest, GiftStart, Ledger, SlotState};
use crate::limits::{
    CHAT_CHARS_MAX, GIFT_COUNT_MAX, GIFT_ID_CHARS_MAX, GIFT_MESSAGE_CHARS_MAX,
    IDEMPOTENCY_LOOKUP_TIMEOUT_MS, IDEMPOTENCY_LOOKUP_TRIES_MAX, IDEMPOTENCY_SWEEP_CHUNK,
    IDEMPOTENCY_SWEEP_MAX, IDEMPOTENCY_SWEEP_MS, THANKS_CHARS_MAX,
};
use crate::protocol::{self, clean_text, valid_id, UserRef};
use crate::record::{GiftRecord, Lsn};
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Health of the durable path, as /readyz and the gift path see it.
pub trait DurabilityStatus: Send + Sync + 'static {
    /// `None` when healthy; otherwise why money is not taken or storage is behind.
    fn problem(&self) -> Option<String>;
    /// Whether gifts can be taken at all (the journal is alive).
    fn taking_money(&self) -> bool;
}

pub struct App {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub ledger: Arc<Ledger>,
    pub keys: TokenKeys,
    pub metrics: PrometheusHandle,
    pub catalog_json: String,
    pub durability: Option<Arc<crate::durable::Durable>>,
    chat_limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    gift_limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    conns_per_ip: DashMap<IpAddr, u32>,
    /// New WebSocket connections per address per second (on while `--max-conns-per-ip` is).
    conn_attempts: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    conns_total: AtomicUsize,
    pub shutting_down: AtomicBool,
    /// `true` once shutdown began: connections close with 1001.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Gift completions not yet settled: shutdown waits for them.
    pub gifts_in_flight: AtomicUsize,
    /// `--daily-cap`: what each viewer spent today (on the wallet's node).
    pub daily_spend: DailySpend,
    /// Cluster mode (set once at start).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Counters of every durable gift, registered once (`counter!` looks its key up per call).
    gift_metrics: GiftMetrics,
    /// FOR TESTS: called with the gift's user and id right after each store lookup of
    /// [`App::look_up_gift`] returns, before its answer is used: a test evicts the wallet's ids
    /// there, deterministically, as a concurrent eviction would. Not in other builds.
    #[cfg(test)]
    after_find_gift: std::sync::OnceLock<AfterFindGift>,
}

struct GiftMetrics {
    gifts: metrics::Counter,
    coins: metrics::Counter,
}

/// FOR TESTS: see `App::after_find_gift`.
#[cfg(test)]
type AfterFindGift = Box<dyn Fn(&str, &str) + Send + Sync>;

/// The message of a moderation refusal.
pub fn gate_message(gate: Gate) -> &'static str {
    match gate {
        Gate::Banned => "you are banned from this stream",
        Gate::TimedOut => "you are timed out in this stream; try again later",
        Gate::Blocked => "that contains a word this stream does not allow",
        Gate::SlowMode => "slow mode is on in this stream; wait before chatting again",
    }
}

/// The stream's own streamer.
pub fn is_streamer(user: &Claims, room: &Room) -> bool {
    user.role == Role::Streamer && user.sub == room.id
}

fn per_minute(n: u32) -> Option<DefaultKeyedRateLimiter<Arc<str>>> {
    let n = NonZeroU32::new(n)?;
    Some(RateLimiter::keyed(Quota::per_minute(n)))
}

/// Why a connection was refused before the upgrade.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    PerIp,
    /// Too many new connections from one address per second.
    Rate,
    Total,
}

/// Counts one open WebSocket; dropping it releases the slot.
pub struct ConnSlot {
    app: Arc<App>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.app.conns_total.fetch_sub(1, Ordering::SeqCst);
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.app.conns_per_ip.entry(self.ip)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        metrics::gauge!("giftcast_connections").decrement(1.0);
    }
}

/// A gift as the wallet's node takes it: checked for shape, sticker looked up.
#[derive(Clone, Copy)]
pub struct WalletGift<'a> {
    pub user_id: &'a Arc<str>,
    pub user_name: &'a Arc<str>,
    pub gift_id: &'a str,
    pub stream: &'a Arc<str>,
    pub sticker: &'a crate::catalog::Sticker,
    pub count: u32,
    pub message: Option<&'a str>,
}

/// Where a gift's store lookups stand: the ledger's mark when the last one began (see
/// `GiftRequest::store_checked`), and how many have run.
#[derive(Clone, Copy, Debug)]
struct StoreChecked {
    mark: Lsn,
    tries: u32,
}

/// [`WalletGift`] owned, to carry into a task or across an `.await`.
#[derive(Clone, Debug)]
pub struct OwnedWalletGift {
    pub user_id: Arc<str>,
    pub user_name: Arc<str>,
    pub gift_id: String,
    pub stream: Arc<str>,
    pub sticker: crate::catalog::Sticker,
    pub count: u32,
    pub message: Option<String>,
}

impl OwnedWalletGift {
    pub fn as_gift(&self) -> WalletGift<'_> {
        WalletGift {
            user_id: &self.user_id,
            user_name: &self.user_name,
            gift_id: &self.gift_id,
            stream: &self.stream,
            sticker: &self.sticker,
            count: self.count,
            message: self.message.as_deref(),
        }
    }
}

impl WalletGift<'_> {
    pub fn to_owned_gift(&self) -> OwnedWalletGift {
        OwnedWalletGift {
            user_id: self.user_id.clone(),
            user_name: self.user_name.clone(),
            gift_id: self.gift_id.to_string(),
            stream: self.stream.clone(),
            sticker: self.sticker.clone(),
            count: self.count,
            message: self.message.map(str::to_string),
        }
    }
}

/// One money completion not settled yet: counted in `App::gifts_in_flight` (which shutdown
/// waits to see at zero) for as long as it lives, so a completion that is dropped uncalled (the
/// journal refused its record) counts itself out like one that ran.
struct InFlight(Arc<App>);

impl InFlight {
    fn new(app: &Arc<App>) -> InFlight {
        app.gifts_in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(app.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.gifts_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Receives a gift's answer (once).
pub type GiftAnswer = Box<dyn FnOnce(GiftReply) + Send>;

pub enum GiftReply {
    Ok {
        balance: u64,
        seq: u64,
    },
    Rejected {
        code: &'static str,
        balance: Option<u64>,
    },
}

impl App {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        ledger: Arc<Ledger>,
        keys: TokenKeys,
        metrics: PrometheusHandle,
        durability: Option<Arc<crate::durable::Durable>>,
    ) -> App {
        let catalog_json = serde_json::to_string(&config.catalog).expect("catalog serialises");
        let conn_attempts = (config.max_conns_per_ip > 0).then(|| {
            RateLimiter::keyed(
                Quota::per_second(
                    NonZeroU32::new(crate::limits::CONN_ATTEMPTS_PER_IP_PER_SEC).expect("nonzero"),
                )
                .allow_burst(
                    NonZeroU32::new(crate::limits::CONN_ATTEMPTS_PER_IP_BURST).expect("nonzero"),
                ),
            )
        });
        let daily_spend = DailySpend::new(config.daily_cap);
        if let Some(d) = &durability {
            let now = crate::now_ms();
            for (user, amount, ts_ms) in d.take_gifts_today() {
                daily_spend.restore(&user, amount, ts_ms, now);
            }
        }
        App {
            daily_spend,
            chat_limiter: per_minute(config.chat_rate_per_min),
            gift_limiter: per_minute(config.gift_rate_per_min),
            config,
            hub,
            ledger,
            keys,
            metrics,
            catalog_json,
            durability,
            conns_per_ip: DashMap::new(),
            conn_attempts,
            conns_total: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            shutdown: tokio::sync::watch::Sender::new(false),
            gifts_in_flight: AtomicUsize::new(0),
            cluster: std::sync::OnceLock::new(),
            gift_metrics: GiftMetrics {
                gifts: metrics::counter!("giftcast_gifts_total"),
                coins: metrics::counter!("giftcast_gifted_coins_total"),
            },
            #[cfg(test)]
            after_find_gift: std::sync::OnceLock::new(),
        }
    }

    /// Waits for a money record's `ticket` on a task of its own, so that it completes even if
    /// the asker (a connection, another node) goes away, and shutdown waits for it; then runs
    /// `durable`, or `refused` with the journal's reason.
    fn settle<Fut>(
        self: &Arc<Self>,
        ticket: crate::ledger::DurableTicket,
        durable: impl FnOnce(Arc<App>) -> Fut + Send + 'static,
        refused: impl FnOnce(Arc<App>, String) + Send + 'static,
    ) where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let in_flight = InFlight::new(self);
        tokio::spawn(async move {
            let app = in_flight.0.clone();
            match ticket.await {
                Ok(()) => durable(app).await,
                Err(e) => refused(app, e),
            }
            drop(in_flight);
        });
    }

    /// Stop taking connections and money; every connection closes with 1001.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown.send_replace(true);
    }

    /// WebSocket connections open now (each holds a `ConnSlot`).
    pub fn conns_open(&self) -> usize {
        self.conns_total.load(Ordering::SeqCst)
    }

    pub fn open_conn(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, ConnRefusal> {
        if let Some(l) = &self.conn_attempts {
            if l.check_key(&ip).is_err() {
                return Err(ConnRefusal::Rate);
            }
        }
        let total = self.conns_total.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.max_conns > 0 && total > self.config.max_conns as usize {
            self.conns_total.fetch_sub(1, Ordering::SeqCst);
            return Err(ConnRefusal::Total);
        }
        {
            let mut per_ip = self.conns_per_ip.entry(ip).or_insert(0);
            if self.config.max_conns_per_ip > 0 && *per_ip >= self.config.max_conns_per_ip {
                drop(per_ip);
                self.conns_total.fetch_sub(1, Ordering::SeqCst);
                return Err(ConnRefusal::PerIp);
            }
            *per_ip += 1;
        }
        metrics::gauge!("giftcast_connections").increment(1.0);
        Ok(ConnSlot {
            app: self.clone(),
            ip,
        })
    }

    /// Chat from a signed-in member: validated, rate limited, published.
    pub fn chat(
        &self,
        user: &Claims,
        room: &Room,
        text: &str,
    ) -> Result<u64, (&'static str, &'static str)> {
        let text = clean_text(text, CHAT_CHARS_MAX)
            .ok_or(("invalid", "chat must be 1-500 characters, not blank"))?;
        let ts = crate::now_ms();
        {
            // Moderation, slow mode and the rate limit are checked and recorded under the room's
            // moderation lock: two connections of one user cannot both slip through slow mode.
            let mut m = room.moderation();
            let staff = is_streamer(user, room) || m.is_moderator(&user.sub);
            if let Err(gate) = m.gate(&user.sub, Some(text), staff, ts) {
                return Err((gate.code(), gate_message(gate)));
            }
            if !staff && !m.slow_mode_allows(&user.sub, ts) {
                return Err((Gate::SlowMode.code(), gate_message(Gate::SlowMode)));
            }
            if let Some(l) = &self.chat_limiter {
                if l.check_key(&user.sub).is_err() {
                    return Err(("rate_limited", "too many chat messages; slow down"));
                }
            }
            m.chat_accepted(&user.sub, ts);
        }
        Ok(room.publish(|seq| {
            serde_json::to_string(&protocol::ChatEvent {
                kind: "chat",
                seq,
                from: UserRef {
                    id: &user.sub,
                    name: &user.name,
                },
                text,
                ts,
            })
            .expect("chat serialises")
        }))
    }

    /// Thanks from the stream's streamer for a queued gift.
    pub fn thanks(
        &self,
        user: &Claims,
        room: &Room,
        gift_id: &str,
        text: Option<&str>,
    ) -> Result<u64, (&'static str, &'static str)> {
        if user.role != Role::Streamer || user.sub != room.id {
            return Err(("forbidden", "only this stream's streamer can thank"));
        }
        let text = match text {
            None => None,
            Some(t) if t.trim().is_empty() => None,
            Some(t) => Some(
                clean_text(t, THANKS_CHARS_MAX)
                    .ok_or(("invalid", "thanks text is at most 200 characters"))?,
            ),
        };
        let gift = room.take_queued(gift_id).ok_or((
            "not_found",
            "no un-thanked gift with that gift_id in this stream",
        ))?;
        let ts = crate::now_ms();
        Ok(room.publish(|seq| {
            serde_json::to_string(&protocol::ThanksEvent {
                kind: "thanks",
                seq,
                gift_id: &gift.gift_id,
                to: UserRef {
                    id: &gift.from.id,
                    name: &gift.from.name,
                },
                text,
                ts,
            })
            .expect("thanks serialises")
        }))
    }

    /// A gift, on the node the sender is connected to: checks, then the wallet's node. `answer`
    /// is called once with the outcome: at once for a refusal, otherwise when the gift is
    /// durable and announced (from the journal's settle thread) or known to have failed.
    #[allow(clippy::too_many_arguments)]
    pub fn gift(
        self: &Arc<Self>,
        user: &Claims,
        room: &Arc<Room>,
        gift_id: &str,
        sticker_id: &str,
        count: u32,
        message: Option<&str>,
        answer: GiftAnswer,
    ) {
        let reject = |code| GiftReply::Rejected {
            code,
            balance: None,
        };
        if !valid_id(gift_id, GIFT_ID_CHARS_MAX) || !(1..=GIFT_COUNT_MAX).contains(&count) {
            return answer(reject("invalid"));
        }
        let message = match message {
            None => None,
            Some(m) if m.trim().is_empty() => None,
            Some(m) => match clean_text(m, GIFT_MESSAGE_CHARS_MAX) {
                Some(m) => Some(m),
                None => return answer(reject("invalid")),
            },
        };
        let Some(sticker) = self.config.catalog.get(sticker_id) else {
            return answer(reject("unknown_sticker"));
        };
        if user.sub == room.id {
            // A streamer does not tip their own stream.
            return answer(reject("invalid"));
        }
        if !room.is_live() {
            return answer(reject("not_found"));
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return answer(reject("unavailable"));
        }
        // Moderation of the room (bans, timeouts, blocked words in the message). A retry of an
        // accepted gift gets its original answer from the ledger, whatever moderation says now.
        if !self.ledger.has_gift(&user.sub, gift_id) {
            let m = room.moderation();
            let staff = is_streamer(user, room) || m.is_moderator(&user.sub);
            if let Err(gate) = m.gate(&user.sub, message, staff, crate::now_ms()) {
                return answer(GiftReply::Rejected {
                    code: gate.code(),
                    balance: Some(self.ledger.balance(&user.sub)),
                });
            }
        }
        if let Some(l) = &self.gift_limiter {
            if l.check_key(&user.sub).is_err() {
                return answer(reject("rate_limited"));
            }
        }
        if let Some(cluster) = self.cluster.get() {
            if !cluster.owns(&user.sub) {
                let (cluster, user, stream) = (cluster.clone(), user.clone(), room.id.clone());
                let (gift_id, sticker) = (gift_id.to_string(), sticker.id.clone());
                let message = message.map(str::to_string);
                tokio::spawn(async move {
                    let reply = cluster
                        .remote_gift(
                            &user,
                            &stream,
                            &gift_id,
                            &sticker,
                            count,
                            message.as_deref(),
                        )
                        .await;
                    answer(reply);
                });
                return;
            }
        }
        let gift = WalletGift {
            user_id: &user.sub,
            user_name: &user.name,
            gift_id,
            stream: &room.id,
            sticker,
            count,
            message,
        };
        self.gift_wallet(&gift, answer);
    }

    /// [`App::gift_wallet`] as a future, for a wallet request from another node.
    pub async fn gift_wallet_reply(self: &Arc<Self>, gift: &WalletGift<'_>) -> GiftReply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer: GiftAnswer = Box::new(move |reply| {
            let _ = tx.send(reply);
        });
        self.gift_wallet(gift, answer);
        rx.await.unwrap_or(GiftReply::Rejected {
            code: "unavailable",
            balance: None,
        })
    }

    /// A gift on the node that owns the sender's wallet: the atomic debit, then (when the
    /// journal has made it durable) the shout-out and the answer.
    ///
    /// No task per gift: the completion is a callback the journal runs on its settle thread
    /// with the rest of its fsync batch, and the answer waits on the gift's slot, so a retry
    /// of a gift in flight is answered by the same completion.
    pub fn gift_wallet(self: &Arc<Self>, gift: &WalletGift<'_>, answer: GiftAnswer) {
        self.gift_wallet_checked(gift, answer, None);
    }

    /// [`App::gift_wallet`], after `checked.tries` store lookups for an id the ledger may have
    /// evicted found nothing (see `ledger::idempotency`).
    fn gift_wallet_checked(
        self: &Arc<Self>,
        gift: &WalletGift<'_>,
        answer: GiftAnswer,
        checked: Option<StoreChecked>,
    ) {
        let WalletGift {
            user_id,
            user_name,
            gift_id,
            stream,
            sticker,
            count,
            message,
        } = *gift;
        if self.shutting_down.load(Ordering::SeqCst)
            || self.durability.as_ref().is_some_and(|d| !d.taking_money())
        {
            return answer(GiftReply::Rejected {
                code: "unavailable",
                balance: Some(self.ledger.balance(user_id)),
            });
        }
        // The daily cap, on the wallet's node: reserved before the debit, given back if nothing
        // is debited. A retry of an accepted gift gets its original answer whatever the cap says.
        // (Looked up only under a cap: without one a reservation is empty either way, and this
        // lookup is the third of the same id per gift.)
        let retry = self.daily_spend.capped() && self.ledger.has_gift(user_id, gift_id);
        let reservation = match sticker.price.checked_mul(count as u64) {
            Some(amount) if !retry => {
                match self.daily_spend.reserve(user_id, amount, crate::now_ms()) {
                    Ok(r) => Some(r),
                    Err(_) => {
                        metrics::counter!("giftcast_gifts_rejected_total", "code" => "daily_cap")
                            .increment(1);
                        return answer(GiftReply::Rejected {
                            code: "daily_cap",
                            balance: Some(self.ledger.balance(user_id)),
                        });
                    }
                }
            }
            _ => None,
        };
        let req = GiftRequest {
            user_id,
            user_name,
            gift_id,
            stream,
            sticker: &sticker.id,
            price: sticker.price,
            count,
            message,
            ts_ms: crate::now_ms(),
            store_checked: checked.map(|c| c.mark),
        };
        let tier = sticker.tier;
        // The completion holds a copy of the reservation, released only if the journal fails
        // the record; if it refuses the record at once the original is released below.
        let start = self.ledger.begin_gift(&req, |record, slot| {
            let (in_flight, record, slot) = (InFlight::new(self), record.clone(), slot.clone());
            let reservation = reservation.clone();
            Box::new(move |outcome| {
                gift_settled(in_flight, record, slot, tier, reservation, outcome)
            })
        });
        let slot = match start {
            GiftStart::Rejected { code, balance } => {
                if let Some(r) = reservation {
                    self.daily_spend.release(user_id, r);
                }
                metrics::counter!("giftcast_gifts_rejected_total", "code" => code).increment(1);
                return answer(GiftReply::Rejected { code, balance });
            }
            GiftStart::Retry(slot) => {
                if let Some(r) = reservation {
                    self.daily_spend.release(user_id, r);
                }
                slot
            }
            GiftStart::Lookup { mark, spans } => {
                if let Some(r) = reservation {
                    self.daily_spend.release(user_id, r);
                }
                let tries = checked.map_or(0, |c| c.tries) + 1;
                return self.look_up_gift(gift, answer, StoreChecked { mark, tries }, spans);
            }
            GiftStart::New { slot, .. } => slot,
        };
        let (app, user_id, balance_after) = (self.clone(), user_id.to_string(), slot.balance_after);
        slot.when_settled(move |state| {
            answer(match state {
                SlotState::Done { seq } => GiftReply::Ok {
                    balance: balance_after,
                    seq,
                },
                _ => GiftReply::Rejected {
                    code: "unavailable",
                    balance: Some(app.ledger.balance(&user_id)),
                },
            })
        });
    }

    /// A gift whose id the ledger may have evicted: the store says whether it is a retry (then
    /// it gets its original `gift_ok`, or `conflict`) or new (then it goes round again). Off the
    /// wallet lock, on a task: this is the rare path (a retry after `resident_ms`, or a filter
    /// false positive). Only gifts made in `spans` count: the days of the filter that answered
    /// "maybe" for this id.
    fn look_up_gift(
        self: &Arc<Self>,
        gift: &WalletGift<'_>,
        answer: GiftAnswer,
        at: StoreChecked,
        spans: Vec<std::ops::Range<u64>>,
    ) {
        let unavailable = |app: &App, user_id: &str| GiftReply::Rejected {
            code: "unavailable",
            balance: Some(app.ledger.balance(user_id)),
        };
        let store = match &self.durability {
            Some(d) if at.tries <= IDEMPOTENCY_LOOKUP_TRIES_MAX => d.store.clone(),
            _ => return answer(unavailable(self, gift.user_id)),
        };
        let (app, owned) = (self.clone(), gift.to_owned_gift());
        tokio::spawn(async move {
            let gift = owned.as_gift();
            let timeout = Duration::from_millis(IDEMPOTENCY_LOOKUP_TIMEOUT_MS);
            let found =
                tokio::time::timeout(timeout, store.find_gift(gift.user_id, gift.gift_id, &spans))
                    .await;
            #[cfg(test)]
            if let Some(hook) = app.after_find_gift.get() {
                hook(gift.user_id, gift.gift_id);
            }
            match found {
                Ok(Ok(Some(stored))) => {
                    metrics::counter!("giftcast_idempotency_lookup_hits_total").increment(1);
                    let same = crate::ledger::same_gift(
                        &stored,
                        gift.stream,
                        &gift.sticker.id,
                        gift.count,
                        gift.message,
                    );
                    answer(if same {
                        // The original answer; its seq is not stored (as after a restart).
                        GiftReply::Ok {
                            balance: stored.balance_after,
                            seq: 0,
                        }
                    } else {
                        GiftReply::Rejected {
                            code: "conflict",
                            balance: Some(app.ledger.balance(gift.user_id)),
                        }
                    });
                }
                Ok(Ok(None)) => app.gift_wallet_checked(&gift, answer, Some(at)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "gift id lookup failed; gift refused, nothing debited");
                    answer(unavailable(&app, gift.user_id));
                }
                Err(_) => {
                    tracing::warn!("gift id lookup timed out; gift refused, nothing debited");
                    answer(unavailable(&app, gift.user_id));
                }
            }
        });
    }

    /// The shout-out, the combo and the thanks queue, in a room this node owns.
    pub fn announce_local(&self, record: &GiftRecord, tier: u8) -> u64 {
        let Ok(room) = self.hub.room(&record.stream) else {
            tracing::warn!(stream = %record.stream, "no room for a shout-out (too many rooms)");
            return 0;
        };
        let combo = room.combo(&record.user_id, &record.sticker, record.ts_ms);
        room.publish_gift(
            |seq| {
                protocol::to_json_sized(&protocol::ShoutoutEvent {
                    kind: "shoutout",
                    seq,
                    gift_id: &record.gift_id,
                    from: UserRef {
                        id: &record.user_id,
                        name: &record.user_name,
                    },
                    sticker: &record.sticker,
                    count: record.count,
                    amount: record.amount,
                    message: record.message.as_deref(),
                    combo,
                    tier,
                    ts: record.ts_ms,
                })
            },
            QueuedGift {
                gift_id: record.gift_id.clone(),
                from: QueuedUser {
                    id: record.user_id.clone(),
                    name: record.user_name.clone(),
                },
                sticker: record.sticker.clone(),
                count: record.count,
                amount: record.amount,
                message: record.message.clone(),
                seq: 0, // set to the shout-out's under the room lock
                ts: record.ts_ms,
            },
        )
    }

    /// A wallet's balance, from the node that owns it.
    pub async fn balance(&self, user_id: &str) -> Result<u64, String> {
        if let Some(cluster) = self.cluster.get() {
            if !cluster.owns(user_id) {
                return cluster.remote_balance(user_id).await;
            }
        }
        Ok(self.ledger.balance(user_id))
    }

    /// A durable credit on the node that owns the wallet, idempotent on `reference`.
    pub async fn credit(
        &self,
        user_id: &str,
        coins: u64,
        reference: &str,
    ) -> Result<u64, (&'static str, String)> {
        if let Some(cluster) = self.cluster.get() {
            if !cluster.owns(user_id) {
                return cluster.remote_credit(user_id, coins, reference).await;
            }
        }
        self.credit_local(user_id, coins, reference).await
    }

    /// A durable credit in this node's ledger. Returns the balance right after it.
    pub async fn credit_local(
        &self,
        user_id: &str,
        coins: u64,
        reference: &str,
    ) -> Result<u64, (&'static str, String)> {
        if self.durability.as_ref().is_some_and(|d| !d.taking_money())
            || self.shutting_down.load(Ordering::SeqCst)
        {
            return Err(("unavailable", "money is not being taken right now".into()));
        }
        let slot = match self
            .ledger
            .begin_credit(user_id, coins, reference, crate::now_ms())
        {
            CreditStart::Retry(slot) => slot,
            CreditStart::Conflict => {
                return Err((
                    "conflict",
                    format!("reference `{reference}` was used for another credit"),
                ))
            }
            CreditStart::TooLarge => {
                return Err((
                    "invalid",
                    "the balance would exceed the largest amount".into(),
                ))
            }
            CreditStart::Unavailable(e) => return Err(("unavailable", e.to_string())),
            CreditStart::New {
                slot,
                ticket,
                record,
            } => {
                // Settled on its own task, so a dropped request never leaves the slot pending.
                let ledger = self.ledger.clone();
                let slot2 = slot.clone();
                tokio::spawn(async move {
                    match ticket.await {
                        Ok(()) => {
                            slot2.settle(SlotState::Done { seq: 0 });
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "journal refused a credit; it is undone");
                            ledger.credit_failed(&record, &slot2);
                        }
                    }
                });
                slot
            }
        };
        match slot.settled().await {
            SlotState::Done { .. } => Ok(slot.balance_after),
            _ => Err(("unavailable", "the credit could not be made durable".into())),
        }
    }
}

/// How often expired red packets are looked for.
pub const PACKET_EXPIRY_SCAN_MS: u64 = 500;

pub enum PacketReply {
    Ok {
        balance: u64,
        seq: u64,
    },
    Rejected {
        code: &'static str,
        balance: Option<u64>,
    },
}

pub enum GrabReply {
    Ok { coins: u64, balance: u64 },
    Rejected(&'static str),
}

impl App {
    /// A red packet from a signed-in viewer: debited and made durable like a gift, then
    /// announced to the room.
    #[allow(clippy::too_many_arguments)]
    pub async fn red_packet(
        self: &Arc<Self>,
        user: &Claims,
        room: &Arc<Room>,
        packet_id: &str,
        coins: u64,
        shares: u32,
        split: &str,
        message: Option<&str>,
    ) -> PacketReply {
        use crate::ledger::packets::{PacketRequest, PacketStart};
        let reject = |code| PacketReply::Rejected {
            code,
            balance: None,
        };
        let random = match split {
            "equal" => false,
            "random" => true,
            _ => return reject("invalid"),
        };
        if !valid_id(packet_id, GIFT_ID_CHARS_MAX) {
            return reject("invalid");
        }
        let message = match message {
            None => None,
            Some(m) if m.trim().is_empty() => None,
            Some(m) => match clean_text(m, GIFT_MESSAGE_CHARS_MAX) {
                Some(m) => Some(m),
                None => return reject("invalid"),
            },
        };
        if self.cluster.get().is_some() {
            // A packet moves coins between wallets that other nodes may own.
            return reject("unavailable");
        }
        if !room.is_live() {
            return reject("not_found");
        }
        if self.shutting_down.load(Ordering::SeqCst)
            || self.durability.as_ref().is_some_and(|d| !d.taking_money())
        {
            return reject("unavailable");
        }
        if let Some(l) = &self.gift_limiter {
            if l.check_key(&user.sub).is_err() {
                return reject("rate_limited");
            }
        }
        let now = crate::now_ms();
        let retry = self.ledger.has_packet(&room.id, packet_id);
        // Moderation, as for gifts: a banned or timed-out sender, or a blocked word in the
        // message, is refused (a retry of an accepted packet gets its original answer).
        if !retry {
            let m = room.moderation();
            let staff = is_streamer(user, room) || m.is_moderator(&user.sub);
            if let Err(gate) = m.gate(&user.sub, message, staff, now) {
                return PacketReply::Rejected {
                    code: gate.code(),
                    balance: Some(self.ledger.balance(&user.sub)),
                };
            }
        }
        // A red packet is spending too: it counts against `--daily-cap` like a gift.
        let reservation = if retry {
            None
        } else {
            match self.daily_spend.reserve(&user.sub, coins, now) {
                Ok(r) => Some(r),
                Err(_) => {
                    return PacketReply::Rejected {
                        code: "daily_cap",
                        balance: Some(self.ledger.balance(&user.sub)),
                    }
                }
            }
        };
        let release = |r: Option<crate::daily_cap::Reservation>| {
            if let Some(r) = r {
                self.daily_spend.release(&user.sub, r);
            }
        };
        let req = PacketRequest {
            user_id: &user.sub,
            user_name: &user.name,
            packet_id,
            stream: &room.id,
            coins,
            shares,
            random,
            message,
            host_cut_bp: self.config.red_packet_host_cut_bp,
            ttl_ms: self.config.red_packet_ttl_ms,
            now_ms: now,
        };
        let slot = match self.ledger.begin_packet(&req) {
            PacketStart::Rejected { code, balance } => {
                release(reservation);
                return PacketReply::Rejected { code, balance };
            }
            PacketStart::Retry(slot) => {
                release(reservation);
                slot
            }
            PacketStart::New {
                slot,
                ticket,
                record,
            } => {
                let room = room.clone();
                let slot2 = slot.clone();
                let (record_e, slot2_e) = (record.clone(), slot2.clone());
                self.settle(
                    ticket,
                    move |app| async move {
                        app.ledger.packet_durable(&record);
                        let seq = room.publish(|seq| {
                            let mut ev = serde_json::json!({
                                "type": "red_packet",
                                "seq": seq,
                                "packet_id": record.packet_id,
                                "from": {"id": record.user_id, "name": record.user_name},
                                "coins": record.coins,
                                "shares": record.amounts.len(),
                                "split": if record.random { "random" } else { "equal" },
                                "host_cut": record.host_cut,
                                "expires_at": record.expires_ms,
                                "ts": record.ts_ms,
                            });
                            if let Some(m) = &record.message {
                                ev["message"] = m.as_str().into();
                            }
                            ev.to_string()
                        });
                        slot2.settle(SlotState::Done { seq });
                        metrics::counter!("giftcast_red_packets_total").increment(1);
                    },
                    move |app, e| {
                        tracing::error!(error = %e, "journal refused a red packet; it is undone");
                        app.ledger.packet_failed(&record_e, &slot2_e);
                        if let Some(r) = reservation {
                            app.daily_spend.release(&record_e.user_id, r);
                        }
                    },
                );
                slot
            }
        };
        match slot.settled().await {
            SlotState::Done { seq } => PacketReply::Ok {
                balance: slot.balance_after,
                seq,
            },
            _ => PacketReply::Rejected {
                code: "unavailable",
                balance: Some(self.ledger.balance(&user.sub)),
            },
        }
    }

    /// A grab: the next share of the packet, credited durably and announced.
    pub async fn grab(
        self: &Arc<Self>,
        user: &Claims,
        room: &Arc<Room>,
        packet_id: &str,
    ) -> GrabReply {
        use crate::ledger::packets::GrabStart;
        if !valid_id(packet_id, GIFT_ID_CHARS_MAX) {
            return GrabReply::Rejected("invalid");
        }
        if self.cluster.get().is_some() {
            return GrabReply::Rejected("unavailable");
        }
        if self.shutting_down.load(Ordering::SeqCst)
            || self.durability.as_ref().is_some_and(|d| !d.taking_money())
        {
            return GrabReply::Rejected("unavailable");
        }
        // A banned or timed-out member cannot grab.
        {
            let m = room.moderation();
            let staff = is_streamer(user, room) || m.is_moderator(&user.sub);
            if let Err(gate) = m.gate(&user.sub, None, staff, crate::now_ms()) {
                return GrabReply::Rejected(gate.code());
            }
        }
        let grab = match self.ledger.begin_grab(
            &room.id,
            packet_id,
            &user.sub,
            &user.name,
            crate::now_ms(),
        ) {
            GrabStart::Rejected(code) => return GrabReply::Rejected(code),
            GrabStart::Retry(grab) => grab,
            GrabStart::New {
                grab,
                ticket,
                record,
                left_shares,
            } => {
                let room = room.clone();
                let grab2 = grab.clone();
                let (record_e, grab2_e) = (record.clone(), grab2.clone());
                self.settle(
                    ticket,
                    move |_app| async move {
                        let seq = room.publish(|seq| {
                            serde_json::json!({
                                "type": "grabbed",
                                "seq": seq,
                                "packet_id": record.packet_id,
                                "to": {"id": record.user_id, "name": record.user_name},
                                "coins": record.coins,
                                "left": left_shares,
                                "ts": record.ts_ms,
                            })
                            .to_string()
                        });
                        grab2.slot.settle(SlotState::Done { seq });
                    },
                    move |app, e| {
                        tracing::error!(error = %e, "journal refused a grab; it is undone");
                        app.ledger.grab_failed(&record_e, &grab2_e);
                    },
                );
                grab
            }
        };
        match grab.slot.settled().await {
            SlotState::Done { .. } => GrabReply::Ok {
                coins: grab.coins,
                balance: grab.slot.balance_after,
            },
            _ => GrabReply::Rejected("unavailable"),
        }
    }

    /// Evicts stored (or old) gift ids from memory every `IDEMPOTENCY_SWEEP_MS`, so the
    /// resident bound holds when no new gift arrives to evict them (after a restart's replay,
    /// after a storage outage, in a quiet hour); runs until shutdown.
    pub async fn run_idempotency_sweep(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(IDEMPOTENCY_SWEEP_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            sweep_tick(|n| self.ledger.sweep_resident(n)).await;
        }
    }

    /// Refunds expired red packets to their senders, durably, and tells their rooms; runs
    /// until shutdown. Packets that expired while the server was down are refunded at start.
    pub async fn run_packet_expiry(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let mut tick =
            tokio::time::interval(std::time::Duration::from_millis(PACKET_EXPIRY_SCAN_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = crate::now_ms();
            for (stream, packet_id) in self.ledger.expired_packets(now) {
                let Some((ticket, record)) = self.ledger.begin_refund(&stream, &packet_id, now)
                else {
                    continue;
                };
                let app = self.clone();
                tokio::spawn(async move {
                    match ticket.await {
                        Ok(()) => {
                            if let Ok(room) = app.hub.room(&record.stream) {
                                room.publish(|seq| {
                                    serde_json::json!({
                                        "type": "red_packet_closed",
                                        "seq": seq,
                                        "packet_id": record.packet_id,
                                        "refunded": record.coins,
                                        "ts": record.ts_ms,
                                    })
                                    .to_string()
                                });
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "journal refused a refund; it is retried");
                            app.ledger.refund_failed(&record);
                        }
                    }
                });
            }
        }
    }
}

/// One tick of the gift-id sweep over `sweep` (the ledger's `sweep_resident`): at most
/// `IDEMPOTENCY_SWEEP_MAX` ids, in chunks of `IDEMPOTENCY_SWEEP_CHUNK` with a yield between
/// them. Returns how many ids it went through.
async fn sweep_tick(sweep: impl FnMut(usize) -> usize) -> usize {
    sweep_in_chunks(IDEMPOTENCY_SWEEP_MAX, IDEMPOTENCY_SWEEP_CHUNK, sweep).await
}

/// Calls `sweep(n)` (which goes through at most `n` ids and says how many) in chunks of `chunk`,
/// yielding to the runtime between two calls, until it returns less than it was asked for or
/// `max` ids have been gone through; the last call asks only for what is left of `max`, so the
/// total never exceeds it. No yield after the last call. Returns the total.
async fn sweep_in_chunks(max: usize, chunk: usize, mut sweep: impl FnMut(usize) -> usize) -> usize {
    let mut total = 0;
    loop {
        let ask = chunk.min(max - total);
        if ask == 0 {
            return total;
        }
        let n = sweep(ask);
        total += n;
        if n < ask || total >= max {
            return total;
        }
        tokio::task::yield_now().await;
    }
}

/// A gift's journal outcome, on the settle thread (in the runtime's context): durable →
/// revenue, shout-out, slot done; failed → the debit undone (and the daily-cap reservation given
/// back). `in_flight` is let go once the slot is settled.
fn gift_settled(
    in_flight: InFlight,
    record: crate::record::SharedGift,
    slot: Arc<crate::ledger::Slot>,
    tier: u8,
    reservation: Option<crate::daily_cap::Reservation>,
    outcome: Result<crate::record::Lsn, String>,
) {
    let app = &in_flight.0;
    match outcome {
        Ok(lsn) => {
            app.ledger.gift_durable(&record);
            app.gift_metrics.gifts.increment(1);
            app.gift_metrics.coins.increment(record.amount);
            let remote = app
                .cluster
                .get()
                .filter(|c| !c.owns(&record.stream))
                .cloned();
            if let Some(cluster) = remote {
                tokio::spawn(async move {
                    let seq = cluster.remote_announce(&record, tier).await;
                    slot.settle(SlotState::Done { seq });
                    in_flight.0.ledger.remember(&record, lsn);
                    drop(in_flight);
                });
                return;
            }
            let seq = app.announce_local(&record, tier);
            slot.settle(SlotState::Done { seq });
            app.ledger.remember(&record, lsn);
        }
        Err(e) => {
            tracing::error!(error = %e, "journal refused a gift; the debit is undone");
            app.ledger.gift_failed(&record, &slot);
            if let Some(r) = reservation {
                app.daily_spend.release(&record.user_id, r);
            }
        }
    }
}

#[cfg(test)]
mod tests;

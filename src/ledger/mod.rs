//! Wallets, idempotency and revenue: synchronous, in memory, no I/O and no `.await`.
//!
//! Every debit and credit is one critical section under its wallet's map entry: check, change,
//! hand the record to the journal (a non-blocking `submit`), remember the id. Because the record
//! is submitted while the entry is held, the journal order of one wallet's records is the order
//! they were applied in memory, so replay reproduces every `balance_after` exactly.
//!
//! Architecture invariant: the ledger knows nothing of sockets, rooms or storage.

mod idempotency;
pub mod packets;
mod revenue;

pub use idempotency::IdempotencyConfig;

pub use revenue::{RevenueReport, RevenueRow, StreamRevenue, Totals};

use crate::money::{Coins, Split, AMOUNT_MAX};
use crate::record::{CreditRecord, GiftRecord, Lsn, Record, SharedGift};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use idempotency::{EvictedIds, Resident, ResidentQueue, EVICTIONS_PER_CALL_MAX};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Resolves once the record handed to the sink is durable.
pub type DurableTicket = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Too much waits to be written or stored: refuse now, the client retries later.
    #[error("journal backlog is full")]
    Full,
    /// The journal cannot make anything durable any more.
    #[error("journal failed: {0}")]
    Failed(String),
}

/// Called once with a submitted record's outcome: `Ok(lsn)` once it is durable, `Err(reason)` if
/// it never will be.
pub type OnDurable = Box<dyn FnOnce(Result<Lsn, String>) + Send>;

/// Where records go to become durable: the journal, or (in unit tests) memory.
pub trait RecordSink: Send + Sync + 'static {
    /// Takes the record or refuses it. Must not block, and must not call `then` before it
    /// returns: it is called while a wallet entry is held. On `Ok`, `then` is called exactly
    /// once, later, from elsewhere; on `Err` never.
    fn submit(&self, record: Arc<Record>, then: OnDurable) -> Result<(), SinkError>;

    /// The store holds every record at or below this LSN (the journal's released position):
    /// only such gifts' ids may leave the wallets' maps.
    fn stored_lsn(&self) -> Lsn;

    /// The highest LSN given to a record so far; a record submitted after this returns gets a
    /// higher one. The default, 0, is always safe: it only makes a store lookup's miss look
    /// stale more often (see `GiftRequest::store_checked`).
    fn assigned_lsn(&self) -> Lsn {
        0
    }
}

/// A sink that makes nothing durable, for unit tests: it keeps the callbacks until
/// [`MemorySink::settle_all`] reports every record durable. The server always uses the journal.
/// Records get LSNs 1, 2, … in submit order; nothing counts as stored until
/// [`MemorySink::set_stored`] says so.
#[derive(Default)]
pub struct MemorySink {
    pending: parking_lot::Mutex<Vec<(Lsn, OnDurable)>>,
    next_lsn: AtomicU64,
    stored: AtomicU64,
}

impl MemorySink {
    /// Reports every record submitted so far as durable.
    pub fn settle_all(&self) {
        let calls = std::mem::take(&mut *self.pending.lock());
        for (lsn, call) in calls {
            call(Ok(lsn));
        }
    }

    /// Pretends records up to `lsn` were submitted already: the next gets `lsn + 1`.
    #[cfg(test)]
    pub(crate) fn set_assigned(&self, lsn: Lsn) {
        self.next_lsn.store(lsn, Ordering::SeqCst);
    }

    /// Pretends the store holds every record up to `lsn`.
    pub fn set_stored(&self, lsn: Lsn) {
        self.stored.store(lsn, Ordering::SeqCst);
    }
}

impl RecordSink for MemorySink {
    fn submit(&self, _record: Arc<Record>, then: OnDurable) -> Result<(), SinkError> {
        let lsn = self.next_lsn.fetch_add(1, Ordering::SeqCst) + 1;
        self.pending.lock().push((lsn, then));
        Ok(())
    }

    fn stored_lsn(&self) -> Lsn {
        self.stored.load(Ordering::SeqCst)
    }

    fn assigned_lsn(&self) -> Lsn {
        self.next_lsn.load(Ordering::SeqCst)
    }
}

/// The ticket form of [`RecordSink::submit`], for the rarer money records (credits, red
/// packets) whose completion runs on a task of its own.
pub(crate) fn submit_ticket(
    sink: &dyn RecordSink,
    record: Record,
) -> Result<DurableTicket, SinkError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    sink.submit(
        Arc::new(record),
        Box::new(move |outcome| {
            let _ = tx.send(outcome.map(|_| ()));
        }),
    )?;
    Ok(Box::pin(async move {
        rx.await
            .unwrap_or_else(|_| Err("the journal stopped before the record was durable".into()))
    }))
}

/// The state of an accepted debit or credit, shared by the first request and its retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Debited in memory, waiting for the journal.
    Pending,
    /// Durable. For gifts: the shout-out's room seq (0 when not known, e.g. recovered after a
    /// crash before it was announced).
    Done { seq: u64 },
    /// The journal refused it; the debit was undone.
    Failed,
}

/// What waits for a slot to settle: the first request's answer, a retry's, a test.
type SlotWaiter = Box<dyn FnOnce(SlotState) + Send>;

/// One accepted gift or credit, remembered for idempotency.
pub struct Slot {
    /// What the request contained, to tell a retry from a conflict.
    fingerprint: String,
    pub balance_after: u64,
    inner: parking_lot::Mutex<SlotInner>,
}

struct SlotInner {
    state: SlotState,
    /// Called once with the settled state; empty once settled.
    waiters: Vec<SlotWaiter>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("balance_after", &self.balance_after)
            .field("state", &self.state())
            .finish()
    }
}

impl Slot {
    fn new(fingerprint: String, balance_after: u64, state: SlotState) -> Arc<Slot> {
        Arc::new(Slot {
            fingerprint,
            balance_after,
            inner: parking_lot::Mutex::new(SlotInner {
                state,
                waiters: Vec::new(),
            }),
        })
    }

    pub fn state(&self) -> SlotState {
        self.inner.lock().state.clone()
    }

    /// Sets the outcome and calls whatever waited for it (outside the lock).
    pub fn settle(&self, state: SlotState) {
        let waiters = {
            let mut inner = self.inner.lock();
            inner.state = state.clone();
            if state == SlotState::Pending {
                return;
            }
            std::mem::take(&mut inner.waiters)
        };
        for waiter in waiters {
            waiter(state.clone());
        }
    }

    /// Calls `f` with the settled state: now if the slot is settled, else when it settles.
    pub fn when_settled(&self, f: impl FnOnce(SlotState) + Send + 'static) {
        let state = {
            let mut inner = self.inner.lock();
            if inner.state == SlotState::Pending {
                inner.waiters.push(Box::new(f));
                return;
            }
            inner.state.clone()
        };
        f(state);
    }

    /// Waits until the slot is no longer pending.
    pub async fn settled(&self) -> SlotState {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.when_settled(move |state| {
            let _ = tx.send(state);
        });
        rx.await.unwrap_or(SlotState::Failed)
    }
}

#[derive(Default, Debug)]
struct Wallet {
    balance: u64,
    /// Resident accepted gift ids with their outcome (see `idempotency`). Hashed with foldhash,
    /// randomly seeded like std's SipHash but several times faster on short ids: the ids are the
    /// sender's own choice, so only the sender's own map could be aimed at, and its size is
    /// bounded by the gift rate and `resident_max`.
    gifts: HashMap<Arc<str>, Arc<Slot>, foldhash::fast::RandomState>,
    /// Ids of this wallet moved from `gifts` to the evicted-id filter, ever: 0 means no filter
    /// check is needed.
    evicted: u64,
    /// The highest LSN of an id this wallet evicted (0: none, or only ids restored from the
    /// store at start): a store lookup's "not found" is stale if this passed the lookup's mark.
    evicted_lsn_max: Lsn,
}

/// A gift as the ledger sees it, already validated for shape by the protocol layer.
#[derive(Debug, Clone)]
pub struct GiftRequest<'a> {
    /// Shared names: the record takes a reference, not a copy (see `GiftRecord`).
    pub user_id: &'a Arc<str>,
    pub user_name: &'a Arc<str>,
    pub gift_id: &'a str,
    pub stream: &'a Arc<str>,
    pub sticker: &'a Arc<str>,
    pub price: u64,
    pub count: u32,
    pub message: Option<&'a str>,
    pub ts_ms: u64,
    /// Set after a store lookup found no gift with this id: the mark [`GiftStart::Lookup`]
    /// returned, the sink's `assigned_lsn` then. The miss is trusted only if the wallet has not
    /// evicted an id with a higher LSN since: the id was not resident when `Lookup` was
    /// returned, so it was either evicted (stored) already, which the lookup would have found,
    /// or not accepted yet; accepted after, it has a higher LSN, and only then could it be
    /// stored and evicted while the lookup ran. Ids accepted before the mark leave memory all
    /// the time on a busy wallet; they cannot be this one.
    pub store_checked: Option<Lsn>,
}

impl GiftRequest<'_> {
    fn fingerprint(&self) -> String {
        gift_fingerprint(self.stream, self.sticker, self.count, self.message)
    }
}

/// Whether a stored gift has the contents of a request (a retry) or not (a conflict).
pub fn same_gift(
    stored: &GiftRecord,
    stream: &str,
    sticker: &str,
    count: u32,
    message: Option<&str>,
) -> bool {
    gift_fingerprint(
        &stored.stream,
        &stored.sticker,
        stored.count,
        stored.message.as_deref(),
    ) == gift_fingerprint(stream, sticker, count, message)
}

fn gift_fingerprint(stream: &str, sticker: &str, count: u32, message: Option<&str>) -> String {
    // "{stream}\0{sticker}\0{count}\0{message or \1}"; `join` sizes its one allocation first
    // (this runs for every gift, under its wallet's lock; `format!` grew its buffer).
    let mut digits = itoa::Buffer::new();
    [
        stream,
        sticker,
        digits.format(count),
        message.unwrap_or("\u{1}"),
    ]
    .join("\0")
}

pub enum GiftStart {
    /// New and debited; the completion given to `begin_gift` calls `Ledger::gift_durable` or
    /// `gift_failed` when the journal has spoken.
    New { slot: Arc<Slot>, record: SharedGift },
    /// A retry of an accepted gift: answer from the slot, debit nothing.
    Retry(Arc<Slot>),
    /// The id is not resident but may have been evicted: look it up in the store among the
    /// gifts made in `spans`, the days of the evicted-id filter that answered "maybe" for it,
    /// newest first (found: a retry; not found: call again with `store_checked: Some(mark)`).
    /// Nothing changed.
    Lookup {
        mark: Lsn,
        spans: Vec<std::ops::Range<u64>>,
    },
    Rejected {
        code: &'static str,
        balance: Option<u64>,
    },
}

pub enum CreditStart {
    New {
        slot: Arc<Slot>,
        ticket: DurableTicket,
        record: CreditRecord,
    },
    Retry(Arc<Slot>),
    /// Same reference, other user or amount.
    Conflict,
    /// The balance would overflow `AMOUNT_MAX`.
    TooLarge,
    Unavailable(SinkError),
}

/// `credited == balances + gifted + held` at every quiet moment (`held`: coins in red packets
/// in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Audit {
    pub credited: u64,
    pub balances: u64,
    pub gifted: u64,
    pub held: u64,
    pub ok: bool,
}

pub struct Ledger {
    split: Split,
    sink: Arc<dyn RecordSink>,
    wallets: DashMap<String, Wallet>,
    /// Credit reference → slot.
    credits: DashMap<String, Arc<Slot>>,
    credited: AtomicU64,
    gifted: AtomicU64,
    revenue: DashMap<Arc<str>, StreamRevenue>,
    /// Red packets by (stream, packet id).
    packets: DashMap<String, packets::Packet>,
    /// Coins held in red packets in flight.
    held: AtomicU64,
    idempotency: IdempotencyConfig,
    /// Gift ids evicted from the wallets' maps.
    evicted_ids: EvictedIds,
    /// Durable gifts whose ids are resident, oldest first.
    resident: ResidentQueue,
    metrics: IdempotencyMetrics,
}

/// Handles registered once (the `counter!` macro looks its key up on every call, and eviction
/// runs once per gift).
struct IdempotencyMetrics {
    evicted: metrics::Counter,
    resident: metrics::Gauge,
}

impl Ledger {
    pub fn new(split: Split, sink: Arc<dyn RecordSink>) -> Ledger {
        Ledger::with_idempotency(split, sink, IdempotencyConfig::default())
    }

    pub fn with_idempotency(
        split: Split,
        sink: Arc<dyn RecordSink>,
        idempotency: IdempotencyConfig,
    ) -> Ledger {
        Ledger {
            evicted_ids: EvictedIds::new(idempotency.filter_bytes, idempotency.retention_ms),
            resident: ResidentQueue::default(),
            metrics: IdempotencyMetrics {
                evicted: metrics::counter!("giftcast_idempotency_evicted_total"),
                resident: metrics::gauge!("giftcast_idempotency_resident"),
            },
            idempotency,
            split,
            sink,
            wallets: DashMap::new(),
            credits: DashMap::new(),
            credited: AtomicU64::new(0),
            gifted: AtomicU64::new(0),
            revenue: DashMap::new(),
            packets: DashMap::new(),
            held: AtomicU64::new(0),
        }
    }

    pub fn split(&self) -> Split {
        self.split
    }

    pub fn balance(&self, user_id: &str) -> u64 {
        self.wallets.get(user_id).map(|w| w.balance).unwrap_or(0)
    }

    /// Whether `gift_id` is a resident accepted (or in-flight) gift of this user: a retry,
    /// which the app lets through its own checks so that it gets its original answer. (An
    /// evicted one is recognised by `begin_gift`, after the app's checks.)
    pub fn has_gift(&self, user_id: &str, gift_id: &str) -> bool {
        self.wallets
            .get(user_id)
            .is_some_and(|w| w.gifts.contains_key(gift_id))
    }

    /// Check, debit, journal, remember: one critical section. For a new gift, `then` builds the
    /// completion that the journal calls once the record is durable (or refused for good); it is
    /// not built for a retry or a rejection.
    pub fn begin_gift(
        &self,
        req: &GiftRequest<'_>,
        then: impl FnOnce(&SharedGift, &Arc<Slot>) -> OnDurable,
    ) -> GiftStart {
        let fingerprint = req.fingerprint();
        let Some(amount) = Coins(req.price)
            .checked_mul(req.count as u64)
            .filter(|a| a.0 <= AMOUNT_MAX)
        else {
            return GiftStart::Rejected {
                code: "invalid",
                balance: None,
            };
        };
        let Some(shares) = self.split.shares(amount) else {
            return GiftStart::Rejected {
                code: "invalid",
                balance: None,
            };
        };
        let Some(mut wallet) = self.wallets.get_mut(&**req.user_id) else {
            return GiftStart::Rejected {
                code: "insufficient_funds",
                balance: Some(0),
            };
        };
        if let Some(slot) = wallet.gifts.get(req.gift_id) {
            if slot.fingerprint != fingerprint {
                return GiftStart::Rejected {
                    code: "conflict",
                    balance: Some(wallet.balance),
                };
            }
            return GiftStart::Retry(slot.clone());
        }
        if wallet.evicted > 0
            && req
                .store_checked
                .is_none_or(|mark| wallet.evicted_lsn_max > mark)
        {
            let spans = self
                .evicted_ids
                .spans_containing(req.user_id, req.gift_id, req.ts_ms);
            if !spans.is_empty() {
                metrics::counter!("giftcast_idempotency_lookups_total").increment(1);
                // Read under the wallet's entry: this id, accepted later, gets a higher LSN.
                return GiftStart::Lookup {
                    mark: self.sink.assigned_lsn(),
                    spans,
                };
            }
        }
        let Some(balance_after) = wallet.balance.checked_sub(amount.0) else {
            return GiftStart::Rejected {
                code: "insufficient_funds",
                balance: Some(wallet.balance),
            };
        };
        let gift_id: Arc<str> = Arc::from(req.gift_id);
        let record = SharedGift::new(GiftRecord {
            user_id: req.user_id.clone(),
            user_name: req.user_name.clone(),
            gift_id: gift_id.clone(),
            stream: req.stream.clone(),
            sticker: req.sticker.clone(),
            count: req.count,
            price: req.price,
            amount: amount.0,
            shares,
            message: req.message.map(str::to_string),
            balance_after,
            ts_ms: req.ts_ms,
        });
        let slot = Slot::new(fingerprint, balance_after, SlotState::Pending);
        let done = then(&record, &slot);
        if self.sink.submit(record.record().clone(), done).is_err() {
            return GiftStart::Rejected {
                code: "unavailable",
                balance: Some(wallet.balance),
            };
        }
        wallet.balance = balance_after;
        wallet.gifts.insert(gift_id, slot.clone());
        self.gifted.fetch_add(amount.0, Ordering::SeqCst);
        GiftStart::New { slot, record }
    }

    /// The gift's record is durable: count its revenue. The caller then announces it and
    /// settles the slot with the shout-out's seq.
    pub fn gift_durable(&self, record: &GiftRecord) {
        // The stream's key is the record's shared name, taken for its first gift.
        if let Some(mut revenue) = self.revenue.get_mut(&*record.stream) {
            return revenue.add(record);
        }
        self.revenue
            .entry(record.stream.clone())
            .or_default()
            .add(record);
    }

    /// A durable gift's slot has settled: its id is resident until it may be evicted (stored,
    /// and old or beyond `resident_max`). Evicts what may go, a bounded number per call.
    pub fn remember(&self, record: &GiftRecord, lsn: Lsn) {
        self.resident.push(Resident::new(lsn, record));
        self.evict(crate::now_ms(), EVICTIONS_PER_CALL_MAX);
    }

    /// Evicts what may go now, at most `max` ids; returns how many left the resident queue
    /// (evicted, or already gone from their wallet). The app calls it every
    /// `IDEMPOTENCY_SWEEP_MS`, so ids that became stored (or old) while no gift arrived leave
    /// memory too: without it, a burst replayed from the journal after a restart stayed resident
    /// until as many new gifts came.
    pub fn sweep_resident(&self, max: usize) -> usize {
        let swept = self.evict(crate::now_ms(), max);
        self.metrics.resident.set(self.resident.len() as f64);
        swept
    }

    /// Evicts at most `limit` ids; returns how many it went through (evicted, or already gone
    /// from their wallet).
    fn evict(&self, now_ms: u64, limit: usize) -> usize {
        let stored = self.sink.stored_lsn();
        let (mut evicted, mut popped) = (0, 0);
        for _ in 0..limit {
            let Some(resident) = self
                .resident
                .pop_evictable(&self.idempotency, stored, now_ms)
            else {
                break;
            };
            popped += 1;
            let (user_id, gift_id) = resident.ids();
            let Some(mut wallet) = self.wallets.get_mut(user_id) else {
                continue;
            };
            // One lookup (the id is old, so its map entry is usually out of the CPU's caches).
            let Some((id, slot)) = wallet.gifts.remove_entry(gift_id) else {
                continue;
            };
            if slot.state() == SlotState::Pending {
                // Not settled yet (cannot happen for a remembered gift; kept for safety).
                wallet.gifts.insert(id, slot);
                drop(wallet);
                self.resident.push_front(resident);
                popped -= 1;
                break;
            }
            // Out of the map and into the filter under the wallet's entry, which `begin_gift` and
            // `has_gift` take too: they see the id in one or the other.
            self.evicted_ids
                .insert(user_id, gift_id, resident.ts_ms, now_ms);
            wallet.evicted += 1;
            wallet.evicted_lsn_max = wallet.evicted_lsn_max.max(resident.lsn);
            evicted += 1;
        }
        if evicted > 0 {
            self.metrics.evicted.increment(evicted);
            self.metrics.resident.set(self.resident.len() as f64);
        }
        popped
    }

    /// Resident ids of durable gifts (what `resident_max` bounds once they are stored).
    pub fn resident_gifts(&self) -> usize {
        self.resident.len()
    }

    /// Bytes the evicted-id filter holds now.
    pub fn evicted_filter_bytes(&self) -> usize {
        self.evicted_ids.allocated_bytes()
    }

    /// The journal refused the gift's record: undo the debit and forget the id, so a retry is a
    /// fresh attempt.
    pub fn gift_failed(&self, record: &GiftRecord, slot: &Slot) {
        if let Some(mut wallet) = self.wallets.get_mut(&*record.user_id) {
            wallet.balance = wallet
                .balance
                .checked_add(record.amount)
                .expect("undo of a debit fits");
            wallet.gifts.remove(&record.gift_id);
        }
        self.gifted.fetch_sub(record.amount, Ordering::SeqCst);
        slot.settle(SlotState::Failed);
    }

    /// Credit a wallet, idempotent on `reference`.
    pub fn begin_credit(
        &self,
        user_id: &str,
        coins: u64,
        reference: &str,
        ts_ms: u64,
    ) -> CreditStart {
        let fingerprint = format!("{user_id}\u{0}{coins}");
        let entry = self.credits.entry(reference.to_string());
        let vacant = match entry {
            Entry::Occupied(o) => {
                return if o.get().fingerprint == fingerprint {
                    CreditStart::Retry(o.get().clone())
                } else {
                    CreditStart::Conflict
                };
            }
            Entry::Vacant(v) => v,
        };
        // Lock order: credit reference entry, then wallet entry (the only path holding both).
        let mut wallet = self.wallets.entry(user_id.to_string()).or_default();
        let Some(balance_after) = wallet
            .balance
            .checked_add(coins)
            .filter(|b| *b <= AMOUNT_MAX)
        else {
            return CreditStart::TooLarge;
        };
        let record = CreditRecord {
            user_id: user_id.to_string(),
            coins,
            reference: reference.to_string(),
            balance_after,
            ts_ms,
        };
        let ticket = match submit_ticket(&*self.sink, Record::Credit(record.clone())) {
            Ok(t) => t,
            Err(e) => return CreditStart::Unavailable(e),
        };
        wallet.balance = balance_after;
        self.credited.fetch_add(coins, Ordering::SeqCst);
        let slot = Slot::new(fingerprint, balance_after, SlotState::Pending);
        vacant.insert(slot.clone());
        CreditStart::New {
            slot,
            ticket,
            record,
        }
    }

    pub fn credit_failed(&self, record: &CreditRecord, slot: &Slot) {
        if let Some(mut wallet) = self.wallets.get_mut(&record.user_id) {
            wallet.balance = wallet
                .balance
                .checked_sub(record.coins)
                .expect("undo of a credit fits");
        }
        self.credited.fetch_sub(record.coins, Ordering::SeqCst);
        self.credits.remove(&record.reference);
        slot.settle(SlotState::Failed);
    }

    pub fn audit(&self) -> Audit {
        // Read the counters around the balances; equal readings on both sides mean quiet.
        let credited = self.credited.load(Ordering::SeqCst);
        let gifted = self.gifted.load(Ordering::SeqCst);
        let held = self.held.load(Ordering::SeqCst);
        let balances: u64 = self.wallets.iter().map(|w| w.balance).sum();
        Audit {
            credited,
            balances,
            gifted,
            held,
            ok: credited == balances + gifted + held,
        }
    }

    /// This node's revenue of a stream in mergeable parts (cluster mode).
    #[allow(clippy::type_complexity)]
    pub fn revenue_parts(
        &self,
        stream: &str,
    ) -> (Totals, Vec<(String, Totals)>, Vec<(String, String, Totals)>) {
        self.revenue
            .get(stream)
            .map(|r| r.parts())
            .unwrap_or_default()
    }

    pub fn revenue(&self, stream: &str) -> RevenueReport {
        match self.revenue.get(stream) {
            Some(r) => r.report(stream),
            None => StreamRevenue::default().report(stream),
        }
    }

    // ---- recovery: state from storage, then the journal tail ----

    /// A wallet's balance as stored at the checkpoint.
    pub fn restore_balance(&self, user_id: &str, balance: u64) {
        self.wallets.entry(user_id.to_string()).or_default().balance = balance;
    }

    /// A stored credit: remembered for idempotency (its coins are in the stored balance).
    pub fn restore_credit(&self, c: &CreditRecord) {
        let slot = Slot::new(
            format!("{}\u{0}{}", c.user_id, c.coins),
            c.balance_after,
            SlotState::Done { seq: 0 },
        );
        self.credits.insert(c.reference.clone(), slot);
    }

    /// A stored gift older than the resident window: only its id, into the evicted-id filter.
    pub fn restore_evicted(&self, user_id: &str, gift_id: &str, ts_ms: u64) {
        let mut wallet = self.wallets.entry(user_id.to_string()).or_default();
        self.evicted_ids
            .insert(user_id, gift_id, ts_ms, crate::now_ms());
        wallet.evicted += 1;
    }

    /// A stored gift: remembered for idempotency (its debit is in the stored balance).
    pub fn restore_gift(&self, g: &GiftRecord) {
        let fp = gift_fingerprint(&g.stream, &g.sticker, g.count, g.message.as_deref());
        let slot = Slot::new(fp, g.balance_after, SlotState::Done { seq: 0 });
        self.wallets
            .entry(g.user_id.to_string())
            .or_default()
            .gifts
            .insert(g.gift_id.clone(), slot);
    }

    pub fn restore_revenue(&self, stream: &str, row: revenue::RevenueRow) {
        self.revenue
            .entry(Arc::from(stream))
            .or_default()
            .restore(row);
    }

    pub fn restore_totals(&self, credited: u64, gifted: u64) {
        self.credited.store(credited, Ordering::SeqCst);
        self.gifted.store(gifted, Ordering::SeqCst);
    }

    /// Re-applies a journal record written after the storage checkpoint. The record's
    /// `balance_after` must come out exactly: anything else means the journal and the stored
    /// state disagree, and the start stops.
    pub fn replay(&self, record: &Record) -> Result<(), String> {
        match record {
            Record::Credit(c) => {
                if self.credits.contains_key(&c.reference) {
                    return Err(format!("credit {} replayed twice", c.reference));
                }
                let mut wallet = self.wallets.entry(c.user_id.clone()).or_default();
                let after = wallet
                    .balance
                    .checked_add(c.coins)
                    .ok_or("credit overflows")?;
                if after != c.balance_after {
                    return Err(format!(
                        "credit {} of {}: balance would be {after}, journal says {}",
                        c.reference, c.user_id, c.balance_after
                    ));
                }
                wallet.balance = after;
                drop(wallet);
                self.credited.fetch_add(c.coins, Ordering::SeqCst);
                self.restore_credit(c);
            }
            Record::Gift(g) => {
                let mut wallet = self.wallets.entry(g.user_id.to_string()).or_default();
                if wallet.gifts.contains_key(&g.gift_id) {
                    return Err(format!("gift {}/{} replayed twice", g.user_id, g.gift_id));
                }
                let after = wallet.balance.checked_sub(g.amount).ok_or_else(|| {
                    format!(
                        "gift {}/{} would take the wallet below zero",
                        g.user_id, g.gift_id
                    )
                })?;
                if after != g.balance_after {
                    return Err(format!(
                        "gift {}/{}: balance would be {after}, journal says {}",
                        g.user_id, g.gift_id, g.balance_after
                    ));
                }
                wallet.balance = after;
                drop(wallet);
                self.gifted.fetch_add(g.amount, Ordering::SeqCst);
                self.restore_gift(g);
                self.gift_durable(g);
            }
            packet => self.replay_packet(packet)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

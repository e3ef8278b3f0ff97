//! Counters and latency histograms, sharded so that thousands of connection tasks can record
//! without fighting over one lock; a sampler swaps the interval histograms out every tick.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

/// Latency metrics, all recorded in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum M {
    /// chat send → chat event received (every receiver).
    Chat = 0,
    /// gift send → shout-out received (every receiver).
    Shoutout,
    /// thanks send → thanks event received.
    Thanks,
    /// gift send → gift_ok.
    GiftAck,
    /// TCP connect start → `joined`.
    Join,
    /// TCP connect + WebSocket handshake.
    Connect,
}
pub const METRIC_NAMES: [&str; 6] = ["chat", "shoutout", "thanks", "gift_ack", "join", "connect"];
pub const NM: usize = METRIC_NAMES.len();

macro_rules! counters {
    ($($v:ident => $n:literal),* $(,)?) => {
        /// Event counters.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum C { $($v),* }
        pub const COUNTER_NAMES: &[&str] = &[$($n),*];
    };
}
counters! {
    ChatsSent => "chats_sent",
    Deliveries => "deliveries",
    Shoutouts => "shoutouts",
    ThanksRecv => "thanks_recv",
    ThanksSent => "thanks_sent",
    GiftsSent => "gifts_sent",
    GiftsOk => "gifts_ok",
    GiftsRejected => "gifts_rejected",
    GiftRetries => "gift_retries",
    RetryOk => "retry_ok",
    RetryMismatch => "retry_mismatch",
    UnexpectedAck => "unexpected_ack",
    Joins => "joins",
    SeqGaps => "seq_gaps",
    SeqReorders => "seq_reorders",
    Lagged => "lagged",
    Reconnects => "reconnects",
    ResumedOk => "resumed_ok",
    ResumedMissed => "resumed_missed",
    PacerBacklog => "pacer_backlog",
    FramesRecv => "frames_recv",
    BatchFrames => "batch_frames",
    BytesRecv => "bytes_recv",
    ChurnCycles => "churn_cycles",
    Disconnects => "disconnects",
}
pub const NC: usize = COUNTER_NAMES.len();

/// Wall clock in microseconds since the epoch (shared by all processes on the machine, so a
/// timestamp written by one client can be compared by another).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Highest recordable latency (60 s); larger values are clamped.
pub const HIST_MAX_US: u64 = 60_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 2).expect("valid histogram bounds")
}

/// A histogram in a form that travels in JSON and merges: (value µs, count) per bucket.
#[derive(Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        HistData(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }
    pub fn to_hist(&self) -> Histogram<u64> {
        let mut h = new_hist();
        self.add_to(&mut h);
        h
    }
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            h.saturating_record_n(v, n);
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn count(&self) -> u64 {
        self.0.iter().map(|x| x.1).sum()
    }
    /// Merge several into one.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a HistData>) -> HistData {
        let mut h = new_hist();
        for p in parts {
            p.add_to(&mut h);
        }
        HistData::from_hist(&h)
    }
}

/// Percentiles of one latency metric, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    LatencySummary {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// One shard: a connection task locks it once per received frame.
pub struct Shard {
    hists: Vec<Histogram<u64>>,
    counters: [u64; NC],
    errors: HashMap<String, u64>,
}

impl Shard {
    fn new() -> Self {
        Shard {
            hists: (0..NM).map(|_| new_hist()).collect(),
            counters: [0; NC],
            errors: HashMap::new(),
        }
    }
    #[inline]
    pub fn rec(&mut self, m: M, us: u64) {
        self.hists[m as usize].saturating_record(us.max(1));
    }
    /// Latency from a send timestamp (µs since epoch) to `now`.
    #[inline]
    pub fn rec_since(&mut self, m: M, sent_us: u64, now: u64) {
        self.rec(m, now.saturating_sub(sent_us));
    }
    #[inline]
    pub fn inc(&mut self, c: C, n: u64) {
        self.counters[c as usize] += n;
    }
    pub fn err(&mut self, code: &str) {
        if let Some(v) = self.errors.get_mut(code) {
            *v += 1;
        } else {
            self.errors.insert(code.to_string(), 1);
        }
    }
}

#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// All statistics of one worker process.
pub struct Stats {
    shards: Vec<Padded>,
    /// Open WebSocket connections now.
    pub open: AtomicI64,
    /// Clients that joined at least once.
    pub joined: AtomicU64,
    /// Clients that failed to join in the connect phase.
    pub failed: AtomicU64,
    /// Gifts sent and not yet answered.
    pub pending_gifts: AtomicI64,
    prev_counters: Mutex<[u64; NC]>,
}

/// What the sampler takes out each tick.
pub struct Interval {
    pub counters: [u64; NC],
    pub hists: Vec<Histogram<u64>>,
    pub errors_total: u64,
}

impl Stats {
    pub fn new(shards: usize) -> Self {
        Stats {
            shards: (0..shards.max(1))
                .map(|_| Padded(Mutex::new(Shard::new())))
                .collect(),
            open: AtomicI64::new(0),
            joined: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            pending_gifts: AtomicI64::new(0),
            prev_counters: Mutex::new([0; NC]),
        }
    }
    pub fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i % self.shards.len()].0.lock()
    }
    pub fn joined_count(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }
    pub fn open_now(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }
    /// Swap out the interval histograms and counter deltas since the previous call.
    pub fn take_interval(&self) -> Interval {
        let mut hists: Vec<Histogram<u64>> = (0..NM).map(|_| new_hist()).collect();
        let mut totals = [0u64; NC];
        let mut errors_total = 0;
        for s in &self.shards {
            let mut fresh: Vec<Histogram<u64>> = (0..NM).map(|_| new_hist()).collect();
            {
                let mut g = s.0.lock();
                std::mem::swap(&mut g.hists, &mut fresh);
                for (t, c) in totals.iter_mut().zip(g.counters.iter()) {
                    *t += *c;
                }
                errors_total += g.errors.values().sum::<u64>();
            }
            for (acc, h) in hists.iter_mut().zip(fresh.iter()) {
                let _ = acc.add(h);
            }
        }
        let mut prev = self.prev_counters.lock();
        let mut delta = [0u64; NC];
        for i in 0..NC {
            delta[i] = totals[i].saturating_sub(prev[i]);
        }
        *prev = totals;
        Interval {
            counters: delta,
            hists,
            errors_total,
        }
    }
    /// Sum of some cumulative counters.
    pub fn counter_sum(&self, which: &[C]) -> u64 {
        let mut t = 0;
        for s in &self.shards {
            let g = s.0.lock();
            for c in which {
                t += g.counters[*c as usize];
            }
        }
        t
    }
    /// Cumulative counters and errors.
    pub fn totals(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let mut c = [0u64; NC];
        let mut e: BTreeMap<String, u64> = BTreeMap::new();
        for s in &self.shards {
            let g = s.0.lock();
            for (t, v) in c.iter_mut().zip(g.counters.iter()) {
                *t += *v;
            }
            for (k, v) in &g.errors {
                *e.entry(k.clone()).or_default() += v;
            }
        }
        (counters_map(&c), e)
    }
}

pub fn counters_map(c: &[u64; NC]) -> BTreeMap<String, u64> {
    COUNTER_NAMES
        .iter()
        .zip(c.iter())
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_distribution() {
        let mut h = new_hist();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let s = summarize(&h);
        assert_eq!(s.count, 10_000);
        assert!((s.p50_ms - 5.0).abs() < 0.1, "{}", s.p50_ms);
        assert!((s.p90_ms - 9.0).abs() < 0.1, "{}", s.p90_ms);
        assert!((s.p99_ms - 9.9).abs() < 0.1, "{}", s.p99_ms);
        assert!((s.max_ms - 10.0).abs() < 0.1, "{}", s.max_ms);
        assert_eq!(summarize(&new_hist()), LatencySummary::default());
    }

    #[test]
    fn histdata_roundtrip_and_merge() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 0..1000u64 {
            a.record(100 + v).unwrap();
            b.record(50_000 + v * 10).unwrap();
        }
        let da = HistData::from_hist(&a);
        let db = HistData::from_hist(&b);
        assert_eq!(da.to_hist().len(), 1000);
        let json = serde_json::to_string(&da).unwrap();
        let back: HistData = serde_json::from_str(&json).unwrap();
        assert_eq!(back, da);
        let m = HistData::merge([&da, &db]).to_hist();
        assert_eq!(m.len(), 2000);
        let s = summarize(&m);
        assert!(s.p50_ms < 1.2 && s.p50_ms > 0.9, "{}", s.p50_ms);
        assert!(s.max_ms > 59.0 && s.max_ms < 61.0, "{}", s.max_ms);
    }

    #[test]
    fn clamps_huge_values() {
        let mut h = new_hist();
        h.saturating_record(u64::MAX / 2);
        assert!(h.max() <= HIST_MAX_US * 2);
    }

    #[test]
    fn interval_deltas() {
        let s = Stats::new(4);
        s.shard(0).inc(C::Deliveries, 5);
        s.shard(3).inc(C::Deliveries, 7);
        s.shard(1).rec(M::Chat, 1500);
        s.shard(2).err("close:4009");
        let i = s.take_interval();
        assert_eq!(i.counters[C::Deliveries as usize], 12);
        assert_eq!(i.hists[M::Chat as usize].len(), 1);
        assert_eq!(i.errors_total, 1);
        s.shard(1).inc(C::Deliveries, 1);
        let i = s.take_interval();
        assert_eq!(i.counters[C::Deliveries as usize], 1);
        assert_eq!(i.hists[M::Chat as usize].len(), 0);
        let (c, e) = s.totals();
        assert_eq!(c["deliveries"], 13);
        assert_eq!(e["close:4009"], 1);
    }
}

use super::*;
use crate::ledger::{IdempotencyConfig, MemorySink};
use crate::money::{Coins, Split};
use std::sync::atomic::AtomicU64;

// ---- the gift-id sweep: IDEMPOTENCY_SWEEP_MAX, IDEMPOTENCY_SWEEP_CHUNK ----

/// What one run of `sweep_in_chunks` did against a fake sweeper.
#[derive(Debug)]
struct FakeSweep {
    total: usize,
    /// What each call asked for.
    asks: Vec<usize>,
    /// Yields seen before each call (a task that counts its turns runs once per yield).
    yields_before: Vec<u64>,
    /// Yields seen when it returned.
    yields_at_end: u64,
}

/// Runs `sweep_in_chunks(max, chunk, ..)` (`limits`), or the sweep task's `sweep_tick` (`None`),
/// over a fake sweeper with `waiting` ids, beside a task
/// that counts its turns on the test's single-threaded runtime: that task runs once each time
/// the sweep yields, so the count a call sees is the number of yields before it.
async fn fake_sweep(limits: Option<(usize, usize)>, waiting: usize) -> FakeSweep {
    let turns = Arc::new(AtomicU64::new(0));
    let counter = tokio::spawn({
        let turns = turns.clone();
        async move {
            loop {
                turns.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        }
    });
    let (mut left, mut asks, mut yields_before) = (waiting, Vec::new(), Vec::new());
    let sweeper = |n: usize| {
        asks.push(n);
        yields_before.push(turns.load(Ordering::SeqCst));
        let took = n.min(left);
        left -= took;
        took
    };
    let total = match limits {
        Some((max, chunk)) => sweep_in_chunks(max, chunk, sweeper).await,
        None => sweep_tick(sweeper).await,
    };
    let yields_at_end = turns.load(Ordering::SeqCst);
    counter.abort();
    FakeSweep {
        total,
        asks,
        yields_before,
        yields_at_end,
    }
}

/// One yield between two calls, none before the first or after the last.
fn yields_between_calls_only(s: &FakeSweep) {
    let calls = s.asks.len() as u64;
    assert_eq!(s.yields_before, (0..calls).collect::<Vec<_>>(), "{s:?}");
    assert_eq!(s.yields_at_end, calls - 1, "no yield after the last call");
}

#[tokio::test]
async fn a_sweep_tick_goes_through_exactly_idempotency_sweep_max_in_chunks_with_yields_between() {
    // More waiting than one tick may take (bounded, so a sweep that ignored the bound would
    // stop at 3x and fail here instead of running forever).
    let s = fake_sweep(None, 3 * IDEMPOTENCY_SWEEP_MAX).await;
    assert_eq!(s.total, IDEMPOTENCY_SWEEP_MAX);
    // 100,000 = 97 x 1,024 + 672: full chunks, then only what is left of the bound.
    let mut expected =
        vec![IDEMPOTENCY_SWEEP_CHUNK; IDEMPOTENCY_SWEEP_MAX / IDEMPOTENCY_SWEEP_CHUNK];
    let rest = IDEMPOTENCY_SWEEP_MAX % IDEMPOTENCY_SWEEP_CHUNK;
    assert_ne!(
        rest, 0,
        "the constants leave a partial last chunk, which this test covers"
    );
    expected.push(rest);
    assert_eq!(s.asks, expected);
    assert_eq!(s.asks.iter().sum::<usize>(), IDEMPOTENCY_SWEEP_MAX);
    yields_between_calls_only(&s);
    // One more waiting than the bound: still the bound, the one left waits for the next tick.
    let s = fake_sweep(None, IDEMPOTENCY_SWEEP_MAX + 1).await;
    assert_eq!(
        (s.total, s.asks.len()),
        (IDEMPOTENCY_SWEEP_MAX, expected.len())
    );
}

#[tokio::test]
async fn a_sweep_stops_after_a_short_chunk_and_at_its_bound() {
    let chunk = 1_024;
    // A short chunk ends the tick: nothing more is waiting.
    let s = fake_sweep(Some((100_000, chunk)), 2 * chunk + 5).await;
    assert_eq!((s.total, &s.asks[..]), (2 * chunk + 5, &[chunk; 3][..]));
    yields_between_calls_only(&s);
    // Exactly whole chunks waiting: the call after them finds nothing and ends it.
    let s = fake_sweep(Some((100_000, chunk)), 2 * chunk).await;
    assert_eq!((s.total, &s.asks[..]), (2 * chunk, &[chunk; 3][..]));
    // Nothing waiting: one call, no yield.
    let s = fake_sweep(Some((100_000, chunk)), 0).await;
    assert_eq!((s.total, &s.asks[..]), (0, &[chunk][..]));
    yields_between_calls_only(&s);
    // A bound of whole chunks: reached, no call beyond it (it would ask for 0 or more).
    let s = fake_sweep(Some((3 * chunk, chunk)), 10 * chunk).await;
    assert_eq!((s.total, &s.asks[..]), (3 * chunk, &[chunk; 3][..]));
    yields_between_calls_only(&s);
    // A bound smaller than a chunk: one call for the bound.
    let s = fake_sweep(Some((10, chunk)), 10 * chunk).await;
    assert_eq!((s.total, &s.asks[..]), (10, &[10][..]));
}

/// The sweep task's own tick on a real ledger: with more stored ids waiting than
/// `IDEMPOTENCY_SWEEP_MAX`, one tick evicts exactly that many, the next tick the rest.
#[tokio::test]
async fn a_sweep_tick_of_the_ledger_evicts_exactly_idempotency_sweep_max() {
    let sink = Arc::new(MemorySink::default());
    let ledger = Ledger::with_idempotency(
        Split::default(),
        sink.clone(),
        IdempotencyConfig {
            resident_ms: 3_600_000,
            resident_max: 0,
            filter_bytes: 1 << 20,
            retention_ms: crate::limits::IDEMPOTENCY_RETENTION_MS,
        },
    );
    let waiting = IDEMPOTENCY_SWEEP_MAX + 500;
    ledger.restore_balance("a", 1_000_000);
    for i in 1..=waiting {
        let g = stored_gift("a", &format!("g{i}"));
        ledger.restore_gift(&g);
        // Not stored yet (the sink says nothing is): resident.
        ledger.remember(&g, i as u64);
    }
    assert_eq!(ledger.resident_gifts(), waiting);
    sink.set_stored(u64::MAX);
    assert_eq!(
        sweep_tick(|n| ledger.sweep_resident(n)).await,
        IDEMPOTENCY_SWEEP_MAX
    );
    assert_eq!(ledger.resident_gifts(), 500);
    assert_eq!(sweep_tick(|n| ledger.sweep_resident(n)).await, 500);
    assert_eq!(ledger.resident_gifts(), 0);
}

/// A one-coin gift by `user`, as the store would hand it back.
fn stored_gift(user: &str, gift_id: &str) -> GiftRecord {
    GiftRecord {
        user_id: user.into(),
        user_name: "U".into(),
        gift_id: gift_id.into(),
        stream: "s1".into(),
        sticker: "k1".into(),
        count: 1,
        price: 1,
        amount: 1,
        shares: Split::default().shares(Coins(1)).unwrap(),
        message: None,
        balance_after: 1,
        ts_ms: crate::now_ms(),
    }
}

use super::*;
use crate::ledger::{IdempotencyConfig, MemorySink};
use crate::money::{Coins, Split};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Mutex;

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

// ---- store lookups of a possibly evicted gift id: IDEMPOTENCY_LOOKUP_TRIES_MAX ----

/// An app whose ledger's sink is memory (the test says what is stored) and whose store is a
/// real, empty SQLite file, so every lookup answers "not found", as for a filter false
/// positive. Wallet `a` holds 100 coins, `stored_ids` stored ids still in memory (the only
/// resident ids: each `sweep_resident(1)` evicts one of `a`'s), and the evicted-id filter
/// answers "maybe" for `x-1`, which the store has never seen.
struct LookupRig {
    app: Arc<App>,
    sink: Arc<MemorySink>,
    /// Store lookups that returned (calls of the hook).
    lookups: Arc<AtomicU32>,
    /// What `sweep_resident(1)` said at each lookup where the hook evicted.
    evictions: Arc<Mutex<Vec<usize>>>,
    _dir: tempfile::TempDir,
}

/// Builds the rig; its hook evicts one of `a`'s stored ids (LSNs 1, 2, ...) after each of the
/// first `evict_on_lookups` lookups and nothing after. Those ids count as accepted while the
/// lookup ran (above its mark: the sink had given fewer LSNs), so those lookups' "not found"
/// are stale.
async fn lookup_rig(stored_ids: usize, evict_on_lookups: u32) -> LookupRig {
    lookup_rig_assigned(stored_ids, evict_on_lookups, 0).await
}

/// The rig, with the sink having given LSNs up to `assigned` before the gift is sent.
async fn lookup_rig_assigned(stored_ids: usize, evict_on_lookups: u32, assigned: u64) -> LookupRig {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::Config::for_tests(dir.path().to_path_buf());
    // The durable part only for its store (the ledger it rebuilds, on the journal, is unused).
    let (durable, _) = crate::durable::Durable::open(
        dir.path(),
        None,
        config.split,
        false,
        "local",
        config.journal.clone(),
        config.idempotency.clone(),
    )
    .await
    .unwrap();
    let sink = Arc::new(MemorySink::default());
    let ledger = Arc::new(Ledger::with_idempotency(
        config.split,
        sink.clone(),
        IdempotencyConfig {
            resident_ms: 3_600_000,
            // Stored ids leave memory at once: when the test says they are stored.
            resident_max: 0,
            filter_bytes: 1 << 16,
            retention_ms: crate::limits::IDEMPOTENCY_RETENTION_MS,
        },
    ));
    // As a restart would restore it: 100 coins left after the one-coin stored gifts.
    ledger.restore_balance("a", 100);
    ledger.restore_totals(100 + stored_ids as u64, stored_ids as u64);
    for i in 1..=stored_ids {
        let g = stored_gift("a", &format!("s-{i}"));
        ledger.restore_gift(&g);
        ledger.remember(&g, i as u64);
    }
    // `x-1` in the filter with no gift behind it: a false positive (and `a` has evicted).
    ledger.restore_evicted("a", "x-1", crate::now_ms());
    sink.set_stored(u64::MAX);
    sink.set_assigned(assigned);
    assert_eq!(ledger.resident_gifts(), stored_ids);
    let keys = TokenKeys::load_or_create(None, dir.path()).unwrap();
    let app = Arc::new(App::new(
        config,
        Hub::new(Duration::from_millis(8)),
        ledger.clone(),
        keys,
        crate::server::metrics_handle(),
        Some(Arc::new(durable)),
    ));
    let (lookups, evictions) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let hook = {
        let (lookups, evictions, sink) = (lookups.clone(), evictions.clone(), sink.clone());
        move |user: &str, gift_id: &str| {
            assert_eq!((user, gift_id), ("a", "x-1"));
            if lookups.fetch_add(1, Ordering::SeqCst) < evict_on_lookups {
                let mut evictions = evictions.lock().unwrap();
                evictions.push(ledger.sweep_resident(1));
                // The id just evicted (LSN k, the k-th evicted) was accepted while this lookup
                // ran: the sink has given LSNs up to k at least, so the next lookup's mark
                // covers it and only a further eviction makes that one stale.
                let k = evictions.len() as u64;
                sink.set_assigned(crate::ledger::RecordSink::assigned_lsn(&*sink).max(k));
            }
        }
    };
    assert!(app.after_find_gift.set(Box::new(hook)).is_ok());
    LookupRig {
        app,
        sink,
        lookups,
        evictions,
        _dir: dir,
    }
}

/// Waits (at most 10 s) until `a`'s gift `x-1` went through: debited, waiting for the sink.
async fn wait_for_x1(app: &Arc<App>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !app.ledger.has_gift("a", "x-1") {
        assert!(
            std::time::Instant::now() < deadline,
            "x-1 never went through"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `a`'s one-coffee gift `x-1`; the receiver gets its answer.
fn send_x1(app: &Arc<App>) -> tokio::sync::oneshot::Receiver<GiftReply> {
    let sticker = app.config.catalog.get("coffee").expect("coffee").clone();
    let gift = WalletGift {
        user_id: &"a".into(),
        user_name: &"A".into(),
        gift_id: "x-1",
        stream: &"s1".into(),
        sticker: &sticker,
        count: 1,
        message: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.gift_wallet(
        &gift,
        Box::new(move |reply| {
            let _ = tx.send(reply);
        }),
    );
    rx
}

/// The gift's answer; a gift that went through is answered only once the test settles the sink.
async fn answer(rx: tokio::sync::oneshot::Receiver<GiftReply>) -> Result<u64, &'static str> {
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(GiftReply::Ok { balance, .. })) => Ok(balance),
        Ok(Ok(GiftReply::Rejected { code, .. })) => Err(code),
        Ok(Err(_)) => panic!("the answer was dropped"),
        Err(_) => panic!("no answer within 10 s (went through, waiting for the sink?)"),
    }
}

#[tokio::test]
async fn a_gift_whose_lookups_all_go_stale_is_refused_after_idempotency_lookup_tries_max() {
    let tries = IDEMPOTENCY_LOOKUP_TRIES_MAX as usize;
    // One stored id more than the lookups may evict: the refusal is the bound's, not a
    // wallet that ran out of ids to evict.
    let rig = lookup_rig(tries + 1, u32::MAX).await;
    assert_eq!(answer(send_x1(&rig.app)).await, Err("unavailable"));
    assert_eq!(
        rig.lookups.load(Ordering::SeqCst),
        IDEMPOTENCY_LOOKUP_TRIES_MAX,
        "exactly IDEMPOTENCY_LOOKUP_TRIES_MAX store lookups"
    );
    assert_eq!(
        *rig.evictions.lock().unwrap(),
        vec![1; tries],
        "every lookup saw an eviction"
    );
    assert_eq!(rig.app.ledger.resident_gifts(), 1);
    assert_eq!(rig.app.ledger.balance("a"), 100, "nothing debited");
    assert!(!rig.app.ledger.has_gift("a", "x-1"));
    assert!(rig.app.ledger.audit().ok);
}

#[tokio::test]
async fn a_lookup_is_not_stale_when_only_ids_accepted_before_it_leave_memory() {
    // The wallet evicts one of its older ids (LSNs up to 4, the sink has given 4) during every
    // lookup, as a busy sender does all the time: they cannot be x-1, so the first miss is
    // trusted and x-1 goes through after one lookup.
    let rig = lookup_rig_assigned(4, u32::MAX, 4).await;
    let _reply = send_x1(&rig.app);
    wait_for_x1(&rig.app).await;
    assert_eq!(rig.lookups.load(Ordering::SeqCst), 1, "one lookup, trusted");
    assert_eq!(
        *rig.evictions.lock().unwrap(),
        vec![1],
        "an id left during it"
    );
    assert_eq!(rig.app.ledger.balance("a"), 90, "one coffee debited once");
    rig.sink.settle_all();
    assert!(rig.app.ledger.audit().ok);
}

#[tokio::test]
async fn a_gift_whose_last_allowed_lookup_is_fresh_goes_through_and_is_debited_once() {
    let tries = IDEMPOTENCY_LOOKUP_TRIES_MAX as usize;
    let rig = lookup_rig(tries + 1, IDEMPOTENCY_LOOKUP_TRIES_MAX - 1).await;
    let reply = send_x1(&rig.app);
    // The last allowed lookup's miss is trusted: debited, waiting for the journal (the sink).
    wait_for_x1(&rig.app).await;
    assert_eq!(
        rig.lookups.load(Ordering::SeqCst),
        IDEMPOTENCY_LOOKUP_TRIES_MAX
    );
    assert_eq!(*rig.evictions.lock().unwrap(), vec![1; tries - 1]);
    // Durable now; not stored (nothing is: the store is empty), so x-1 stays in memory.
    rig.sink.set_stored(0);
    rig.sink.settle_all();
    assert_eq!(answer(reply).await, Ok(90));
    // A retry: answered from memory, no lookup, nothing more debited.
    assert_eq!(answer(send_x1(&rig.app)).await, Ok(90));
    assert_eq!(
        rig.lookups.load(Ordering::SeqCst),
        IDEMPOTENCY_LOOKUP_TRIES_MAX
    );
    assert_eq!(rig.app.ledger.balance("a"), 90, "debited once");
    assert!(rig.app.ledger.audit().ok);
}

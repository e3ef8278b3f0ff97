// Lists of time spans that hold one span are what these tests mean.
#![allow(clippy::single_range_in_vec_init)]
use super::*;
use proptest::prelude::*;
use std::sync::Mutex;

fn ledger() -> Ledger {
    Ledger::new(Split::default(), Arc::new(MemorySink::default()))
}

/// A shared name for a request (leaked: a test's few names live as long as the test binary).
fn name(s: &str) -> &'static Arc<str> {
    Box::leak(Box::new(Arc::from(s)))
}

fn gift<'a>(user: &str, id: &'a str, price: u64, count: u32) -> GiftRequest<'a> {
    GiftRequest {
        user_id: name(user),
        user_name: name("U"),
        gift_id: id,
        stream: name("s1"),
        // One sticker per price, as in a catalog.
        sticker: name(&format!("k{price}")),
        price,
        count,
        message: None,
        ts_ms: 1,
        store_checked: None,
    }
}

/// Runs a gift to completion as the server does (durable at once with the memory sink).
fn run_gift(l: &Ledger, req: &GiftRequest<'_>) -> Result<u64, &'static str> {
    match l.begin_gift(req, no_completion) {
        GiftStart::New { slot, record, .. } => {
            l.gift_durable(&record);
            slot.settle(SlotState::Done { seq: 1 });
            Ok(slot.balance_after)
        }
        GiftStart::Retry(slot) => Ok(slot.balance_after),
        GiftStart::Rejected { code, .. } => Err(code),
        GiftStart::Lookup { .. } => Err("lookup"),
    }
}

/// The unit tests settle slots by hand (as the app's completion would), so the completion the
/// ledger hands the sink does nothing.
fn no_completion(_: &SharedGift, _: &Arc<Slot>) -> OnDurable {
    Box::new(|_| {})
}

fn credit(l: &Ledger, user: &str, coins: u64, reference: &str) {
    match l.begin_credit(user, coins, reference, 1) {
        CreditStart::New { slot, .. } => {
            slot.settle(SlotState::Done { seq: 0 });
        }
        CreditStart::Retry(_) => {}
        _ => panic!("credit refused"),
    }
}

#[test]
fn debit_never_below_zero_and_insufficient_reports_balance() {
    let l = ledger();
    credit(&l, "a", 10, "r1");
    assert_eq!(run_gift(&l, &gift("a", "g1", 4, 2)), Ok(2));
    assert_eq!(
        run_gift(&l, &gift("a", "g2", 4, 1)),
        Err("insufficient_funds")
    );
    assert_eq!(l.balance("a"), 2);
    assert_eq!(
        run_gift(&l, &gift("nobody", "g1", 1, 1)),
        Err("insufficient_funds")
    );
    assert!(l.audit().ok);
}

#[test]
fn retry_debits_once_and_other_contents_conflict() {
    let l = ledger();
    credit(&l, "a", 100, "r1");
    assert_eq!(run_gift(&l, &gift("a", "g1", 10, 1)), Ok(90));
    assert_eq!(run_gift(&l, &gift("a", "g1", 10, 1)), Ok(90));
    assert_eq!(l.balance("a"), 90);
    assert_eq!(run_gift(&l, &gift("a", "g1", 10, 2)), Err("conflict"));
    // Another user may use the same gift id.
    credit(&l, "b", 100, "r2");
    assert_eq!(run_gift(&l, &gift("b", "g1", 10, 1)), Ok(90));
    assert_eq!(l.revenue("s1").gifts, 2);
}

#[test]
fn rejected_id_can_be_retried_after_top_up() {
    let l = ledger();
    credit(&l, "a", 5, "r1");
    assert_eq!(
        run_gift(&l, &gift("a", "g1", 10, 1)),
        Err("insufficient_funds")
    );
    credit(&l, "a", 5, "r2");
    assert_eq!(run_gift(&l, &gift("a", "g1", 10, 1)), Ok(0));
}

#[test]
fn credits_are_idempotent_on_reference() {
    let l = ledger();
    credit(&l, "a", 5, "r1");
    credit(&l, "a", 5, "r1");
    assert_eq!(l.balance("a"), 5);
    assert!(matches!(
        l.begin_credit("a", 6, "r1", 1),
        CreditStart::Conflict
    ));
    assert!(matches!(
        l.begin_credit("b", 5, "r1", 1),
        CreditStart::Conflict
    ));
    assert!(matches!(
        l.begin_credit("a", AMOUNT_MAX, "r2", 1),
        CreditStart::TooLarge
    ));
    assert_eq!(
        l.audit(),
        Audit {
            credited: 5,
            balances: 5,
            gifted: 0,
            held: 0,
            ok: true
        }
    );
}

struct FailingSink;
impl RecordSink for FailingSink {
    fn submit(&self, _r: Arc<Record>, _then: OnDurable) -> Result<(), SinkError> {
        Err(SinkError::Failed("disk gone".into()))
    }

    fn stored_lsn(&self) -> Lsn {
        0
    }
}

#[test]
fn a_sink_refusal_debits_nothing() {
    let l = Ledger::new(Split::default(), Arc::new(FailingSink));
    l.restore_balance("a", 50);
    l.restore_totals(50, 0);
    assert_eq!(run_gift(&l, &gift("a", "g1", 10, 1)), Err("unavailable"));
    assert_eq!(l.balance("a"), 50);
    assert!(l.audit().ok);
}

#[test]
fn a_failed_ticket_undoes_the_debit() {
    let l = ledger();
    credit(&l, "a", 50, "r");
    let GiftStart::New { slot, record, .. } = l.begin_gift(&gift("a", "g1", 10, 1), no_completion)
    else {
        panic!()
    };
    assert_eq!(l.balance("a"), 40);
    l.gift_failed(&record, &slot);
    assert_eq!(l.balance("a"), 50);
    assert!(l.audit().ok);
    assert_eq!(l.revenue("s1").gifts, 0);
    assert_eq!(run_gift(&l, &gift("a", "g1", 10, 1)), Ok(40));
}

#[test]
fn many_threads_on_one_wallet_spend_exactly_what_is_there() {
    let l = Arc::new(ledger());
    credit(&l, "a", 1000, "r");
    let ok = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..8 {
            let l = l.clone();
            let ok = ok.clone();
            s.spawn(move || {
                for i in 0..200 {
                    let id = format!("t{t}-{i}");
                    if run_gift(&l, &gift("a", &id, 7, 1)).is_ok() {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(ok.load(Ordering::SeqCst), 1000 / 7);
    assert_eq!(l.balance("a"), 1000 % 7);
    assert!(l.audit().ok);
}

#[test]
fn replay_reproduces_balances_and_refuses_inconsistency() {
    let journal = Arc::new(Mutex::new(Vec::new()));
    struct Capture(Arc<Mutex<Vec<Record>>>);
    impl RecordSink for Capture {
        fn submit(&self, r: Arc<Record>, _then: OnDurable) -> Result<(), SinkError> {
            self.0.lock().unwrap().push((*r).clone());
            Ok(())
        }

        fn stored_lsn(&self) -> Lsn {
            0
        }
    }
    let l = Ledger::new(Split::default(), Arc::new(Capture(journal.clone())));
    credit(&l, "a", 100, "r1");
    run_gift(&l, &gift("a", "g1", 10, 3)).unwrap();
    run_gift(&l, &gift("a", "g2", 1, 1)).unwrap();
    let fresh = ledger();
    for r in journal.lock().unwrap().iter() {
        fresh.replay(r).unwrap();
    }
    assert_eq!(fresh.balance("a"), l.balance("a"));
    assert_eq!(fresh.audit(), l.audit());
    assert_eq!(fresh.revenue("s1").gross, 31);
    // The same gift again is refused, so is a record that does not fit the balance.
    let records = journal.lock().unwrap().clone();
    assert!(fresh.replay(&records[1]).is_err());
    let other = ledger();
    assert!(other.replay(&records[1]).is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Credit {
        user: u8,
        coins: u64,
        reference: u8,
    },
    Gift {
        user: u8,
        id: u8,
        price: u64,
        count: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 0u64..200, 0u8..20).prop_map(|(user, coins, reference)| Op::Credit {
            user,
            coins,
            reference
        }),
        (0u8..4, 0u8..30, 1u64..60, 1u32..5).prop_map(|(user, id, price, count)| Op::Gift {
            user,
            id,
            price,
            count
        }),
    ]
}

proptest! {
    /// The ledger against a simple single-threaded model.
    #[test]
    fn matches_a_simple_model(ops in proptest::collection::vec(op(), 1..200)) {
        let l = ledger();
        let mut balances = [0u64; 4];
        let mut refs: HashMap<u8, (u8, u64)> = HashMap::new();
        let mut gifts: HashMap<(u8, u8), (u64, u32, u64)> = HashMap::new();
        let (mut credited, mut gifted) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Credit { user, coins, reference } => {
                    let r = format!("r{reference}");
                    let got = l.begin_credit(&format!("u{user}"), coins, &r, 1);
                    match refs.get(&reference) {
                        Some(&(u, c)) if u == user && c == coins => prop_assert!(matches!(got, CreditStart::Retry(_))),
                        Some(_) => prop_assert!(matches!(got, CreditStart::Conflict)),
                        None => {
                            let CreditStart::New { slot, .. } = got else { panic!("expected new credit") };
                            slot.settle(SlotState::Done { seq: 0 });
                            refs.insert(reference, (user, coins));
                            balances[user as usize] += coins;
                            credited += coins;
                        }
                    }
                }
                Op::Gift { user, id, price, count } => {
                    let u = format!("u{user}");
                    let gid = format!("g{id}");
                    let got = run_gift(&l, &gift(&u, &gid, price, count));
                    let amount = price * count as u64;
                    match gifts.get(&(user, id)) {
                        Some(&(p, c, after)) if p == price && c == count => prop_assert_eq!(got, Ok(after)),
                        Some(_) => prop_assert_eq!(got, Err("conflict")),
                        None if balances[user as usize] >= amount => {
                            balances[user as usize] -= amount;
                            gifted += amount;
                            gifts.insert((user, id), (price, count, balances[user as usize]));
                            prop_assert_eq!(got, Ok(balances[user as usize]));
                        }
                        None => prop_assert_eq!(got, Err("insufficient_funds")),
                    }
                }
            }
            for (i, b) in balances.iter().enumerate() {
                prop_assert_eq!(l.balance(&format!("u{i}")), *b);
            }
            let audit = l.audit();
            prop_assert!(audit.ok);
            prop_assert_eq!((audit.credited, audit.gifted), (credited, gifted));
            let rev = l.revenue("s1");
            prop_assert_eq!(rev.gross, gifted);
            prop_assert_eq!(rev.store + rev.streamer + rev.platform, gifted * crate::money::SHARE_UNIT);
        }
    }
}

/// A slot answers whoever waits on it exactly once with the settled state: a waiter registered
/// while pending is called at `settle`, one registered afterwards at once; settling to
/// `Pending` calls nobody.
#[test]
fn a_slot_calls_each_waiter_once_with_the_settled_state() {
    let slot = Slot::new("fp".into(), 7, SlotState::Pending);
    let calls = Arc::new(Mutex::new(Vec::new()));
    for who in ["first", "retry"] {
        let calls = calls.clone();
        slot.when_settled(move |s| calls.lock().unwrap().push((who, s)));
    }
    slot.settle(SlotState::Pending);
    assert!(calls.lock().unwrap().is_empty(), "nothing settled yet");
    slot.settle(SlotState::Done { seq: 3 });
    let late = calls.clone();
    slot.when_settled(move |s| late.lock().unwrap().push(("late", s)));
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            ("first", SlotState::Done { seq: 3 }),
            ("retry", SlotState::Done { seq: 3 }),
            ("late", SlotState::Done { seq: 3 }),
        ]
    );
    assert_eq!(slot.state(), SlotState::Done { seq: 3 });
}

/// The completion a new gift hands the sink is the one the sink later calls; a rejected or
/// retried gift builds none.
#[test]
fn a_new_gift_hands_its_completion_to_the_sink_and_only_a_new_one() {
    let sink = Arc::new(MemorySink::default());
    let l = Ledger::new(Split::default(), sink.clone());
    credit(&l, "a", 10, "r");
    let called = Arc::new(AtomicU64::new(0));
    let built = AtomicU64::new(0);
    let then = |_: &SharedGift, slot: &Arc<Slot>| -> OnDurable {
        built.fetch_add(1, Ordering::SeqCst);
        let (slot, called) = (slot.clone(), called.clone());
        Box::new(move |outcome| {
            assert_eq!(outcome, Ok(2), "the LSN after the credit's");
            called.fetch_add(1, Ordering::SeqCst);
            slot.settle(SlotState::Done { seq: 1 });
        })
    };
    assert!(matches!(
        l.begin_gift(&gift("a", "g1", 4, 1), then),
        GiftStart::New { .. }
    ));
    assert!(matches!(
        l.begin_gift(&gift("a", "g1", 4, 1), then),
        GiftStart::Retry(_)
    ));
    assert!(matches!(
        l.begin_gift(&gift("a", "g2", 40, 1), then),
        GiftStart::Rejected {
            code: "insufficient_funds",
            ..
        }
    ));
    assert_eq!(built.load(Ordering::SeqCst), 1);
    assert_eq!(called.load(Ordering::SeqCst), 0, "not durable yet");
    sink.settle_all();
    assert_eq!(called.load(Ordering::SeqCst), 1);
    let GiftStart::Retry(slot) = l.begin_gift(&gift("a", "g1", 4, 1), then) else {
        panic!("a retry")
    };
    assert_eq!(slot.state(), SlotState::Done { seq: 1 });
    assert_eq!(l.balance("a"), 6);
}

// ---- bounded gift-id memory (idempotency.rs) ----

/// A ledger whose sink settles like the journal (LSN to the completion) and whose completion
/// does what the app's does: settle the slot, then `remember` the gift.
fn bounded(resident_max: usize, resident_ms: u64) -> (Arc<Ledger>, Arc<MemorySink>) {
    let sink = Arc::new(MemorySink::default());
    let cfg = IdempotencyConfig {
        resident_ms,
        resident_max,
        filter_bytes: 1 << 16,
        retention_ms: 7 * 24 * 3600 * 1000,
    };
    (
        Arc::new(Ledger::with_idempotency(
            Split::default(),
            sink.clone(),
            cfg,
        )),
        sink,
    )
}

fn gift_now<'a>(user: &'a str, id: &'a str) -> GiftRequest<'a> {
    GiftRequest {
        ts_ms: crate::now_ms(),
        ..gift(user, id, 1, 1)
    }
}

/// Starts a gift with the app's completion; returns what `begin_gift` said.
fn start(l: &Arc<Ledger>, req: &GiftRequest<'_>) -> &'static str {
    let ledger = l.clone();
    let then = move |record: &SharedGift, slot: &Arc<Slot>| -> OnDurable {
        let (record, slot) = (record.clone(), slot.clone());
        Box::new(move |outcome| {
            let lsn = outcome.expect("durable");
            ledger.gift_durable(&record);
            slot.settle(SlotState::Done { seq: lsn });
            ledger.remember(&record, lsn);
        })
    };
    match l.begin_gift(req, then) {
        GiftStart::New { .. } => "new",
        GiftStart::Retry(_) => "retry",
        GiftStart::Lookup { .. } => "lookup",
        GiftStart::Rejected { code, .. } => code,
    }
}

#[test]
fn ids_leave_memory_only_once_stored_and_then_need_a_store_lookup() {
    let (l, sink) = bounded(2, 3_600_000);
    credit(&l, "a", 100, "r");
    for i in 1..=5 {
        assert_eq!(start(&l, &gift_now("a", &format!("g{i}"))), "new");
    }
    sink.settle_all();
    // Durable but not stored: every id stays, whatever resident_max says.
    assert_eq!(l.resident_gifts(), 5);
    assert_eq!(start(&l, &gift_now("a", "g1")), "retry");
    // The store holds the first three records (the credit is LSN 1, gifts g1-g3 are 2-4); the
    // next remembered gift evicts the stored ones beyond resident_max.
    sink.set_stored(4);
    assert_eq!(start(&l, &gift_now("a", "g6")), "new");
    sink.settle_all();
    assert_eq!(
        l.resident_gifts(),
        3,
        "g1-g3 stored and evicted down to the bound; g4, g5 unstored; g6 over the bound but unstored"
    );
    for id in ["g1", "g2", "g3"] {
        assert_eq!(start(&l, &gift_now("a", id)), "lookup", "{id} was evicted");
    }
    for id in ["g4", "g5", "g6"] {
        assert_eq!(start(&l, &gift_now("a", id)), "retry", "{id} is resident");
    }
    // Asking changed nothing: six coins gone, one per gift.
    assert_eq!(l.balance("a"), 94);
    assert!(l.audit().ok);
    // Another user's new ids need no lookup: the filter is keyed by user, and a wallet that
    // never evicted skips it.
    credit(&l, "b", 10, "rb");
    assert_eq!(start(&l, &gift_now("b", "g1")), "new");
}

#[test]
fn a_sweep_evicts_what_the_store_caught_up_on_without_a_new_gift_and_at_most_its_bound() {
    let (l, sink) = bounded(10, 3_600_000);
    credit(&l, "a", 1000, "r");
    for i in 1..=200 {
        assert_eq!(start(&l, &gift_now("a", &format!("g{i}"))), "new");
    }
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 200, "none stored yet: all resident");
    assert_eq!(
        l.sweep_resident(usize::MAX),
        0,
        "nothing stored: nothing to evict"
    );
    // The store catches up; no gift arrives to evict, the sweep does, at most its bound per call
    // (100: neither 64, what a gift's completion evicts, nor a multiple of it).
    sink.set_stored(u64::MAX);
    assert_eq!(l.sweep_resident(100), 100);
    assert_eq!(l.resident_gifts(), 100);
    assert_eq!(l.sweep_resident(usize::MAX), 90, "down to resident_max");
    assert_eq!(l.resident_gifts(), 10);
    assert_eq!(l.sweep_resident(usize::MAX), 0);
    for i in 1..=190 {
        assert_eq!(
            start(&l, &gift_now("a", &format!("g{i}"))),
            "lookup",
            "g{i}"
        );
    }
    for i in 191..=200 {
        assert_eq!(start(&l, &gift_now("a", &format!("g{i}"))), "retry", "g{i}");
    }
    assert_eq!(l.balance("a"), 800);
    assert!(l.audit().ok);
}

#[test]
fn old_stored_ids_leave_memory_after_the_resident_time() {
    let (l, sink) = bounded(1000, 60_000);
    credit(&l, "a", 100, "r");
    sink.set_stored(u64::MAX);
    let old = GiftRequest {
        ts_ms: crate::now_ms() - 61_000,
        ..gift("a", "old", 1, 1)
    };
    let recent = GiftRequest {
        ts_ms: crate::now_ms() - 59_000,
        ..gift("a", "recent", 1, 1)
    };
    assert_eq!(start(&l, &old), "new");
    assert_eq!(start(&l, &recent), "new");
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 1, "only the one older than 60 s left");
    assert_eq!(start(&l, &gift_now("a", "old")), "lookup");
    assert_eq!(start(&l, &gift_now("a", "recent")), "retry");
}

/// A lookup names the days of the evicted-id filter that answered "maybe" for the id: the day
/// of its gift's time (three days back here), not the whole retention. That day is all the
/// store probes.
#[test]
fn a_lookup_names_the_day_of_the_evicted_gift() {
    const DAY: u64 = 24 * 3600 * 1000;
    let (l, sink) = bounded(0, 0);
    credit(&l, "a", 100, "r");
    sink.set_stored(u64::MAX);
    let made = crate::now_ms() - 3 * DAY;
    let old = GiftRequest {
        ts_ms: made,
        ..gift("a", "g1", 1, 1)
    };
    assert_eq!(start(&l, &old), "new");
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 0, "evicted once stored");
    let GiftStart::Lookup { spans, .. } = l.begin_gift(&gift_now("a", "g1"), no_completion) else {
        panic!("g1 needs a lookup")
    };
    let day = made / DAY * DAY;
    assert_eq!(spans, [day..day + DAY]);
    assert!(spans[0].contains(&made));
}

#[test]
fn a_store_miss_is_trusted_unless_the_wallet_evicted_an_id_accepted_after_the_lookup_began() {
    let (l, sink) = bounded(0, 3_600_000);
    credit(&l, "a", 100, "r");
    sink.set_stored(u64::MAX);
    assert_eq!(start(&l, &gift_now("a", "g1")), "new");
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 0, "resident_max 0: evicted once stored");
    // (The credit took LSN 1, g1 LSN 2.) g0 accepted (LSN 3), not durable yet: it leaves memory while g1's lookup runs.
    assert_eq!(start(&l, &gift_now("a", "g0")), "new");
    // g1 needs a lookup; say the store answered "not found" (as it would for a filter false
    // positive): the app then asks again with the mark `Lookup` gave.
    let GiftStart::Lookup { mark, .. } = l.begin_gift(&gift_now("a", "g1"), no_completion) else {
        panic!("g1 needs a lookup")
    };
    assert_eq!(mark, 3, "the highest LSN given so far");
    // Meanwhile the wallet evicts g0, accepted before the lookup began: it cannot be g1 (g1 was
    // not resident then), so the miss is still trusted. A busy sender evicts all the time.
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 0, "g0 evicted");
    let before = GiftRequest {
        store_checked: Some(mark),
        ..gift_now("a", "g1")
    };
    assert_eq!(start(&l, &before), "new");
    // g0 (evicted) needs a lookup; meanwhile g4 is accepted after its mark and evicted: that
    // one could have been g0 itself (sent again on another connection), so the miss is stale.
    let GiftStart::Lookup { mark, .. } = l.begin_gift(&gift_now("a", "g0"), no_completion) else {
        panic!("g0 needs a lookup")
    };
    assert_eq!(mark, 4, "g1 took LSN 4");
    assert_eq!(start(&l, &gift_now("a", "g4")), "new");
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 0, "g1 and g4 evicted");
    let stale = GiftRequest {
        store_checked: Some(mark),
        ..gift_now("a", "g0")
    };
    assert_eq!(start(&l, &stale), "lookup");
    // With an up-to-date mark the miss is trusted and the gift goes ahead.
    let GiftStart::Lookup { mark, .. } = l.begin_gift(&gift_now("a", "g0"), no_completion) else {
        panic!("g0 needs a lookup")
    };
    let fresh = GiftRequest {
        store_checked: Some(mark),
        ..gift_now("a", "g0")
    };
    assert_eq!(start(&l, &fresh), "new");
}

#[test]
fn restored_old_ids_go_to_the_filter_and_recent_ones_stay_resident() {
    let (l, _sink) = bounded(1000, 3_600_000);
    l.restore_balance("a", 10);
    l.restore_evicted("a", "old", crate::now_ms() - 2 * 3_600_000);
    let recent = GiftRecord {
        user_id: "a".into(),
        user_name: "U".into(),
        gift_id: "recent".into(),
        stream: "s1".into(),
        sticker: "k1".into(),
        count: 1,
        price: 1,
        amount: 1,
        shares: Split::default().shares(Coins(1)).unwrap(),
        message: None,
        balance_after: 10,
        ts_ms: crate::now_ms(),
    };
    l.restore_gift(&recent);
    l.remember(&recent, 0);
    assert_eq!(start(&l, &gift_now("a", "old")), "lookup");
    assert_eq!(start(&l, &gift_now("a", "recent")), "retry");
    assert_eq!(l.balance("a"), 10);
}

#[test]
fn one_completion_evicts_at_most_evictions_per_call_max() {
    let (l, sink) = bounded(0, 3_600_000);
    credit(&l, "a", 1_000, "r");
    let backlog = idempotency::EVICTIONS_PER_CALL_MAX + 36;
    for i in 0..backlog {
        assert_eq!(start(&l, &gift_now("a", &format!("b{i}"))), "new");
    }
    sink.settle_all();
    assert_eq!(l.resident_gifts(), backlog, "none stored yet: all resident");
    // The store catches up at once (as after an outage): the next completion evicts a bounded
    // number, the one after it the rest.
    sink.set_stored(u64::MAX);
    assert_eq!(start(&l, &gift_now("a", "next1")), "new");
    sink.settle_all();
    assert_eq!(
        l.resident_gifts(),
        backlog + 1 - idempotency::EVICTIONS_PER_CALL_MAX
    );
    assert_eq!(start(&l, &gift_now("a", "next2")), "new");
    sink.settle_all();
    assert_eq!(l.resident_gifts(), 0);
}

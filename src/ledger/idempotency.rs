//! Bounded gift-id memory.
//!
//! Guarantee 2 (a `gift_id` is debited at most once per user) needs every accepted id to be
//! recognised when it comes back. Keeping each one in its wallet's map for the life of the
//! process costs ~550 B per gift without bound; instead an id stays *resident* (its slot in the
//! wallet's map: the fast, exact answer, and the only one for a gift still in flight) until it is
//! both stored and older than `resident_ms` or pushed out by `resident_max`. Then it is
//! *evicted*: its key goes into a Bloom filter of evicted ids and its slot is dropped. A new
//! gift whose id the filter may hold is looked up in the store (the app does that, off the
//! wallet lock): found, it is a retry; not found, a false positive, and the gift goes ahead.
//!
//! Why this is exact, not probabilistic: a Bloom filter has no false negatives, an id is evicted
//! only once the store holds its record (so the lookup finds it), and a lookup's "not found" is
//! trusted only if the wallet evicted nothing while the lookup ran (the wallet's eviction count
//! is compared before and after; see `Ledger::begin_gift`). False positives cost a store lookup,
//! never a wrong answer.
//!
//! The filter is split into generations by the gifts' time, `IDEMPOTENCY_FILTER_GENERATIONS` of
//! them covering `IDEMPOTENCY_RETENTION_MS`: the oldest is cleared when a new one begins, so an
//! id is recognised for at least the retention, as after a restart. A generation grows in
//! stages as it takes ids in (each stage a Bloom filter twice the size of the one before,
//! allocated when the last is full), so a quiet day takes a few MiB and a busy one what its ids
//! need, all within one budget (`filter_bytes`). Past the budget, a generation's last stage takes
//! the rest of its ids beyond its size: nothing is forgotten, but false positives, so store
//! lookups, grow until a generation leaves and frees its memory.

use crate::limits::{
    IDEMPOTENCY_FILTER_BYTES_DEFAULT, IDEMPOTENCY_FILTER_GENERATIONS,
    IDEMPOTENCY_RESIDENT_MAX_DEFAULT, IDEMPOTENCY_RESIDENT_MS_DEFAULT, IDEMPOTENCY_RETENTION_MS,
};
use crate::record::{GiftRecord, Lsn};
use fastbloom::AtomicBloomFilter;
use parking_lot::{Mutex, RwLock};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The generation count as a number of spans.
const GENERATIONS: u64 = IDEMPOTENCY_FILTER_GENERATIONS as u64;

/// Bits per id a stage is sized for: ~0.005% false positives per stage while it holds at most
/// that many ids (measured: 0.021% over 4 stages, `a_busy_day_grows_in_stages_and_keeps_every_id`).
/// A lookup asks every stage, so their rates add up: the default budget's ~14 stages stay
/// under 0.1%.
const FILTER_BITS_PER_ID: usize = 20;

/// Ids the first stage of a generation is sized for (2.5 MiB at `FILTER_BITS_PER_ID`); each
/// further stage is twice the one before, so a day of N ids takes ~log2(N / this) stages.
const FILTER_FIRST_STAGE_IDS: usize = 1 << 20;

/// A stage at most (a lookup asks every stage, so stages keep doubling up to this; past it the
/// budget is taken in stages of this size). Zeroing one takes tens of milliseconds, done outside
/// the filter's lock.
const FILTER_STAGE_BYTES_MAX: usize = 128 << 20;

/// Evictions done per remembered gift at most, so one call never stalls the settle thread
/// (twice the arrival rate: a backlog left by a storage outage drains while gifts flow).
pub(crate) const EVICTIONS_PER_CALL_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// A stored gift's id stays in its wallet's map at least this long after the gift.
    pub resident_ms: u64,
    /// At most this many stored gift ids stay in the maps; beyond it the oldest stored ones are
    /// evicted early. (Gifts not yet stored stay resident whatever this says: their number is
    /// bounded by the journal's backlog.)
    pub resident_max: usize,
    /// Memory of the evicted-id filter at most, all generations together.
    pub filter_bytes: usize,
    /// How long an evicted id is recognised.
    pub retention_ms: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            resident_ms: IDEMPOTENCY_RESIDENT_MS_DEFAULT,
            resident_max: IDEMPOTENCY_RESIDENT_MAX_DEFAULT,
            filter_bytes: IDEMPOTENCY_FILTER_BYTES_DEFAULT,
            retention_ms: IDEMPOTENCY_RETENTION_MS,
        }
    }
}

/// Ids evicted from the wallets' maps, by generation of the gift's time; a generation grows
/// in stages as it takes ids in, within one memory budget for all of them.
pub(crate) struct EvictedIds {
    /// `IDEMPOTENCY_FILTER_GENERATIONS` slots; generation `g` (gift time / span) lives in slot
    /// `g % IDEMPOTENCY_FILTER_GENERATIONS`.
    slots: RwLock<Vec<Option<Generation>>>,
    span_ms: u64,
    /// The first stage of every generation: each may have one whatever the others took, so a
    /// new day always has somewhere of its own to go (its ids must leave with it, not before).
    /// The first stages take at most a quarter of the budget.
    first_stage_bytes: usize,
    /// A stage at most (`FILTER_STAGE_BYTES_MAX`).
    stage_bytes_max: usize,
    /// What further stages of all generations may take together: the budget less every
    /// generation's first stage.
    growth_bytes: usize,
    /// Set when a stage could not grow for want of budget: until a generation is cleared, ids
    /// go into their generation's last stage past its size (more false positives, so more
    /// store lookups; never a wrong answer) without asking the write lock again.
    at_budget: AtomicBool,
    /// An id is hashed once, with this (randomly seeded) hasher, and that hash goes to every
    /// stage's filter: a lookup checks every stage of every live generation, and each filter's
    /// own hasher (SipHash) would hash the id again for each.
    hasher: foldhash::fast::RandomState,
}

struct Generation {
    number: u64,
    /// Oldest first; every one but the last is full.
    stages: Vec<Stage>,
}

/// One Bloom filter sized for `capacity` ids at `FILTER_BITS_PER_ID`.
struct Stage {
    filter: AtomicBloomFilter,
    capacity: usize,
    /// Ids inserted (a duplicate counts again: it only makes the stage full a little sooner).
    taken: AtomicUsize,
}

impl Stage {
    fn new(bytes: usize) -> Stage {
        let capacity = (bytes * 8 / FILTER_BITS_PER_ID).max(1);
        Stage {
            filter: AtomicBloomFilter::with_num_bits(bytes * 8).expected_items(capacity),
            capacity,
            taken: AtomicUsize::new(0),
        }
    }

    fn bytes(&self) -> usize {
        self.filter.num_bits() / 8
    }

    /// Inserts; false if the stage was full already (the id is not inserted then).
    fn insert_if_room(&self, key: u64) -> bool {
        if self.taken.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            return false;
        }
        self.filter.insert_hash(key);
        true
    }

    fn insert(&self, key: u64) {
        self.taken.fetch_add(1, Ordering::Relaxed);
        self.filter.insert_hash(key);
    }
}

impl EvictedIds {
    pub(crate) fn new(filter_bytes: usize, retention_ms: u64) -> EvictedIds {
        Self::with_stages(
            filter_bytes,
            retention_ms,
            FILTER_FIRST_STAGE_IDS * FILTER_BITS_PER_ID / 8,
            FILTER_STAGE_BYTES_MAX,
        )
    }

    /// `new` with other stage sizes (tests reach the largest stage without allocating 128 MiB).
    fn with_stages(
        filter_bytes: usize,
        retention_ms: u64,
        first_stage_bytes: usize,
        stage_bytes_max: usize,
    ) -> EvictedIds {
        // `GENERATIONS - 1` whole spans cover the retention; the extra one is the current.
        let span_ms = retention_ms.div_ceil(GENERATIONS - 1).max(1);
        // First stages take at most a quarter of the budget; whole 64-bit words (fastbloom's
        // unit), at least one.
        let first_stage_bytes = first_stage_bytes
            .min(filter_bytes / (4 * IDEMPOTENCY_FILTER_GENERATIONS))
            .max(8)
            & !7;
        let growth_bytes =
            filter_bytes.saturating_sub(first_stage_bytes * IDEMPOTENCY_FILTER_GENERATIONS);
        EvictedIds {
            slots: RwLock::new((0..IDEMPOTENCY_FILTER_GENERATIONS).map(|_| None).collect()),
            span_ms,
            first_stage_bytes,
            stage_bytes_max,
            growth_bytes,
            at_budget: AtomicBool::new(false),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn hash(&self, user_id: &str, gift_id: &str) -> u64 {
        self.hasher.hash_one((user_id, gift_id))
    }

    fn oldest_live(&self, now_ms: u64) -> u64 {
        (now_ms / self.span_ms).saturating_sub(GENERATIONS - 1)
    }

    fn slot_of(number: u64) -> usize {
        (number % GENERATIONS) as usize
    }

    /// Remembers an evicted id of a gift made at `ts_ms`. An id older than the retention is
    /// not kept (the restart rule: gifts older than that are not recognised).
    pub(crate) fn insert(&self, user_id: &str, gift_id: &str, ts_ms: u64, now_ms: u64) {
        let number = ts_ms / self.span_ms;
        if number < self.oldest_live(now_ms) {
            return;
        }
        let key = self.hash(user_id, gift_id);
        {
            let slots = self.slots.read();
            if let Some(g) = &slots[Self::slot_of(number)] {
                if g.number > number {
                    // The slot already holds a newer generation: this id is past the retention.
                    return;
                }
                if g.number == number {
                    let last = g.stages.last().expect("a generation has a stage");
                    if self.at_budget.load(Ordering::Relaxed) {
                        last.insert(key);
                        return;
                    }
                    if last.insert_if_room(key) {
                        return;
                    }
                }
            }
        }
        // A new generation, or the last stage is full: the write lock, rarely (a stage holds
        // a million ids or more at the default budget). A new stage is allocated (zeroed: up to
        // `FILTER_STAGE_BYTES_MAX`) outside the lock, then put in place if it is still needed.
        let i = Self::slot_of(number);
        let mut fresh: Option<Stage> = None;
        loop {
            let mut slots = self.slots.write();
            let need = match &slots[i] {
                Some(g) if g.number > number => return,
                Some(g) if g.number == number => {
                    let last = g.stages.last().expect("a generation has a stage");
                    if last.taken.load(Ordering::Relaxed) < last.capacity
                        || self.at_budget.load(Ordering::Relaxed)
                    {
                        None
                    } else {
                        let left = self.growth_bytes.saturating_sub(Self::growth_used(&slots));
                        let next = (last.bytes() * 2).min(self.stage_bytes_max).min(left) & !7;
                        // A stage smaller than a first one is not worth another probe per lookup.
                        if next < self.first_stage_bytes {
                            self.at_budget.store(true, Ordering::Relaxed);
                            None
                        } else {
                            Some(next)
                        }
                    }
                }
                // A generation past the retention (or none): its slot goes to this one.
                _ => Some(self.first_stage_bytes),
            };
            let Some(bytes) = need else {
                let g = slots[i].as_ref().expect("a live generation");
                g.stages
                    .last()
                    .expect("a generation has a stage")
                    .insert(key);
                return;
            };
            let Some(stage) = fresh.take().filter(|s| s.bytes() == bytes) else {
                drop(slots);
                fresh = Some(Stage::new(bytes));
                continue;
            };
            stage.insert(key);
            match &mut slots[i] {
                Some(g) if g.number == number => g.stages.push(stage),
                old => {
                    // The old generation's memory is free again.
                    if old.as_ref().is_some_and(|g| g.stages.len() > 1) {
                        self.at_budget.store(false, Ordering::Relaxed);
                    }
                    *old = Some(Generation {
                        number,
                        stages: vec![stage],
                    });
                }
            }
            return;
        }
    }

    /// Bytes the stages past each generation's first take now.
    fn growth_used(slots: &[Option<Generation>]) -> usize {
        slots.iter().flatten().map(Generation::growth_bytes).sum()
    }

    /// The time from which the filter remembers ids at `now_ms`: it answers for the gifts made
    /// at this time or later, and never for older ones (every span `spans_containing` names
    /// starts here or later).
    #[cfg(test)]
    fn remembered_since_ms(&self, now_ms: u64) -> u64 {
        self.oldest_live(now_ms) * self.span_ms
    }

    /// When the gift of an evicted id may have been made: the span of gift time (`ts_ms`,
    /// half-open) of each live generation that answers "maybe" for it, newest first. Empty:
    /// the id was never evicted (within the retention). An id goes into the generation of its
    /// gift's time, so a store lookup after a "maybe" needs to look only among the gifts made
    /// in these spans (`Store::find_gift`), usually one day of the seven, where a copy of the
    /// id evicted since `remembered_since_ms` is sure to be.
    pub(crate) fn spans_containing(
        &self,
        user_id: &str,
        gift_id: &str,
        now_ms: u64,
    ) -> Vec<Range<u64>> {
        let oldest = self.oldest_live(now_ms);
        let key = self.hash(user_id, gift_id);
        let mut spans: Vec<Range<u64>> = self
            .slots
            .read()
            .iter()
            .flatten()
            .filter(|g| g.number >= oldest && g.stages.iter().any(|s| s.filter.contains_hash(key)))
            .map(|g| {
                let start = g.number.saturating_mul(self.span_ms);
                start..start.saturating_add(self.span_ms)
            })
            .collect();
        spans.sort_unstable_by_key(|s| std::cmp::Reverse(s.start));
        spans
    }

    /// False: the id was never evicted (within the retention). True: it may have been.
    #[cfg(test)]
    fn may_contain(&self, user_id: &str, gift_id: &str, now_ms: u64) -> bool {
        !self.spans_containing(user_id, gift_id, now_ms).is_empty()
    }

    /// Bytes allocated for the filter now (stages are allocated when first used).
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.slots
            .read()
            .iter()
            .flatten()
            .flat_map(|g| &g.stages)
            .map(Stage::bytes)
            .sum()
    }

    /// Stages allocated now, all generations together.
    #[cfg(test)]
    fn stages(&self) -> usize {
        self.slots
            .read()
            .iter()
            .flatten()
            .map(|g| g.stages.len())
            .sum()
    }
}

impl Generation {
    fn growth_bytes(&self) -> usize {
        self.stages[1..].iter().map(Stage::bytes).sum()
    }
}

/// A durable gift whose id is resident, in the order the journal made them durable. It shares
/// the record's ids (the sender's id and the gift id, which the wallet's map holds too), not
/// the record, so that the record is freed when its completion ends, not later.
pub(crate) struct Resident {
    /// 0: stored already (restored from the store at start).
    pub lsn: Lsn,
    pub ts_ms: u64,
    user_id: Arc<str>,
    gift_id: Arc<str>,
}

impl Resident {
    pub(crate) fn new(lsn: Lsn, gift: &GiftRecord) -> Resident {
        Resident {
            lsn,
            ts_ms: gift.ts_ms,
            user_id: gift.user_id.clone(),
            gift_id: gift.gift_id.clone(),
        }
    }

    /// (user_id, gift_id).
    pub(crate) fn ids(&self) -> (&str, &str) {
        (&self.user_id, &self.gift_id)
    }
}

/// The queue of resident ids, oldest first.
#[derive(Default)]
pub(crate) struct ResidentQueue {
    queue: Mutex<VecDeque<Resident>>,
}

impl ResidentQueue {
    pub(crate) fn push(&self, resident: Resident) {
        self.queue.lock().push_back(resident);
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.lock().len()
    }

    /// The oldest resident if it may be evicted now: stored (`lsn <= stored_lsn`) and either
    /// older than `resident_ms` or beyond `resident_max`.
    pub(crate) fn pop_evictable(
        &self,
        cfg: &IdempotencyConfig,
        stored_lsn: Lsn,
        now_ms: u64,
    ) -> Option<Resident> {
        let mut queue = self.queue.lock();
        let front = queue.front()?;
        let stored = front.lsn <= stored_lsn;
        let old = front.ts_ms.saturating_add(cfg.resident_ms) <= now_ms;
        if stored && (old || queue.len() > cfg.resident_max) {
            queue.pop_front()
        } else {
            None
        }
    }

    /// Puts back a resident that could not be evicted yet (its slot still pending).
    pub(crate) fn push_front(&self, resident: Resident) {
        self.queue.lock().push_front(resident);
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // a list of spans that holds one
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    #[test]
    fn evicted_ids_have_no_false_negatives_and_few_false_positives() {
        let f = EvictedIds::new(1 << 20, 7 * DAY);
        let now = 100 * DAY;
        for i in 0..50_000 {
            f.insert("u", &format!("g{i}"), now - (i % 5) * DAY, now);
        }
        for i in 0..50_000 {
            assert!(f.may_contain("u", &format!("g{i}"), now), "g{i} forgotten");
        }
        let false_positives = (0..50_000)
            .filter(|i| f.may_contain("u", &format!("other{i}"), now))
            .count();
        // 1 MiB over 8 generations = 1M bits each, 10k ids in each of 5: far below 1%.
        assert!(false_positives < 500, "{false_positives} false positives");
        assert!(
            !f.may_contain("v", "g1", now),
            "the user is part of the key"
        );
    }

    /// An id answers "maybe" in the generation of its gift's time: the spans are those days,
    /// newest first, each one span long and holding its gift's time; the same id made on two
    /// days names both; an id never inserted names none (but for a false positive).
    #[test]
    fn spans_containing_names_the_days_of_the_gifts_time() {
        let f = EvictedIds::new(1 << 20, 7 * DAY);
        let now = 100 * DAY + 7;
        let (three_days_back, five_days_back) = (now - 3 * DAY + 11, now - 5 * DAY - 13);
        f.insert("u", "once", three_days_back, now);
        f.insert("u", "twice", three_days_back, now);
        f.insert("u", "twice", five_days_back, now);
        f.insert("u", "today", now, now);
        assert_eq!(f.spans_containing("u", "once", now), [97 * DAY..98 * DAY]);
        assert_eq!(
            f.spans_containing("u", "twice", now),
            [97 * DAY..98 * DAY, 94 * DAY..95 * DAY],
            "newest first"
        );
        assert_eq!(
            f.spans_containing("u", "today", now),
            [100 * DAY..101 * DAY]
        );
        assert!(f.spans_containing("u", "never", now).is_empty());
        assert!(f.spans_containing("v", "once", now).is_empty());
        for (id, ts) in [("once", three_days_back), ("today", now)] {
            assert!(f.spans_containing("u", id, now)[0].contains(&ts));
        }
    }

    #[test]
    fn ids_are_kept_for_the_retention_and_dropped_after_it() {
        let f = EvictedIds::new(1 << 16, 7 * DAY);
        let made = 100 * DAY + 5;
        f.insert("u", "old", made, made);
        // Recognised for the whole retention, whatever newer generations begin meanwhile.
        for day in 0..7 {
            let now = made + day * DAY;
            f.insert("u", &format!("day{day}"), now, now);
            assert!(f.may_contain("u", "old", now), "forgotten after {day} days");
        }
        // Past the retention by a whole generation: its slot is reused, the id is gone.
        let later = made + 8 * DAY;
        f.insert("u", "new", later, later);
        assert!(!f.may_contain("u", "old", later));
        assert!(f.may_contain("u", "new", later));
        // An id already older than the retention is not kept at all.
        f.insert("u", "ancient", later - 9 * DAY, later);
        assert!(!f.may_contain("u", "ancient", later));
    }

    /// `remembered_since_ms` is exactly where the filter's memory begins, the window a store
    /// lookup after a "maybe" must cover: every id of a gift made at it or later (and inserted
    /// then) is still answered "maybe", and none made before it is, at any time of the day.
    #[test]
    fn the_filter_remembers_exactly_the_gifts_since_remembered_since_ms() {
        let span = (7 * DAY).div_ceil(GENERATIONS - 1);
        for now in [
            100 * DAY,
            100 * DAY + 1,
            100 * DAY + span / 2,
            101 * DAY - 1,
        ] {
            let f = EvictedIds::new(1 << 20, 7 * DAY);
            let since = f.remembered_since_ms(now);
            assert!(since <= now - 7 * DAY, "at least the retention");
            assert!(now - since <= 7 * DAY + span, "at most a span more");
            // Ids made around the boundary, each evicted the moment it was made or later.
            for offset in 0..6u64 {
                for ts in [since + offset, since - 1 - offset] {
                    f.insert("u", &format!("at{ts}"), ts, ts.max(since));
                }
            }
            for offset in 0..6u64 {
                let (inside, before) = (since + offset, since - 1 - offset);
                assert!(
                    f.may_contain("u", &format!("at{inside}"), now),
                    "{inside} forgotten"
                );
                assert!(
                    !f.may_contain("u", &format!("at{before}"), now),
                    "{before} kept"
                );
            }
        }
    }

    #[test]
    fn the_filter_memory_is_bounded_and_allocated_as_used() {
        let bytes = 1 << 16;
        let f = EvictedIds::new(bytes, 7 * DAY);
        assert_eq!(f.allocated_bytes(), 0, "an idle server allocates nothing");
        let mut now = 100 * DAY;
        for _ in 0..30 {
            f.insert("u", "g", now, now);
            now += DAY;
        }
        // One small first stage per live generation, a quarter of the budget in all.
        assert_eq!(f.stages(), IDEMPOTENCY_FILTER_GENERATIONS);
        assert_eq!(f.allocated_bytes(), bytes / 4);
    }

    #[test]
    fn the_default_first_stage_is_a_million_ids_and_stages_stop_doubling_at_their_largest() {
        let f = EvictedIds::new(IDEMPOTENCY_FILTER_BYTES_DEFAULT, 7 * DAY);
        let now = 100 * DAY;
        f.insert("u", "g", now, now);
        assert_eq!(
            f.allocated_bytes(),
            (1 << 20) * 20 / 8,
            "2.5 MiB: 1M ids at 20 bits"
        );
        // The same rule at a small scale: first stages of 8 KiB (3,276 ids), at most 32 KiB.
        let f = EvictedIds::with_stages(1 << 20, 7 * DAY, 8 << 10, 32 << 10);
        let mut sizes = Vec::new();
        for id in ids("g", 100_000) {
            f.insert("u", &id, now, now);
            let stages = f.slots.read()[EvictedIds::slot_of(now / f.span_ms)]
                .as_ref()
                .map(|g| g.stages.iter().map(|s| s.bytes() >> 10).collect::<Vec<_>>())
                .unwrap();
            if stages.len() > sizes.len() {
                sizes = stages;
            }
        }
        assert_eq!(
            sizes[..5],
            [8, 16, 32, 32, 32],
            "doubling up to the largest, then more of it"
        );
        assert!(sizes[2..].iter().all(|&k| k == 32));
        let forgotten = count_forgotten(&f, "g", 100_000, now);
        assert_eq!(forgotten, 0);
    }

    /// Ids and others, distinct by construction.
    fn ids(prefix: &str, n: usize) -> impl Iterator<Item = String> + '_ {
        (0..n).map(move |i| format!("{prefix}{i}"))
    }

    /// Inserts `ids(prefix, n)` of user `u` made at `now`.
    fn insert_all(f: &EvictedIds, prefix: &str, n: usize, now: u64) {
        for id in ids(prefix, n) {
            f.insert("u", &id, now, now);
        }
    }

    /// How many of `ids(prefix, n)` the filter says it never saw (a false negative each).
    fn count_forgotten(f: &EvictedIds, prefix: &str, n: usize, now: u64) -> usize {
        ids(prefix, n)
            .filter(|id| !f.may_contain("u", id, now))
            .count()
    }

    #[test]
    fn a_busy_day_grows_in_stages_and_keeps_every_id() {
        // 4 MiB: first stages of 128 KiB (52,428 ids), then 256 KiB, 512 KiB, 1 MiB...
        let bytes = 4 << 20;
        let f = EvictedIds::new(bytes, 7 * DAY);
        let now = 100 * DAY;
        let n = 600_000;
        insert_all(&f, "g", n, now);
        // 52,428 + 104,857 + 209,715 + 419,430 ids: the fourth stage holds the last of them.
        assert_eq!(f.stages(), 4);
        assert_eq!(f.allocated_bytes(), (128 + 256 + 512 + 1024) << 10);
        assert!(f.allocated_bytes() <= bytes);
        let forgotten = count_forgotten(&f, "g", n, now);
        assert_eq!(forgotten, 0, "a Bloom filter has no false negatives");
        // Every stage within its size: ~0.01% each (the rates add up over the stages).
        let others = 400_000;
        let false_positives = ids("other", others)
            .filter(|id| f.may_contain("u", id, now))
            .count();
        assert!(
            false_positives * 1000 < others,
            "{false_positives} false positives in {others} (0.1% at most)"
        );
    }

    #[test]
    fn at_its_budget_the_filter_keeps_every_id_and_grows_again_when_a_day_leaves() {
        // 1 MiB: first stages of 32 KiB (a quarter of it for the 8), and 768 KiB to grow in:
        // stages of 64, 128, 256 KiB, then the 320 KiB left.
        let bytes = 1 << 20;
        let f = EvictedIds::new(bytes, 7 * DAY);
        let day0 = 100 * DAY;
        let n = 1_000_000;
        insert_all(&f, "g", n, day0);
        assert_eq!(f.stages(), 5, "32 + 64 + 128 + 256 + 320 KiB");
        assert_eq!(f.allocated_bytes(), (32 + 64 + 128 + 256 + 320) << 10);
        // Past its budget the last stage takes the rest: more false positives, none missing.
        let forgotten = count_forgotten(&f, "g", n, day0);
        assert_eq!(forgotten, 0, "nothing forgotten at the budget");
        // Another day still gets its own first stage (the budget keeps one for each).
        let day1 = day0 + DAY;
        f.insert("u", "next-day", day1, day1);
        assert_eq!(f.allocated_bytes(), (32 + 32 + 64 + 128 + 256 + 320) << 10);
        assert!(f.may_contain("u", "g0", day1) && f.may_contain("u", "next-day", day1));
        // Once day 0 is past the retention its slot and its growth are free again: a new busy
        // day grows in stages as before.
        let later = day0 + 8 * DAY;
        insert_all(&f, "h", 150_000, later);
        assert_eq!(
            f.stages(),
            1 + 4,
            "day 1's one stage, then 32 + 64 + 128 + 256 KiB"
        );
        assert_eq!(f.allocated_bytes(), (32 + 32 + 64 + 128 + 256) << 10);
        let day0_kept = ids("g", 10_000)
            .filter(|id| f.may_contain("u", id, later))
            .count();
        assert!(
            day0_kept < 100,
            "day 0 is past the retention: {day0_kept} of 10,000 still seen"
        );
        let forgotten = count_forgotten(&f, "h", 150_000, later);
        assert_eq!(forgotten, 0);
        assert!(f.allocated_bytes() <= bytes);
    }
}

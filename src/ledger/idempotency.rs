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
//! them covering `IDEMPOTENCY_RETENTION_MS`: the oldest is cleared when a new one begins, so the
//! memory is fixed (`filter_bytes`, allocated one generation at a time as it is first used) and
//! an id is recognised for at least the retention, as after a restart.

use crate::limits::{
    IDEMPOTENCY_FILTER_BYTES_DEFAULT, IDEMPOTENCY_FILTER_GENERATIONS,
    IDEMPOTENCY_RESIDENT_MAX_DEFAULT, IDEMPOTENCY_RESIDENT_MS_DEFAULT, IDEMPOTENCY_RETENTION_MS,
};
use crate::record::{GiftRecord, Lsn};
use fastbloom::AtomicBloomFilter;
use parking_lot::{Mutex, RwLock};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;

/// The generation count as a number of spans.
const GENERATIONS: u64 = IDEMPOTENCY_FILTER_GENERATIONS as u64;

/// Bits per expected id in a generation: ~1% false positives while a generation holds fewer
/// than its bits / 10 ids; more ids raise the rate (more store lookups), never a wrong answer.
const FILTER_BITS_PER_ID: usize = 10;

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
    /// Memory of the evicted-id filter, all generations together.
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

/// Ids evicted from the wallets' maps, by generation of the gift's time.
pub(crate) struct EvictedIds {
    /// `IDEMPOTENCY_FILTER_GENERATIONS` slots; generation `g` (gift time / span) lives in slot
    /// `g % IDEMPOTENCY_FILTER_GENERATIONS`.
    slots: RwLock<Vec<Option<Generation>>>,
    span_ms: u64,
    bits_per_generation: usize,
    /// An id is hashed once, with this (randomly seeded) hasher, and that hash goes to every
    /// generation's filter: a lookup checks up to `IDEMPOTENCY_FILTER_GENERATIONS` filters, and
    /// each filter's own hasher (SipHash) would hash the id again for each.
    hasher: foldhash::fast::RandomState,
}

struct Generation {
    number: u64,
    filter: AtomicBloomFilter,
}

impl EvictedIds {
    pub(crate) fn new(filter_bytes: usize, retention_ms: u64) -> EvictedIds {
        // `GENERATIONS - 1` whole spans cover the retention; the extra one is the current.
        let span_ms = retention_ms.div_ceil(GENERATIONS - 1).max(1);
        let bits_per_generation = (filter_bytes * 8 / IDEMPOTENCY_FILTER_GENERATIONS).max(64);
        EvictedIds {
            slots: RwLock::new((0..IDEMPOTENCY_FILTER_GENERATIONS).map(|_| None).collect()),
            span_ms,
            bits_per_generation,
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
                if g.number == number {
                    g.filter.insert_hash(key);
                    return;
                }
                if g.number > number {
                    // The slot already holds a newer generation: this id is past the retention.
                    return;
                }
            }
        }
        let mut slots = self.slots.write();
        let slot = &mut slots[Self::slot_of(number)];
        match slot {
            Some(g) if g.number == number => {}
            Some(g) if g.number > number => return,
            Some(g) => {
                g.filter.clear();
                g.number = number;
            }
            None => {
                *slot = Some(Generation {
                    number,
                    filter: AtomicBloomFilter::with_num_bits(self.bits_per_generation)
                        .expected_items(self.bits_per_generation / FILTER_BITS_PER_ID),
                });
            }
        }
        slot.as_ref().expect("just filled").filter.insert_hash(key);
    }

    /// False: the id was never evicted (within the retention). True: it may have been.
    pub(crate) fn may_contain(&self, user_id: &str, gift_id: &str, now_ms: u64) -> bool {
        let oldest = self.oldest_live(now_ms);
        let key = self.hash(user_id, gift_id);
        self.slots
            .read()
            .iter()
            .flatten()
            .any(|g| g.number >= oldest && g.filter.contains_hash(key))
    }

    /// Bytes allocated for the filter now (generations are allocated when first used).
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.slots.read().iter().flatten().count() * self.bits_per_generation / 8
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

    #[test]
    fn the_filter_memory_is_fixed_and_allocated_as_used() {
        let bytes = 1 << 16;
        let f = EvictedIds::new(bytes, 7 * DAY);
        assert_eq!(f.allocated_bytes(), 0, "an idle server allocates nothing");
        let mut now = 100 * DAY;
        for _ in 0..30 {
            f.insert("u", "g", now, now);
            now += DAY;
        }
        assert_eq!(f.allocated_bytes(), bytes, "never more than the setting");
    }
}

//! `--daily-cap`: coins one viewer may spend on gifts per UTC day. Checked in the app before the
//! ledger's debit; the day's totals live in memory and are rebuilt at start from the gifts that
//! recovery restored (storage and journal), so a restart does not reset them.

use crate::limits::DAY_MS;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Coins reserved for one gift: released if the gift is not debited after all. `Clone` so the
/// gift's completion can hold a copy while the caller keeps the original for a refusal; exactly
/// one of the two is ever released.
#[derive(Debug, Clone)]
pub struct Reservation {
    day: u64,
    amount: u64,
}

pub struct DailySpend {
    /// Coins per user per UTC day; 0 = no cap (nothing is tracked).
    cap: u64,
    /// The UTC day (ms / `DAY_MS`) the totals are for.
    day: AtomicU64,
    /// User → coins spent today (debited or reserved for a gift in progress).
    spent: DashMap<String, u64>,
}

impl DailySpend {
    pub fn new(cap: u64) -> DailySpend {
        DailySpend::starting(cap, crate::now_ms())
    }

    fn starting(cap: u64, now_ms: u64) -> DailySpend {
        DailySpend {
            cap,
            day: AtomicU64::new(now_ms / DAY_MS),
            spent: DashMap::new(),
        }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// A new UTC day starts from zero: yesterday's totals are dropped.
    fn roll(&self, now_ms: u64) -> u64 {
        let today = now_ms / DAY_MS;
        let known = self.day.load(Ordering::SeqCst);
        if today > known
            && self
                .day
                .compare_exchange(known, today, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.spent.clear();
        }
        today
    }

    /// Whether there is a cap at all (`--daily-cap` > 0): without one a reservation is empty.
    pub fn capped(&self) -> bool {
        self.cap > 0
    }

    /// Reserves `amount` of `user_id`'s allowance for today, or refuses (`Err` carries what it
    /// spent today). Atomic per user: concurrent gifts of one user never pass the cap together.
    pub fn reserve(&self, user_id: &str, amount: u64, now_ms: u64) -> Result<Reservation, u64> {
        let day = self.roll(now_ms);
        if self.cap == 0 {
            return Ok(Reservation { day, amount: 0 });
        }
        let mut spent = self.spent.entry(user_id.to_string()).or_insert(0);
        match spent.checked_add(amount).filter(|total| *total <= self.cap) {
            Some(total) => {
                *spent = total;
                Ok(Reservation { day, amount })
            }
            None => Err(*spent),
        }
    }

    /// Gives a reservation back (the gift was refused, was a retry, or could not be made durable).
    pub fn release(&self, user_id: &str, r: Reservation) {
        if r.amount == 0 || self.day.load(Ordering::SeqCst) != r.day {
            return;
        }
        if let Some(mut spent) = self.spent.get_mut(user_id) {
            *spent = spent.saturating_sub(r.amount);
        }
    }

    /// A gift restored at start: counted if it was made today (UTC).
    pub fn restore(&self, user_id: &str, amount: u64, ts_ms: u64, now_ms: u64) {
        if self.cap == 0 || ts_ms / DAY_MS != self.roll(now_ms) {
            return;
        }
        let mut spent = self.spent.entry(user_id.to_string()).or_insert(0);
        *spent = spent.saturating_add(amount);
    }

    pub fn spent_today(&self, user_id: &str) -> u64 {
        self.spent.get(user_id).map(|s| *s).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON: u64 = 20_000 * DAY_MS + DAY_MS / 2;

    #[test]
    fn the_cap_edge_and_release() {
        let d = DailySpend::starting(100, NOON);
        let _a = d.reserve("u", 60, NOON).unwrap();
        assert!(d.reserve("u", 41, NOON).is_err(), "one over the cap");
        let b = d.reserve("u", 40, NOON).unwrap();
        assert_eq!(d.spent_today("u"), 100, "exactly the cap passes");
        assert_eq!(d.reserve("u", 1, NOON).unwrap_err(), 100);
        assert!(d.reserve("v", 100, NOON).is_ok(), "per user");
        d.release("u", b);
        assert_eq!(d.spent_today("u"), 60);
        assert!(d.reserve("u", u64::MAX, NOON).is_err(), "no overflow");
    }

    #[test]
    fn a_new_utc_day_starts_from_zero_and_restore_counts_only_today() {
        let d = DailySpend::starting(100, NOON);
        d.restore("u", 70, NOON - 1000, NOON);
        d.restore("u", 50, NOON - DAY_MS, NOON);
        assert_eq!(d.spent_today("u"), 70);
        assert!(d.reserve("u", 31, NOON).is_err());
        assert!(d.reserve("u", 30, NOON + DAY_MS).is_ok(), "next day");
        assert_eq!(d.spent_today("u"), 30);
    }

    #[test]
    fn zero_is_off() {
        let d = DailySpend::starting(0, NOON);
        assert!(d.reserve("u", u64::MAX, NOON).is_ok());
        assert_eq!(d.spent_today("u"), 0);
    }
}

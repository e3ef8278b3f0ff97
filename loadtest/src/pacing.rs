//! Open-loop rate pacing: how many sends are due by a given instant at a given rate.

use std::time::{Duration, Instant};

/// Issues sends at `rate` per second from `start`, without drift: the n-th send is due at
/// `start + n / rate`. When the caller falls behind, the backlog is handed out in chunks of at
/// most `max_burst` per call, so it catches up without one huge burst.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    start: Instant,
    issued: u64,
    max_burst: u64,
}

impl Pacer {
    pub fn new(rate: f64, start: Instant, max_burst: u64) -> Self {
        Pacer {
            rate: rate.max(0.0),
            start,
            issued: 0,
            max_burst: max_burst.max(1),
        }
    }
    pub fn rate(&self) -> f64 {
        self.rate
    }
    /// Change the rate from `now` on (the count restarts).
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.rate = rate.max(0.0);
        self.start = now;
        self.issued = 0;
    }
    /// Sends due by `now` that were not handed out yet (at most `max_burst`).
    pub fn due(&mut self, now: Instant) -> u64 {
        if self.rate <= 0.0 || now < self.start {
            return 0;
        }
        let should = ((now - self.start).as_secs_f64() * self.rate).floor() as u64;
        let n = should.saturating_sub(self.issued).min(self.max_burst);
        self.issued += n;
        n
    }
    /// Sends due by `now` not handed out yet, uncapped (the backlog).
    pub fn backlog(&self, now: Instant) -> u64 {
        if self.rate <= 0.0 || now < self.start {
            return 0;
        }
        (((now - self.start).as_secs_f64() * self.rate).floor() as u64).saturating_sub(self.issued)
    }
    /// When the next send falls due (None at rate 0).
    pub fn next_due(&self) -> Option<Instant> {
        if self.rate <= 0.0 {
            return None;
        }
        Some(self.start + Duration::from_secs_f64((self.issued + 1) as f64 / self.rate))
    }
}

/// Split `total` into `parts` shares that differ by at most one; share `i`.
pub fn share(total: usize, parts: usize, i: usize) -> usize {
    let parts = parts.max(1);
    total / parts + usize::from(i < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_exactly_over_time() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000.0, t0, 1_000_000);
        assert_eq!(p.due(t0), 0);
        assert_eq!(p.due(t0 + Duration::from_millis(10)), 10);
        assert_eq!(p.due(t0 + Duration::from_millis(10)), 0);
        assert_eq!(p.due(t0 + Duration::from_millis(1000)), 990);
        let next = p.next_due().unwrap();
        assert!(
            next > t0 + Duration::from_millis(1000)
                && next <= t0 + Duration::from_micros(1_001_001)
        );
    }

    #[test]
    fn burst_cap_catches_up() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100.0, t0, 30);
        let t = t0 + Duration::from_secs(1);
        assert_eq!(p.backlog(t), 100);
        assert_eq!(p.due(t), 30);
        assert_eq!(p.due(t), 30);
        assert_eq!(p.due(t), 30);
        assert_eq!(p.due(t), 10);
        assert_eq!(p.due(t), 0);
    }

    #[test]
    fn zero_rate_and_rate_change() {
        let t0 = Instant::now();
        let mut p = Pacer::new(0.0, t0, 10);
        assert_eq!(p.due(t0 + Duration::from_secs(5)), 0);
        assert!(p.next_due().is_none());
        let t1 = t0 + Duration::from_secs(5);
        p.set_rate(10.0, t1);
        assert_eq!(p.due(t1 + Duration::from_millis(500)), 5);
        assert!((p.rate() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn shares_sum_up() {
        for total in [0usize, 1, 7, 100, 1001] {
            for parts in 1..6 {
                let s: usize = (0..parts).map(|i| share(total, parts, i)).sum();
                assert_eq!(s, total);
            }
        }
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 2), 3);
    }
}

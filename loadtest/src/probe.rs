//! How fast this machine's CPU is right now: a fixed single-threaded loop, timed. On a shared or
//! virtual machine the same work can take tens of percent longer from one minute to the next
//! (measured here: 328-523 ms for one loop within five minutes, docs/benchmarks.md "Gifts through
//! WebSockets, session 11"), so every report carries the probe taken before and after its run:
//! two runs compare fairly only when their probes are close.

use std::hint::black_box;
use std::time::Instant;

/// Iterations of the probe loop: some tens of ms in a release build here, small beside a run.
pub const PROBE_ITERATIONS: u64 = 20_000_000;

/// Milliseconds one thread takes for [`PROBE_ITERATIONS`] rounds of a xorshift step (no
/// memory traffic, no allocation, nothing the compiler can fold away).
pub fn cpu_probe_ms() -> f64 {
    let t0 = Instant::now();
    let mut x: u64 = black_box(0x9e37_79b9_7f4a_7c15);
    for _ in 0..black_box(PROBE_ITERATIONS) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    black_box(x);
    t0.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_takes_measurable_time() {
        let ms = cpu_probe_ms();
        assert!(ms > 0.5, "{ms} ms: the loop was optimised away");
        assert!(ms < 10_000.0, "{ms} ms");
    }
}

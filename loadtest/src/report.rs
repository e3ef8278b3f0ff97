//! The report: what one worker process measured, how reports of several processes merge, and
//! how the final one is summarised and printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::ProcSample;
use crate::stats::{summarize, HistData, LatencySummary};

/// One timeline interval.
#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct Sample {
    /// `connect`, `run` or `drain`.
    pub phase: String,
    /// Load step (index into the rate list) during `run`.
    pub step: usize,
    /// End of the interval, seconds from the start of the run phase (negative while connecting).
    pub t_secs: f64,
    /// Length of the interval in seconds.
    pub secs: f64,
    /// Open connections at the end of the interval.
    pub open: i64,
    /// Counter increments during the interval.
    pub counters: BTreeMap<String, u64>,
    /// Errors during the interval.
    pub errors: u64,
    /// Latency percentiles of the interval.
    #[serde(default)]
    pub latency_ms: BTreeMap<String, LatencySummary>,
    /// Server RSS at the end of the interval, when sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_rss_bytes: Option<u64>,
    /// Raw histograms (for merging across processes; dropped from the final report).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub raw: BTreeMap<String, HistData>,
}

impl Sample {
    pub fn rate(&self, counter: &str) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        *self.counters.get(counter).unwrap_or(&0) as f64 / self.secs
    }
}

/// Money as one worker saw it.
#[derive(Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
pub struct MoneyTally {
    /// Value (coins) of the gifts acknowledged with gift_ok, per stream.
    pub acked_by_stream: BTreeMap<String, u64>,
    /// Value of gifts sent that never got an answer (outcome unknown), per stream.
    pub unknown_by_stream: BTreeMap<String, u64>,
    pub acked_gifts: u64,
    pub rejected_gifts: u64,
    /// Retries of acknowledged gift_ids answered differently (must be 0).
    pub retry_mismatches: u64,
    /// Wallets whose final balance was checked through /api/me.
    pub wallets_checked: u64,
    /// Wallets whose final balance differs from start − acknowledged spend.
    pub wallet_mismatches: u64,
    /// Balances below zero seen anywhere (gift_ok, /api/me).
    pub negative_balances: u64,
    /// First few problems, in words.
    pub details: Vec<String>,
}

impl MoneyTally {
    pub fn merge(&mut self, o: &MoneyTally) {
        for (k, v) in &o.acked_by_stream {
            *self.acked_by_stream.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.unknown_by_stream {
            *self.unknown_by_stream.entry(k.clone()).or_default() += v;
        }
        self.acked_gifts += o.acked_gifts;
        self.rejected_gifts += o.rejected_gifts;
        self.retry_mismatches += o.retry_mismatches;
        self.wallets_checked += o.wallets_checked;
        self.wallet_mismatches += o.wallet_mismatches;
        self.negative_balances += o.negative_balances;
        for d in &o.details {
            if self.details.len() < 20 {
                self.details.push(d.clone());
            }
        }
    }
    pub fn acked_total(&self) -> u64 {
        self.acked_by_stream.values().sum()
    }
}

#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct StreamMoney {
    pub stream: String,
    pub acked_coins: u64,
    pub unknown_coins: u64,
    pub gross_before: i64,
    pub gross_after: i64,
    pub split_exact: bool,
}

/// The money check of a gift scenario.
#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct MoneyReport {
    pub ok: bool,
    pub failures: Vec<String>,
    pub skipped: Vec<String>,
    pub acked_coins: u64,
    pub streams: Vec<StreamMoney>,
    pub audit: Option<Value>,
    pub tally: MoneyTally,
}

#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct ServerStats {
    /// `proc` (--server-pid), `metrics` (/metrics) or `none`.
    pub source: String,
    pub before_connect: ProcSample,
    pub connected: ProcSample,
    pub end: ProcSample,
    /// (RSS connected − RSS before) / connections, bytes.
    pub rss_per_conn_bytes: Option<f64>,
    /// Server CPU seconds during the run phase.
    pub cpu_secs_run: Option<f64>,
    /// Server CPU time per delivered event during the run phase, µs.
    pub cpu_us_per_delivery: Option<f64>,
    /// Server CPU time per acknowledged gift during the run phase, µs (the `gifts` scenario, or
    /// any run that sent no chat): what sizes a node for a gift rate.
    #[serde(default)]
    pub cpu_us_per_gift: Option<f64>,
    /// Server RSS over time: (seconds since run start, bytes).
    pub rss_timeline: Vec<(f64, u64)>,
}

#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct Connections {
    /// Long-lived clients the scenario asked for.
    pub target: u64,
    /// Of those, joined at least once.
    pub joined: u64,
    pub failed: u64,
    pub peak_open: i64,
}

#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct StepReport {
    pub step: usize,
    pub target: String,
    pub secs: f64,
    pub rates: BTreeMap<String, f64>,
    pub latency_ms: BTreeMap<String, LatencySummary>,
}

#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct DriftWindow {
    pub from_secs: f64,
    pub to_secs: f64,
    pub deliveries_per_sec: f64,
    pub chat_p99_ms: f64,
    pub gift_ack_p99_ms: f64,
    pub server_rss_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Default, Debug)]
pub struct Report {
    pub scenario: String,
    pub run_id: String,
    pub url: String,
    pub procs: usize,
    pub started_unix_ms: u64,
    /// The scenario's parameters.
    pub params: Value,
    /// Seconds of the measured (run) phase.
    pub duration_secs: f64,
    pub connections: Connections,
    pub counters: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// Per second over the run phase.
    pub rates: BTreeMap<String, f64>,
    pub latency_ms: BTreeMap<String, LatencySummary>,
    pub steps: Vec<StepReport>,
    pub timeline: Vec<Sample>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub money_tally: Option<MoneyTally>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub money: Option<MoneyReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerStats>,
    /// Runtime worker threads of each harness process (`--threads`; 0 = one per core).
    #[serde(default)]
    pub client_threads: usize,
    /// The machine's speed before and after the run: ms for a fixed loop on one thread
    /// (`probe::cpu_probe_ms`; lower is faster). Compare runs only with close probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_probe_ms: Option<[f64; 2]>,
    /// The harness's own CPU seconds and peak RSS (summed over processes).
    pub client_cpu_secs: f64,
    pub client_rss_bytes: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<DriftWindow>,
    /// Chat events received / (chats sent × members of the sender's room), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_ratio: Option<f64>,
    pub notes: Vec<String>,
}

impl Report {
    /// Merge worker reports (same scenario, run at the same time in several processes).
    pub fn merge(parts: &[Report]) -> Report {
        let mut out = parts.first().cloned().unwrap_or_default();
        out.timeline.clear();
        out.counters.clear();
        out.errors.clear();
        out.connections = Connections::default();
        out.money_tally = None;
        out.client_cpu_secs = 0.0;
        out.client_rss_bytes = 0;
        out.notes.clear();
        // Align timelines by (phase, ordinal within phase).
        let mut buckets: Vec<((String, usize), Vec<&Sample>)> = Vec::new();
        for p in parts {
            let mut ord: BTreeMap<&str, usize> = BTreeMap::new();
            for s in &p.timeline {
                let o = ord.entry(s.phase.as_str()).or_default();
                let key = (s.phase.clone(), *o);
                *o += 1;
                match buckets.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(s),
                    None => buckets.push((key, vec![s])),
                }
            }
        }
        let phase_rank = |p: &str| match p {
            "connect" => 0,
            "run" => 1,
            _ => 2,
        };
        buckets.sort_by_key(|((p, o), _)| (phase_rank(p), *o));
        for (_, group) in buckets {
            let mut m = group[0].clone();
            m.counters.clear();
            m.raw.clear();
            m.errors = 0;
            m.open = 0;
            m.secs = group.iter().map(|s| s.secs).fold(0.0, f64::max);
            let mut raws: BTreeMap<String, Vec<&HistData>> = BTreeMap::new();
            for s in &group {
                for (k, v) in &s.counters {
                    *m.counters.entry(k.clone()).or_default() += v;
                }
                m.errors += s.errors;
                m.open += s.open;
                for (k, h) in &s.raw {
                    raws.entry(k.clone()).or_default().push(h);
                }
            }
            m.raw = raws
                .into_iter()
                .map(|(k, v)| (k, HistData::merge(v)))
                .collect();
            out.timeline.push(m);
        }
        for p in parts {
            for (k, v) in &p.counters {
                *out.counters.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &p.errors {
                *out.errors.entry(k.clone()).or_default() += v;
            }
            out.connections.target += p.connections.target;
            out.connections.joined += p.connections.joined;
            out.connections.failed += p.connections.failed;
            out.connections.peak_open += p.connections.peak_open;
            if let Some(t) = &p.money_tally {
                out.money_tally
                    .get_or_insert_with(MoneyTally::default)
                    .merge(t);
            }
            out.client_threads = out.client_threads.max(p.client_threads);
            out.client_cpu_secs += p.client_cpu_secs;
            out.client_rss_bytes += p.client_rss_bytes;
            for n in &p.notes {
                if !out.notes.contains(n) {
                    out.notes.push(n.clone());
                }
            }
        }
        out.procs = parts.len();
        out
    }

    /// Compute rates, latency summaries and steps from the timeline.
    pub fn finalize(&mut self, step_targets: &[String], keep_raw: bool) {
        let mut totals: BTreeMap<String, Vec<&HistData>> = BTreeMap::new();
        for s in &self.timeline {
            for (k, h) in &s.raw {
                totals.entry(k.clone()).or_default().push(h);
            }
        }
        self.latency_ms = totals
            .into_iter()
            .map(|(k, v)| (k, summarize(&HistData::merge(v).to_hist())))
            .filter(|(_, s)| s.count > 0)
            .collect();
        let run: Vec<&Sample> = self.timeline.iter().filter(|s| s.phase == "run").collect();
        self.duration_secs = run.iter().map(|s| s.secs).sum();
        self.rates = rates_of(&run);
        self.steps.clear();
        let nsteps = run.iter().map(|s| s.step + 1).max().unwrap_or(0);
        for step in 0..nsteps {
            let ss: Vec<&Sample> = run.iter().copied().filter(|s| s.step == step).collect();
            let mut raws: BTreeMap<String, Vec<&HistData>> = BTreeMap::new();
            for s in &ss {
                for (k, h) in &s.raw {
                    raws.entry(k.clone()).or_default().push(h);
                }
            }
            self.steps.push(StepReport {
                step,
                target: step_targets.get(step).cloned().unwrap_or_default(),
                secs: ss.iter().map(|s| s.secs).sum(),
                rates: rates_of(&ss),
                latency_ms: raws
                    .into_iter()
                    .map(|(k, v)| (k, summarize(&HistData::merge(v).to_hist())))
                    .filter(|(_, s)| s.count > 0)
                    .collect(),
            });
        }
        for s in &mut self.timeline {
            s.latency_ms = s
                .raw
                .iter()
                .map(|(k, h)| (k.clone(), summarize(&h.to_hist())))
                .collect();
            if !keep_raw {
                s.raw.clear();
            }
        }
        self.connections.peak_open = self
            .connections
            .peak_open
            .max(self.timeline.iter().map(|s| s.open).max().unwrap_or(0));
    }

    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "== loadtest {} (run {}, {} proc{} × {} thread{}) against {}",
            self.scenario,
            self.run_id,
            self.procs,
            if self.procs == 1 { "" } else { "s" },
            self.client_threads,
            if self.client_threads == 1 { "" } else { "s" },
            self.url
        );
        let _ = writeln!(
            o,
            "connections: {} target, {} joined, {} failed, peak open {}; measured {:.1}s",
            self.connections.target,
            self.connections.joined,
            self.connections.failed,
            self.connections.peak_open,
            self.duration_secs
        );
        let _ = writeln!(o, "throughput (per second, run phase):");
        for (k, v) in &self.rates {
            let _ = writeln!(o, "  {k:<24} {}", human(*v));
        }
        let _ = writeln!(
            o,
            "latency (ms)               count      p50      p90      p99    p99.9      max"
        );
        for (k, s) in &self.latency_ms {
            let _ = writeln!(
                o,
                "  {k:<20} {:>10} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
            );
        }
        if self.steps.len() > 1 {
            let _ = writeln!(o, "load steps:");
            for st in &self.steps {
                let mut line = format!("  step {} [{}]:", st.step, st.target);
                for (k, label) in [
                    ("deliveries", "deliveries/s"),
                    ("chats_sent", "sent/s"),
                    ("shoutouts", "shout-outs/s"),
                    ("gifts_ok", "gift acks/s"),
                    ("joins", "joins/s"),
                ] {
                    let v = *st.rates.get(k).unwrap_or(&0.0);
                    if v > 0.0 {
                        let _ = write!(line, " {label} {}", human(v));
                    }
                }
                for k in ["chat", "gift_ack", "join"] {
                    if let Some(l) = st.latency_ms.get(k) {
                        let _ = write!(
                            line,
                            "; {k} p50 {:.2} p99 {:.2} max {:.2} ms",
                            l.p50_ms, l.p99_ms, l.max_ms
                        );
                    }
                }
                let _ = writeln!(o, "{line}");
            }
        }
        if let Some(r) = self.delivery_ratio {
            let _ = writeln!(
                o,
                "delivery ratio: {:.4} (chat events received / chats sent × room members)",
                r
            );
        }
        let _ = writeln!(o, "counters:");
        for (k, v) in &self.counters {
            let _ = writeln!(o, "  {k:<24} {v}");
        }
        if self.errors.is_empty() {
            let _ = writeln!(o, "errors: none");
        } else {
            let _ = writeln!(o, "errors by code:");
            for (k, v) in &self.errors {
                let _ = writeln!(o, "  {k:<32} {v}");
            }
        }
        if let Some(s) = &self.server {
            let mb = |b: Option<u64>| {
                b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
                    .unwrap_or_else(|| "?".into())
            };
            let _ = writeln!(
                o,
                "server ({}): RSS before {} / connected {} / end {}; per connection {}; CPU in run {}; CPU per delivery {}",
                s.source,
                mb(s.before_connect.rss_bytes),
                mb(s.connected.rss_bytes),
                mb(s.end.rss_bytes),
                s.rss_per_conn_bytes.map(|b| format!("{b:.0} B")).unwrap_or_else(|| "?".into()),
                s.cpu_secs_run.map(|c| format!("{c:.2}s")).unwrap_or_else(|| "?".into()),
                s.cpu_us_per_delivery.map(|c| format!("{c:.3} µs")).unwrap_or_else(|| "?".into()),
            );
            if let Some(c) = s.cpu_us_per_gift {
                let _ = writeln!(o, "server CPU per acknowledged gift: {c:.1} µs");
            }
        }
        let _ = writeln!(
            o,
            "client: CPU {:.2}s, RSS {:.1} MiB",
            self.client_cpu_secs,
            self.client_rss_bytes as f64 / 1048576.0
        );
        if let Some([before, after]) = self.cpu_probe_ms {
            let _ = writeln!(
                o,
                "machine: CPU probe {before:.1} ms before / {after:.1} ms after (a fixed loop on one thread; lower is faster; compare runs with close probes)"
            );
        }
        if !self.drift.is_empty() {
            let _ = writeln!(o, "drift windows:");
            for w in &self.drift {
                let _ = writeln!(
                    o,
                    "  {:>6.0}-{:<6.0}s deliveries/s {:>10} chat p99 {:>8.2} ms gift ack p99 {:>8.2} ms server RSS {}",
                    w.from_secs,
                    w.to_secs,
                    human(w.deliveries_per_sec),
                    w.chat_p99_ms,
                    w.gift_ack_p99_ms,
                    w.server_rss_bytes.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0)).unwrap_or_else(|| "?".into())
                );
            }
        }
        if let Some(m) = &self.money {
            let _ = writeln!(
                o,
                "money: {} — {} gifts acknowledged worth {} coins, {} rejected, {} retries mismatched, {} wallets checked ({} mismatched)",
                if m.ok { "OK" } else { "FAILED" },
                m.tally.acked_gifts,
                m.acked_coins,
                m.tally.rejected_gifts,
                m.tally.retry_mismatches,
                m.tally.wallets_checked,
                m.tally.wallet_mismatches
            );
            let shown = if m.streams.len() > 10 {
                5
            } else {
                m.streams.len()
            };
            if shown < m.streams.len() {
                let exact = m
                    .streams
                    .iter()
                    .filter(|s| {
                        s.unknown_coins == 0
                            && s.gross_after - s.gross_before == s.acked_coins as i64
                    })
                    .count();
                let _ = writeln!(o, "  {} streams, {} with server gross Δ == acknowledged value exactly; the first {shown}:", m.streams.len(), exact);
            }
            for s in m.streams.iter().take(shown) {
                let _ = writeln!(
                    o,
                    "  stream {}: acked {} (+{} unknown) vs server gross {} → {} (Δ {}), split exact: {}",
                    s.stream,
                    s.acked_coins,
                    s.unknown_coins,
                    s.gross_before,
                    s.gross_after,
                    s.gross_after - s.gross_before,
                    s.split_exact
                );
            }
            for f in &m.failures {
                let _ = writeln!(o, "  FAIL: {f}");
            }
            for f in &m.skipped {
                let _ = writeln!(o, "  skipped: {f}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(o, "note: {n}");
        }
        o
    }
}

fn rates_of(samples: &[&Sample]) -> BTreeMap<String, f64> {
    let secs: f64 = samples.iter().map(|s| s.secs).sum();
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for s in samples {
        for (k, v) in &s.counters {
            *sums.entry(k.clone()).or_default() += v;
        }
    }
    sums.into_iter()
        .map(|(k, v)| (k, if secs > 0.0 { v as f64 / secs } else { 0.0 }))
        .collect()
}

pub fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_hist;

    fn sample(phase: &str, step: usize, deliveries: u64, lat_us: &[u64]) -> Sample {
        let mut h = new_hist();
        for v in lat_us {
            h.record(*v).unwrap();
        }
        let mut raw = BTreeMap::new();
        if !lat_us.is_empty() {
            raw.insert("chat".to_string(), HistData::from_hist(&h));
        }
        Sample {
            phase: phase.into(),
            step,
            t_secs: 0.0,
            secs: 1.0,
            open: 10,
            counters: [("deliveries".to_string(), deliveries)]
                .into_iter()
                .collect(),
            errors: 1,
            raw,
            ..Default::default()
        }
    }

    fn worker(deliveries: u64, lat: u64) -> Report {
        Report {
            scenario: "fanout".into(),
            timeline: vec![
                sample("connect", 0, 0, &[]),
                sample("run", 0, deliveries, &[lat; 10]),
                sample("run", 1, deliveries * 2, &[lat * 2; 10]),
                sample("drain", 1, 5, &[]),
            ],
            counters: [("deliveries".to_string(), deliveries * 3 + 5)]
                .into_iter()
                .collect(),
            errors: [("close:4009".to_string(), 2)].into_iter().collect(),
            connections: Connections {
                target: 10,
                joined: 9,
                failed: 1,
                peak_open: 9,
            },
            money_tally: Some(MoneyTally {
                acked_by_stream: [("r0".to_string(), 7)].into_iter().collect(),
                acked_gifts: 7,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn merge_sums_and_aligns_timelines() {
        let mut r = Report::merge(&[worker(100, 1000), worker(300, 3000)]);
        assert_eq!(r.procs, 2);
        assert_eq!(r.timeline.len(), 4);
        assert_eq!(r.timeline[1].phase, "run");
        assert_eq!(r.timeline[1].counters["deliveries"], 400);
        assert_eq!(r.timeline[2].counters["deliveries"], 800);
        assert_eq!(r.timeline[1].open, 20);
        assert_eq!(r.counters["deliveries"], 1210);
        assert_eq!(r.errors["close:4009"], 4);
        assert_eq!(r.connections.target, 20);
        assert_eq!(r.connections.failed, 2);
        let t = r.money_tally.clone().unwrap();
        assert_eq!(t.acked_by_stream["r0"], 14);
        assert_eq!(t.acked_gifts, 14);

        r.finalize(&["1000/s".into(), "2000/s".into()], false);
        assert_eq!(r.duration_secs, 2.0);
        assert_eq!(r.rates["deliveries"], 600.0);
        let chat = &r.latency_ms["chat"];
        assert_eq!(chat.count, 40);
        assert!(chat.max_ms > 5.9 && chat.max_ms < 6.1, "{}", chat.max_ms);
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.steps[1].target, "2000/s");
        assert_eq!(r.steps[1].rates["deliveries"], 800.0);
        assert!((r.steps[0].latency_ms["chat"].p50_ms - 2.0).abs() < 1.01);
        assert!(r.timeline.iter().all(|s| s.raw.is_empty()));
        assert_eq!(r.timeline[1].latency_ms["chat"].count, 20);
        assert!(r.to_text().contains("deliveries"));
    }

    #[test]
    fn merge_survives_json_roundtrip() {
        let w = worker(10, 500);
        let back: Report = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        let mut r = Report::merge(&[back]);
        r.finalize(&[], true);
        assert_eq!(r.latency_ms["chat"].count, 20);
        assert!(!r.timeline[1].raw.is_empty());
    }
}

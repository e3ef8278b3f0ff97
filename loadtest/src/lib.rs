//! giftcast's load harness as a library: `run(cli)` drives one scenario against a server and
//! returns the report (the `loadtest` binary is a thin wrapper around it).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use clap::Parser;
//! let cli = loadtest::Cli::parse_from(["loadtest", "fanout", "--url", "http://127.0.0.1:18081",
//!     "--token-secret", "sekret", "--viewers", "20", "--senders", "2", "--rate", "50", "--duration-secs", "2"]);
//! let report = loadtest::run(cli).await?;
//! assert!(report.counters.get("deliveries").copied().unwrap_or(0) > 0);
//! # Ok(()) }
//! ```

pub mod api;
pub mod args;
pub mod chart;
pub mod client;
pub mod fast;
pub mod pacing;
pub mod plan;
pub mod probe;
pub mod report;
pub mod stats;
pub mod token;
pub mod worker;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

pub use args::Cli;
pub use report::Report;

use api::{server_sample, Api, ProcSample};
use plan::{Room, Shape, WorkerPlan};
use report::{human, DriftWindow, MoneyReport, Sample, ServerStats, StreamMoney};
use stats::{summarize, HistData};
use worker::{run_worker, WorkerMsg};

/// Environment variable carrying a child worker's plan (JSON) when re-executed for --procs.
pub const CHILD_ENV: &str = "LOADTEST_CHILD_PLAN";
/// Tokio's runtime reads its default worker count from this variable.
pub const THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

enum Ev {
    Ready,
    Progress(Box<Sample>),
    Done(Box<Result<Report>>),
}

enum Go {
    Local(oneshot::Sender<()>),
    Child(tokio::process::ChildStdin),
}

/// Parse arguments (as on the command line, first item = program name) and run.
pub async fn run_from_args<I, T>(args: I) -> Result<Report>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    run(Cli::try_parse_from(args)?).await
}

/// Run one scenario and return the final report (also written to --json / --svg when given).
/// The report's `money.ok` is false when a money check failed.
pub async fn run(cli: Cli) -> Result<Report> {
    let c = &cli.common;
    if c.procs == 0 {
        bail!("--procs must be at least 1");
    }
    let shape = Shape::of(&cli);
    let probe_before = tokio::task::spawn_blocking(probe::cpu_probe_ms).await?;
    let started_unix_ms = stats::now_us() / 1000;
    let run_id = c
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{:06x}", rand::random::<u32>() & 0xff_ffff));
    let api = Api::new(c.primary_url(), c.admin_token.clone())?;
    let mut notes: Vec<String> = vec![];
    if shape.total_clients() / c.procs > 19_000 {
        notes.push(format!(
            "{} clients over {} process(es): more than 19,000 per process will hit the 20,000 open files limit; use --procs",
            shape.total_clients(),
            c.procs
        ));
    }
    let per_sender = |rates: &[f64], n: usize| {
        if n == 0 {
            0.0
        } else {
            rates.iter().cloned().fold(0.0, f64::max) / n as f64
        }
    };
    let chat_each = per_sender(&shape.chat_rates, shape.chatters);
    let gift_each = per_sender(&shape.gift_rates, shape.wallets * shape.conns_per_wallet);
    if chat_each > 90.0 || gift_each > 90.0 || shape.gifts_as_fast() {
        notes.push(format!(
            "up to {:.0} frames/s per sending connection{}: giftcast closes a connection sending over 100 frames/s sustained (4008); spread the rate over more senders/wallets",
            chat_each.max(gift_each),
            if shape.gifts_as_fast() { " (as fast as acknowledged: unbounded)" } else { "" }
        ));
    }
    if shape.total_clients() / (c.source_ips.max(1) as usize) > 28_000 {
        notes.push("more than 28,000 clients per source address: use --source-ips".into());
    }

    // Catalog (prices are read, never assumed).
    let catalog: Vec<(String, u64)> = if shape.has_gifts() {
        api.catalog()
            .await
            .context("reading the catalog")?
            .into_iter()
            .map(|s| (s.id, s.price))
            .collect()
    } else {
        vec![]
    };

    // Rooms and their streamers.
    let mut rooms = vec![];
    for r in 0..shape.rooms {
        let name = format!("streamer {r}");
        let room = match (c.streams.get(r), &c.token_secret) {
            (Some(id), Some(secret)) => Room {
                id: id.clone(),
                streamer_user: id.clone(),
                streamer_token: Some(token::mint(secret, id, &name, "streamer", 24 * 3600)?),
            },
            (Some(id), None) => Room {
                id: id.clone(),
                streamer_user: id.clone(),
                streamer_token: None,
            },
            (None, Some(secret)) => {
                let id = format!("lt{run_id}-r{r}");
                Room {
                    streamer_user: id.clone(),
                    streamer_token: Some(token::mint(secret, &id, &name, "streamer", 24 * 3600)?),
                    id,
                }
            }
            (None, None) if shape.streamers || shape.has_gifts() => {
                let g = api
                    .guest(&name, "streamer")
                    .await
                    .context("guest sign-up of a streamer (or give --token-secret)")?;
                let id = g.stream.clone().unwrap_or_else(|| g.user_id.clone());
                Room {
                    id,
                    streamer_user: g.user_id,
                    streamer_token: Some(g.token),
                }
            }
            (None, None) => Room {
                id: format!("lt{run_id}-r{r}"),
                streamer_user: String::new(),
                streamer_token: None,
            },
        };
        rooms.push(room);
    }

    // Revenue before, for the money check.
    let mut gross_before: BTreeMap<String, i64> = BTreeMap::new();
    if shape.has_gifts() && api.has_admin() {
        for r in &rooms {
            let g = match api.revenue(&r.id).await {
                Ok(Some(v)) => v.get("gross").and_then(|g| g.as_i64()).unwrap_or(0),
                Ok(None) => 0,
                Err(e) => {
                    notes.push(format!("revenue of {} before the run: {e:#}", r.id));
                    0
                }
            };
            gross_before.insert(r.id.clone(), g);
        }
    }

    let before_connect = server_sample(&api, &c.server_pid).await;

    // Workers.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(usize, Ev)>();
    let mut gos: Vec<Option<Go>> = vec![];
    let mut children = vec![];
    for i in 0..c.procs {
        let plan = WorkerPlan {
            cli: cli.clone(),
            index: i,
            count: c.procs,
            run_id: run_id.clone(),
            rooms: rooms.clone(),
            catalog: catalog.clone(),
        };
        if c.procs == 1 {
            let (msg_tx, mut msg_rx) = mpsc::unbounded_channel();
            let (go_tx, go_rx) = oneshot::channel();
            gos.push(Some(Go::Local(go_tx)));
            let tx = ev_tx.clone();
            tokio::spawn(async move {
                while let Some(m) = msg_rx.recv().await {
                    let e = match m {
                        WorkerMsg::Ready => Ev::Ready,
                        WorkerMsg::Progress(s) => Ev::Progress(Box::new(s)),
                    };
                    if tx.send((i, e)).is_err() {
                        break;
                    }
                }
            });
            let tx = ev_tx.clone();
            tokio::spawn(async move {
                let r = run_worker(plan, msg_tx, go_rx).await;
                let _ = tx.send((i, Ev::Done(Box::new(r))));
            });
        } else {
            let exe = match &c.exe {
                Some(p) => p.clone(),
                None => std::env::current_exe()?,
            };
            let mut command = tokio::process::Command::new(exe);
            if c.threads > 0 {
                // Read by the child's runtime builder (tokio's own setting).
                command.env(THREADS_ENV, c.threads.to_string());
            }
            let mut child = command
                .env(CHILD_ENV, serde_json::to_string(&plan)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            gos.push(Some(Go::Child(
                child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?,
            )));
            let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            let tx = ev_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                let mut done = false;
                while let Ok(Some(l)) = lines.next_line().await {
                    let e = if l == "LT-READY" {
                        Ev::Ready
                    } else if let Some(j) = l.strip_prefix("LT-SAMPLE ") {
                        match serde_json::from_str(j) {
                            Ok(s) => Ev::Progress(Box::new(s)),
                            Err(_) => continue,
                        }
                    } else if let Some(j) = l.strip_prefix("LT-REPORT ") {
                        done = true;
                        Ev::Done(Box::new(serde_json::from_str(j).context("worker report")))
                    } else if let Some(j) = l.strip_prefix("LT-ERROR ") {
                        done = true;
                        Ev::Done(Box::new(Err(anyhow!("worker {i}: {j}"))))
                    } else {
                        continue;
                    };
                    let _ = tx.send((i, e));
                }
                if !done {
                    let _ = tx.send((
                        i,
                        Ev::Done(Box::new(Err(anyhow!("worker {i} exited without a report")))),
                    ));
                }
            });
            children.push(child);
        }
    }
    drop(ev_tx);

    // Live progress.
    let pb = if c.no_progress {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(Duration::from_millis(250));
        pb
    };
    let target = shape.total_clients();
    let mut latest: Vec<Option<Sample>> = vec![None; c.procs];
    let mut ready = 0;
    let mut reports: Vec<Option<Report>> = (0..c.procs).map(|_| None).collect();
    let mut done = 0;
    let mut connected = ProcSample::default();
    let mut run_started: Option<Instant> = None;
    let mut rss_timeline: Vec<(f64, u64)> = vec![];
    let total_secs =
        c.connect_timeout_secs + shape.steps as f64 * c.duration_secs + c.drain_secs + 60.0;
    let hard_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(total_secs);
    let mut tick = tokio::time::interval(Duration::from_millis(c.sample_ms.max(200)));
    let mut failure: Option<anyhow::Error> = None;
    while done < c.procs {
        tokio::select! {
            m = ev_rx.recv() => {
                let Some((i, e)) = m else { break };
                match e {
                    Ev::Ready => {
                        ready += 1;
                        if ready == c.procs {
                            connected = server_sample(&api, &c.server_pid).await;
                            for g in gos.iter_mut() {
                                match g.take() {
                                    Some(Go::Local(tx)) => { let _ = tx.send(()); }
                                    Some(Go::Child(mut stdin)) => { let _ = stdin.write_all(b"GO\n").await; let _ = stdin.flush().await; }
                                    None => {}
                                }
                            }
                            run_started = Some(Instant::now());
                        }
                    }
                    Ev::Progress(s) => {
                        latest[i] = Some(*s);
                        pb.set_message(progress_line(&latest, target, ready, c.procs));
                    }
                    Ev::Done(r) => {
                        done += 1;
                        match *r {
                            Ok(r) => reports[i] = Some(r),
                            Err(e) => { failure.get_or_insert(e); }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(t0) = run_started {
                    if let Some(rss) = server_sample(&api, &c.server_pid).await.rss_bytes {
                        rss_timeline.push((t0.elapsed().as_secs_f64(), rss));
                    }
                }
            }
            _ = tokio::time::sleep_until(hard_deadline) => {
                failure.get_or_insert(anyhow!("the run did not finish within {total_secs:.0}s"));
                break;
            }
        }
    }
    pb.finish_and_clear();
    for mut ch in children {
        let _ = tokio::time::timeout(Duration::from_secs(5), ch.wait()).await;
        let _ = ch.start_kill();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let parts: Vec<Report> = reports.into_iter().flatten().collect();
    let end = server_sample(&api, &c.server_pid).await;
    let probe_after = tokio::task::spawn_blocking(probe::cpu_probe_ms).await?;

    let mut report = Report::merge(&parts);
    report.cpu_probe_ms = Some([probe_before, probe_after]);
    report.run_id = run_id.clone();
    report.url = c.url.join(",");
    report.procs = c.procs;
    report.started_unix_ms = started_unix_ms;
    report.params = serde_json::to_value(&cli.scenario).unwrap_or_default();
    let targets: Vec<String> = (0..shape.steps).map(|s| shape.step_target(s)).collect();
    report.finalize(&targets, true);
    if report.errors.contains_key("close:4008") {
        notes.push("the server closed connections for flooding (close:4008): lower the per-connection send rate".into());
    }
    report.notes.splice(0..0, notes);

    // Server memory and CPU.
    let source = if !c.server_pid.is_empty() {
        "proc"
    } else if before_connect.rss_bytes.is_some() {
        "metrics"
    } else {
        "none"
    };
    let conns = report.connections.joined.max(1) as f64;
    // Every room event delivered to a client: chat, shout-outs, thanks.
    let deliveries: u64 = report
        .timeline
        .iter()
        .filter(|s| s.phase != "connect")
        .map(|s| {
            ["deliveries", "shoutouts", "thanks_recv"]
                .iter()
                .map(|k| *s.counters.get(*k).unwrap_or(&0))
                .sum::<u64>()
        })
        .sum();
    let cpu_run = match (connected.cpu_secs, end.cpu_secs) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    for s in &mut report.timeline {
        if s.t_secs >= 0.0 {
            s.server_rss_bytes = rss_timeline
                .iter()
                .min_by(|a, b| (a.0 - s.t_secs).abs().total_cmp(&(b.0 - s.t_secs).abs()))
                .map(|x| x.1);
        }
    }
    report.server = Some(ServerStats {
        source: source.into(),
        before_connect,
        connected,
        end,
        rss_per_conn_bytes: match (before_connect.rss_bytes, connected.rss_bytes) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / conns),
            _ => None,
        },
        cpu_secs_run: cpu_run,
        cpu_us_per_delivery: cpu_run
            .filter(|_| deliveries > 0)
            .map(|c| c * 1e6 / deliveries as f64),
        // Only where gifts are the server's work (`gifts`): with chat in the run (`mixed`,
        // `soak`) most of its CPU is fan-out, and dividing it by the gifts would mislead.
        cpu_us_per_gift: cpu_run
            .zip(report.counters.get("gifts_ok").copied().filter(|n| *n > 0))
            .filter(|_| report.counters.get("chats_sent").is_none_or(|n| *n == 0))
            .map(|(c, n)| c * 1e6 / n as f64),
        rss_timeline: rss_timeline.clone(),
    });

    // Every chat should reach every member of its room (rooms are filled evenly).
    if let (Some(&sent), true) = (report.counters.get("chats_sent"), shape.churners == 0) {
        let members = shape.total_clients() as f64 / shape.rooms as f64;
        if sent > 0 && members > 0.0 {
            report.delivery_ratio = Some(
                *report.counters.get("deliveries").unwrap_or(&0) as f64 / (sent as f64 * members),
            );
        }
    }

    // Drift windows (soak).
    if let args::Scenario::Soak(s) = &cli.scenario {
        report.drift = drift_windows(&report.timeline, s.window_secs, &rss_timeline);
    }
    if !c.keep_raw {
        for s in &mut report.timeline {
            s.raw.clear();
        }
    }

    // Money.
    if shape.has_gifts() {
        report.money = Some(
            money_check(
                &api,
                &rooms,
                &gross_before,
                report.money_tally.clone().unwrap_or_default(),
            )
            .await,
        );
    }

    if let Some(p) = &c.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &c.svg {
        chart::write_svg(&report, p).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(report)
}

fn progress_line(latest: &[Option<Sample>], target: usize, ready: usize, procs: usize) -> String {
    let mut open = 0;
    let mut d = 0.0;
    let mut sent = 0.0;
    let mut acks = 0.0;
    let mut joins = 0.0;
    let mut errs = 0;
    let mut p99: f64 = 0.0;
    let mut phase = "connect";
    for s in latest.iter().flatten() {
        open += s.open;
        d += s.rate("deliveries");
        sent += s.rate("chats_sent");
        acks += s.rate("gifts_ok");
        joins += s.rate("joins");
        errs += s.errors;
        if let Some(l) = s
            .latency_ms
            .get("chat")
            .or_else(|| s.latency_ms.get("gift_ack"))
        {
            p99 = p99.max(l.p99_ms);
        }
        phase = if s.phase == "connect" && ready == procs {
            "run"
        } else {
            &s.phase
        };
    }
    format!(
        "[{phase}] conns {open}/{target} | deliveries/s {} | chats/s {} | gift acks/s {} | joins/s {} | p99 {:.1} ms | errors {errs}",
        human(d),
        human(sent),
        human(acks),
        human(joins),
        p99
    )
}

fn drift_windows(timeline: &[Sample], window: f64, rss: &[(f64, u64)]) -> Vec<DriftWindow> {
    let run: Vec<&Sample> = timeline.iter().filter(|s| s.phase == "run").collect();
    let window = window.max(1.0);
    let mut out = vec![];
    let mut from = 0.0;
    let end = run.last().map(|s| s.t_secs).unwrap_or(0.0);
    while end - from > 0.25 * window && out.len() < 10_000 {
        let to = from + window;
        let ss: Vec<&&Sample> = run
            .iter()
            .filter(|s| s.t_secs > from && s.t_secs <= to + 1e-9)
            .collect();
        let secs: f64 = ss.iter().map(|s| s.secs).sum();
        let deliveries: u64 = ss
            .iter()
            .map(|s| *s.counters.get("deliveries").unwrap_or(&0))
            .sum();
        let p99 = |k: &str| {
            let h = HistData::merge(ss.iter().filter_map(|s| s.raw.get(k)));
            summarize(&h.to_hist()).p99_ms
        };
        out.push(DriftWindow {
            from_secs: from,
            to_secs: to.min(end),
            deliveries_per_sec: if secs > 0.0 {
                deliveries as f64 / secs
            } else {
                0.0
            },
            chat_p99_ms: p99("chat"),
            gift_ack_p99_ms: p99("gift_ack"),
            server_rss_bytes: rss.iter().rfind(|x| x.0 <= to).map(|x| x.1),
        });
        from = to;
    }
    out
}

async fn money_check(
    api: &Api,
    rooms: &[Room],
    before: &BTreeMap<String, i64>,
    tally: report::MoneyTally,
) -> MoneyReport {
    let mut m = MoneyReport {
        acked_coins: tally.acked_total(),
        ..Default::default()
    };
    if tally.retry_mismatches > 0 {
        m.failures.push(format!(
            "{} retries of acknowledged gift_ids were answered differently",
            tally.retry_mismatches
        ));
    }
    if tally.wallet_mismatches > 0 {
        m.failures.push(format!(
            "{} wallets' final balance differs from start − acknowledged spend",
            tally.wallet_mismatches
        ));
    }
    if tally.negative_balances > 0 {
        m.failures.push(format!(
            "{} negative balances seen",
            tally.negative_balances
        ));
    }
    for d in &tally.details {
        m.failures.push(d.clone());
    }
    if api.has_admin() {
        // The revenue may be written by a background flusher: give it a few seconds to agree.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut streams = vec![];
            let mut problems = vec![];
            for r in rooms {
                let acked = *tally.acked_by_stream.get(&r.id).unwrap_or(&0);
                let unknown = *tally.unknown_by_stream.get(&r.id).unwrap_or(&0);
                let gb = *before.get(&r.id).unwrap_or(&0);
                match api.revenue(&r.id).await {
                    Ok(v) => {
                        let v = v.unwrap_or_default();
                        let gross = v.get("gross").and_then(|x| x.as_i64()).unwrap_or(0);
                        let unit = v.get("unit").and_then(|x| x.as_i64()).unwrap_or(10_000);
                        let parts: i64 = ["store", "streamer", "platform"]
                            .iter()
                            .map(|k| v.get(*k).and_then(|x| x.as_i64()).unwrap_or(0))
                            .sum();
                        let split_exact = v.is_null() || parts == gross * unit;
                        let delta = gross - gb;
                        if delta < acked as i64 || delta > (acked + unknown) as i64 {
                            problems.push(format!(
                                "stream {}: acknowledged gifts worth {acked}{} but the server's gross grew by {delta} ({gb} → {gross})",
                                r.id,
                                if unknown > 0 { format!(" (+{unknown} unanswered)") } else { String::new() }
                            ));
                        }
                        if !split_exact {
                            problems.push(format!(
                                "stream {}: store+streamer+platform = {parts} ≠ gross×unit = {}",
                                r.id,
                                gross * unit
                            ));
                        }
                        streams.push(StreamMoney {
                            stream: r.id.clone(),
                            acked_coins: acked,
                            unknown_coins: unknown,
                            gross_before: gb,
                            gross_after: gross,
                            split_exact,
                        });
                    }
                    Err(e) => problems.push(format!("revenue of {}: {e:#}", r.id)),
                }
            }
            m.streams = streams;
            if problems.is_empty() || Instant::now() > deadline {
                m.failures.extend(problems);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match api.audit().await {
            Ok(a) => {
                if a.get("ok").and_then(|x| x.as_bool()) != Some(true) {
                    m.failures
                        .push(format!("GET /api/admin/audit is not ok: {a}"));
                }
                m.audit = Some(a);
            }
            Err(e) => m.failures.push(format!("audit: {e:#}")),
        }
    } else {
        m.skipped
            .push("revenue and audit comparison (no --admin-token)".into());
    }
    m.ok = m.failures.is_empty();
    m.tally = tally;
    m
}

/// Entry point of a child worker process (called by the binary when CHILD_ENV is set):
/// protocol on stdout `LT-READY`, `LT-SAMPLE <json>`, `LT-REPORT <json>` / `LT-ERROR <text>`;
/// the run starts when a line arrives on stdin.
pub async fn run_child(plan_json: &str) -> Result<()> {
    let plan: WorkerPlan = serde_json::from_str(plan_json).context("child plan")?;
    let (msg_tx, mut msg_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let _ = lines.next_line().await;
        let _ = go_tx.send(());
    });
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(m) = msg_rx.recv().await {
            let line = match m {
                WorkerMsg::Ready => "LT-READY\n".to_string(),
                WorkerMsg::Progress(s) => format!(
                    "LT-SAMPLE {}\n",
                    serde_json::to_string(&s).unwrap_or_default()
                ),
            };
            let _ = out.write_all(line.as_bytes()).await;
            let _ = out.flush().await;
        }
    });
    let r = run_worker(plan, msg_tx, go_rx).await;
    let _ = printer.await;
    let mut out = tokio::io::stdout();
    let line = match r {
        Ok(rep) => format!("LT-REPORT {}\n", serde_json::to_string(&rep)?),
        Err(e) => format!("LT-ERROR {}\n", format!("{e:#}").replace('\n', " ")),
    };
    out.write_all(line.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

//! Durable gifts, two designs side by side in one run, on SQLite and on PostgreSQL:
//!
//! - **group commit** (giftcast): a gift is acknowledged once its journal frame is fsynced (one
//!   fdatasync for everything that arrived during the previous one); the flusher then copies
//!   batches into the store, one transaction per batch.
//! - **naive**: the store is the durability point and every gift is its own transaction
//!   (debit the wallet with a balance check, insert the gift, upsert the revenue row, COMMIT);
//!   SQLite in WAL mode with `synchronous=FULL` (an fsync per commit), PostgreSQL with its
//!   defaults (`synchronous_commit=on`, `fsync=on`: a WAL flush per commit).
//!
//! ```text
//! cargo run --release --example durable_compare -- [--quick] [--pg URL] [--dir DIR] [--flush-batch N]
//! cargo run --release --example durable_compare -- --sustain-secs S [--dir DIR] [--samples CSV]
//!     [--flush-batch N]
//!     (only the SQLite group-commit open loop at 100,000 gifts/s, for S seconds, at most 600;
//!     `--samples` writes the store backlog every 100 ms until the store has every gift)
//! `--flush-batch` sets the flusher's records per store transaction in every group-commit run
//! (default the server's, `FLUSH_BATCH_RECORDS_MAX_DEFAULT`).
//! ```
//!
//! `--pg` defaults to `postgres://postgres@127.0.0.1:5432/test`; a fresh schema is created
//! there and dropped at the end. `--dir` is where the journal and SQLite files go (default: the
//! system temp dir). Prints one markdown table row per run.

use giftcast::flusher::{self, FlushConfig};
use giftcast::journal::{Journal, JournalConfig, JournalError};
use giftcast::money::{Coins, Split};
use giftcast::record::{GiftRecord, Record};
use giftcast::store::Store;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USERS: u64 = 10_000;
const FUNDS: i64 = 1_000_000_000;
const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

fn gift(n: u64, split: &Split) -> GiftRecord {
    let amount = 10;
    GiftRecord {
        user_id: format!("user-{}", n % USERS).into(),
        user_name: format!("User {}", n % USERS).into(),
        gift_id: format!("gift-{n}").into(),
        stream: format!("stream-{}", n % 10).into(),
        sticker: "rose".into(),
        count: 1,
        price: 10,
        amount,
        shares: split.shares(Coins(amount)).unwrap(),
        message: None,
        balance_after: 1_000_000,
        ts_ms: 1_700_000_000_000 + n,
    }
}

/// One measured run.
struct Row {
    design: &'static str,
    backend: &'static str,
    load: String,
    gifts: usize,
    secs: f64,
    lat_us: Vec<u64>,
    /// Group commit: seconds until the store had every record (end to end).
    stored_secs: Option<f64>,
    fsyncs: Option<u64>,
    note: String,
    /// Group commit: (seconds since the load started, store backlog in records), every 100 ms
    /// until the store had every record.
    backlog: Vec<(f64, u64)>,
}

impl Row {
    fn print(&mut self) {
        self.lat_us.sort_unstable();
        let pct = |p: f64| -> String {
            if self.lat_us.is_empty() {
                return "–".into();
            }
            let v = self.lat_us[((self.lat_us.len() as f64 - 1.0) * p) as usize];
            format!("{:.2}", v as f64 / 1000.0)
        };
        let per_fsync = self
            .fsyncs
            .map(|f| format!("{:.0}", self.gifts as f64 / f.max(1) as f64))
            .unwrap_or_else(|| "1".into());
        let stored = self
            .stored_secs
            .map(|s| format!("{:.0}", self.gifts as f64 / s))
            .unwrap_or_else(|| "(same)".into());
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            self.design,
            self.backend,
            self.load,
            self.gifts,
            self.gifts as f64 / self.secs,
            pct(0.5),
            pct(0.99),
            pct(1.0),
            per_fsync,
            stored,
            self.note
        );
    }
}

fn header() {
    println!("| design | backend | load | gifts | durable gifts/s | ack p50 ms | ack p99 ms | ack max ms | gifts/fsync | stored gifts/s end to end | note |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
}

// ------------------------------------------------------------------------------------------
// Group commit: journal + flusher + store
// ------------------------------------------------------------------------------------------

enum Load {
    /// `in_flight` submitters, each waiting for its ack before the next gift.
    Closed { gifts: u64, in_flight: u64 },
    /// Gifts scheduled at `rate`/s for `secs`; latency from the scheduled time.
    Open { rate: u64, secs: f64 },
}

impl Load {
    fn describe(&self) -> String {
        match self {
            Load::Closed { in_flight, .. } => format!("closed loop, {in_flight} in flight"),
            Load::Open { rate, secs } => format!("open loop {rate}/s for {secs} s"),
        }
    }
}

/// "store backlog max N; per quarter of the load a / b / c / d" (each quarter's largest sample):
/// a store that keeps up shows flat quarters, one that trails shows them climbing.
fn backlog_note(samples: &[u64]) -> String {
    let max = samples.iter().copied().max().unwrap_or(0);
    let quarter = samples.len().div_ceil(4).max(1);
    let quarters: Vec<String> = samples
        .chunks(quarter)
        .map(|c| c.iter().max().unwrap().to_string())
        .collect();
    format!(
        "store backlog max {max} records; per quarter of the load {}",
        quarters.join(" / ")
    )
}

/// Group commit into SQLite, open loop at 100,000 gifts/s for `secs`.
async fn sqlite_at_100k(dir: &Path, secs: f64, flush: FlushConfig) -> anyhow::Result<Row> {
    let load = Load::Open {
        rate: 100_000,
        secs,
    };
    group_commit(dir, "sqlite", None, load, flush).await
}

async fn group_commit(
    dir: &Path,
    backend: &'static str,
    pg_url: Option<&str>,
    load: Load,
    flush: FlushConfig,
) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new()
        .prefix("gc-bench")
        .tempdir_in(dir)?;
    let store = Store::open(pg_url, dir.path()).await?;
    let checkpoint = store.load(0).await?.checkpoint_lsn;
    let (journal, _, rx) = Journal::open(JournalConfig::new(dir.path()), checkpoint)?;
    let flusher = std::sync::Arc::new(flusher::spawn(store, journal.clone(), rx, flush));
    // The store's backlog (durable, not yet stored) while the load runs, sampled every 100 ms:
    // bounded means the store keeps up; growing means it trails.
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(f64, u64)>::new()));
    let started = Instant::now();
    let sampler = {
        let (flusher, samples) = (flusher.clone(), samples.clone());
        tokio::spawn(async move {
            loop {
                let pending = flusher.status().pending_records;
                let at = started.elapsed().as_secs_f64();
                samples.lock().unwrap().push((at, pending));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let split = Split::default();
    let mut lat_us: Vec<u64> = Vec::new();
    let describe = load.describe();
    let mut refused = 0u64;
    match load {
        Load::Closed { gifts, in_flight } => {
            let per_task = gifts / in_flight;
            let mut tasks = Vec::new();
            for t in 0..in_flight {
                let journal = journal.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_task as usize);
                    for i in 0..per_task {
                        let sent = Instant::now();
                        let ticket = loop {
                            match journal.submit(Record::Gift(gift(t * per_task + i, &split))) {
                                Ok(ticket) => break ticket,
                                Err(JournalError::Full(_)) => {
                                    tokio::time::sleep(Duration::from_millis(1)).await
                                }
                                Err(e) => panic!("{e}"),
                            }
                        };
                        ticket.wait().await.unwrap();
                        lat.push(sent.elapsed().as_micros() as u64);
                    }
                    lat
                }));
            }
            for task in tasks {
                lat_us.extend(task.await?);
            }
        }
        Load::Open { rate, secs } => {
            let total = (rate as f64 * secs) as u64;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let collector = tokio::spawn(async move {
                // Tickets resolve in LSN order, so awaiting them in order measures each one.
                let mut lat = Vec::with_capacity(total as usize);
                while let Some((scheduled, ticket)) = rx.recv().await {
                    let ticket: giftcast::journal::Ticket = ticket;
                    ticket.wait().await.unwrap();
                    let scheduled: Instant = scheduled;
                    lat.push(scheduled.elapsed().as_micros() as u64);
                }
                lat
            });
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = 0u64;
            while n < total {
                ticker.tick().await;
                // Everything whose scheduled time has come, each stamped with that time.
                let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while n < due {
                    let scheduled = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    match journal.submit(Record::Gift(gift(n, &split))) {
                        Ok(ticket) => tx.send((scheduled, ticket)).unwrap(),
                        // The store trails by the whole backlog bound: the server would answer
                        // `unavailable`; the load goes on and the count is reported.
                        Err(JournalError::Full(_)) => refused += 1,
                        Err(e) => return Err(e.into()),
                    }
                    n += 1;
                }
            }
            drop(tx);
            lat_us = collector.await?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let during: Vec<u64> = samples.lock().unwrap().iter().map(|&(_, n)| n).collect();
    let mut note = backlog_note(&during);
    if refused > 0 {
        note.push_str(&format!(
            "; {refused} gifts refused: the journal's backlog bound was reached"
        ));
    }
    let stats = journal.stats();
    let target = stats.durable_lsn;
    let deadline = Instant::now() + Duration::from_secs(120);
    while flusher.status().stored_lsn < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    anyhow::ensure!(
        flusher.status().stored_lsn >= target,
        "store did not catch up"
    );
    let stored_secs = started.elapsed().as_secs_f64();
    sampler.abort();
    let backlog = std::mem::take(&mut *samples.lock().unwrap());
    journal.shutdown().await;
    flusher.drain(Duration::from_secs(10)).await?;
    Ok(Row {
        design: "group commit",
        backend,
        load: describe,
        gifts: lat_us.len(),
        secs,
        lat_us,
        stored_secs: Some(stored_secs),
        fsyncs: Some(stats.fsyncs),
        note,
        backlog,
    })
}

// ------------------------------------------------------------------------------------------
// Naive: one storage transaction per gift
// ------------------------------------------------------------------------------------------

const NAIVE_SQLITE_DDL: &str = "
CREATE TABLE wallets (user_id TEXT PRIMARY KEY, balance BIGINT NOT NULL CHECK (balance >= 0));
CREATE TABLE gifts (user_id TEXT NOT NULL, gift_id TEXT NOT NULL, stream TEXT NOT NULL,
  sticker TEXT NOT NULL, count BIGINT NOT NULL, amount BIGINT NOT NULL, store_share BIGINT NOT NULL,
  streamer_share BIGINT NOT NULL, platform_share BIGINT NOT NULL, balance_after BIGINT NOT NULL,
  ts_ms BIGINT NOT NULL, PRIMARY KEY (user_id, gift_id));
CREATE TABLE revenue (stream TEXT NOT NULL, sticker TEXT NOT NULL, user_id TEXT NOT NULL,
  gifts BIGINT NOT NULL, gross BIGINT NOT NULL, store_share BIGINT NOT NULL,
  streamer_share BIGINT NOT NULL, platform_share BIGINT NOT NULL,
  PRIMARY KEY (stream, sticker, user_id));
";
const NAIVE_DEBIT: &str =
    "UPDATE wallets SET balance = balance - $2 WHERE user_id = $1 AND balance >= $2 RETURNING balance";
const NAIVE_GIFT: &str = "INSERT INTO gifts VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING";
const NAIVE_REVENUE: &str = "INSERT INTO revenue VALUES ($1, $2, $3, 1, $4, $5, $6, $7)
  ON CONFLICT (stream, sticker, user_id) DO UPDATE SET gifts = revenue.gifts + 1,
  gross = revenue.gross + excluded.gross, store_share = revenue.store_share + excluded.store_share,
  streamer_share = revenue.streamer_share + excluded.streamer_share,
  platform_share = revenue.platform_share + excluded.platform_share";

fn sqlite_naive_open(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let db = rusqlite::Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.busy_timeout(Duration::from_secs(30))?;
    Ok(db)
}

/// SQLite numbers parameters `?N` (a `$N` is a *named* parameter, numbered by first use).
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn sqlite_naive_gift(db: &mut rusqlite::Connection, g: &GiftRecord) -> anyhow::Result<()> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let balance: i64 = tx
        .prepare_cached(&sqlite_sql(NAIVE_DEBIT))?
        .query_row(rusqlite::params![g.user_id, g.amount as i64], |r| r.get(0))?;
    tx.prepare_cached(&sqlite_sql(NAIVE_GIFT))?
        .execute(rusqlite::params![
            g.user_id,
            g.gift_id,
            g.stream,
            g.sticker,
            g.count as i64,
            g.amount as i64,
            g.shares.store as i64,
            g.shares.streamer as i64,
            g.shares.platform as i64,
            balance,
            g.ts_ms as i64
        ])?;
    tx.prepare_cached(&sqlite_sql(NAIVE_REVENUE))?
        .execute(rusqlite::params![
            g.stream,
            g.sticker,
            g.user_id,
            g.amount as i64,
            g.shares.store as i64,
            g.shares.streamer as i64,
            g.shares.platform as i64
        ])?;
    tx.commit()?; // synchronous=FULL: the WAL is fsynced here
    Ok(())
}

/// Naive SQLite. Closed loop: one writer thread (SQLite has one writer at a time anyway).
/// Open loop: a generator at `rate` and the writer; whatever the writer has not done when the
/// window (+2 s) ends is reported as backlog.
fn sqlite_naive(dir: &Path, load: Load) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new()
        .prefix("naive-sqlite")
        .tempdir_in(dir)?;
    let path = dir.path().join("naive.db");
    let mut db = sqlite_naive_open(&path)?;
    db.execute_batch(NAIVE_SQLITE_DDL)?;
    {
        let tx = db.transaction()?;
        for u in 0..USERS {
            tx.execute(
                "INSERT INTO wallets VALUES (?1, ?2)",
                rusqlite::params![format!("user-{u}"), FUNDS],
            )?;
        }
        tx.commit()?;
    }
    let split = Split::default();
    let describe = load.describe();
    let mut lat_us = Vec::new();
    let started = Instant::now();
    let mut note = String::new();
    let secs;
    match load {
        Load::Closed { gifts, .. } => {
            for n in 0..gifts {
                let t = Instant::now();
                sqlite_naive_gift(&mut db, &gift(n, &split))?;
                lat_us.push(t.elapsed().as_micros() as u64);
            }
            secs = started.elapsed().as_secs_f64();
        }
        Load::Open { rate, secs: window } => {
            let total = (rate as f64 * window) as u64;
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, GiftRecord)>();
            let generator = std::thread::spawn(move || {
                for n in 0..total {
                    let scheduled = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if tx.send((scheduled, gift(n, &split))).is_err() {
                        return;
                    }
                }
            });
            let stop_at = started + Duration::from_secs_f64(window + 2.0);
            while let Ok((scheduled, g)) = rx.recv() {
                if Instant::now() > stop_at {
                    break;
                }
                sqlite_naive_gift(&mut db, &g)?;
                lat_us.push(scheduled.elapsed().as_micros() as u64);
            }
            drop(rx);
            generator.join().unwrap();
            secs = started.elapsed().as_secs_f64().min(window + 2.0);
            let behind = total as usize - lat_us.len();
            if behind > 0 {
                note = format!(
                    "cannot keep up: {behind} of {total} not done {:.0} s after the window",
                    2.0
                );
            }
        }
    }
    Ok(Row {
        design: "naive: txn per gift",
        backend: "sqlite (WAL, synchronous=FULL)",
        load: describe,
        gifts: lat_us.len(),
        secs,
        lat_us,
        stored_secs: None,
        fsyncs: None,
        note,
        backlog: Vec::new(),
    })
}

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

struct PgNaive {
    client: tokio_postgres::Client,
    debit: tokio_postgres::Statement,
    gift: tokio_postgres::Statement,
    revenue: tokio_postgres::Statement,
}

impl PgNaive {
    async fn connect(url: &str) -> anyhow::Result<PgNaive> {
        let client = pg_connect(url).await?;
        Ok(PgNaive {
            debit: client.prepare(NAIVE_DEBIT).await?,
            gift: client.prepare(NAIVE_GIFT).await?,
            revenue: client.prepare(NAIVE_REVENUE).await?,
            client,
        })
    }

    async fn gift(&mut self, g: &GiftRecord) -> anyhow::Result<()> {
        let tx = self.client.transaction().await?;
        let balance: i64 = tx
            .query_one(&self.debit, &[&&*g.user_id, &(g.amount as i64)])
            .await?
            .get(0);
        tx.execute(
            &self.gift,
            &[
                &&*g.user_id,
                &&*g.gift_id,
                &&*g.stream,
                &&*g.sticker,
                &(g.count as i64),
                &(g.amount as i64),
                &(g.shares.store as i64),
                &(g.shares.streamer as i64),
                &(g.shares.platform as i64),
                &balance,
                &(g.ts_ms as i64),
            ],
        )
        .await?;
        tx.execute(
            &self.revenue,
            &[
                &&*g.stream,
                &&*g.sticker,
                &&*g.user_id,
                &(g.amount as i64),
                &(g.shares.store as i64),
                &(g.shares.streamer as i64),
                &(g.shares.platform as i64),
            ],
        )
        .await?;
        tx.commit().await?; // synchronous_commit=on: the WAL is flushed here
        Ok(())
    }
}

/// Naive PostgreSQL: `conns` connections, each running one gift transaction at a time (closed
/// loop), or sharing an open-loop queue.
async fn pg_naive(url: &str, schema: &str, conns: usize, load: Load) -> anyhow::Result<Row> {
    let admin = pg_connect(url).await?;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {schema}.wallets, {schema}.gifts, {schema}.revenue; SET search_path TO {schema}; {NAIVE_SQLITE_DDL}
             INSERT INTO wallets SELECT 'user-' || g, {FUNDS} FROM generate_series(0, {}) g;",
            USERS - 1
        ))
        .await?;
    let describe = format!("{}, {conns} connections", load.describe());
    let split = Split::default();
    let scoped = format!("{url}?options=-csearch_path%3D{schema}");
    let mut workers = Vec::new();
    for _ in 0..conns {
        workers.push(PgNaive::connect(&scoped).await?);
    }
    let started = Instant::now();
    let mut lat_us = Vec::new();
    let mut note = String::new();
    let secs;
    match load {
        Load::Closed { gifts, .. } => {
            let per = gifts / conns as u64;
            let mut tasks = Vec::new();
            for (w, mut worker) in workers.into_iter().enumerate() {
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    for i in 0..per {
                        let t = Instant::now();
                        worker.gift(&gift(w as u64 * per + i, &split)).await?;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    anyhow::Ok(lat)
                }));
            }
            for t in tasks {
                lat_us.extend(t.await??);
            }
            secs = started.elapsed().as_secs_f64();
        }
        Load::Open { rate, secs: window } => {
            let total = (rate as f64 * window) as u64;
            let (tx, rx) = async_channel(total as usize);
            let stop_at = started + Duration::from_secs_f64(window + 2.0);
            let mut tasks = Vec::new();
            for mut worker in workers {
                let rx = rx.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while let Some((scheduled, g)) = recv(&rx).await {
                        if Instant::now() > stop_at {
                            break;
                        }
                        worker.gift(&g).await?;
                        let scheduled: Instant = scheduled;
                        lat.push(scheduled.elapsed().as_micros() as u64);
                    }
                    anyhow::Ok(lat)
                }));
            }
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            let mut n = 0u64;
            while n < total {
                ticker.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while n < due {
                    let scheduled = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    tx.lock().await.push_back((scheduled, gift(n, &split)));
                    n += 1;
                }
            }
            tx.lock().await.push_back_end();
            for t in tasks {
                lat_us.extend(t.await??);
            }
            secs = started.elapsed().as_secs_f64().min(window + 2.0);
            let behind = total as usize - lat_us.len();
            if behind > 0 {
                note = format!("cannot keep up: {behind} of {total} not done 2 s after the window");
            }
        }
    }
    Ok(Row {
        design: "naive: txn per gift",
        backend: "postgres (synchronous_commit=on)",
        load: describe,
        gifts: lat_us.len(),
        secs,
        lat_us,
        stored_secs: None,
        fsyncs: None,
        note,
        backlog: Vec::new(),
    })
}

/// A tiny shared work queue for the open-loop PostgreSQL workers.
struct Queue<T> {
    items: std::collections::VecDeque<T>,
    ended: bool,
}

impl<T> Queue<T> {
    fn push_back(&mut self, t: T) {
        self.items.push_back(t);
    }
    fn push_back_end(&mut self) {
        self.ended = true;
    }
}

type Shared<T> = Arc<tokio::sync::Mutex<Queue<T>>>;

fn async_channel<T>(cap: usize) -> (Shared<T>, Shared<T>) {
    let q = Arc::new(tokio::sync::Mutex::new(Queue {
        items: std::collections::VecDeque::with_capacity(cap),
        ended: false,
    }));
    (q.clone(), q)
}

async fn recv<T>(q: &Shared<T>) -> Option<T> {
    loop {
        {
            let mut q = q.lock().await;
            if let Some(t) = q.items.pop_front() {
                return Some(t);
            }
            if q.ended {
                return None;
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// The disk as it is right now: write 4 KiB + fdatasync, `n` times. Every figure above depends on
/// it, and on a shared machine it moves a lot between runs.
fn fsync_probe(dir: &Path, n: usize) -> anyhow::Result<String> {
    use std::io::Write;
    let file_dir = tempfile::Builder::new()
        .prefix("fsync-probe")
        .tempdir_in(dir)?;
    let mut f = std::fs::File::create(file_dir.path().join("probe"))?;
    let buf = vec![7u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        f.write_all(&buf)?;
        let t = Instant::now();
        f.sync_data()?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    Ok(format!(
        "fdatasync of 4 KiB x{n}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    ))
}

// ------------------------------------------------------------------------------------------

/// `cargo run --release --example durable_compare -- --help`. The header of
/// examples/durable_compare.rs says what each run measures.
#[derive(clap::Parser)]
#[command(
    about = "Durable gifts: group commit (giftcast) against a transaction per gift, on SQLite and PostgreSQL, side by side"
)]
struct Opts {
    /// A fifth of the gifts in the closed loops, shorter open loops.
    #[arg(long)]
    quick: bool,
    /// PostgreSQL database for the PostgreSQL runs (fresh schemas, dropped after).
    #[arg(long, default_value = PG_DEFAULT)]
    pg: String,
    /// Where the journal and SQLite files go.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Records per store transaction in every group-commit run (default the server's).
    #[arg(long, default_value_t = flusher::FLUSH_BATCH_RECORDS_MAX_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    flush_batch: usize,
    /// Only the SQLite group-commit open loop at 100,000 gifts/s, for this many seconds (at most 600).
    #[arg(long, value_parser = parse_sustain_secs)]
    sustain_secs: Option<f64>,
    /// With --sustain-secs: write the store backlog every 100 ms to this CSV.
    #[arg(long, requires = "sustain_secs")]
    samples: Option<PathBuf>,
}

fn parse_sustain_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if secs > 0.0 && secs <= 600.0 {
        Ok(secs)
    } else {
        Err("0 < S <= 600".into())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Opts {
        quick,
        pg,
        dir,
        flush_batch,
        sustain_secs,
        samples,
    } = clap::Parser::parse();
    let scale = if quick { 0.2 } else { 1.0 };
    let n = |x: f64| (x * scale) as u64;
    let flush = FlushConfig {
        batch_records_max: flush_batch,
        ..FlushConfig::default()
    };
    println!(
        "flusher batch: at most {} records\n",
        flush.batch_records_max
    );
    if let Some(secs) = sustain_secs {
        // Only the SQLite open loop at 100,000 gifts/s, for as long as asked.
        println!(
            "cores: {}, disk: {}\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            fsync_probe(&dir, 2000)?
        );
        header();
        let mut row = sqlite_at_100k(&dir, secs, flush).await?;
        row.print();
        if let Some(path) = samples {
            let mut csv = String::from("secs,store_backlog_records\n");
            for (at, n) in &row.backlog {
                csv.push_str(&format!("{at:.2},{n}\n"));
            }
            std::fs::write(&path, csv)?;
            println!("store backlog samples: {}", path.display());
        }
        return Ok(());
    }

    let schema = format!("gc_bench_{}", std::process::id());
    let admin = pg_connect(&pg).await?;
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    // A fresh schema per group-commit run (the store keeps a checkpoint), one for the naive runs.
    let mut schemas = vec![schema.clone()];
    for s in ["gc1", "gc2"] {
        let name = format!("{schema}_{s}");
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await?;
        schemas.push(name);
    }
    let store_url = |i: usize| format!("{pg}?options=-csearch_path%3D{}", schemas[i]);
    let pg_naive_schema = schema.clone();

    let loadavg = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "cores: {}, load average: {}disk before: {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        fsync_probe(&dir, 2000)?
    );
    let result = async {
        header();
        let closed = |gifts: u64, in_flight: u64| Load::Closed { gifts, in_flight };
        let open10k = || Load::Open {
            rate: 10_000,
            secs: 5.0 * scale.max(0.4),
        };
        // SQLite
        group_commit(
            &dir,
            "sqlite",
            None,
            closed(n(1_000_000.0), 2000),
            flush.clone(),
        )
        .await?
        .print();
        sqlite_at_100k(&dir, 10.0 * scale, flush.clone())
            .await?
            .print();
        group_commit(&dir, "sqlite", None, open10k(), flush.clone())
            .await?
            .print();
        sqlite_naive(&dir, closed(n(5_000.0), 1))?.print();
        sqlite_naive(&dir, open10k())?.print();
        // PostgreSQL
        group_commit(
            &dir,
            "postgres",
            Some(&store_url(1)),
            closed(n(1_000_000.0), 2000),
            flush.clone(),
        )
        .await?
        .print();
        group_commit(
            &dir,
            "postgres",
            Some(&store_url(2)),
            open10k(),
            flush.clone(),
        )
        .await?
        .print();
        pg_naive(&pg, &pg_naive_schema, 1, closed(n(5_000.0), 1))
            .await?
            .print();
        pg_naive(&pg, &pg_naive_schema, 64, closed(n(50_000.0), 64))
            .await?
            .print();
        pg_naive(&pg, &pg_naive_schema, 64, open10k())
            .await?
            .print();
        println!(
            "\nload average: {}disk after: {}",
            loadavg(),
            fsync_probe(&dir, 2000)?
        );
        anyhow::Ok(())
    }
    .await;
    for s in &schemas {
        admin
            .batch_execute(&format!("DROP SCHEMA {s} CASCADE"))
            .await?;
    }
    result
}

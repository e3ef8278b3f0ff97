//! How fast the store takes the flusher's batches, and whether that holds as the tables grow.
//!
//! ```text
//! cargo bench --bench store_apply -- [--records N] [--batch N] [--window N] [--pg URL] [--dir DIR]
//! ```
//!
//! Applies `--records` (default 2,000,000) gift records in `Store::apply_batch` calls of
//! `--batch` (default the flusher's, `FLUSH_BATCH_RECORDS_MAX_DEFAULT`) to a fresh SQLite file in `--dir` (default
//! the system temp dir) and, with `--pg`, to a fresh schema in that PostgreSQL database (dropped
//! after). Gifts: 10,000 senders, 100 streams (9 in 10 of a sender's gifts in one), 4 stickers, random
//! 128-bit gift ids (clients make UUIDs), a balance that falls. Prints, per `--window` records
//! (default 250,000), the records/s of that window, so a slowdown as the gift table and its
//! indexes outgrow the page cache shows up, then one summary row per backend, then the latency
//! of `find_gift` for 1,000 stored gifts spread over the table and 1,000 ids never stored (in
//! SQLite a lookup probes every key generation: docs/durability.md "Store").
//!
//! The figure to compare with is the journal's: the flusher must store as fast as gifts become
//! durable, or the journal's backlog grows (docs/benchmarks.md, "The store alone").

use clap::Parser;
use giftcast::flusher::FLUSH_BATCH_RECORDS_MAX_DEFAULT;
use giftcast::money::{Coins, Split};
use giftcast::record::{GiftRecord, Lsn, Record};
use giftcast::store::Store;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

const USERS: u64 = 10_000;
const STREAMS: u64 = 100;
const STICKERS: [(&str, u64); 4] = [("rose", 1), ("heart", 5), ("rocket", 100), ("castle", 1000)];

/// `cargo bench --bench store_apply -- --help`
#[derive(clap::Parser)]
struct Opts {
    /// Gift records to apply.
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    records: u64,
    /// Records per `apply_batch` call.
    #[arg(long, default_value_t = FLUSH_BATCH_RECORDS_MAX_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    batch: usize,
    /// Records per printed row.
    #[arg(long, default_value_t = 250_000, value_parser = clap::value_parser!(u64).range(1..))]
    window: u64,
    /// Also run on a fresh schema in this PostgreSQL database (dropped after).
    #[arg(long)]
    pg: Option<String>,
    /// Where the SQLite file goes (a temporary directory inside it).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: std::path::PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Gift `n`, reproducible from the seed.
fn gift(n: u64, rng: &mut rand::rngs::StdRng, split: &Split) -> GiftRecord {
    let user = rng.random_range(0..USERS);
    let (sticker, price) = STICKERS[rng.random_range(0..STICKERS.len())];
    let count = 1 + rng.random_range(0..3u32);
    let amount = price * u64::from(count);
    GiftRecord {
        user_id: format!("user-{user}").into(),
        user_name: format!("User {user}").into(),
        gift_id: format!("{:032x}", rng.random::<u128>()).into(),
        // A sender mostly gifts in the room they watch.
        stream: format!(
            "stream-{}",
            if rng.random_range(0..10) == 0 {
                rng.random_range(0..STREAMS)
            } else {
                user % STREAMS
            }
        )
        .into(),
        sticker: sticker.into(),
        count,
        price,
        amount,
        shares: split.shares(Coins(amount)).expect("amount in range"),
        message: n.is_multiple_of(10).then(|| format!("question {n}?")),
        balance_after: 1_000_000_000_000 - n,
        ts_ms: 1_800_000_000_000 + n / 100,
    }
}

async fn run(store: &Store, label: &str, o: &Opts) -> anyhow::Result<()> {
    let split = Split::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut lsn: Lsn = 0;
    let mut in_window = 0u64;
    let mut window_secs = 0f64;
    let mut total_secs = 0f64;
    let mut slowest_batch = 0f64;
    let mut gross = 0u64;
    // Every `sample_every`th gift, looked up by id at the end.
    let sample_every = (o.records / LOOKUPS).max(1);
    let mut sampled = Vec::new();
    println!("\n{label}: {} records in batches of {}", o.records, o.batch);
    println!("| records stored | window records/s | slowest batch in window (ms) |");
    println!("|---|---|---|");
    while lsn < o.records {
        let n = (o.records - lsn).min(o.batch as u64);
        let batch: Vec<(Lsn, Arc<Record>)> = (0..n)
            .map(|_| {
                lsn += 1;
                let gift = gift(lsn, &mut rng, &split);
                gross += gift.amount;
                if lsn.is_multiple_of(sample_every) {
                    sampled.push(gift.clone());
                }
                (lsn, Arc::new(Record::Gift(gift)))
            })
            .collect();
        let started = Instant::now();
        store.apply_batch(&batch).await?;
        let secs = started.elapsed().as_secs_f64();
        window_secs += secs;
        total_secs += secs;
        slowest_batch = slowest_batch.max(secs);
        in_window += n;
        if in_window >= o.window || lsn == o.records {
            println!(
                "| {lsn} | {:.0} | {:.1} |",
                in_window as f64 / window_secs,
                slowest_batch * 1e3
            );
            (in_window, window_secs, slowest_batch) = (0, 0.0, 0.0);
        }
    }
    // The totals, not every gift whole (that would hold them all in memory): the checkpoint, the
    // revenue rows' gift count (one per stored gift) and the gifted total.
    let snapshot = store.load(i64::MAX as u64).await?;
    anyhow::ensure!(snapshot.checkpoint_lsn == o.records, "checkpoint moved");
    let stored: u64 = snapshot.revenue.iter().map(|row| row.gifts).sum();
    anyhow::ensure!(
        stored == o.records,
        "every gift stored once ({stored} counted)"
    );
    anyhow::ensure!(snapshot.gifted_total == gross, "the gifted total is exact");
    println!(
        "\n**{label}: {:.0} records/s over {} records** ({:.2} s in apply_batch)",
        o.records as f64 / total_secs,
        o.records,
        total_secs
    );
    lookups(store, label, &sampled).await
}

/// Gifts looked up by id after the run (`Store::find_gift`, as for a retry whose id left
/// memory): stored ones spread over the whole table, and as many ids never stored.
const LOOKUPS: u64 = 1_000;

/// Times `find_gift` for each sampled gift (it must be found, whole) and for as many ids never
/// stored (none must be), and prints the latency percentiles of each.
async fn lookups(store: &Store, label: &str, sampled: &[GiftRecord]) -> anyhow::Result<()> {
    let mut found = Vec::with_capacity(sampled.len());
    let mut missed = Vec::with_capacity(sampled.len());
    for (i, gift) in sampled.iter().enumerate() {
        let started = Instant::now();
        // From 0: every generation is in the window (the run's gifts span seconds, well within
        // the 7-day retention the server looks back).
        let got = store
            .find_gift(&gift.user_id, &gift.gift_id, giftcast::store::since(0))
            .await?;
        found.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(got.as_ref() == Some(gift), "stored gift {i} found whole");
        let started = Instant::now();
        let got = store
            .find_gift(
                &gift.user_id,
                &format!("never-{i}"),
                giftcast::store::since(0),
            )
            .await?;
        missed.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(got.is_none(), "an id never stored is not found");
    }
    for (what, mut secs) in [("stored id", found), ("id never stored", missed)] {
        secs.sort_by(f64::total_cmp);
        let at = |q: f64| secs[((secs.len() - 1) as f64 * q) as usize] * 1e6;
        println!(
            "{label}: find_gift of {} x {what}: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            secs.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let dir = tempfile::tempdir_in(&o.dir)?;
    println!(
        "store_apply: load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let sqlite = Store::open(None, dir.path()).await?;
    run(&sqlite, "sqlite", &o).await?;
    if let Some(url) = &o.pg {
        let schema = format!("store_apply_{}", std::process::id());
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let scoped = format!("{url}{sep}options=-csearch_path%3D{schema}");
        let result = async {
            let pg = Store::open(Some(&scoped), dir.path()).await?;
            run(&pg, "postgres", &o).await
        }
        .await;
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await?;
        result?;
    }
    Ok(())
}

//! Durable-path micro benchmark: journal group commit alone, or journal + flusher into a store.
//!
//! cargo run --release --example durable_bench -- [records] [in_flight] [none|sqlite|postgres://…] [rate_per_s]
//!
//! `in_flight` submitters each submit a record and wait for its ticket (a gift acknowledged only
//! once durable), so the load is closed-loop; with `rate_per_s` > 0 the load is open-loop at that
//! rate instead. Prints durable records/s, fsyncs, records per fsync, ack latency p50/p99/max,
//! and (with a store) the time until everything was stored.

use giftcast::flusher::{self, FlushConfig};
use giftcast::journal::{Journal, JournalConfig};
use giftcast::money::{Coins, Split};
use giftcast::record::{GiftRecord, Record};
use giftcast::store::Store;
use std::time::{Duration, Instant};

fn gift(n: u64, split: &Split) -> Record {
    let amount = 10;
    Record::Gift(GiftRecord {
        user_id: format!("user-{}", n % 10_000).into(),
        user_name: format!("User {}", n % 10_000).into(),
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
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let records: u64 = args.get(1).map_or(Ok(200_000), |s| s.parse())?;
    let in_flight: u64 = args.get(2).map_or(Ok(1000), |s| s.parse())?;
    let backend = args.get(3).cloned().unwrap_or_else(|| "none".into());
    let rate: u64 = args.get(4).map_or(Ok(0), |s| s.parse())?;
    let dir = tempfile::Builder::new()
        .prefix("durable-bench")
        .tempdir_in(".")?;
    let store = match backend.as_str() {
        "none" => None,
        "sqlite" => Some(Store::open(None, dir.path()).await?),
        url => Some(Store::open(Some(url), dir.path()).await?),
    };
    let checkpoint = match &store {
        Some(store) => store.load(0).await?.checkpoint_lsn,
        None => 0,
    };
    let (journal, _, rx) = Journal::open(JournalConfig::new(dir.path()), checkpoint)?;
    let flusher = store.map(|s| flusher::spawn(s, journal.clone(), rx, FlushConfig::default()));
    let split = Split::default();
    let started = Instant::now();
    let mut latencies_us: Vec<u64> = Vec::with_capacity(records as usize);
    if rate == 0 {
        let mut tasks = Vec::new();
        let per_task = records / in_flight;
        for t in 0..in_flight {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_task as usize);
                for i in 0..per_task {
                    let sent = Instant::now();
                    let ticket = loop {
                        match journal.submit(gift(t * per_task + i, &split)) {
                            Ok(ticket) => break ticket,
                            Err(giftcast::journal::JournalError::Full(_)) => {
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
            latencies_us.extend(task.await?);
        }
    } else {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut ticker = tokio::time::interval(interval.max(Duration::from_micros(100)));
        let per_tick = (rate as f64 * ticker.period().as_secs_f64())
            .round()
            .max(1.0) as u64;
        let mut waits = Vec::new();
        let mut n = 0;
        while n < records {
            ticker.tick().await;
            for _ in 0..per_tick {
                let sent = Instant::now();
                let ticket = journal.submit(gift(n, &split))?;
                waits.push(tokio::spawn(async move {
                    ticket.wait().await.unwrap();
                    sent.elapsed().as_micros() as u64
                }));
                n += 1;
            }
        }
        for w in waits {
            latencies_us.push(w.await?);
        }
    }
    let elapsed = started.elapsed();
    let stats = journal.stats();
    latencies_us.sort_unstable();
    let pct = |p: f64| latencies_us[((latencies_us.len() as f64 - 1.0) * p) as usize];
    println!(
        "backend={backend} records={} in_flight={in_flight} rate={rate}: {:.0} durable records/s, {} fsyncs ({:.0} records/fsync), ack p50={}us p99={}us max={}us",
        latencies_us.len(),
        latencies_us.len() as f64 / elapsed.as_secs_f64(),
        stats.fsyncs,
        latencies_us.len() as f64 / stats.fsyncs.max(1) as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    if let Some(flusher) = flusher {
        let target = stats.durable_lsn;
        while flusher.status().stored_lsn < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stored = started.elapsed();
        println!(
            "all {target} records stored after {:.2}s: {:.0} stored records/s end to end",
            stored.as_secs_f64(),
            target as f64 / stored.as_secs_f64()
        );
        journal.shutdown().await;
        flusher.drain(Duration::from_secs(10)).await?;
    }
    Ok(())
}

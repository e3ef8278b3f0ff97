//! What would cut the journal's ack p99? A probe of the disk alone, no giftcast code: records
//! arrive open-loop at a set rate and are made durable by group commit (one `write` + one
//! `fdatasync` per batch), four ways, interleaved round by round in the same run so they share
//! the disk's mood:
//!
//! - `append`: today's journal: append to a growing file, one fsync in flight;
//! - `zeroed`: overwrite a file zero-filled and synced beforehand (no size change to commit);
//! - `append2`: append, but up to two fsyncs in flight (the next batch is written and its fsync
//!   started while the previous one runs; acks still in order);
//! - `zeroed2`: both.
//!
//! cargo run --release --example fsync_probe -- --rate 10000 --secs 10 --rounds 3 --dir /tmp/fp
//!
//! Prints, per mode, the ack latency (arrival to durable) p50/p90/p99/p99.9/max and the fsync
//! p50/p99, summed over the rounds.

use clap::Parser;
use parking_lot::{Condvar, Mutex};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    about = "Ack latency of group commit on this disk: append vs pre-zeroed, 1 vs 2 fsyncs in flight"
)]
struct Args {
    /// Records per second, offered open-loop.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds per mode per round.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Rounds; each runs every mode once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Bytes per record (a journal gift frame is ~150).
    #[arg(long, default_value_t = 160)]
    record_bytes: usize,
    /// Directory for the probe files (same disk as the journal you care about).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Modes to run, comma-separated.
    #[arg(long, default_value = "append,zeroed,append2,zeroed2")]
    modes: String,
}

#[derive(Default)]
struct Queue {
    arrivals: Vec<Instant>,
    done: bool,
}

struct Job {
    arrivals: Vec<Instant>,
    seq: u64,
}

#[derive(Default)]
struct Results {
    acks_us: Vec<u64>,
    fsyncs_us: Vec<u64>,
    batches: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let modes: Vec<String> = args.modes.split(',').map(str::to_owned).collect();
    for mode in &modes {
        anyhow::ensure!(
            ["append", "zeroed", "append2", "zeroed2"].contains(&mode.as_str()),
            "unknown mode {mode}: append, zeroed, append2 or zeroed2"
        );
    }
    let mut totals: Vec<Results> = modes.iter().map(|_| Results::default()).collect();
    for round in 1..=args.rounds {
        for (i, mode) in modes.iter().enumerate() {
            eprint!("round {round}/{} {mode}: ", args.rounds);
            let r = run_mode(&args, mode)?;
            eprintln!(
                "{} acks, {} fsyncs, ack p99 {:.2} ms",
                r.acks_us.len(),
                r.batches,
                pct(&sorted(r.acks_us.clone()), 99.0) as f64 / 1000.0
            );
            totals[i].acks_us.extend(r.acks_us);
            totals[i].fsyncs_us.extend(r.fsyncs_us);
            totals[i].batches += r.batches;
        }
    }
    println!(
        "rate {}/s, {} s x {} rounds per mode, {} B records, dir {}",
        args.rate,
        args.secs,
        args.rounds,
        args.record_bytes,
        args.dir.display()
    );
    println!("| mode | acks | records/fsync | ack p50 | p90 | p99 | p99.9 | max | fsync p50 | fsync p99 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (mode, r) in modes.iter().zip(totals) {
        let ms = |v: u64| format!("{:.2}", v as f64 / 1000.0);
        let (acks, fsyncs) = (sorted(r.acks_us), sorted(r.fsyncs_us));
        println!(
            "| {mode} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            acks.len(),
            acks.len() as f64 / r.batches.max(1) as f64,
            ms(pct(&acks, 50.0)),
            ms(pct(&acks, 90.0)),
            ms(pct(&acks, 99.0)),
            ms(pct(&acks, 99.9)),
            ms(pct(&acks, 100.0)),
            ms(pct(&fsyncs, 50.0)),
            ms(pct(&fsyncs, 99.0)),
        );
    }
    Ok(())
}

/// The `p`th percentile of `sorted` (ascending).
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

fn run_mode(args: &Args, mode: &str) -> anyhow::Result<Results> {
    let zeroed = mode.starts_with("zeroed");
    let depth = if mode.ends_with('2') { 2 } else { 1 };
    let path = args.dir.join(format!("fsync-probe-{mode}.dat"));
    let _ = std::fs::remove_file(&path);
    let bytes = args.rate * args.secs * args.record_bytes as u64 * 11 / 10 + (1 << 20);
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    if zeroed {
        let chunk = vec![0u8; 1 << 20];
        let mut f = &file;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
    }
    File::open(&args.dir)?.sync_all()?;
    let file = Arc::new(file);

    let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let generator = {
        let queue = queue.clone();
        let (rate, secs) = (args.rate, args.secs);
        std::thread::spawn(move || {
            let start = Instant::now();
            let total = rate * secs;
            for n in 0..total {
                let due = start + Duration::from_nanos(n * 1_000_000_000 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let (lock, cv) = &*queue;
                lock.lock().arrivals.push(due);
                cv.notify_one();
            }
            let (lock, cv) = &*queue;
            lock.lock().done = true;
            cv.notify_one();
        })
    };

    // Completions: acks go out in batch order (a batch is acknowledged only once it and every
    // batch before it are durable), as the journal's durable LSN would move.
    let results = Arc::new(Mutex::new(Results::default()));
    let in_flight = Arc::new((
        Mutex::new((0usize, 0u64, std::collections::BTreeMap::new())),
        Condvar::new(),
    ));
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let syncers: Vec<_> = (0..depth)
        .map(|_| {
            let (file, job_rx, in_flight, results) = (
                file.clone(),
                job_rx.clone(),
                in_flight.clone(),
                results.clone(),
            );
            std::thread::spawn(move || loop {
                let Ok(job) = job_rx.lock().recv() else {
                    return;
                };
                let t = Instant::now();
                file.sync_data().expect("fdatasync");
                let fsync_us = t.elapsed().as_micros() as u64;
                let (lock, cv) = &*in_flight;
                let mut state = lock.lock();
                let (count, next_ack, parked) = &mut *state;
                parked.insert(job.seq, job.arrivals);
                let mut r = results.lock();
                r.fsyncs_us.push(fsync_us);
                while let Some(arrivals) = parked.remove(next_ack) {
                    let now = Instant::now();
                    r.acks_us.extend(
                        arrivals
                            .iter()
                            .map(|a| now.saturating_duration_since(*a).as_micros() as u64),
                    );
                    r.batches += 1;
                    *next_ack += 1;
                    *count -= 1;
                }
                cv.notify_all();
            })
        })
        .collect();

    let record = vec![0xA5u8; args.record_bytes];
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut seq = 0u64;
    let mut appender = &*file;
    loop {
        // Wait for a free fsync slot, then for records.
        {
            let (lock, cv) = &*in_flight;
            let mut state = lock.lock();
            while state.0 >= depth {
                cv.wait(&mut state);
            }
        }
        let arrivals = {
            let (lock, cv) = &*queue;
            let mut q = lock.lock();
            while q.arrivals.is_empty() && !q.done {
                cv.wait(&mut q);
            }
            if q.arrivals.is_empty() {
                break;
            }
            std::mem::take(&mut q.arrivals)
        };
        buf.clear();
        for _ in &arrivals {
            buf.extend_from_slice(&record);
        }
        if zeroed {
            file.write_all_at(&buf, offset)?;
        } else {
            appender.write_all(&buf)?;
        }
        offset += buf.len() as u64;
        in_flight.0.lock().0 += 1;
        job_tx.send(Job { arrivals, seq })?;
        seq += 1;
    }
    drop(job_tx);
    for s in syncers {
        s.join().expect("syncer");
    }
    generator.join().expect("generator");
    drop(file);
    std::fs::remove_file(&path)?;
    let results = std::mem::take(&mut *results.lock());
    Ok(results)
}

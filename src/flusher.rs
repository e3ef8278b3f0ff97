//! The flusher: moves durable journal records into the store, one transaction per batch, then
//! releases the journal up to the stored position. Storage down: nothing is dropped; the batch is
//! kept and retried with exponential backoff while the journal keeps taking records up to its
//! backlog bound; `status()` and the metrics say that storage is behind.
//!
//! Recovery needs no extra wiring: `Journal::open` queues the recovered records (those after the
//! store's checkpoint) on the `DurableRx` ahead of new ones, so they are stored first.

use crate::journal::{DurableRx, Journal};
use crate::record::{Lsn, Record};
use crate::store::Store;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Default time a record may wait before its batch is stored: short enough that the store (and
/// dashboards reading it) trail the journal by well under a second, long enough to batch
/// thousands of gifts per transaction at load.
pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 200;

/// Default records per store transaction. A batch is whatever arrived within the interval, up to
/// this: at a few thousand gifts/s batches stay small, and under load they grow to it. The store
/// takes a large batch far faster per record (a commit writes every page the batch dirtied, and
/// gift ids land at random in their index, so past a few million stored gifts a batch dirties
/// most of that index whatever its size): cargo bench store_apply measured SQLite at ~35k
/// records/s in batches of 5,000, ~90k/s in batches of 50,000, and at the 6th million stored
/// gifts 119-137k/s in batches of 200,000 against 58-72k/s in batches of 50,000
/// (docs/benchmarks.md, "The store alone", "Larger flusher batches"). End to end at 100k gifts/s
/// for 120 s (12M gifts), 50,000 fell behind until the journal's backlog bound refused gifts in
/// 2 of 2 runs, while 200,000 kept up (backlog at most 219-240k records; 400,000: the same), so
/// the default is 200,000 (docs/benchmarks.md, "Flusher batches of 200,000"). One transaction then takes up
/// to ~2 s at 6M stored gifts. A store lookup of an evicted gift id does not wait behind it: in
/// SQLite it has its own reader connection; in PostgreSQL it is pipelined on the one connection
/// between the batch's statements (inside the open transaction, so it may see the batch's own
/// gifts: every one of them is durable in the journal already, so answering from them is
/// right). The records are the journal's own (`Arc`s), so a batch costs no copy.
pub const FLUSH_BATCH_RECORDS_MAX_DEFAULT: usize = 200_000;

/// Default cap of the retry backoff while storage fails: a returning database is noticed within
/// this, and a dead one is not hammered.
pub const FLUSH_BACKOFF_MS_MAX_DEFAULT: u64 = 5_000;

/// The first retry delay after a store error; doubled per failure up to `backoff_ms_max`.
pub const FLUSH_BACKOFF_MS_MIN: u64 = 50;

#[derive(Clone, Debug)]
pub struct FlushConfig {
    pub interval_ms: u64,
    pub batch_records_max: usize,
    pub backoff_ms_max: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            interval_ms: FLUSH_INTERVAL_MS_DEFAULT,
            batch_records_max: FLUSH_BATCH_RECORDS_MAX_DEFAULT,
            backoff_ms_max: FLUSH_BACKOFF_MS_MAX_DEFAULT,
        }
    }
}

/// For /readyz and the dashboard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushStatus {
    /// The store holds every record <= this.
    pub stored_lsn: Lsn,
    /// Durable journal records not yet in the store.
    pub pending_records: u64,
    /// False while the last store attempt failed (storage down or refusing): "storage is behind".
    pub healthy: bool,
    /// The last store error, until a batch succeeds again.
    pub last_error: Option<String>,
    /// Milliseconds since the last successful store transaction (or since start), 0 when nothing
    /// is pending.
    pub behind_ms: u64,
    /// Store transactions that succeeded since start (each at most `batch_records_max` records).
    pub stored_batches: u64,
}

struct Shared {
    stored_lsn: AtomicU64,
    stored_batches: AtomicU64,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    last_success: Mutex<Instant>,
}

pub struct FlusherHandle {
    shared: Arc<Shared>,
    journal: Journal,
    drain: watch::Sender<bool>,
    /// Taken by the first `drain` (the lock is never held across an `.await`).
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Why `drain` gave up. The records it could not store are safe in the journal and are stored
/// at the next start.
#[derive(Debug, thiserror::Error)]
#[error("flusher drain timed out with {unstored_records} records not yet stored (safe in the journal); last error: {last_error:?}")]
pub struct DrainError {
    pub unstored_records: u64,
    pub last_error: Option<String>,
}

/// Starts the flusher task. Must be called inside a tokio runtime. `rx` is the one returned by
/// `Journal::open` (it already holds the recovered records).
pub fn spawn(store: Store, journal: Journal, rx: DurableRx, cfg: FlushConfig) -> FlusherHandle {
    assert!(cfg.batch_records_max > 0 && cfg.interval_ms > 0);
    let shared = Arc::new(Shared {
        stored_lsn: AtomicU64::new(journal.stats().released_lsn),
        stored_batches: AtomicU64::new(0),
        healthy: AtomicBool::new(true),
        last_error: Mutex::new(None),
        last_success: Mutex::new(Instant::now()),
    });
    let (drain, drain_rx) = watch::channel(false);
    let flusher = Flusher {
        store,
        journal: journal.clone(),
        rx,
        rx_open: true,
        drain_rx,
        handle_dropped: false,
        draining: false,
        cfg,
        shared: shared.clone(),
        pending: Vec::new(),
    };
    let task = tokio::spawn(flusher.run());
    FlusherHandle {
        shared,
        journal,
        drain,
        task: Mutex::new(Some(task)),
    }
}

impl FlusherHandle {
    pub fn status(&self) -> FlushStatus {
        let stored_lsn = self.shared.stored_lsn.load(Ordering::Acquire);
        let pending_records = self.journal.stats().durable_lsn.saturating_sub(stored_lsn);
        FlushStatus {
            stored_lsn,
            pending_records,
            healthy: self.shared.healthy.load(Ordering::Acquire),
            last_error: self.shared.last_error.lock().clone(),
            behind_ms: if pending_records == 0 {
                0
            } else {
                self.shared.last_success.lock().elapsed().as_millis() as u64
            },
            stored_batches: self.shared.stored_batches.load(Ordering::Acquire),
        }
    }

    /// Stores everything received so far and stops. For SIGTERM: call `journal.shutdown()`
    /// first, so that "received so far" is every durable record. On timeout the task is stopped
    /// and the unstored records stay in the journal for the next start. Takes `&self` so the
    /// handle can live in an `Arc` shared with /readyz; a second call returns `Ok` at once.
    pub async fn drain(&self, timeout: Duration) -> Result<(), DrainError> {
        let _ = self.drain.send(true);
        let Some(mut task) = self.task.lock().take() else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(_) => Ok(()),
            Err(_) => {
                task.abort();
                let status = self.status();
                Err(DrainError {
                    unstored_records: status.pending_records,
                    last_error: status.last_error,
                })
            }
        }
    }
}

struct Flusher {
    store: Store,
    journal: Journal,
    rx: DurableRx,
    /// False once the journal writer has exited (every durable record received).
    rx_open: bool,
    drain_rx: watch::Receiver<bool>,
    /// The handle was dropped without a drain: keep flushing until the journal closes.
    handle_dropped: bool,
    /// Drain requested: store what was received, take nothing more, stop.
    draining: bool,
    cfg: FlushConfig,
    shared: Arc<Shared>,
    /// Received and not yet stored, in LSN order.
    pending: Vec<(Lsn, Arc<Record>)>,
}

impl Flusher {
    async fn run(mut self) {
        let mut backoff_ms = FLUSH_BACKOFF_MS_MIN;
        loop {
            if self.pending.len() < self.cfg.batch_records_max {
                self.collect().await;
            }
            if self.pending.is_empty() {
                if self.draining || !self.rx_open {
                    break;
                }
                continue;
            }
            let count = self.pending.len().min(self.cfg.batch_records_max);
            let started = Instant::now();
            let result = self.store.apply_batch(&self.pending[..count]).await;
            metrics::histogram!("giftcast_flusher_batch_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    let last = self.pending[count - 1].0;
                    self.pending.drain(..count);
                    self.journal.release_upto(last);
                    self.shared.stored_lsn.store(last, Ordering::Release);
                    self.shared.stored_batches.fetch_add(1, Ordering::AcqRel);
                    *self.shared.last_success.lock() = Instant::now();
                    if !self.shared.healthy.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            stored_lsn = last,
                            "storage is back; the flusher caught up a batch"
                        );
                    }
                    self.shared.last_error.lock().take();
                    backoff_ms = FLUSH_BACKOFF_MS_MIN;
                    metrics::counter!("giftcast_flusher_batches_total").increment(1);
                    metrics::counter!("giftcast_flusher_records_total").increment(count as u64);
                }
                Err(e) => {
                    let message = e.to_string();
                    tracing::warn!(error = %message, pending = self.pending.len(), retry_ms = backoff_ms, "storage write failed; records stay in the journal, retrying");
                    self.shared.healthy.store(false, Ordering::Release);
                    *self.shared.last_error.lock() = Some(message);
                    metrics::counter!("giftcast_flusher_errors_total").increment(1);
                    self.publish_gauges();
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms =
                        (backoff_ms * 2).min(self.cfg.backoff_ms_max.max(FLUSH_BACKOFF_MS_MIN));
                }
            }
            self.publish_gauges();
        }
        self.publish_gauges();
        tracing::info!(
            stored_lsn = self.shared.stored_lsn.load(Ordering::Acquire),
            "flusher stopped"
        );
    }

    /// Fills `pending`: waits for a first record, then gathers more until the batch is full or
    /// the interval has passed. On drain, takes what is already queued and nothing more.
    async fn collect(&mut self) {
        if !self.draining && *self.drain_rx.borrow() {
            self.start_draining();
        }
        if self.draining || !self.rx_open {
            return;
        }
        let batch_max = self.cfg.batch_records_max;
        if self.pending.is_empty() {
            tokio::select! {
                received = self.rx.recv() => match received {
                    Some(record) => self.pending.push(record),
                    None => { self.rx_open = false; return; }
                },
                changed = self.drain_rx.changed(), if !self.handle_dropped => {
                    self.on_drain_signal(changed.is_ok());
                    return;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.cfg.interval_ms);
        while self.pending.len() < batch_max {
            tokio::select! {
                received = self.rx.recv() => match received {
                    Some(record) => self.pending.push(record),
                    None => { self.rx_open = false; return; }
                },
                _ = tokio::time::sleep_until(deadline) => return,
                changed = self.drain_rx.changed(), if !self.handle_dropped => {
                    self.on_drain_signal(changed.is_ok());
                    return;
                }
            }
        }
    }

    fn on_drain_signal(&mut self, drain_requested: bool) {
        if drain_requested {
            self.start_draining();
        } else {
            self.handle_dropped = true;
        }
    }

    /// Takes every record already queued; later ones are left to the journal (next start).
    fn start_draining(&mut self) {
        self.draining = true;
        while let Ok(record) = self.rx.try_recv() {
            self.pending.push(record);
        }
        tracing::info!(pending = self.pending.len(), "flusher draining");
    }

    fn publish_gauges(&self) {
        let stored = self.shared.stored_lsn.load(Ordering::Acquire);
        let pending = self.journal.stats().durable_lsn.saturating_sub(stored);
        metrics::gauge!("giftcast_flusher_pending_records").set(pending as f64);
        metrics::gauge!("giftcast_flusher_behind").set(
            if self.shared.healthy.load(Ordering::Acquire) {
                0.0
            } else {
                1.0
            },
        );
        let behind = if pending == 0 {
            0.0
        } else {
            self.shared.last_success.lock().elapsed().as_secs_f64()
        };
        metrics::gauge!("giftcast_flusher_seconds_since_success").set(behind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{FullReason, JournalConfig, JournalError, Ticket};
    use crate::store::tests::{history, model, pg_schema};
    use crate::store::{PgStore, Snapshot};
    use std::path::Path;
    use tokio::net::{TcpListener, TcpStream};

    fn fast() -> FlushConfig {
        FlushConfig {
            interval_ms: 20,
            batch_records_max: 64,
            backoff_ms_max: 100,
        }
    }

    fn strip(records: &[(Lsn, Arc<Record>)]) -> Vec<Record> {
        records.iter().map(|(_, r)| (**r).clone()).collect()
    }

    async fn submit_all(journal: &Journal, records: &[(Lsn, Arc<Record>)]) {
        let tickets: Vec<Ticket> = records
            .iter()
            .map(|(_, r)| journal.submit((**r).clone()).unwrap())
            .collect();
        for (ticket, (lsn, _)) in tickets.into_iter().zip(records) {
            assert_eq!(ticket.wait().await, Ok(*lsn));
        }
    }

    async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn journal_config(dir: &Path) -> JournalConfig {
        let mut cfg = JournalConfig::new(dir);
        cfg.segment_bytes_max = 4096;
        cfg
    }

    #[tokio::test]
    async fn journaled_records_arrive_in_sqlite_and_release_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(None, dir.path()).await.unwrap();
        let (journal, _, rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
        let flusher = spawn(store.clone(), journal.clone(), rx, fast());
        let records = history(10, 30);
        submit_all(&journal, &records).await;
        wait_for("everything stored", || flusher.status().stored_lsn == 310).await;
        assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
        let status = flusher.status();
        assert!(status.healthy && status.last_error.is_none());
        assert_eq!((status.pending_records, status.behind_ms), (0, 0));
        wait_for("old segments deleted", || journal.stats().segments == 1).await;
        assert_eq!(journal.stats().released_lsn, 310);
        journal.shutdown().await;
        flusher.drain(Duration::from_secs(5)).await.unwrap();
    }

    /// Crash with records journaled but not stored, restart: load → open after the checkpoint →
    /// the ledger replays `recovered.records` and the flusher stores them, with no extra wiring.
    #[tokio::test]
    async fn recovery_stores_the_journal_tail_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let records = history(8, 20); // 168 records
        {
            let store = Store::open(None, dir.path()).await.unwrap();
            let (journal, _, rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
            let flusher = spawn(store, journal.clone(), rx, fast());
            submit_all(&journal, &records[..100]).await;
            wait_for("first part stored", || flusher.status().stored_lsn == 100).await;
            flusher.drain(Duration::from_secs(5)).await.unwrap();
            // No flusher any more: these are durable in the journal only. Then a "crash" (the
            // shutdown only waits for the writer thread to let go of the journal's lock).
            submit_all(&journal, &records[100..]).await;
            journal.shutdown().await;
        }
        let store = Store::open(None, dir.path()).await.unwrap();
        let snapshot = store.load(0).await.unwrap();
        assert_eq!(snapshot, model(&records[..100], 0));
        let (journal, recovered, rx) =
            Journal::open(journal_config(dir.path()), snapshot.checkpoint_lsn).unwrap();
        assert_eq!(recovered.next_lsn, 169);
        assert_eq!(
            recovered
                .records
                .iter()
                .map(|(_, r)| r.clone())
                .collect::<Vec<_>>(),
            strip(&records[100..])
        );
        let flusher = spawn(store.clone(), journal.clone(), rx, fast());
        wait_for("tail stored", || flusher.status().stored_lsn == 168).await;
        assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
        journal.shutdown().await;
        flusher.drain(Duration::from_secs(5)).await.unwrap();
    }

    /// The batch bound at its edge: a backlog of 1,000 records already queued when the flusher
    /// starts goes in exactly ceil(1000 / 64) = 16 transactions of at most 64 (and the last 40).
    #[tokio::test]
    async fn a_backlog_is_stored_in_batches_of_exactly_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let records = history(40, 24); // 1,000 records
        assert_eq!(records.len(), 1_000);
        {
            let (journal, _, _rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
            submit_all(&journal, &records).await;
            journal.shutdown().await;
        }
        let store = Store::open(None, dir.path()).await.unwrap();
        let (journal, recovered, rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
        assert_eq!(recovered.records.len(), 1_000);
        let flusher = spawn(store.clone(), journal.clone(), rx, fast());
        wait_for("backlog stored", || flusher.status().stored_lsn == 1_000).await;
        assert_eq!(flusher.status().stored_batches, 16);
        assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
        journal.shutdown().await;
        flusher.drain(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn drain_stores_everything_received_then_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(None, dir.path()).await.unwrap();
        let (journal, _, rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
        // A long interval: only the drain makes the flusher store now.
        let cfg = FlushConfig {
            interval_ms: 60_000,
            ..fast()
        };
        let flusher = spawn(store.clone(), journal.clone(), rx, cfg);
        let records = history(5, 5);
        submit_all(&journal, &records).await;
        journal.shutdown().await;
        flusher.drain(Duration::from_secs(5)).await.unwrap();
        assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
    }

    #[tokio::test]
    async fn a_dead_database_keeps_the_journal_accepting_up_to_the_backlog_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::Postgres(PgStore::new("postgres://postgres@127.0.0.1:1/test", "local").unwrap());
        let mut cfg = journal_config(dir.path());
        cfg.backlog_records_max = 300;
        let (journal, _, rx) = Journal::open(cfg, 0).unwrap();
        let flusher = spawn(store, journal.clone(), rx, fast());
        let records = history(10, 40); // 410 records
        submit_all(&journal, &records[..300]).await; // every one acknowledged: durable
        let refused = journal.submit((*records[300].1).clone()).err();
        assert_eq!(refused, Some(JournalError::Full(FullReason::Backlog)));
        wait_for("an error reported", || !flusher.status().healthy).await;
        let status = flusher.status();
        assert_eq!((status.stored_lsn, status.pending_records), (0, 300));
        assert!(status.last_error.is_some(), "{status:?}");
        wait_for("behind_ms grows", || flusher.status().behind_ms > 0).await;
        assert_eq!(journal.stats().durable_lsn, 300);
        journal.shutdown().await;
        let err = flusher.drain(Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(err.unstored_records, 300);
        // Nothing was lost: the journal still holds all 300 for the next start.
        let (_journal, recovered, _rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
        assert_eq!(recovered.records.len(), 300);
    }

    /// A TCP proxy in front of PostgreSQL that can be cut (every connection reset, new ones
    /// refused) and restored: a database outage and return, under the store's feet.
    struct Proxy {
        addr: std::net::SocketAddr,
        up: Arc<AtomicBool>,
        connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    }

    impl Proxy {
        async fn start(target: &'static str) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let up = Arc::new(AtomicBool::new(true));
            let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
            let (up2, connections2) = (up.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let (mut inbound, _) = listener.accept().await.unwrap();
                    if !up2.load(Ordering::Acquire) {
                        drop(inbound);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections2.lock().push(task.abort_handle());
                }
            });
            Proxy {
                addr,
                up,
                connections,
            }
        }

        fn cut(&self) {
            self.up.store(false, Ordering::Release);
            for connection in self.connections.lock().drain(..) {
                connection.abort();
            }
        }

        fn restore(&self) {
            self.up.store(true, Ordering::Release);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_outage_keeps_acknowledging_and_everything_lands_when_it_returns() {
        let proxy = Proxy::start("127.0.0.1:5432").await;
        let (schema, url) = pg_schema(&proxy.addr.to_string()).await;
        let _cleanup = SchemaGuard(schema);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(Some(&url), dir.path()).await.unwrap();
        let (journal, _, rx) = Journal::open(journal_config(dir.path()), 0).unwrap();
        let flusher = spawn(store.clone(), journal.clone(), rx, fast());
        let records = history(20, 50); // 1020 records
        submit_all(&journal, &records[..200]).await;
        wait_for("first part stored", || flusher.status().stored_lsn == 200).await;

        proxy.cut();
        submit_all(&journal, &records[200..800]).await; // acknowledged during the outage
        wait_for("the outage noticed", || !flusher.status().healthy).await;
        submit_all(&journal, &records[800..]).await;
        let status = flusher.status();
        assert!(
            status.stored_lsn < 1020 && status.pending_records > 0,
            "{status:?}"
        );
        assert!(status.last_error.is_some());
        assert!(journal.stats().segments > 1, "unstored segments are kept");

        proxy.restore();
        wait_for("the backlog drained", || {
            flusher.status().stored_lsn == 1020
        })
        .await;
        let status = flusher.status();
        assert!(status.healthy && status.last_error.is_none() && status.pending_records == 0);
        let snapshot: Snapshot = store.load(0).await.unwrap();
        assert_eq!(snapshot, model(&records, 0));
        wait_for("segments released", || journal.stats().segments == 1).await;
        journal.shutdown().await;
        flusher.drain(Duration::from_secs(5)).await.unwrap();
    }

    struct SchemaGuard(String);

    impl Drop for SchemaGuard {
        fn drop(&mut self) {
            crate::store::tests::drop_schema(std::mem::take(&mut self.0));
        }
    }
}

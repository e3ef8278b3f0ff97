//! The journal: append-only segments of CRC-checked frames, written by one thread with group
//! commit, so that a money record is acknowledged only once it is on disk. Bytes and records
//! only: no business rules live here.
//!
//! Layout: `<data_dir>/journal/<first lsn, 20 digits>.log`; frame format in [`frame`]; see
//! docs/durability.md for the whole story (group commit, recovery, outage behaviour, limits).

mod frame;
mod recover;
mod writer;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

pub use frame::{FRAME_BODY_BYTES_MAX, FRAME_HEADER_BYTES};

use crate::record::{Lsn, Record};
use parking_lot::{Condvar, Mutex};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// The file in the journal directory that the writer holds an exclusive lock on (`flock`), so
/// two processes never append to one journal. The lock dies with the process.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Default segment size before rotation: 64 MiB. Recovery reads one segment into memory at a
/// time, so this is also the recovery buffer size; segments are deleted whole once stored.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;

/// Default bound on records submitted but not yet taken by the writer. At ~300 B a record this
/// is ~20 MiB; it is only reached when fsync stalls, and then callers get `Full` at once instead
/// of queueing without bound.
pub const QUEUE_RECORDS_MAX_DEFAULT: usize = 65_536;

/// Default bound on records journaled but not yet in the store (the storage-outage backlog). The
/// flusher keeps each one in memory (~300-400 B with its `Arc<Record>`), so 1,000,000 is about
/// 400 MiB, and ~100 s of outage at 10,000 gifts/s. Past it, money is refused, never lost.
pub const BACKLOG_RECORDS_MAX_DEFAULT: u64 = 1_000_000;

/// Default bound on records in one write + fsync. Bounds the write buffer (4096 frames of a few
/// hundred bytes: ~1-2 MiB) while keeping fsyncs rare: measured 2M records/s at 1000 per fsync.
pub const BATCH_RECORDS_MAX_DEFAULT: usize = 4096;

/// Where the journal lives and how big things may grow.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The journal directory (normally `<data_dir>/journal`); created when missing.
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it holds at least this many bytes (it may
    /// exceed it by one batch: a batch is never split across segments).
    pub segment_bytes_max: u64,
    /// `submit` fails with `Full(Queue)` while this many records wait for the writer.
    pub queue_records_max: usize,
    /// `submit` fails with `Full(Backlog)` once this many journaled records are not yet released
    /// by the store (assigned lsn - released lsn).
    pub backlog_records_max: u64,
    /// At most this many records go into one write + fsync. Recovery also relies on it: after a
    /// power cut, frames past unwritten pages are taken for the rest of the last (never
    /// acknowledged) write only when they lie within this many LSNs of the damage.
    pub batch_records_max: usize,
    /// Zero-fill and fsync the next segment ahead of time, on a thread of its own, and write
    /// into it in place. An fdatasync then has no file size to commit through the filesystem's
    /// journal, which removes its long stalls (docs/benchmarks.md, "Preallocated segments").
    /// Off: segments grow by appending (for copy-on-write filesystems, where overwriting zeros
    /// allocates anyway).
    pub preallocate: bool,
    /// FOR TESTS (fault injection): after this many successful fsyncs, the next one fails as if
    /// the disk returned EIO. `None` in production.
    pub fail_after_syncs: Option<u64>,
    /// FOR TESTS: each fsync first waits this long, so records stay in flight long enough for a
    /// test to see what waits for the journal (e.g. the per-connection bound on gifts in flight).
    /// Zero in production.
    pub sync_delay_ms: u64,
}

impl JournalConfig {
    /// Defaults, with the journal in `<data_dir>/journal`.
    pub fn new(data_dir: &Path) -> Self {
        JournalConfig {
            dir: data_dir.join("journal"),
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            queue_records_max: QUEUE_RECORDS_MAX_DEFAULT,
            backlog_records_max: BACKLOG_RECORDS_MAX_DEFAULT,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            preallocate: true,
            fail_after_syncs: None,
            sync_delay_ms: 0,
        }
    }
}

/// Which bound refused a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullReason {
    /// Too many records wait for the writer (the disk is slower than the load).
    Queue,
    /// Too many journaled records are not yet in the store (storage is down or behind).
    Backlog,
}

impl std::fmt::Display for FullReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FullReason::Queue => "too many records wait for the disk",
            FullReason::Backlog => "storage is behind: the journal backlog bound is reached",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Back-pressure: the record was NOT taken; nothing was assigned. Retry later.
    #[error("journal full: {0}")]
    Full(FullReason),
    /// A write or fsync failed: the journal is dead for good; the node must stop taking money.
    #[error("journal failed, not taking money: {0}")]
    Failed(String),
    /// `shutdown` was called (or every handle dropped).
    #[error("journal closed")]
    Closed,
    #[error(
        "record encodes to {bytes} bytes, over the journal frame limit of {FRAME_BODY_BYTES_MAX}"
    )]
    TooLarge { bytes: usize },
    #[error("record cannot be encoded: {0}")]
    Encode(String),
    /// Recovery found damage that is not a torn tail. Never skipped: the operator must look.
    #[error("corrupt journal segment {}, byte offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("journal I/O error on {}: {message}", path.display())]
    Io { path: PathBuf, message: String },
}

/// What `Journal::open` read back.
#[derive(Debug)]
pub struct Recovered {
    /// Every record with lsn > after_lsn, in LSN order. The same records are also already queued
    /// on the returned [`DurableRx`], so the flusher stores them first.
    pub records: Vec<(Lsn, Record)>,
    /// The LSN the next submitted record gets.
    pub next_lsn: Lsn,
    /// Where a torn last frame was cut, if one was.
    pub torn_tail: Option<(PathBuf, u64)>,
}

/// Durable records, in LSN order, for the flusher. Unbounded as a channel, but bounded in
/// practice by `backlog_records_max` (submit refuses past it).
pub type DurableRx = mpsc::UnboundedReceiver<(Lsn, Arc<Record>)>;
pub(crate) type DurableTx = mpsc::UnboundedSender<(Lsn, Arc<Record>)>;

/// Point-in-time numbers for /readyz and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalStats {
    /// The LSN the next record gets.
    pub next_lsn: Lsn,
    /// Every record <= this is fsynced.
    pub durable_lsn: Lsn,
    /// The store has every record <= this.
    pub released_lsn: Lsn,
    /// Segment files on disk.
    pub segments: u64,
    /// Successful write + fsync rounds since open (one per group-committed batch).
    pub fsyncs: u64,
    /// Why the journal died, if it did.
    pub failed: Option<String>,
}

/// Called once with the outcome of a record given to [`Journal::submit_then`]: `Ok(lsn)` once
/// its frame is fsynced, `Err` if the journal failed (or closed) first. Runs on the journal's
/// settle thread, never under the submitter's locks; it should be short and must not block.
pub type OnDurable = Box<dyn FnOnce(Result<Lsn, JournalError>) + Send>;

/// How a submitter hears of its record's outcome.
pub(crate) enum Done {
    /// [`Journal::submit`]: a ticket to await.
    Ticket(oneshot::Sender<Result<Lsn, JournalError>>),
    /// [`Journal::submit_then`]: a callback, run with the rest of its batch on the settle thread.
    Call(OnDurable),
}

/// One batch's callbacks with their outcomes, handed to the settle thread in one message.
pub(crate) type SettleBatch = Vec<(Result<Lsn, JournalError>, OnDurable)>;

/// A record waiting for the writer.
pub(crate) struct Entry {
    pub lsn: Lsn,
    pub record: Arc<Record>,
    pub bytes: Vec<u8>,
    pub done: Done,
}

/// State shared by submitters and the writer, under one short lock.
pub(crate) struct Queue {
    pub next_lsn: Lsn,
    pub entries: Vec<Entry>,
    pub closed: bool,
    pub failed: Option<String>,
    /// `release_upto` raised `released_lsn`; the writer should delete segments.
    pub release_pending: bool,
}

pub(crate) struct Shared {
    pub queue: Mutex<Queue>,
    /// Wakes the writer: records, a release, or closing.
    pub wake: Condvar,
    pub durable_lsn: AtomicU64,
    pub released_lsn: AtomicU64,
    pub segments: AtomicU64,
    pub fsyncs: AtomicU64,
    pub queue_records_max: usize,
    pub backlog_records_max: u64,
}

/// Closes the journal when the last `Journal` clone is dropped.
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.queue.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// A cheap, cloneable handle to the journal.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    _close: Arc<CloseOnDrop>,
    /// Becomes true when the writer thread has exited (after writing everything it was given).
    exited: watch::Receiver<bool>,
}

/// Resolves once the record is durable.
#[must_use = "a record is acknowledged only when its ticket resolves"]
pub struct Ticket {
    lsn: Lsn,
    done: oneshot::Receiver<Result<Lsn, JournalError>>,
}

impl Ticket {
    /// The LSN assigned at submit.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Waits until the record's frame is fsynced; `Err(Failed)` if the write or fsync failed.
    pub async fn wait(self) -> Result<Lsn, JournalError> {
        match self.done.await {
            Ok(result) => result,
            Err(_) => Err(JournalError::Failed(
                "the journal writer stopped before the record was durable".into(),
            )),
        }
    }
}

impl Journal {
    /// Scans `cfg.dir`, cuts a torn tail, returns every record after `after_lsn` (the store's
    /// checkpoint) and starts the writer thread. The recovered records are also queued on the
    /// returned `DurableRx`, ahead of any new record, so the flusher stores them first.
    /// Blocking file I/O: call at start-up (it does not need a tokio runtime).
    pub fn open(
        cfg: JournalConfig,
        after_lsn: Lsn,
    ) -> Result<(Journal, Recovered, DurableRx), JournalError> {
        assert!(cfg.batch_records_max > 0 && cfg.queue_records_max > 0);
        assert!(cfg.backlog_records_max > 0 && cfg.segment_bytes_max > 0);
        std::fs::create_dir_all(&cfg.dir).map_err(|e| recover::io_error(&cfg.dir, e))?;
        if let Some(parent) = cfg.dir.parent() {
            recover::sync_dir(parent).map_err(|e| recover::io_error(parent, e))?;
        }
        let lock_path = cfg.dir.join(LOCK_FILE_NAME);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| recover::io_error(&lock_path, e))?;
        lock.try_lock().map_err(|e| JournalError::Io {
            path: lock_path.clone(),
            message: format!("the journal is in use by another process or handle: {e}"),
        })?;
        let scan = recover::scan(&cfg.dir, after_lsn, cfg.batch_records_max)?;
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        for (lsn, record) in &scan.records {
            durable_tx
                .send((*lsn, Arc::new(record.clone())))
                .expect("the receiver is held here");
        }
        let durable_lsn = scan.next_lsn - 1;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                next_lsn: scan.next_lsn,
                entries: Vec::new(),
                closed: false,
                failed: None,
                release_pending: true,
            }),
            wake: Condvar::new(),
            durable_lsn: AtomicU64::new(durable_lsn),
            released_lsn: AtomicU64::new(after_lsn.min(durable_lsn)),
            segments: AtomicU64::new(scan.segments.len() as u64),
            fsyncs: AtomicU64::new(0),
            queue_records_max: cfg.queue_records_max,
            backlog_records_max: cfg.backlog_records_max,
        });
        let (exited_tx, exited) = watch::channel(false);
        // The settle thread runs `submit_then` callbacks, a batch per message, so the writer
        // goes back to the disk at once while the previous batch's completions run beside it.
        // Opened from within a tokio runtime (the server), the settle thread runs in its
        // context, so a callback may spawn a task (cluster mode announces on another node).
        let (settle_tx, settle_rx) = std::sync::mpsc::channel::<SettleBatch>();
        let runtime = tokio::runtime::Handle::try_current().ok();
        let settler = std::thread::Builder::new()
            .name("journal-settle".into())
            .spawn(move || {
                let _context = runtime.as_ref().map(|r| r.enter());
                for batch in settle_rx {
                    for (outcome, call) in batch {
                        // A panicking callback is a bug in its submitter; it must not take the
                        // completions of every later record down with this thread.
                        let lsn = outcome.as_ref().ok().copied();
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(outcome)))
                            .is_err()
                        {
                            tracing::error!(?lsn, "a journal completion panicked");
                        }
                    }
                }
            })
            .map_err(|e| recover::io_error(&cfg.dir, e))?;
        let state =
            writer::Writer::start(&cfg, &scan, shared.clone(), durable_tx, settle_tx, lock)?;
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                // The writer drops its end of the settle channel when it returns: the settle
                // thread then runs what is left and ends, and only then is the journal exited.
                state.run();
                let _ = settler.join();
                let _ = exited_tx.send(true);
            })
            .map_err(|e| recover::io_error(&cfg.dir, e))?;
        let recovered = Recovered {
            records: scan.records,
            next_lsn: scan.next_lsn,
            torn_tail: scan.torn_tail,
        };
        tracing::info!(
            dir = %cfg.dir.display(),
            after_lsn,
            recovered = recovered.records.len(),
            next_lsn = recovered.next_lsn,
            "journal open"
        );
        let journal = Journal {
            _close: Arc::new(CloseOnDrop(shared.clone())),
            shared,
            exited,
        };
        Ok((journal, recovered, durable_rx))
    }

    /// Takes a record for the journal and assigns its LSN, in call order. Synchronous and
    /// non-blocking (one short lock), so the ledger may call it under a wallet lock: the journal
    /// order of one wallet's records is then the order they were applied in memory.
    pub fn submit(&self, record: impl Into<Arc<Record>>) -> Result<Ticket, JournalError> {
        let (done, wait) = oneshot::channel();
        let lsn = self.enqueue(record.into(), Done::Ticket(done))?;
        Ok(Ticket { lsn, done: wait })
    }

    /// As [`Journal::submit`], but instead of a ticket to await, `then` is called with the
    /// outcome on the journal's settle thread, together with the rest of its batch: no task and
    /// no wake-up per record. On `Err` here, `then` is dropped without being called.
    pub fn submit_then(
        &self,
        record: impl Into<Arc<Record>>,
        then: OnDurable,
    ) -> Result<Lsn, JournalError> {
        self.enqueue(record.into(), Done::Call(then))
    }

    fn enqueue(&self, record: Arc<Record>, done: Done) -> Result<Lsn, JournalError> {
        let bytes = frame::encode_record(&record)?;
        let mut queue = self.shared.queue.lock();
        if let Some(reason) = &queue.failed {
            return Err(JournalError::Failed(reason.clone()));
        }
        if queue.closed {
            return Err(JournalError::Closed);
        }
        if queue.entries.len() >= self.shared.queue_records_max {
            return Err(JournalError::Full(FullReason::Queue));
        }
        let assigned = queue.next_lsn - 1;
        let released = self.shared.released_lsn.load(Ordering::Acquire);
        if assigned.saturating_sub(released) >= self.shared.backlog_records_max {
            return Err(JournalError::Full(FullReason::Backlog));
        }
        let lsn = queue.next_lsn;
        queue.next_lsn += 1;
        queue.entries.push(Entry {
            lsn,
            record,
            bytes,
            done,
        });
        drop(queue);
        self.shared.wake.notify_one();
        Ok(lsn)
    }

    /// The store holds every record <= `lsn`: lowers the backlog and lets the writer delete the
    /// segments wholly <= `lsn` (never the active one).
    pub fn release_upto(&self, lsn: Lsn) {
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        assert!(
            lsn <= durable,
            "released lsn {lsn} beyond the durable lsn {durable}"
        );
        let previous = self.shared.released_lsn.fetch_max(lsn, Ordering::AcqRel);
        if lsn > previous {
            self.shared.queue.lock().release_pending = true;
            self.shared.wake.notify_one();
        }
    }

    /// The highest LSN given to a record so far (0: none); a record submitted after this call
    /// returns gets a higher one.
    pub fn assigned_lsn(&self) -> Lsn {
        self.shared.queue.lock().next_lsn - 1
    }

    /// The released position alone (no lock): the store holds every record at or below it.
    pub fn released_lsn(&self) -> Lsn {
        self.shared.released_lsn.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> JournalStats {
        let queue = self.shared.queue.lock();
        JournalStats {
            next_lsn: queue.next_lsn,
            durable_lsn: self.shared.durable_lsn.load(Ordering::Acquire),
            released_lsn: self.shared.released_lsn.load(Ordering::Acquire),
            segments: self.shared.segments.load(Ordering::Acquire),
            fsyncs: self.shared.fsyncs.load(Ordering::Acquire),
            failed: queue.failed.clone(),
        }
    }

    /// Stops taking records, writes and fsyncs everything already submitted (resolving their
    /// tickets), and waits for the writer to exit. The `DurableRx` then ends after the last
    /// durable record, so a flusher drain afterwards stores everything.
    pub async fn shutdown(&self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
        let mut exited = self.exited.clone();
        let _ = exited.wait_for(|done| *done).await;
    }
}

//! The single writer thread: group commit. It takes every record that arrived while the previous
//! write + fsync ran (up to `batch_records_max`), writes them with one `write`, makes them durable
//! with one `fdatasync`, then resolves their tickets and forwards them to the flusher.
//!
//! A dedicated OS thread rather than `spawn_blocking` per batch: the writer blocks in fsync most
//! of its life, and a thread parked on a condvar wakes faster than a task hop to the blocking
//! pool and back (no runtime needed either).
//!
//! With `preallocate`, a second thread (the preparer) zero-fills and fsyncs the next segment
//! ahead of time; the writer renames it into place at rotation and writes into it in place, so
//! its fdatasyncs never commit a file size change. Until one is ready (at start, or if the
//! preparer falls behind or fails), the writer appends to a plain segment, and it switches to
//! the prepared one at the next batch once it is ready.

use super::recover::{io_error, segment_path, sync_dir, Scan, Segment, PREPARED_SEGMENT_NAME};
use super::{frame, Done, DurableTx, Entry, JournalConfig, JournalError, SettleBatch, Shared};
use crate::record::Lsn;
use parking_lot::{Condvar, Mutex};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The preparer writes zeros in chunks of this size, checking between chunks whether the
/// journal is closing.
const PREPARE_CHUNK_BYTES: usize = 1024 * 1024;

/// The preparer fsyncs every this many bytes of zeros, so the next segment never sits in the
/// page cache as one large dirty burst that the journal's own fsync would queue behind.
const PREPARE_SYNC_BYTES: u64 = 8 * 1024 * 1024;

/// The write buffer is dropped after a batch when it grew beyond this, so one burst of large
/// records does not pin memory for the life of the process.
const WRITE_BUFFER_RETAIN_BYTES_MAX: usize = 4 * 1024 * 1024;

pub(crate) struct Writer {
    shared: Arc<Shared>,
    durable_tx: DurableTx,
    /// To the settle thread: each batch's `submit_then` callbacks, in one message.
    settle_tx: std::sync::mpsc::Sender<SettleBatch>,
    dir: PathBuf,
    segment_bytes_max: u64,
    batch_records_max: usize,
    /// Every segment on disk, oldest first; the last is the active one.
    segments: Vec<Segment>,
    active: File,
    active_bytes: u64,
    /// The active segment was preallocated (zero-filled): it is written in place.
    active_zeroed: bool,
    /// The thread preparing the next segment, when `preallocate` is on.
    preparer: Option<Preparer>,
    buf: Vec<u8>,
    syncs: u64,
    fail_after_syncs: Option<u64>,
    sync_delay_ms: u64,
    failed: Option<String>,
    /// Held (locked) for the writer's life: released when the writer exits.
    _lock: File,
}

impl Writer {
    /// Opens the active segment: the last one when it is empty, else a new one named by the next
    /// LSN (a segment a crash may have torn is never appended to).
    pub(crate) fn start(
        cfg: &JournalConfig,
        scan: &Scan,
        shared: Arc<Shared>,
        durable_tx: DurableTx,
        settle_tx: std::sync::mpsc::Sender<SettleBatch>,
        lock: File,
    ) -> Result<Writer, JournalError> {
        let mut segments = scan.segments.clone();
        let reuse = match segments.last() {
            Some(last) if scan.last_segment_bytes == 0 && last.first_lsn == scan.next_lsn => true,
            Some(last) if scan.last_segment_bytes == 0 => {
                // An empty segment with a stale name (the store checkpoint is ahead of it).
                std::fs::remove_file(&last.path).map_err(|e| io_error(&last.path, e))?;
                segments.pop();
                false
            }
            _ => false,
        };
        if !reuse {
            segments.push(Segment {
                first_lsn: scan.next_lsn,
                path: segment_path(&cfg.dir, scan.next_lsn),
            });
        }
        let path = &segments.last().expect("just ensured").path;
        let active = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        sync_dir(&cfg.dir).map_err(|e| io_error(&cfg.dir, e))?;
        let preparer = if cfg.preallocate {
            Some(Preparer::spawn(&cfg.dir, cfg.segment_bytes_max)?)
        } else {
            None
        };
        shared
            .segments
            .store(segments.len() as u64, Ordering::Release);
        metrics::gauge!("giftcast_journal_segments").set(segments.len() as f64);
        metrics::gauge!("giftcast_journal_failed").set(0.0);
        metrics::gauge!("giftcast_journal_active_preallocated").set(0.0);
        Ok(Writer {
            shared,
            durable_tx,
            settle_tx,
            dir: cfg.dir.clone(),
            segment_bytes_max: cfg.segment_bytes_max,
            batch_records_max: cfg.batch_records_max,
            segments,
            active,
            active_bytes: 0,
            active_zeroed: false,
            preparer,
            buf: Vec::new(),
            syncs: 0,
            fail_after_syncs: cfg.fail_after_syncs,
            sync_delay_ms: cfg.sync_delay_ms,
            failed: None,
            _lock: lock,
        })
    }

    pub(crate) fn run(mut self) {
        loop {
            let (batch, release, exit) = {
                let mut queue = self.shared.queue.lock();
                while queue.entries.is_empty() && !queue.release_pending && !queue.closed {
                    self.shared.wake.wait(&mut queue);
                }
                let batch = if queue.entries.len() <= self.batch_records_max {
                    std::mem::take(&mut queue.entries)
                } else {
                    queue.entries.drain(..self.batch_records_max).collect()
                };
                let release = std::mem::take(&mut queue.release_pending);
                let exit = queue.closed && queue.entries.is_empty();
                (batch, release, exit)
            };
            if !batch.is_empty() {
                self.write_batch(batch);
            }
            if release {
                self.delete_released_segments();
            }
            if exit {
                // Dropping the preparer stops it and removes what it prepared.
                self.preparer = None;
                tracing::info!(
                    durable_lsn = self.shared.durable_lsn.load(Ordering::Acquire),
                    "journal writer stopped"
                );
                return;
            }
        }
    }

    fn write_batch(&mut self, batch: Vec<Entry>) {
        if let Some(reason) = self.failed.clone() {
            self.settle(batch, |_| Err(JournalError::Failed(reason.clone())), false);
            return;
        }
        let first_lsn = batch[0].lsn;
        let last_lsn = batch[batch.len() - 1].lsn;
        debug_assert_eq!(last_lsn - first_lsn + 1, batch.len() as u64);
        debug_assert_eq!(
            first_lsn,
            self.shared.durable_lsn.load(Ordering::Acquire) + 1
        );
        self.buf.clear();
        for entry in &batch {
            frame::append_frame(&mut self.buf, entry.lsn, &entry.bytes);
        }
        let started = Instant::now();
        let result = self
            .rotate_if_due(first_lsn)
            .and_then(|()| self.write_and_sync());
        let elapsed = started.elapsed();
        if self.buf.capacity() > WRITE_BUFFER_RETAIN_BYTES_MAX {
            self.buf = Vec::new();
        }
        if let Err(reason) = result {
            tracing::error!(%reason, first_lsn, last_lsn, "journal write failed: the journal is dead, no more money is taken");
            metrics::gauge!("giftcast_journal_failed").set(1.0);
            self.shared.queue.lock().failed = Some(reason.clone());
            self.failed = Some(reason.clone());
            self.settle(batch, |_| Err(JournalError::Failed(reason.clone())), false);
            return;
        }
        self.shared.durable_lsn.store(last_lsn, Ordering::Release);
        self.shared.fsyncs.fetch_add(1, Ordering::AcqRel);
        metrics::counter!("giftcast_journal_fsyncs_total").increment(1);
        metrics::counter!("giftcast_journal_records_total").increment(batch.len() as u64);
        metrics::histogram!("giftcast_journal_fsync_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("giftcast_journal_batch_records").record(batch.len() as f64);
        let released = self.shared.released_lsn.load(Ordering::Acquire);
        metrics::gauge!("giftcast_journal_backlog_records")
            .set(last_lsn.saturating_sub(released) as f64);
        self.settle(batch, Ok, true);
    }

    /// Tells every submitter of `batch` its outcome: tickets at once, callbacks in one message to
    /// the settle thread; durable records also go on to the flusher.
    fn settle(
        &self,
        batch: Vec<Entry>,
        outcome: impl Fn(Lsn) -> Result<Lsn, JournalError>,
        durable: bool,
    ) {
        let mut calls: SettleBatch = Vec::new();
        for entry in batch {
            match entry.done {
                Done::Ticket(tx) => {
                    let _ = tx.send(outcome(entry.lsn));
                }
                Done::Call(call) => calls.push((outcome(entry.lsn), call)),
            }
            if durable {
                // The receiver is gone only when no flusher runs (tests, shutdown): nothing to do.
                let _ = self.durable_tx.send((entry.lsn, entry.record));
            }
        }
        if !calls.is_empty() {
            // The settle thread ends only after the writer: it is there to receive.
            let _ = self.settle_tx.send(calls);
        }
    }

    /// One write of the whole batch (at the end of what the segment holds: into the zeros of a
    /// prepared segment, or appended to a plain one), then one fdatasync.
    fn write_and_sync(&mut self) -> Result<(), String> {
        let path = &self.segments.last().expect("an active segment").path;
        self.active
            .write_all_at(&self.buf, self.active_bytes)
            .map_err(|e| format!("write to {} failed: {e}", path.display()))?;
        self.active_bytes += self.buf.len() as u64;
        if self.fail_after_syncs == Some(self.syncs) {
            return Err(format!(
                "fsync of {} failed: injected failure (JournalConfig::fail_after_syncs)",
                path.display()
            ));
        }
        if self.sync_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.sync_delay_ms));
        }
        self.active
            .sync_data()
            .map_err(|e| format!("fsync of {} failed: {e}", path.display()))?;
        self.syncs += 1;
        Ok(())
    }

    /// Before the batch starting at `first_lsn`: starts a new segment named `first_lsn` when the
    /// active one is full, or when it is a plain one and a prepared segment is ready. An active
    /// segment that is still empty (the first batch after open) has that very name: a prepared
    /// segment then replaces it.
    fn rotate_if_due(&mut self, first_lsn: Lsn) -> Result<(), String> {
        let full = self.active_bytes >= self.segment_bytes_max;
        let upgrade = !self.active_zeroed && self.preparer.as_ref().is_some_and(Preparer::ready);
        if !full && !upgrade {
            return Ok(());
        }
        let path = segment_path(&self.dir, first_lsn);
        if let Some(preparer) = &self.preparer {
            if let Some(file) = preparer.take() {
                let renamed = std::fs::rename(preparer.path(), &path);
                preparer.request();
                match renamed {
                    Ok(()) => {
                        sync_dir(&self.dir)
                            .map_err(|e| format!("fsync of {} failed: {e}", self.dir.display()))?;
                        self.start_segment(file, true, first_lsn, path);
                        return Ok(());
                    }
                    Err(e) => {
                        // Not a money problem: this segment is a plain one instead.
                        tracing::warn!(error = %e, path = %path.display(), "cannot rename the prepared journal segment into place");
                    }
                }
            } else {
                preparer.request();
            }
        }
        if !full {
            return Ok(());
        }
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot create segment {}: {e}", path.display()))?;
        sync_dir(&self.dir).map_err(|e| format!("fsync of {} failed: {e}", self.dir.display()))?;
        self.start_segment(file, false, first_lsn, path);
        Ok(())
    }

    fn start_segment(&mut self, file: File, zeroed: bool, first_lsn: Lsn, path: PathBuf) {
        if self.active_bytes == 0 {
            // The empty active segment (same name) was replaced, not closed.
            let last = self.segments.last().expect("an active segment");
            debug_assert_eq!(last.path, path);
            self.segments.pop();
        }
        self.active = file;
        self.active_bytes = 0;
        self.active_zeroed = zeroed;
        metrics::gauge!("giftcast_journal_active_preallocated").set(if zeroed { 1.0 } else { 0.0 });
        self.segments.push(Segment { first_lsn, path });
        self.publish_segment_count();
    }

    /// Deletes every segment whose records are all <= the released LSN, except the active one.
    fn delete_released_segments(&mut self) {
        let released = self.shared.released_lsn.load(Ordering::Acquire);
        let mut deleted = 0;
        while self.segments.len() >= 2 && self.segments[1].first_lsn - 1 <= released {
            let segment = &self.segments[0];
            match std::fs::remove_file(&segment.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Not a money problem: the segment is only kept longer. Retried next release.
                    tracing::warn!(segment = %segment.path.display(), error = %e, "cannot delete a released journal segment");
                    break;
                }
            }
            self.segments.remove(0);
            deleted += 1;
        }
        if deleted > 0 {
            if let Err(e) = sync_dir(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot fsync the journal directory after deleting segments");
            }
            self.publish_segment_count();
        }
    }

    fn publish_segment_count(&self) {
        self.shared
            .segments
            .store(self.segments.len() as u64, Ordering::Release);
        metrics::gauge!("giftcast_journal_segments").set(self.segments.len() as f64);
    }
}

/// What the writer and the preparer thread share.
#[derive(Default)]
struct PrepState {
    /// The writer wants a prepared segment (none is ready or being made).
    wanted: bool,
    /// A zero-filled, fsynced segment at `PREPARED_SEGMENT_NAME`, ready to be renamed into place.
    ready: Option<File>,
}

struct PrepShared {
    state: Mutex<PrepState>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The preparer thread's handle.
struct Preparer {
    shared: Arc<PrepShared>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Preparer {
    /// Deletes a stale prepared file (a crash may have left it half-filled) and starts the thread,
    /// which begins preparing at once.
    fn spawn(dir: &Path, bytes: u64) -> Result<Preparer, JournalError> {
        let path = dir.join(PREPARED_SEGMENT_NAME);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path, e)),
        }
        let shared = Arc::new(PrepShared {
            state: Mutex::new(PrepState {
                wanted: true,
                ready: None,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let (shared, path) = (shared.clone(), path.clone());
            std::thread::Builder::new()
                .name("journal-prepare".into())
                .spawn(move || prepare_loop(&shared, &path, bytes))
                .map_err(|e| io_error(dir, e))?
        };
        Ok(Preparer {
            shared,
            path,
            thread: Some(thread),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn ready(&self) -> bool {
        self.shared.state.lock().ready.is_some()
    }

    fn take(&self) -> Option<File> {
        self.shared.state.lock().ready.take()
    }

    /// Asks for the next prepared segment (once the last one was taken, or could not be made).
    fn request(&self) {
        let mut state = self.shared.state.lock();
        if state.ready.is_none() && !state.wanted {
            state.wanted = true;
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Preparer {
    /// Stops the thread (within one chunk of zeros) and removes what it prepared.
    fn drop(&mut self) {
        {
            // Under the lock: the thread is then either working (it sees the flag between
            // chunks) or parked in `wait`, never between its check and its wait.
            let _state = self.shared.state.lock();
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.state.lock().ready = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

fn prepare_loop(shared: &PrepShared, path: &Path, bytes: u64) {
    loop {
        {
            let mut state = shared.state.lock();
            while !state.wanted && !shared.stop.load(Ordering::Acquire) {
                shared.wake.wait(&mut state);
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
        }
        let started = Instant::now();
        let result = zero_fill(path, bytes, &shared.stop);
        let mut state = shared.state.lock();
        state.wanted = false;
        match result {
            Ok(Some(file)) => {
                metrics::histogram!("giftcast_journal_prepare_seconds")
                    .record(started.elapsed().as_secs_f64());
                state.ready = Some(file);
            }
            Ok(None) => return,
            Err(e) => {
                // The writer goes on with plain segments and asks again at its next rotation.
                tracing::warn!(path = %path.display(), error = %e, "cannot prepare the next journal segment");
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Writes `bytes` zeros to a new file at `path` and fsyncs it. `Ok(None)` when stopped midway.
fn zero_fill(path: &Path, bytes: u64, stop: &AtomicBool) -> std::io::Result<Option<File>> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; PREPARE_CHUNK_BYTES];
    let mut written = 0u64;
    let mut synced = 0u64;
    while written < bytes {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        let n = (bytes - written).min(PREPARE_CHUNK_BYTES as u64) as usize;
        file.write_all(&zeros[..n])?;
        written += n as u64;
        if written - synced >= PREPARE_SYNC_BYTES {
            file.sync_data()?;
            synced = written;
        }
    }
    file.sync_all()?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_fill_writes_exactly_the_size_across_chunk_and_sync_edges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED_SEGMENT_NAME);
        let stop = AtomicBool::new(false);
        // Past one fdatasync interval, and not a whole number of chunks.
        let bytes = PREPARE_SYNC_BYTES + PREPARE_CHUNK_BYTES as u64 + 1;
        let file = zero_fill(&path, bytes, &stop)
            .unwrap()
            .expect("not stopped");
        assert_eq!(file.metadata().unwrap().len(), bytes);
        let data = std::fs::read(&path).unwrap();
        assert!(super::frame::is_all_zero(&data));
        // A smaller size over the same file: truncated to it, not left at the old length.
        let file = zero_fill(&path, 10, &stop).unwrap().expect("not stopped");
        assert_eq!(file.metadata().unwrap().len(), 10);
    }

    #[test]
    fn zero_fill_stops_between_chunks_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED_SEGMENT_NAME);
        let stop = AtomicBool::new(true);
        assert!(zero_fill(&path, 4 * PREPARE_CHUNK_BYTES as u64, &stop)
            .unwrap()
            .is_none());
        assert!(std::fs::metadata(&path).unwrap().len() < PREPARE_CHUNK_BYTES as u64);
    }
}

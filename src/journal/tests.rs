use super::*;
use crate::money::Shares;
use crate::record::{CreditRecord, GiftRecord};
use std::fs;
use std::time::{Duration, Instant};

pub(crate) fn gift(n: u64) -> Record {
    Record::Gift(GiftRecord {
        user_id: format!("u{}", n % 7).into(),
        user_name: format!("User {}", n % 7).into(),
        gift_id: format!("g{n}").into(),
        stream: "demo".into(),
        sticker: "rose".into(),
        count: 1 + (n % 3) as u32,
        price: 10,
        amount: 10 * (1 + n % 3),
        shares: Shares {
            store: 3,
            streamer: 5,
            platform: 2,
        },
        message: n.is_multiple_of(2).then(|| format!("question {n}")),
        balance_after: 1_000_000 - n,
        ts_ms: 1_700_000_000_000 + n,
    })
}

pub(crate) fn credit(n: u64) -> Record {
    Record::Credit(CreditRecord {
        user_id: format!("u{n}"),
        coins: 1000,
        reference: format!("welcome-u{n}"),
        balance_after: 1000,
        ts_ms: 1_700_000_000_000 + n,
    })
}

fn record(n: u64) -> Record {
    if n.is_multiple_of(5) {
        credit(n)
    } else {
        gift(n)
    }
}

/// The defaults with plain (appended) segments: the tests that take segment files apart by hand
/// want each one to end at its last frame. Preallocation has its own tests, at the end.
fn config(dir: &Path) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir);
    cfg.preallocate = false;
    cfg
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Submits records `from..=to` one durable batch each (submit, wait), so each is its own frame
/// write; returns when all are durable.
fn write_one_by_one(journal: &Journal, from: u64, to: u64) {
    let rt = runtime();
    for n in from..=to {
        let ticket = journal.submit(record(n)).unwrap();
        assert_eq!(ticket.lsn(), n);
        assert_eq!(rt.block_on(ticket.wait()), Ok(n));
    }
}

fn shutdown(journal: Journal) {
    runtime().block_on(journal.shutdown());
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Frame start offsets of a segment, plus its end.
fn frame_bounds(data: &[u8]) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut offset = 0;
    while offset < data.len() {
        offset = frame::read_frame(data, offset).unwrap().end;
        bounds.push(offset);
    }
    bounds
}

#[tokio::test]
async fn round_trip_and_reopen_filters_by_after_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, recovered, mut rx) = Journal::open(config(dir.path()), 0).unwrap();
    assert!(recovered.records.is_empty());
    assert_eq!(recovered.next_lsn, 1);
    assert_eq!(journal.assigned_lsn(), 0, "no LSN given yet");
    // `assigned_lsn` is exactly the last LSN given: the ledger's lookup mark relies on a
    // record submitted after it getting a higher one (one more would trust a stale miss).
    let tickets: Vec<Ticket> = (1..=100)
        .map(|n| {
            let ticket = journal.submit(record(n)).unwrap();
            assert_eq!(journal.assigned_lsn(), ticket.lsn());
            ticket
        })
        .collect();
    for (i, ticket) in tickets.into_iter().enumerate() {
        assert_eq!(ticket.wait().await, Ok(i as u64 + 1));
    }
    for n in 1..=100 {
        let (lsn, rec) = rx.recv().await.unwrap();
        assert_eq!((lsn, &*rec), (n, &record(n)));
    }
    let stats = journal.stats();
    assert_eq!(
        (stats.next_lsn, stats.durable_lsn, stats.released_lsn),
        (101, 100, 0)
    );
    journal.shutdown().await;
    assert!(
        rx.recv().await.is_none(),
        "the durable stream ends after shutdown"
    );
    assert_eq!(
        journal.submit(record(101)).err(),
        Some(JournalError::Closed)
    );
    drop(journal);

    let (journal, recovered, mut rx) = Journal::open(config(dir.path()), 0).unwrap();
    let expected: Vec<(Lsn, Record)> = (1..=100).map(|n| (n, record(n))).collect();
    assert_eq!(recovered.records, expected);
    assert_eq!(recovered.next_lsn, 101);
    assert_eq!(recovered.torn_tail, None);
    assert_eq!(
        journal.assigned_lsn(),
        100,
        "recovered records' LSNs count as given"
    );
    for n in 1..=100 {
        assert_eq!(
            rx.recv().await.unwrap().0,
            n,
            "recovered records are queued for the flusher"
        );
    }
    assert_eq!(journal.submit(record(101)).unwrap().wait().await, Ok(101));
    journal.shutdown().await;
    drop(journal);

    let (journal, recovered, _rx) = Journal::open(config(dir.path()), 60).unwrap();
    let expected: Vec<(Lsn, Record)> = (61..=101).map(|n| (n, record(n))).collect();
    assert_eq!(recovered.records, expected);
    assert_eq!(recovered.next_lsn, 102);
    assert_eq!(journal.stats().released_lsn, 60);
    journal.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_uses_far_fewer_fsyncs_than_records() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(dir.path()), 0).unwrap();
    let mut tasks = Vec::new();
    for n in 0..1000u64 {
        let journal = journal.clone();
        tasks.push(tokio::spawn(async move {
            let ticket = journal.submit(record(n)).unwrap();
            let lsn = ticket.lsn();
            assert_eq!(ticket.wait().await, Ok(lsn));
            lsn
        }));
    }
    let mut lsns = Vec::new();
    for task in tasks {
        lsns.push(task.await.unwrap());
    }
    lsns.sort_unstable();
    assert_eq!(lsns, (1..=1000).collect::<Vec<_>>());
    let stats = journal.stats();
    assert_eq!(stats.durable_lsn, 1000);
    assert!(stats.fsyncs >= 1);
    assert!(
        stats.fsyncs <= 200,
        "1000 concurrent records took {} fsyncs",
        stats.fsyncs
    );
    journal.shutdown().await;
}

#[test]
fn segments_rotate_and_release_deletes_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 500;
    let (journal, _, _rx) = Journal::open(cfg.clone(), 0).unwrap();
    write_one_by_one(&journal, 1, 60);
    let segments = journal.stats().segments;
    assert!(
        segments >= 5,
        "60 records of ~100 B in 500 B segments: {segments} segments"
    );
    assert_eq!(segment_files(dir.path()).len() as u64, segments);
    // Every file is named by its first LSN, and the names increase.
    let firsts: Vec<u64> = segment_files(dir.path())
        .iter()
        .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(firsts[0], 1);
    assert!(firsts.windows(2).all(|w| w[0] < w[1]));

    // Releasing up to a middle LSN deletes only segments wholly at or below it.
    let middle = firsts[2]; // segments 0 and 1 end at middle - 1
    journal.release_upto(middle);
    wait_until(|| journal.stats().segments == segments - 2);
    assert_eq!(journal.stats().released_lsn, middle);
    let left: Vec<u64> = segment_files(dir.path())
        .iter()
        .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(left, firsts[2..].to_vec());

    // Releasing everything keeps the active segment only.
    journal.release_upto(60);
    wait_until(|| journal.stats().segments == 1);
    shutdown(journal);
    let (journal, recovered, _rx) = Journal::open(cfg.clone(), 60).unwrap();
    assert!(recovered.records.is_empty());
    assert_eq!(recovered.next_lsn, 61);
    write_one_by_one(&journal, 61, 62);
    shutdown(journal);
    let (_journal, recovered, _rx) = Journal::open(cfg, 60).unwrap();
    assert_eq!(recovered.records, vec![(61, record(61)), (62, record(62))]);
}

fn wait_until(condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("condition not reached in 5 s");
}

#[test]
fn missing_records_above_the_checkpoint_stop_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 500;
    let (journal, _, _rx) = Journal::open(cfg.clone(), 0).unwrap();
    write_one_by_one(&journal, 1, 30);
    shutdown(journal);
    let files = segment_files(dir.path());
    let second_first: u64 = files[1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    fs::remove_file(&files[0]).unwrap();
    // The store has nothing: records 1..second_first are gone. Never silently skipped.
    match Journal::open(cfg.clone(), 0) {
        Err(JournalError::Corrupt {
            path,
            offset,
            reason,
        }) => {
            assert_eq!((path, offset), (files[1].clone(), 0));
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
    }
    // With the store holding them, the same journal is fine.
    let (_journal, recovered, _rx) = Journal::open(cfg, second_first - 1).unwrap();
    assert_eq!(recovered.records.first().map(|r| r.0), Some(second_first));
    assert_eq!(recovered.records.len() as u64, 30 - second_first + 1);
}

#[test]
fn torn_tail_at_every_offset_keeps_exactly_the_complete_records() {
    let source = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(source.path()), 0).unwrap();
    write_one_by_one(&journal, 1, 20);
    shutdown(journal);
    let files = segment_files(source.path());
    assert_eq!(files.len(), 1);
    let data = fs::read(&files[0]).unwrap();
    let bounds = frame_bounds(&data);
    assert_eq!(bounds.len(), 21);
    let start = bounds[16]; // inside the last 4 records, and every byte of them
    for cut in start..=data.len() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("journal")).unwrap();
        let segment = dir
            .path()
            .join("journal")
            .join(files[0].file_name().unwrap());
        fs::write(&segment, &data[..cut]).unwrap();
        let complete = bounds.iter().filter(|&&b| b > 0 && b <= cut).count() as u64;
        let last_good = bounds[complete as usize];
        let (journal, recovered, _rx) =
            Journal::open(config(dir.path()), 0).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let expected: Vec<(Lsn, Record)> = (1..=complete).map(|n| (n, record(n))).collect();
        assert_eq!(recovered.records, expected, "cut at {cut}");
        assert_eq!(recovered.next_lsn, complete + 1);
        if cut == last_good {
            assert_eq!(recovered.torn_tail, None, "cut at {cut}");
        } else {
            assert_eq!(
                recovered.torn_tail,
                Some((segment.clone(), last_good as u64))
            );
        }
        assert_eq!(
            fs::metadata(&segment).unwrap().len(),
            last_good as u64,
            "the torn bytes are cut"
        );
        // The journal continues with the next LSN, and a reopen reads everything.
        write_one_by_one(&journal, complete + 1, complete + 1);
        shutdown(journal);
        let (_journal, recovered, _rx) = Journal::open(config(dir.path()), 0).unwrap();
        assert_eq!(recovered.records.len() as u64, complete + 1, "cut at {cut}");
        assert_eq!(recovered.torn_tail, None);
    }
}

#[test]
fn a_flipped_bit_in_a_middle_frame_is_detected_never_applied() {
    let source = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(source.path()), 0).unwrap();
    write_one_by_one(&journal, 1, 20);
    shutdown(journal);
    let files = segment_files(source.path());
    let data = fs::read(&files[0]).unwrap();
    let bounds = frame_bounds(&data);
    let (frame_start, frame_end) = (bounds[9], bounds[10]); // record 10 of 20
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("journal")).unwrap();
    let segment = dir
        .path()
        .join("journal")
        .join(files[0].file_name().unwrap());
    let mut checked = 0;
    for byte in frame_start..frame_end {
        for bit in 0..8 {
            let mut flipped = data.clone();
            flipped[byte] ^= 1 << bit;
            fs::write(&segment, &flipped).unwrap();
            match Journal::open(config(dir.path()), 0) {
                Err(JournalError::Corrupt { path, offset, .. }) => {
                    assert_eq!(path, segment);
                    assert_eq!(offset, frame_start as u64, "byte {byte} bit {bit}");
                }
                Err(other) => panic!("byte {byte} bit {bit}: unexpected error {other}"),
                Ok((_, recovered, _)) => panic!(
                    "byte {byte} bit {bit}: open succeeded with {} records",
                    recovered.records.len()
                ),
            }
            assert_eq!(
                fs::read(&segment).unwrap(),
                flipped,
                "a corrupt journal is never modified"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, (frame_end - frame_start) * 8);
}

#[test]
fn damage_at_the_end_of_a_non_last_segment_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes_max = 500;
    let (journal, _, _rx) = Journal::open(cfg.clone(), 0).unwrap();
    write_one_by_one(&journal, 1, 30);
    shutdown(journal);
    let files = segment_files(dir.path());
    let data = fs::read(&files[0]).unwrap();
    fs::write(&files[0], &data[..data.len() - 3]).unwrap();
    let bounds = frame_bounds(&data);
    match Journal::open(cfg, 0) {
        Err(JournalError::Corrupt { path, offset, .. }) => {
            assert_eq!(path, files[0]);
            assert_eq!(offset, bounds[bounds.len() - 2] as u64);
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
    }
}

#[tokio::test]
async fn an_fsync_failure_kills_the_journal_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.fail_after_syncs = Some(2);
    let (journal, _, mut rx) = Journal::open(cfg, 0).unwrap();
    assert_eq!(journal.submit(record(1)).unwrap().wait().await, Ok(1));
    assert_eq!(journal.submit(record(2)).unwrap().wait().await, Ok(2));
    let third = journal.submit(record(3)).unwrap().wait().await;
    assert!(
        matches!(&third, Err(JournalError::Failed(reason)) if reason.contains("injected")),
        "{third:?}"
    );
    for n in 4..10 {
        assert!(matches!(
            journal.submit(record(n)),
            Err(JournalError::Failed(_))
        ));
    }
    let stats = journal.stats();
    assert!(stats.failed.is_some());
    assert_eq!(
        stats.durable_lsn, 2,
        "the failed record is never reported durable"
    );
    assert_eq!(rx.recv().await.unwrap().0, 1);
    assert_eq!(rx.recv().await.unwrap().0, 2);
    journal.shutdown().await;
    assert!(
        rx.recv().await.is_none(),
        "the failed record never reaches the flusher"
    );
}

#[tokio::test]
async fn backlog_bound_refuses_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.backlog_records_max = 10;
    let (journal, _, _rx) = Journal::open(cfg, 0).unwrap();
    for n in 1..=10 {
        assert_eq!(journal.submit(record(n)).unwrap().wait().await, Ok(n));
    }
    assert_eq!(
        journal.submit(record(11)).err(),
        Some(JournalError::Full(FullReason::Backlog))
    );
    assert_eq!(
        journal.stats().next_lsn,
        11,
        "a refused record takes no LSN"
    );
    journal.release_upto(4);
    for n in 11..=14 {
        assert_eq!(journal.submit(record(n)).unwrap().wait().await, Ok(n));
    }
    assert_eq!(
        journal.submit(record(15)).err(),
        Some(JournalError::Full(FullReason::Backlog))
    );
    journal.shutdown().await;
}

#[test]
fn a_journal_in_use_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(dir.path()), 0).unwrap();
    match Journal::open(config(dir.path()), 0) {
        Err(JournalError::Io { message, .. }) => assert!(message.contains("in use"), "{message}"),
        other => panic!("expected Io, got {:?}", other.map(|(_, r, _)| r)),
    }
    shutdown(journal);
    assert!(
        Journal::open(config(dir.path()), 0).is_ok(),
        "the lock dies with the writer"
    );
}

#[test]
fn an_oversized_record_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(dir.path()), 0).unwrap();
    let Record::Gift(mut big) = gift(1) else {
        unreachable!()
    };
    big.message = Some("x".repeat(FRAME_BODY_BYTES_MAX));
    assert!(matches!(
        journal.submit(Record::Gift(big)),
        Err(JournalError::TooLarge { .. })
    ));
    assert_eq!(journal.stats().next_lsn, 1);
    shutdown(journal);
}

#[test]
fn a_store_checkpoint_ahead_of_the_journal_never_reuses_lsns() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(dir.path()), 0).unwrap();
    write_one_by_one(&journal, 1, 3);
    shutdown(journal);
    // The store says it holds up to 10 (e.g. the journal directory was restored from an old copy).
    let (journal, recovered, _rx) = Journal::open(config(dir.path()), 10).unwrap();
    assert!(recovered.records.is_empty());
    assert_eq!(recovered.next_lsn, 11);
    let rt = runtime();
    assert_eq!(
        rt.block_on(journal.submit(record(11)).unwrap().wait()),
        Ok(11)
    );
    shutdown(journal);
    let (_journal, recovered, _rx) = Journal::open(config(dir.path()), 10).unwrap();
    assert_eq!(recovered.records, vec![(11, record(11))]);
}

/// `submit_then`: every callback runs exactly once, on the settle thread, after its record is
/// fsynced (the durable LSN already covers it), in LSN order; `shutdown` returns only after the
/// last callback ran; callbacks of one fsync batch arrive together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_then_calls_back_once_durable_in_lsn_order_before_shutdown_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(dir.path()), 0).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<(Lsn, Lsn, String)>::new()));
    for n in 1..=2000u64 {
        let (seen, shared) = (seen.clone(), journal.shared.clone());
        let lsn = journal
            .submit_then(
                record(n),
                Box::new(move |outcome| {
                    let lsn = outcome.expect("durable");
                    let durable = shared.durable_lsn.load(Ordering::Acquire);
                    let thread = std::thread::current().name().unwrap_or("").to_string();
                    seen.lock().push((lsn, durable, thread));
                }),
            )
            .unwrap();
        assert_eq!(lsn, n);
    }
    journal.shutdown().await;
    let seen = seen.lock();
    assert_eq!(
        seen.len(),
        2000,
        "every callback ran before shutdown returned"
    );
    for (i, (lsn, durable, thread)) in seen.iter().enumerate() {
        assert_eq!(*lsn, i as u64 + 1, "callbacks run in LSN order");
        assert!(
            durable >= lsn,
            "record {lsn} called back before it was durable"
        );
        assert_eq!(thread, "journal-settle");
    }
    assert!(
        journal.stats().fsyncs < 2000,
        "group commit: fewer fsyncs than records"
    );
}

/// A failed fsync: the callbacks of that batch and of every later record get `Err(Failed)`,
/// once each; a record refused at submit is never called back.
#[tokio::test]
async fn submit_then_reports_a_failed_fsync_to_every_callback_of_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.fail_after_syncs = Some(1);
    let (journal, _, _rx) = Journal::open(cfg, 0).unwrap();
    let outcomes = Arc::new(Mutex::new(Vec::<Result<Lsn, JournalError>>::new()));
    let call = |outcomes: &Arc<Mutex<Vec<_>>>| -> OnDurable {
        let outcomes = outcomes.clone();
        Box::new(move |outcome| outcomes.lock().push(outcome))
    };
    assert_eq!(journal.submit(record(1)).unwrap().wait().await, Ok(1));
    journal.submit_then(record(2), call(&outcomes)).unwrap();
    // The second fsync fails: wait for record 2's outcome, then nothing more is taken.
    for _ in 0..500 {
        if !outcomes.lock().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(journal
        .submit_then(record(3), call(&outcomes))
        .is_err_and(|e| matches!(e, JournalError::Failed(_))));
    journal.shutdown().await;
    let outcomes = outcomes.lock();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert!(
        matches!(&outcomes[0], Err(JournalError::Failed(reason)) if reason.contains("injected")),
        "{outcomes:?}"
    );
    assert_eq!(journal.stats().durable_lsn, 1);
}

/// A callback that panics is logged and skipped: the settle thread lives on and every later
/// callback still runs.
#[tokio::test]
async fn a_panicking_callback_does_not_stop_the_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _, _rx) = Journal::open(config(dir.path()), 0).unwrap();
    let ran = Arc::new(AtomicU64::new(0));
    journal
        .submit_then(record(1), Box::new(|_| panic!("a bug in a submitter")))
        .unwrap();
    assert_eq!(journal.submit(record(2)).unwrap().wait().await, Ok(2));
    for n in 3..=5 {
        let ran = ran.clone();
        journal
            .submit_then(
                record(n),
                Box::new(move |outcome| {
                    assert_eq!(outcome, Ok(n));
                    ran.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
    }
    journal.shutdown().await;
    assert_eq!(ran.load(Ordering::SeqCst), 3);
}

/// Opened from within a runtime (as the server does, on its blocking pool), callbacks run in
/// that runtime's context and may spawn tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_may_spawn_tasks_when_opened_in_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (journal, _, _rx) = tokio::task::spawn_blocking(move || Journal::open(cfg, 0))
        .await
        .unwrap()
        .unwrap();
    let (tx, rx) = oneshot::channel();
    journal
        .submit_then(
            record(1),
            Box::new(move |outcome| {
                tokio::spawn(async move {
                    let _ = tx.send(outcome);
                });
            }),
        )
        .unwrap();
    assert_eq!(rx.await.unwrap(), Ok(1));
    journal.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Preallocated segments
// ---------------------------------------------------------------------------------------------

const PREALLOCATED_BYTES: u64 = 64 * 1024;

fn preallocating_config(dir: &Path) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir);
    assert!(cfg.preallocate, "on by default");
    cfg.segment_bytes_max = PREALLOCATED_BYTES;
    cfg
}

/// Copies the journal directory as it is on disk this instant: what a kill -9 would leave.
fn copy_journal(from: &Path, to: &Path) {
    let target = to.join("journal");
    fs::create_dir_all(&target).unwrap();
    for entry in fs::read_dir(from.join("journal")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, target.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_preallocated_segment_is_written_in_place_and_its_zero_end_cut_at_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preallocating_config(dir.path());
    let (journal, _, _rx) = Journal::open(cfg, 0).unwrap();
    // Write until the writer has moved into a prepared segment (the preparer runs beside it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        write_one_by_one(&journal, n, n);
        let files = segment_files(dir.path());
        if fs::metadata(files.last().unwrap()).unwrap().len() == PREALLOCATED_BYTES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no prepared segment after {n} records"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = n + 50;
    write_one_by_one(&journal, n + 1, total);
    let files = segment_files(dir.path());
    let active = files.last().unwrap().clone();
    assert_eq!(
        fs::metadata(&active).unwrap().len(),
        PREALLOCATED_BYTES,
        "records are written into the zeros: the file does not grow"
    );
    let prepared = dir
        .path()
        .join("journal")
        .join(recover::PREPARED_SEGMENT_NAME);
    wait_until(|| prepared.exists());

    // What a crash leaves: the active segment with its zero end, and a prepared next segment.
    let crashed = tempfile::tempdir().unwrap();
    copy_journal(dir.path(), crashed.path());
    shutdown(journal);
    assert!(!prepared.exists(), "shutdown removes the prepared segment");

    let (journal, recovered, _rx) = Journal::open(preallocating_config(crashed.path()), 0).unwrap();
    let expected: Vec<(Lsn, Record)> = (1..=total).map(|n| (n, record(n))).collect();
    assert_eq!(recovered.records, expected);
    assert_eq!(recovered.next_lsn, total + 1);
    assert_eq!(
        recovered.torn_tail, None,
        "zeros after the last frame are no damage"
    );
    let cut = crashed
        .path()
        .join("journal")
        .join(active.file_name().unwrap());
    let data = fs::read(&cut).unwrap();
    assert!((data.len() as u64) < PREALLOCATED_BYTES);
    assert_eq!(
        *frame_bounds(&data).last().unwrap(),
        data.len(),
        "cut right after its last frame"
    );
    // The cut segment is no longer the last one: a later open reads it whole again.
    write_one_by_one(&journal, total + 1, total + 10);
    shutdown(journal);
    let (_journal, recovered, _rx) =
        Journal::open(preallocating_config(crashed.path()), 0).unwrap();
    assert_eq!(recovered.records.len() as u64, total + 10);
    assert_eq!(recovered.torn_tail, None);
}

#[test]
fn plain_segments_when_preallocation_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = preallocating_config(dir.path());
    cfg.preallocate = false;
    let (journal, _, _rx) = Journal::open(cfg, 0).unwrap();
    write_one_by_one(&journal, 1, 30);
    let prepared = dir
        .path()
        .join("journal")
        .join(recover::PREPARED_SEGMENT_NAME);
    assert!(!prepared.exists(), "nothing is prepared");
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let data = fs::read(&files[0]).unwrap();
    assert_eq!(
        frame_bounds(&data).len(),
        31,
        "30 frames, appended, no zeros"
    );
    shutdown(journal);
}

#[test]
fn a_stale_prepared_segment_is_not_read_and_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    fs::create_dir_all(&journal_dir).unwrap();
    let prepared = journal_dir.join(recover::PREPARED_SEGMENT_NAME);
    // Half-filled when a crash came, or garbage: never a segment, never trusted.
    fs::write(&prepared, vec![0xEEu8; 10_000]).unwrap();
    let (journal, recovered, _rx) = Journal::open(preallocating_config(dir.path()), 0).unwrap();
    assert!(recovered.records.is_empty());
    wait_until(|| {
        fs::read(&prepared)
            .is_ok_and(|d| d.len() as u64 == PREALLOCATED_BYTES && frame::is_all_zero(&d))
    });
    write_one_by_one(&journal, 1, 5);
    shutdown(journal);
    let (_journal, recovered, _rx) = Journal::open(preallocating_config(dir.path()), 0).unwrap();
    assert_eq!(recovered.records.len(), 5);
}

/// A preallocated segment of records 1..=n written over zeros, as bytes, with its frame bounds.
fn preallocated_segment(n: u64) -> (Vec<u8>, Vec<usize>) {
    let mut data = Vec::new();
    for lsn in 1..=n {
        frame::append_frame(&mut data, lsn, &frame::encode_record(&record(lsn)).unwrap());
    }
    let bounds = frame_bounds(&data);
    data.resize(PREALLOCATED_BYTES as usize, 0);
    (data, bounds)
}

#[test]
fn unwritten_pages_of_the_last_write_are_a_torn_tail_other_holes_are_corruption() {
    // A power cut during the last write: the kernel wrote back its pages out of order, and the
    // 4 KiB page at 8192 never reached the disk (it reads as the preallocated zeros).
    let (mut data, bounds) = preallocated_segment(300);
    let written = *bounds.last().unwrap();
    let page = 8192..12288;
    assert!(
        written > page.end + 1000,
        "frames follow the page: {written}"
    );
    data[page.clone()].fill(0);
    let damaged_index = bounds.iter().rposition(|b| *b <= page.start).unwrap();
    let damaged_at = bounds[damaged_index];
    let first_missing = damaged_index as u64 + 1;

    let open = |bytes: &[u8], batch_records_max: usize| {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        fs::create_dir_all(&journal_dir).unwrap();
        let path = recover::segment_path(&journal_dir, 1);
        fs::write(&path, bytes).unwrap();
        let mut cfg = preallocating_config(dir.path());
        cfg.batch_records_max = batch_records_max;
        let result = Journal::open(cfg, 0).map(|(j, r, _)| {
            shutdown(j);
            r
        });
        (result, fs::read(&path).unwrap(), dir)
    };

    // Every frame after the page is within one write of the first missing record: torn.
    let (result, after, _dir) = open(&data, BATCH_RECORDS_MAX_DEFAULT);
    let recovered = result.expect("a torn last write is not corruption");
    let kept: Vec<(Lsn, Record)> = (1..first_missing).map(|n| (n, record(n))).collect();
    assert_eq!(recovered.records, kept);
    assert_eq!(recovered.next_lsn, first_missing);
    assert_eq!(
        recovered.torn_tail.map(|(_, offset)| offset),
        Some(damaged_at as u64)
    );
    assert_eq!(after.len(), damaged_at, "cut at the first damaged frame");

    // With writes of at most 16 records, frames 16 or more past the hole came from a later
    // write, so the damaged one had been fsynced and acknowledged: corruption, file untouched.
    let last_lsn = bounds.len() as u64 - 1;
    assert!(last_lsn - first_missing >= 16);
    let (result, after, _dir) = open(&data, 16);
    match result {
        Err(JournalError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset, damaged_at as u64);
            assert!(reason.contains("outside the write"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(after, data, "a corrupt journal is never modified");

    // The same hole holding garbage instead of zeros is not an unwritten page: corruption.
    let mut garbage = data.clone();
    garbage[page].fill(0xEE);
    let (result, after, _dir) = open(&garbage, BATCH_RECORDS_MAX_DEFAULT);
    match result {
        Err(JournalError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset, damaged_at as u64);
            assert!(reason.contains("no zeroed sector"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(after, garbage);
}

#[test]
fn many_rotations_through_prepared_and_plain_segments_lose_nothing() {
    // 4 KiB segments: about 40 records each, so the writer rotates every few dozen batches,
    // sometimes into a prepared segment, sometimes (when the preparer is behind) into a plain
    // one. A crash copy at the end must give back every record, in order, with nothing torn.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = preallocating_config(dir.path());
    cfg.segment_bytes_max = 4096;
    let (journal, _, _rx) = Journal::open(cfg.clone(), 0).unwrap();
    let mut sizes = std::collections::BTreeSet::new();
    for n in 1..=400 {
        write_one_by_one(&journal, n, n);
        if let Some(last) = segment_files(dir.path()).last() {
            sizes.insert(fs::metadata(last).unwrap().len());
        }
    }
    assert!(
        sizes.contains(&4096),
        "some segment was a prepared (4096-byte, zero-filled) one: {sizes:?}"
    );
    assert!(segment_files(dir.path()).len() > 5);
    let crashed = tempfile::tempdir().unwrap();
    copy_journal(dir.path(), crashed.path());
    shutdown(journal);
    let mut reopen = cfg;
    reopen.dir = crashed.path().join("journal");
    let (_journal, recovered, _rx) = Journal::open(reopen, 0).unwrap();
    let expected: Vec<(Lsn, Record)> = (1..=400).map(|n| (n, record(n))).collect();
    assert_eq!(recovered.records, expected);
    assert_eq!(recovered.torn_tail, None);
}

#[test]
fn a_zeroed_sector_counts_only_when_whole_and_aligned() {
    let sector = frame::SECTOR_BYTES;
    let mut data = vec![0xEEu8; 4 * sector];
    // One byte short of a sector, aligned: not a sector.
    data[sector..2 * sector - 1].fill(0);
    assert!(!frame::has_zero_sector(&data, 0, data.len()));
    // A whole sector of zeros, but straddling two aligned sectors: not one either.
    data[sector + 100..2 * sector + 100].fill(0);
    data[sector..sector + 100].fill(0xEE);
    assert!(!frame::has_zero_sector(&data, 0, data.len()));
    // A whole aligned sector: found, but only when the range holds all of it.
    data[2 * sector..3 * sector].fill(0);
    assert!(frame::has_zero_sector(&data, 0, data.len()));
    assert!(frame::has_zero_sector(&data, 2 * sector, 3 * sector));
    assert!(!frame::has_zero_sector(&data, 2 * sector + 1, data.len()));
    assert!(!frame::has_zero_sector(&data, 0, 3 * sector - 1));
}

//! Wiring of the durable path: recovery at start (storage snapshot, then the journal tail), the
//! journal as the ledger's record sink, health for /readyz, and the drain on shutdown.

use crate::app::DurabilityStatus;
use crate::flusher::{self, FlushConfig, FlusherHandle};
use crate::journal::{Journal, JournalConfig, JournalError};
use crate::ledger::{
    IdempotencyConfig, Ledger, OnDurable, RecordSink, RevenueRow, SinkError, Totals,
};
use crate::money::Split;
use crate::record::{Lsn, Record};
use crate::store::Store;
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The journal settings a deployment chooses; the rest are the journal's defaults.
#[derive(Clone, Debug)]
pub struct JournalSettings {
    /// `JournalConfig::segment_bytes_max`.
    pub segment_bytes: u64,
    /// `JournalConfig::preallocate`.
    pub preallocate: bool,
    /// FOR TESTS: every journal fsync first waits this long (`JournalConfig::sync_delay_ms`); 0.
    pub sync_delay_ms: u64,
}

/// The journal as the ledger's sink: `submit` queues the record (never blocks), the ticket
/// resolves when its frame is fsynced.
struct JournalSink {
    journal: Journal,
    /// Negative control for the crash tests only: acknowledge before the record is durable.
    ack_before_durable: bool,
}

impl RecordSink for JournalSink {
    fn submit(&self, record: Arc<Record>, then: OnDurable) -> Result<(), SinkError> {
        let submitted = if self.ack_before_durable {
            // Told "durable" at once, from a task (never inside submit, which runs under a
            // wallet lock); the record is still written, later.
            self.journal.submit(record).map(|ticket| {
                let lsn = ticket.lsn();
                drop(ticket);
                tokio::spawn(async move { then(Ok(lsn)) });
            })
        } else {
            self.journal
                .submit_then(
                    record,
                    Box::new(move |outcome| then(outcome.map_err(|e| e.to_string()))),
                )
                .map(|_| ())
        };
        match submitted {
            Ok(()) => Ok(()),
            Err(JournalError::Full(_)) => {
                metrics::counter!("giftcast_journal_refused_total").increment(1);
                Err(SinkError::Full)
            }
            Err(e) => Err(SinkError::Failed(e.to_string())),
        }
    }

    fn stored_lsn(&self) -> Lsn {
        self.journal.released_lsn()
    }

    fn assigned_lsn(&self) -> Lsn {
        self.journal.assigned_lsn()
    }
}

/// Gift ids restored into the evicted-id filter between two progress lines at start.
const RESTORE_PROGRESS_IDS: usize = 1_000_000;

/// The durable path of a running server.
pub struct Durable {
    pub journal: Journal,
    pub flusher: FlusherHandle,
    pub store: Store,
    /// Gifts restored at start that were made today (UTC): (user, amount, ts_ms), for the
    /// `--daily-cap` totals. Taken once by the app.
    gifts_today: parking_lot::Mutex<Vec<(String, u64, u64)>>,
}

impl DurabilityStatus for Durable {
    fn problem(&self) -> Option<String> {
        if let Some(why) = self.journal.stats().failed {
            return Some(format!("journal failed, not taking money: {why}"));
        }
        let status = self.flusher.status();
        if !status.healthy {
            return Some(format!(
                "storage is behind by {} records ({} ms): {}",
                status.pending_records,
                status.behind_ms,
                status.last_error.unwrap_or_default()
            ));
        }
        None
    }

    fn taking_money(&self) -> bool {
        self.journal.stats().failed.is_none()
    }
}

impl Durable {
    /// Today's restored gifts (see the field); empty after the first call.
    pub fn take_gifts_today(&self) -> Vec<(String, u64, u64)> {
        std::mem::take(&mut *self.gifts_today.lock())
    }

    /// Opens storage and the journal and rebuilds the ledger: balances, credit references,
    /// recent gift ids and revenue from storage at its checkpoint, then every journal record
    /// after it. A corrupt journal or a record that does not fit stops the start.
    pub async fn open(
        data_dir: &Path,
        database_url: Option<&str>,
        split: Split,
        ack_before_durable: bool,
        node_id: &str,
        journal_settings: JournalSettings,
        idempotency: IdempotencyConfig,
    ) -> anyhow::Result<(Durable, Ledger)> {
        let store = Store::open_node(database_url, data_dir, node_id)
            .await
            .context("opening storage")?;
        let now = crate::now_ms();
        let since = now.saturating_sub(idempotency.retention_ms);
        let resident_since = now.saturating_sub(idempotency.resident_ms);
        tracing::info!(
            backend = store.backend(),
            "loading balances, revenue and the gift ids of the retention from storage"
        );
        let started = std::time::Instant::now();
        let snapshot = store
            .load_window(crate::store::Window {
                since_ms: since,
                resident_since_ms: resident_since,
                resident_max: idempotency.resident_max,
            })
            .await
            .context("loading storage")?;
        tracing::info!(
            gifts = snapshot.gifts.len() + snapshot.gift_keys.len(),
            resident = snapshot.gifts.len(),
            secs = started.elapsed().as_secs_f64(),
            "loaded from storage"
        );
        let mut jconfig = JournalConfig::new(data_dir);
        jconfig.segment_bytes_max = journal_settings.segment_bytes;
        jconfig.preallocate = journal_settings.preallocate;
        jconfig.sync_delay_ms = journal_settings.sync_delay_ms;
        let checkpoint = snapshot.checkpoint_lsn;
        let (journal, recovered, rx) =
            tokio::task::spawn_blocking(move || Journal::open(jconfig, checkpoint))
                .await
                .context("journal open task")?
                .context("opening the journal")?;
        if let Some((path, offset)) = &recovered.torn_tail {
            tracing::warn!(segment = %path.display(), offset, "journal: cut a torn last frame");
        }
        let sink = Arc::new(JournalSink {
            journal: journal.clone(),
            ack_before_durable,
        });
        let ledger = Ledger::with_idempotency(split, sink, idempotency);
        for (user, balance) in &snapshot.balances {
            ledger.restore_balance(user, *balance);
        }
        for c in &snapshot.credits {
            ledger.restore_credit(c);
        }
        // Older gifts' ids go straight into the evicted-id filter; recent ones are resident
        // (stored already: LSN 0), to be evicted like any other.
        for (i, k) in snapshot.gift_keys.iter().enumerate() {
            ledger.restore_evicted(&k.user_id, &k.gift_id, k.ts_ms);
            if (i + 1) % RESTORE_PROGRESS_IDS == 0 {
                tracing::info!(
                    ids = i + 1,
                    of = snapshot.gift_keys.len(),
                    "gift ids into the evicted-id filter"
                );
            }
        }
        for g in &snapshot.gifts {
            ledger.restore_gift(g);
            ledger.remember(g, 0);
        }
        for r in &snapshot.revenue {
            ledger.restore_revenue(
                &r.stream,
                RevenueRow {
                    sticker: r.sticker.clone(),
                    user_id: r.user_id.clone(),
                    user_name: r.user_name.clone(),
                    totals: Totals {
                        gifts: r.gifts,
                        stickers: r.stickers,
                        gross: r.gross,
                        store: r.store,
                        streamer: r.streamer,
                        platform: r.platform,
                    },
                },
            );
        }
        ledger.restore_totals(snapshot.credited_total, snapshot.gifted_total);
        for r in &snapshot.packets {
            ledger
                .restore_packet(r)
                .map_err(|e| anyhow::anyhow!("stored red packet records do not fit: {e}"))?;
        }
        for (lsn, record) in &recovered.records {
            ledger.replay(record).map_err(|e| {
                anyhow::anyhow!("journal record {lsn} does not fit the stored state: {e}")
            })?;
            if let Record::Gift(g) = record {
                // Not stored yet: resident until the flusher has stored it.
                ledger.remember(g, *lsn);
            }
        }
        let audit = ledger.audit();
        anyhow::ensure!(audit.ok, "recovered ledger does not balance: {audit:?}");
        tracing::info!(
            backend = store.backend(),
            checkpoint,
            replayed = recovered.records.len(),
            wallets = snapshot.balances.len(),
            credited = audit.credited,
            gifted = audit.gifted,
            "money recovered"
        );
        let today_ms = crate::now_ms() / crate::limits::DAY_MS * crate::limits::DAY_MS;
        let gifts_today = snapshot
            .gift_keys
            .iter()
            .map(|k| (&*k.user_id, &*k.gift_id, k.amount, k.ts_ms))
            .chain(
                snapshot
                    .gifts
                    .iter()
                    .chain(recovered.records.iter().filter_map(|(_, r)| match r {
                        Record::Gift(g) => Some(g),
                        _ => None,
                    }))
                    .map(|g| (&*g.user_id, &*g.gift_id, g.amount, g.ts_ms)),
            )
            // A red packet's host cut is counted with its packet below.
            .filter(|(_, gift_id, _, ts_ms)| *ts_ms >= today_ms && !gift_id.starts_with("rp:"))
            .map(|(user_id, _, amount, ts_ms)| (user_id.to_string(), amount, ts_ms))
            .chain(
                snapshot
                    .packets
                    .iter()
                    .chain(recovered.records.iter().map(|(_, r)| r))
                    .filter_map(|r| match r {
                        Record::PacketCreate(p) if p.ts_ms >= today_ms => {
                            Some((p.user_id.clone(), p.coins, p.ts_ms))
                        }
                        _ => None,
                    }),
            )
            .collect();
        let flusher = flusher::spawn(store.clone(), journal.clone(), rx, FlushConfig::default());
        Ok((
            Durable {
                journal,
                flusher,
                store,
                gifts_today: parking_lot::Mutex::new(gifts_today),
            },
            ledger,
        ))
    }

    /// Shutdown: the journal writes and fsyncs what is queued, the flusher stores what it can.
    /// What storage does not take in time stays in the journal for the next start.
    pub async fn close(&self, timeout: Duration) {
        self.journal.shutdown().await;
        match self.flusher.drain(timeout).await {
            Ok(()) => tracing::info!(
                stored = self.flusher.status().stored_lsn,
                "storage is up to date"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "storage not up to date at exit; the journal keeps the rest")
            }
        }
    }
}

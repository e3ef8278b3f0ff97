//! The embedded store: one SQLite connection in WAL mode, used from the blocking pool.

use super::{
    final_balances, to_i64, to_u64, Deltas, Result, RevenueRow, Snapshot, StoreError, GIFT_COLUMNS,
    MIGRATIONS, SCHEMA_VERSION_DDL,
};
use crate::money::Shares;
use crate::record::{CreditRecord, GiftRecord, Lsn, Record};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long a statement waits for SQLite's file lock (another process reading the file, e.g. an
/// operator's sqlite3 shell) before failing; the flusher then retries the batch.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;

/// Page size of a database file this store creates (SQLite fixes it when the first table is
/// made; a file created with another size keeps it). The flusher's gift inserts land at random
/// places of the gift-id index, and every page a batch dirties is written twice (WAL, then
/// checkpoint): at 16 KiB one batch dirties a quarter as many pages, with a quarter of the write
/// calls, than at SQLite's 4 KiB (docs/benchmarks.md, "The store alone").
pub const SQLITE_PAGE_SIZE_BYTES: u32 = 16 * 1024;

/// Page cache of the store's connection: room for one flusher batch's dirtied pages, so a
/// transaction does not spill them to the WAL half-way (SQLite's default is 2 MiB).
pub const SQLITE_CACHE_MIB: u32 = 64;

#[derive(Clone)]
pub struct SqliteStore {
    /// The lock is only taken inside `spawn_blocking` closures, never across an `.await`.
    conn: Arc<Mutex<Connection>>,
    node_id: Arc<str>,
}

impl SqliteStore {
    pub async fn open(path: &Path, node_id: &str) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let node = node_id.to_string();
        let conn = blocking(move || {
            let mut conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))?;
            // Before the first table (and before WAL, which fixes the size too); a no-op on a
            // file that has tables already.
            conn.pragma_update(None, "page_size", SQLITE_PAGE_SIZE_BYTES)?;
            // Negative: KiB rather than pages.
            conn.pragma_update(None, "cache_size", -i64::from(SQLITE_CACHE_MIB) * 1024)?;
            // WAL: readers never block the flusher. synchronous=FULL: a commit is on disk when
            // it returns, because the flusher then releases the journal up to it and the journal
            // deletes the segments that held it (NORMAL would let a power cut lose a committed
            // batch that no journal holds any more). One fsync per batch of up to 50,000 records.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            migrate(&mut conn, &node)?;
            Ok(conn)
        })
        .await?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            node_id: node_id.into(),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let node = self.node_id.clone();
        blocking(move || f(&mut conn.lock(), &node)).await
    }

    pub async fn ping(&self) -> Result<()> {
        self.with_conn(|conn, _| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    pub async fn apply_batch(&self, records: &[(Lsn, Arc<Record>)]) -> Result<()> {
        let records = records.to_vec();
        self.with_conn(move |conn, node| {
            let tx = conn.transaction()?;
            apply(&tx, node, &records)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn load(&self, since_ms: u64, resident_since_ms: u64) -> Result<Snapshot> {
        self.with_conn(move |conn, node| {
            let tx = conn.transaction()?; // one consistent read
            let snapshot = load(&tx, node, since_ms, resident_since_ms)?;
            tx.commit()?;
            Ok(snapshot)
        })
        .await
    }

    /// `cache_size`, `synchronous` and `journal_mode` of the store's own connection.
    #[cfg(test)]
    pub(crate) async fn connection_settings(&self) -> Result<(i64, i64, String)> {
        self.with_conn(|conn, _| {
            let cache = conn.query_row("PRAGMA cache_size", [], |r| r.get(0))?;
            let synchronous = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
            let journal_mode = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            Ok((cache, synchronous, journal_mode))
        })
        .await
    }

    pub async fn find_gift(&self, user_id: &str, gift_id: &str) -> Result<Option<GiftRecord>> {
        let (user_id, gift_id) = (user_id.to_string(), gift_id.to_string());
        self.with_conn(move |conn, _| {
            let sql =
                format!("SELECT {GIFT_COLUMNS} FROM gifts WHERE user_id = ?1 AND gift_id = ?2");
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(params![user_id, gift_id])?;
            match rows.next()? {
                Some(row) => Ok(Some(gift_row(row)?)),
                None => Ok(None),
            }
        })
        .await
    }
}

/// A row of `GIFT_COLUMNS`.
fn gift_row(row: &rusqlite::Row<'_>) -> Result<GiftRecord> {
    Ok(GiftRecord {
        user_id: row.get(0)?,
        user_name: row.get(1)?,
        gift_id: row.get(2)?,
        stream: row.get(3)?,
        sticker: row.get(4)?,
        count: u32::try_from(row.get::<_, i64>(5)?)
            .map_err(|_| StoreError::Range("gift count".into()))?,
        price: to_u64(row.get(6)?, "price")?,
        amount: to_u64(row.get(7)?, "amount")?,
        shares: Shares {
            store: to_u64(row.get(8)?, "store share")?,
            streamer: to_u64(row.get(9)?, "streamer share")?,
            platform: to_u64(row.get(10)?, "platform share")?,
        },
        message: row.get(11)?,
        balance_after: to_u64(row.get(12)?, "balance_after")?,
        ts_ms: to_u64(row.get(13)?, "ts_ms")?,
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

fn migrate(conn: &mut Connection, node: &str) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA_VERSION_DDL)?;
    let version: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    for (index, ddl) in MIGRATIONS.iter().enumerate() {
        let number = index as i64 + 1;
        if number > version {
            tx.execute_batch(ddl)?;
            tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [number])?;
        }
    }
    tx.execute(
        "INSERT INTO checkpoints (node_id, lsn, credited_total, gifted_total) VALUES (?1, 0, 0, 0)
         ON CONFLICT (node_id) DO NOTHING",
        [node],
    )?;
    tx.commit()?;
    Ok(())
}

fn apply(tx: &Transaction<'_>, node: &str, records: &[(Lsn, Arc<Record>)]) -> Result<()> {
    let checkpoint: i64 = tx.query_row(
        "SELECT lsn FROM checkpoints WHERE node_id = ?1",
        [node],
        |r| r.get(0),
    )?;
    let checkpoint = to_u64(checkpoint, "checkpoint")?;
    let start = records.partition_point(|(lsn, _)| *lsn <= checkpoint);
    let records = &records[start..];
    let Some((last_lsn, _)) = records.last() else {
        return Ok(()); // a replay of what is stored already
    };
    let mut deltas = Deltas::default();
    {
        let mut insert_credit = tx.prepare_cached(
            "INSERT INTO credits (reference, user_id, coins, balance_after, ts_ms, lsn)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )?;
        let mut insert_gift = tx.prepare_cached(
            "INSERT INTO gifts (user_id, gift_id, user_name, stream, sticker, count, price, amount,
                 store_share, streamer_share, platform_share, message, balance_after, ts_ms, lsn)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT DO NOTHING",
        )?;
        let mut insert_packet = tx.prepare_cached(
            "INSERT INTO packet_records (node_id, lsn, body) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?;
        // Gifts (and red packets' host cuts, which are gifts too) in the gift-id index's order
        // (user, gift id), so a batch walks that index once from end to end instead of at random
        // (clients' ids are random); records without a gift part first. Stable: a gift id twice
        // in one batch keeps its first (LSN order), as before. The totals are then added in LSN
        // order (the revenue row keeps the latest name).
        let parts: Vec<_> = records.iter().map(|(_, r)| super::gift_part(r)).collect();
        let key = |i: usize| parts[i].as_deref().map(|g| (&g.user_id, &g.gift_id));
        let mut in_key_order: Vec<usize> = (0..records.len()).collect();
        in_key_order.sort_by(|&a, &b| key(a).cmp(&key(b)));
        let mut inserted = vec![false; records.len()];
        for i in in_key_order {
            let (lsn, record) = &records[i];
            let lsn = to_i64(*lsn, "lsn")?;
            match &**record {
                Record::Credit(c) => {
                    inserted[i] = insert_credit.execute(params![
                        c.reference,
                        c.user_id,
                        to_i64(c.coins, "coins")?,
                        to_i64(c.balance_after, "balance_after")?,
                        to_i64(c.ts_ms, "ts_ms")?,
                        lsn,
                    ])? == 1;
                }
                other => {
                    if let Some(g) = parts[i].as_deref() {
                        inserted[i] = insert_gift.execute(params![
                            g.user_id,
                            g.gift_id,
                            g.user_name,
                            g.stream,
                            g.sticker,
                            i64::from(g.count),
                            to_i64(g.price, "price")?,
                            to_i64(g.amount, "amount")?,
                            to_i64(g.shares.store, "store share")?,
                            to_i64(g.shares.streamer, "streamer share")?,
                            to_i64(g.shares.platform, "platform share")?,
                            g.message,
                            to_i64(g.balance_after, "balance_after")?,
                            to_i64(g.ts_ms, "ts_ms")?,
                            lsn,
                        ])? == 1;
                    }
                    if super::is_packet(other) {
                        insert_packet.execute(params![node, lsn, super::encode_packet(other)])?;
                    }
                }
            }
        }
        for (i, (_, record)) in records.iter().enumerate().filter(|&(i, _)| inserted[i]) {
            match (&**record, parts[i].as_deref()) {
                (Record::Credit(c), _) => deltas.add_credit(c)?,
                (_, Some(g)) => deltas.add_gift(g)?,
                _ => {}
            }
        }
        let mut upsert_wallet = tx.prepare_cached(
            "INSERT INTO wallets (user_id, balance) VALUES (?1, ?2)
             ON CONFLICT (user_id) DO UPDATE SET balance = excluded.balance",
        )?;
        for (user, balance) in final_balances(records) {
            upsert_wallet.execute(params![user, to_i64(balance, "balance")?])?;
        }
        let mut upsert_revenue = tx.prepare_cached(
            "INSERT INTO revenue (stream, sticker, user_id, user_name, gifts, stickers, gross,
                 store_share, streamer_share, platform_share)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (stream, sticker, user_id) DO UPDATE SET
                 user_name = excluded.user_name,
                 gifts = revenue.gifts + excluded.gifts,
                 stickers = revenue.stickers + excluded.stickers,
                 gross = revenue.gross + excluded.gross,
                 store_share = revenue.store_share + excluded.store_share,
                 streamer_share = revenue.streamer_share + excluded.streamer_share,
                 platform_share = revenue.platform_share + excluded.platform_share",
        )?;
        for row in deltas.revenue.values() {
            upsert_revenue.execute(params![
                row.stream,
                row.sticker,
                row.user_id,
                row.user_name,
                to_i64(row.gifts, "gifts")?,
                to_i64(row.stickers, "stickers")?,
                to_i64(row.gross, "gross")?,
                to_i64(row.store, "store share")?,
                to_i64(row.streamer, "streamer share")?,
                to_i64(row.platform, "platform share")?,
            ])?;
        }
    }
    tx.execute(
        "UPDATE checkpoints SET lsn = ?1, credited_total = credited_total + ?2,
             gifted_total = gifted_total + ?3 WHERE node_id = ?4",
        params![
            to_i64(*last_lsn, "lsn")?,
            to_i64(deltas.credited, "credited")?,
            to_i64(deltas.gifted, "gifted")?,
            node
        ],
    )?;
    Ok(())
}

fn load(
    tx: &Transaction<'_>,
    node: &str,
    since_ms: u64,
    resident_since_ms: u64,
) -> Result<Snapshot> {
    let checkpoint: Option<i64> = tx
        .query_row(
            "SELECT lsn FROM checkpoints WHERE node_id = ?1",
            [node],
            |r| r.get(0),
        )
        .optional()?;
    let (credited, gifted): (i64, i64) = tx.query_row(
        "SELECT COALESCE(SUM(credited_total), 0), COALESCE(SUM(gifted_total), 0) FROM checkpoints",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut snapshot = Snapshot {
        checkpoint_lsn: to_u64(checkpoint.unwrap_or(0), "checkpoint")?,
        credited_total: to_u64(credited, "credited total")?,
        gifted_total: to_u64(gifted, "gifted total")?,
        ..Snapshot::default()
    };
    let mut stmt = tx.prepare("SELECT user_id, balance FROM wallets ORDER BY user_id")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        snapshot
            .balances
            .push((row.get(0)?, to_u64(row.get(1)?, "balance")?));
    }
    let mut stmt = tx.prepare(
        "SELECT user_id, coins, reference, balance_after, ts_ms FROM credits ORDER BY lsn",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        snapshot.credits.push(CreditRecord {
            user_id: row.get(0)?,
            coins: to_u64(row.get(1)?, "coins")?,
            reference: row.get(2)?,
            balance_after: to_u64(row.get(3)?, "balance_after")?,
            ts_ms: to_u64(row.get(4)?, "ts_ms")?,
        });
    }
    let sql = format!("SELECT {GIFT_COLUMNS} FROM gifts WHERE ts_ms >= ?1 ORDER BY lsn");
    let mut stmt = tx.prepare(&sql)?;
    let mut rows = stmt.query([to_i64(since_ms, "since")?])?;
    while let Some(row) = rows.next()? {
        let gift = gift_row(row)?;
        super::sort_gift(&mut snapshot, gift, resident_since_ms);
    }
    let mut stmt = tx.prepare(
        "SELECT stream, sticker, user_id, user_name, gifts, stickers, gross, store_share,
             streamer_share, platform_share
         FROM revenue ORDER BY stream, sticker, user_id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        snapshot.revenue.push(RevenueRow {
            stream: row.get(0)?,
            sticker: row.get(1)?,
            user_id: row.get(2)?,
            user_name: row.get(3)?,
            gifts: to_u64(row.get(4)?, "gifts")?,
            stickers: to_u64(row.get(5)?, "stickers")?,
            gross: to_u64(row.get(6)?, "gross")?,
            store: to_u64(row.get(7)?, "store share")?,
            streamer: to_u64(row.get(8)?, "streamer share")?,
            platform: to_u64(row.get(9)?, "platform share")?,
        });
    }
    drop(rows);
    drop(stmt);
    let mut stmt = tx.prepare("SELECT body FROM packet_records WHERE node_id = ?1 ORDER BY lsn")?;
    let mut rows = stmt.query([node])?;
    while let Some(row) = rows.next()? {
        let body: Vec<u8> = row.get(0)?;
        snapshot.packets.push(super::decode_packet(&body)?);
    }
    snapshot.sort();
    Ok(snapshot)
}

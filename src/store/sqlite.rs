//! The embedded store: one SQLite connection in WAL mode, used from the blocking pool.

use super::{
    final_balances, to_i64, to_u64, Deltas, Result, RevenueRow, Snapshot, StoreError, GIFT_COLUMNS,
    SCHEMA_VERSION_DDL,
};
use crate::money::Shares;
use crate::record::{CreditRecord, GiftRecord, Lsn, Record};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
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

/// The gift-id key of a gift: 64 bits of XXH3 over the sender and the gift id. The gift table's
/// unique index is on `(key_hash, key_salt)`, not on the two strings: ~15 bytes an entry
/// instead of ~45, so a batch of random client ids dirties a third as many index pages. Two
/// different gifts with one hash (about one pair in 2^64) get salts 0, 1, ...; a gift is the
/// same one only if its sender and id are equal (see `GiftInsert::insert`). Never change this
/// function: stored keys depend on it (`store::tests::the_gift_key_hash_never_changes`).
pub fn gift_key_hash(user_id: &str, gift_id: &str) -> i64 {
    let mut bytes = Vec::with_capacity(4 + user_id.len() + gift_id.len());
    bytes.extend_from_slice(&(user_id.len() as u32).to_le_bytes());
    bytes.extend_from_slice(user_id.as_bytes());
    bytes.extend_from_slice(gift_id.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes) as i64
}

/// How a gift's key is hashed: `gift_key_hash`, or in tests one that collides.
pub(crate) type KeyHash = fn(&str, &str) -> i64;

/// A gift's key generation is its LSN shifted right by this: 2^21 = 2,097,152 LSNs a
/// generation (~21 s at 100,000 gifts/s). The gift table's unique index leads with the
/// generation, `(key_gen, key_hash, key_salt)`, so a batch's random keys land only in the
/// current generation's part of the index, which stays about the size of the page cache
/// (~2M entries of ~20 bytes), instead of all over an index as large as the whole table: the
/// pages a batch dirties no longer grow with the table (docs/durability.md "Store",
/// docs/benchmarks.md "Key generations"). What keeps a gift id from being accepted twice is
/// the ledger; the store holds every gift record it is given, once per LSN (`GiftInsert`).
pub const GIFT_KEY_GEN_SHIFT: u32 = 21;

/// How a store is keyed: the hash and the generation size (tests use tiny generations).
#[derive(Clone, Copy)]
pub(crate) struct KeyScheme {
    pub hash: KeyHash,
    pub gen_shift: u32,
}

impl KeyScheme {
    pub(crate) const DEFAULT: KeyScheme = KeyScheme {
        hash: gift_key_hash,
        gen_shift: GIFT_KEY_GEN_SHIFT,
    };

    fn gen(self, lsn: i64) -> i64 {
        lsn >> self.gen_shift
    }

    /// The gift's place in the key index: `(key_gen, key_hash)`.
    fn key(self, lsn: i64, g: &GiftRecord) -> (i64, i64) {
        (self.gen(lsn), (self.hash)(&g.user_id, &g.gift_id))
    }
}

/// Rows between two progress lines while an older file's gift table is re-keyed at open.
const REKEY_PROGRESS_ROWS: u64 = 1_000_000;

#[derive(Clone)]
pub struct SqliteStore {
    /// The writer: migrations, `apply_batch`, `load`. The lock is only taken inside
    /// `spawn_blocking` closures, never across an `.await`.
    conn: Arc<Mutex<Connection>>,
    /// A second, read-only connection for the reads that run while the server takes money
    /// (`find_gift`, `ping`). In WAL mode a reader never waits for the writer, so a lookup of an
    /// evicted gift id does not queue behind a flusher batch that may hold the writer for a
    /// second or more; it sees every batch committed before it starts (the ledger evicts an id
    /// only after its batch committed).
    reader: Arc<Mutex<Connection>>,
    node_id: Arc<str>,
    keys: KeyScheme,
}

impl SqliteStore {
    pub async fn open(path: &Path, node_id: &str) -> Result<SqliteStore> {
        Self::open_with_keys(path, node_id, KeyScheme::DEFAULT).await
    }

    pub(crate) async fn open_with_keys(
        path: &Path,
        node_id: &str,
        keys: KeyScheme,
    ) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let node = node_id.to_string();
        let (conn, reader) = blocking(move || {
            let mut conn = Connection::open(&path)?;
            refuse_memory_database(&conn)?;
            conn.busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))?;
            // Before the first table (and before WAL, which fixes the size too); a no-op on a
            // file that has tables already.
            conn.pragma_update(None, "page_size", SQLITE_PAGE_SIZE_BYTES)?;
            // Negative: KiB rather than pages.
            conn.pragma_update(None, "cache_size", -i64::from(SQLITE_CACHE_MIB) * 1024)?;
            // WAL: readers never block the flusher. synchronous=FULL: a commit is on disk when
            // it returns, because the flusher then releases the journal up to it and the journal
            // deletes the segments that held it (NORMAL would let a power cut lose a committed
            // batch that no journal holds any more). One fsync per flusher batch.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            migrate(&mut conn, &node, keys)?;
            // URI as for the writer (`Connection::open`'s flags have it), so `file:` names
            // open the same file.
            let reader = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))?;
            Ok((conn, reader))
        })
        .await?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            node_id: node_id.into(),
            keys,
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

    /// As `with_conn`, on the read-only connection.
    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let reader = self.reader.clone();
        blocking(move || f(&reader.lock())).await
    }

    /// Reads the file through the reader (`checkpoints` exists in every migrated file), so a
    /// file that went away or became unreadable is reported, without waiting for a batch.
    pub async fn ping(&self) -> Result<()> {
        self.with_reader(|conn| {
            Ok(conn.query_row("SELECT count(*) FROM checkpoints", [], |_| Ok(()))?)
        })
        .await
    }

    pub async fn apply_batch(&self, records: &[(Lsn, Arc<Record>)]) -> Result<()> {
        let records = records.to_vec();
        let keys = self.keys;
        self.with_conn(move |conn, node| {
            let tx = conn.transaction()?;
            apply(&tx, node, &records, keys)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn load(&self, window: super::Window) -> Result<Snapshot> {
        self.with_conn(move |conn, node| {
            let tx = conn.transaction()?; // one consistent read
            let snapshot = load(&tx, node, window)?;
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

    /// FOR TESTS: holds the writer inside an open write transaction (as a long flusher batch
    /// does) from `held` until `release`, then rolls it back.
    #[cfg(test)]
    pub(crate) async fn hold_writer(
        &self,
        held: tokio::sync::oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    ) -> Result<()> {
        self.with_conn(move |conn, _| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute("UPDATE checkpoints SET lsn = lsn", [])?;
            let _ = held.send(());
            let _ = release.recv();
            tx.rollback()?;
            Ok(())
        })
        .await
    }

    /// The newest stored copy of the gift made in one of `spans` (`Store::find_gift`). Only
    /// the key generations that may hold such gifts are probed (`gift_generations`: those whose
    /// gift times overlap a span), newest first, one index lookup each: the work is bounded by
    /// the gifts of the spans, usually one day's, not by every gift ever stored.
    pub async fn find_gift(
        &self,
        user_id: &str,
        gift_id: &str,
        spans: Vec<(i64, i64)>,
    ) -> Result<Option<GiftRecord>> {
        let (user_id, gift_id) = (user_id.to_string(), gift_id.to_string());
        let hash = (self.keys.hash)(&user_id, &gift_id);
        let from = spans.iter().map(|s| s.0).min().unwrap_or(i64::MAX);
        let to = spans.iter().map(|s| s.1).max().unwrap_or(i64::MIN);
        self.with_reader(move |conn| {
            let generations: Vec<i64> = conn
                .prepare_cached(
                    "SELECT key_gen, ts_min, ts_max FROM gift_generations
                     WHERE ts_max >= ?1 AND ts_min < ?2 ORDER BY key_gen DESC",
                )?
                .query_map([from, to], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?
                .filter_map(|row| match row {
                    Ok((gen, ts_min, ts_max)) => spans
                        .iter()
                        .any(|&(start, end)| start <= ts_max && ts_min < end)
                        .then_some(Ok(gen)),
                    Err(e) => Some(Err(e)),
                })
                .collect::<rusqlite::Result<_>>()?;
            let sql = format!(
                "SELECT {GIFT_COLUMNS} FROM gifts
                 WHERE key_gen = ?1 AND key_hash = ?2 AND user_id = ?3 AND gift_id = ?4
                 ORDER BY lsn DESC"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            for gen in generations {
                let mut rows = stmt.query(params![gen, hash, user_id, gift_id])?;
                while let Some(row) = rows.next()? {
                    let gift = gift_row(row)?;
                    if super::in_spans(&spans, gift.ts_ms) {
                        return Ok(Some(gift));
                    }
                }
            }
            Ok(None)
        })
        .await
    }

    /// FOR TESTS: `gift_generations` as stored: `(key_gen, ts_min, ts_max)` by generation.
    #[cfg(test)]
    pub(crate) async fn gift_generations(&self) -> Result<Vec<(i64, i64, i64)>> {
        self.with_reader(|conn| {
            Ok(conn
                .prepare("SELECT key_gen, ts_min, ts_max FROM gift_generations ORDER BY key_gen")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?)
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

/// The store holds money across restarts, and its lookups run on a second connection to the
/// same file: an in-memory or temporary database (`:memory:`, `file::memory:`, an empty path)
/// would do neither, so it is refused with a clear error.
fn refuse_memory_database(conn: &Connection) -> Result<()> {
    let file: String = conn.query_row(
        "SELECT file FROM pragma_database_list WHERE name = 'main'",
        [],
        |r| r.get(0),
    )?;
    if file.is_empty() {
        return Err(StoreError::Url(
            "an in-memory or temporary SQLite database cannot hold money across restarts: give \
             the store a file path (sqlite:<path>, or no URL for <data_dir>/giftcast.db)"
                .into(),
        ));
    }
    Ok(())
}

fn migrate(conn: &mut Connection, node: &str, keys: KeyScheme) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA_VERSION_DDL)?;
    let version: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    for (number, ddl) in super::steps_after(version)? {
        if !ddl.is_empty() {
            tx.execute_batch(ddl)?;
        }
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [number])?;
    }
    tx.execute(
        "INSERT INTO checkpoints (node_id, lsn, credited_total, gifted_total) VALUES (?1, 0, 0, 0)
         ON CONFLICT (node_id) DO NOTHING",
        [node],
    )?;
    if !has_column(&tx, "gifts", "key_hash")? {
        key_gifts_by_hash(&tx, keys)?;
    } else if !has_column(&tx, "gifts", "key_gen")? {
        key_gifts_by_generation(&tx)?;
    }
    if !has_table(&tx, "gift_generations")? {
        index_gift_generations(&tx)?;
    } else if !has_column(&tx, "gift_generations", "ts_min")? {
        // Step 4: the oldest gift time of each generation. Not known for the generations
        // stored before: 0, so they are probed for any span until they are past the retention.
        tx.execute_batch(
            "ALTER TABLE gift_generations ADD COLUMN ts_min INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn has_column(tx: &Transaction<'_>, table: &str, column: &str) -> Result<bool> {
    let n: i64 = tx.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
        [table, column],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

fn has_table(tx: &Transaction<'_>, table: &str) -> Result<bool> {
    let n: i64 = tx.query_row(
        "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// `gift_generations`: each key generation's oldest and newest gift time (`ts_ms`, the wall
/// clock of the gift, which is not in LSN order: the smallest and the largest, not the first
/// and the last), kept by `apply` in each batch's transaction, so `find_gift` probes only the
/// generations that may hold a gift of its spans.
/// Built once from the gifts of a file that predates it (one pass over the table, logged before
/// and after).
fn index_gift_generations(tx: &Transaction<'_>) -> Result<()> {
    // Whether there are gifts at all (one probe; a COUNT would be a second pass over them).
    let any: bool = tx.query_row("SELECT EXISTS (SELECT 1 FROM gifts)", [], |r| r.get(0))?;
    if any {
        tracing::info!("sqlite: indexing the gift table's key generations by time (once)");
    }
    tx.execute_batch(
        "CREATE TABLE gift_generations (
             key_gen INTEGER PRIMARY KEY,
             ts_max INTEGER NOT NULL,
             ts_min INTEGER NOT NULL DEFAULT 0
         );
         INSERT INTO gift_generations (key_gen, ts_min, ts_max)
             SELECT key_gen, MIN(ts_ms), MAX(ts_ms) FROM gifts GROUP BY key_gen;",
    )?;
    if any {
        let generations: i64 =
            tx.query_row("SELECT COUNT(*) FROM gift_generations", [], |r| r.get(0))?;
        tracing::info!(
            generations,
            "sqlite: the gift table's key generations are indexed by time"
        );
    }
    Ok(())
}

/// SQLite only (PostgreSQL keys by the strings and the LSN): the shared schema makes `gifts`
/// keyed by the two strings; this rebuilds it keyed by `(key_gen, key_hash, key_salt)` (see
/// `gift_key_hash`, `GIFT_KEY_GEN_SHIFT`), once, copying any gifts a file of an older giftcast
/// holds, in LSN order.
fn key_gifts_by_hash(tx: &Transaction<'_>, keys: KeyScheme) -> Result<()> {
    tx.execute_batch(concat!(
        "CREATE TABLE gifts_by_hash (\n",
        super::gift_column_defs!(),
        "    key_hash INTEGER NOT NULL,
    key_salt INTEGER NOT NULL,
    key_gen INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX gifts_gen_key ON gifts_by_hash (key_gen, key_hash, key_salt);",
    ))?;
    let total: i64 = tx.query_row("SELECT COUNT(*) FROM gifts", [], |r| r.get(0))?;
    if total > 0 {
        tracing::info!(
            total,
            "sqlite: keying the gift table by gift-id hash (once)"
        );
    }
    let copied = {
        let mut insert = GiftInsert::prepare(tx, "gifts_by_hash")?;
        let mut stmt = tx.prepare(&format!(
            "SELECT {GIFT_COLUMNS}, lsn FROM gifts ORDER BY lsn"
        ))?;
        let mut rows = stmt.query([])?;
        let mut copied = 0u64;
        while let Some(row) = rows.next()? {
            let gift = gift_row(row)?;
            let lsn: i64 = row.get(14)?;
            if !insert.insert(&gift, lsn, keys.key(lsn, &gift))? {
                return Err(StoreError::Range(format!(
                    "re-keying the gift table: gift {} of {} is in it twice (the file is damaged; \
                     nothing was changed)",
                    gift.gift_id, gift.user_id
                )));
            }
            copied += 1;
            if copied.is_multiple_of(REKEY_PROGRESS_ROWS) {
                tracing::info!(
                    copied,
                    total,
                    "sqlite: keying the gift table by gift-id hash"
                );
            }
        }
        copied
    };
    tx.execute_batch(
        "DROP TABLE gifts;
         ALTER TABLE gifts_by_hash RENAME TO gifts;
         CREATE INDEX gifts_ts_ms ON gifts (ts_ms);",
    )?;
    if copied > 0 {
        tracing::info!(
            copied,
            "sqlite: the gift table is now keyed by gift-id hash"
        );
    }
    Ok(())
}

/// A file keyed by `(key_hash, key_salt)` alone (giftcast of 2026-12-03 to 2026-12-06) gets the
/// generation column: its gifts all go in generation 0 (adding a column with a default rewrites
/// nothing; they stay unique there, as before), and the key index is rebuilt leading with the
/// generation, once (one pass over the table).
fn key_gifts_by_generation(tx: &Transaction<'_>) -> Result<()> {
    let total: i64 = tx.query_row("SELECT COUNT(*) FROM gifts", [], |r| r.get(0))?;
    if total > 0 {
        tracing::info!(
            total,
            "sqlite: adding key generations to the gift table's key (once)"
        );
    }
    tx.execute_batch(
        "ALTER TABLE gifts ADD COLUMN key_gen INTEGER NOT NULL DEFAULT 0;
         CREATE UNIQUE INDEX gifts_gen_key ON gifts (key_gen, key_hash, key_salt);
         DROP INDEX gifts_by_hash_key;",
    )?;
    if total > 0 {
        tracing::info!(total, "sqlite: the gift table's key has generations");
    }
    Ok(())
}

/// The gift insert of the hash-keyed table: the record of an LSN stored already (the same
/// sender, id and LSN in its key generation) is not inserted again; any other gift with the same
/// hash gets the next salt. That includes a sender's gift id used again under a new LSN: the
/// ledger accepts an id again once it is past the retention, debits it, and the store must hold
/// every gift it debited, or its totals would not balance.
struct GiftInsert<'t> {
    insert: rusqlite::CachedStatement<'t>,
    same_hash: rusqlite::CachedStatement<'t>,
}

impl<'t> GiftInsert<'t> {
    fn prepare(tx: &'t Transaction<'_>, table: &str) -> Result<GiftInsert<'t>> {
        Ok(GiftInsert {
            insert: tx.prepare_cached(&format!(
                "INSERT INTO {table} (user_id, gift_id, user_name, stream, sticker, count, price,
                     amount, store_share, streamer_share, platform_share, message, balance_after,
                     ts_ms, lsn, key_hash, key_salt, key_gen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                     ?18)
                 ON CONFLICT DO NOTHING"
            ))?,
            same_hash: tx.prepare_cached(&format!(
                "SELECT user_id, gift_id, lsn, key_salt FROM {table}
                 WHERE key_gen = ?1 AND key_hash = ?2"
            ))?,
        })
    }

    /// Whether the gift was inserted (false: this very record, the sender's gift id under this
    /// LSN, is stored already). `(gen, hash)`: `KeyScheme::key`.
    fn insert(&mut self, g: &GiftRecord, lsn: i64, (gen, hash): (i64, i64)) -> Result<bool> {
        if self.insert_salted(g, lsn, gen, hash, 0)? {
            return Ok(true);
        }
        // Salt 0 is taken: by this very record (a replay) or by another gift with the same hash
        // (another id, or this id under another LSN).
        let mut salt_max = 0i64;
        let mut rows = self.same_hash.query([gen, hash])?;
        while let Some(row) = rows.next()? {
            let (user_id, gift_id, stored_lsn): (String, String, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            if stored_lsn == lsn && *user_id == *g.user_id && *gift_id == *g.gift_id {
                return Ok(false);
            }
            salt_max = salt_max.max(row.get(3)?);
        }
        drop(rows);
        let salt = salt_max + 1;
        if !self.insert_salted(g, lsn, gen, hash, salt)? {
            return Err(StoreError::Range(format!(
                "gift {} of {}: key ({gen}, {hash}, {salt}) is taken though no gift with that \
                 hash has it (the file is damaged; the batch is not stored)",
                g.gift_id, g.user_id
            )));
        }
        Ok(true)
    }

    fn insert_salted(
        &mut self,
        g: &GiftRecord,
        lsn: i64,
        gen: i64,
        hash: i64,
        salt: i64,
    ) -> Result<bool> {
        Ok(self.insert.execute(params![
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
            hash,
            salt,
            gen,
        ])? == 1)
    }
}

fn apply(
    tx: &Transaction<'_>,
    node: &str,
    records: &[(Lsn, Arc<Record>)],
    keys: KeyScheme,
) -> Result<()> {
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
    // Each record's gift part (a gift, or a red packet's host cut), computed once.
    let parts: Vec<_> = records.iter().map(|(_, r)| super::gift_part(r)).collect();
    let mut deltas = Deltas::default();
    {
        let mut insert_credit = tx.prepare_cached(
            "INSERT INTO credits (reference, user_id, coins, balance_after, ts_ms, lsn)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )?;
        let mut insert_gift = GiftInsert::prepare(tx, "gifts")?;
        let mut insert_packet = tx.prepare_cached(
            "INSERT INTO packet_records (node_id, lsn, body) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?;
        // Gifts (and red packets' host cuts, which are gifts too) in the gift-key index's order
        // (generation, then `gift_key_hash`), so a batch walks that index once from end to end
        // instead of at random (clients' ids are random); records without a gift part first.
        // Stable: a gift id twice in one batch keeps its first (LSN order), as before. The
        // totals are then added in LSN order (the revenue row keeps the latest name).
        let index_keys: Vec<Option<(i64, i64)>> = records
            .iter()
            .zip(&parts)
            .map(|((lsn, _), p)| {
                let lsn = to_i64(*lsn, "lsn")?;
                Ok(p.as_deref().map(|g| keys.key(lsn, g)))
            })
            .collect::<Result<_>>()?;
        let mut in_key_order: Vec<usize> = (0..records.len()).collect();
        in_key_order.sort_by_key(|&i| index_keys[i]);
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
                    if let (Some(g), Some(key)) = (parts[i].as_deref(), index_keys[i]) {
                        inserted[i] = insert_gift.insert(g, lsn, key)?;
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
        // Each generation's oldest and newest gift time, widened by the gifts inserted into
        // it (a batch touches one generation, two at a boundary).
        let mut times: Vec<(i64, i64, i64)> = Vec::new();
        for (i, part) in parts.iter().enumerate().filter(|&(i, _)| inserted[i]) {
            let (Some(g), Some((gen, _))) = (part.as_deref(), index_keys[i]) else {
                continue;
            };
            let ts = to_i64(g.ts_ms, "ts_ms")?;
            match times.iter_mut().find(|t| t.0 == gen) {
                Some(t) => (t.1, t.2) = (t.1.min(ts), t.2.max(ts)),
                None => times.push((gen, ts, ts)),
            }
        }
        let mut upsert_times = tx.prepare_cached(
            "INSERT INTO gift_generations (key_gen, ts_min, ts_max) VALUES (?1, ?2, ?3)
             ON CONFLICT (key_gen) DO UPDATE SET
                 ts_min = MIN(ts_min, excluded.ts_min), ts_max = MAX(ts_max, excluded.ts_max)",
        )?;
        for (gen, ts_min, ts_max) in times {
            upsert_times.execute([gen, ts_min, ts_max])?;
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
        for row in deltas.revenue_in_key_order() {
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

fn load(tx: &Transaction<'_>, node: &str, window: super::Window) -> Result<Snapshot> {
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
    // No ORDER BY: sorting millions of whole rows took SQLite ~20 s before the first of 6.3M
    // came (`GiftSorter` keeps the newest whole, by LSN, as they come). When every stored gift
    // is within the retention (a young file, or a busy week), the table is read in storage
    // order, about twice as fast as through the `ts_ms` index; otherwise the index skips the
    // older ones.
    let since = to_i64(window.since_ms, "since")?;
    let oldest: Option<i64> = tx.query_row("SELECT MIN(ts_ms) FROM gifts", [], |r| r.get(0))?;
    let source = if oldest.is_none_or(|ts| ts >= since) {
        "gifts NOT INDEXED"
    } else {
        "gifts"
    };
    let sql = format!("SELECT {GIFT_COLUMNS}, lsn FROM {source} WHERE ts_ms >= ?1");
    let mut stmt = tx.prepare(&sql)?;
    let mut rows = stmt.query([since])?;
    let mut gifts = super::GiftSorter::new(window);
    while let Some(row) = rows.next()? {
        gifts.push(to_u64(row.get(14)?, "lsn")?, gift_row(row)?);
    }
    gifts.finish(&mut snapshot);
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

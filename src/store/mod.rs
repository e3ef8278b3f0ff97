//! Storage: the flusher's target and the start-up snapshot. Embedded SQLite (WAL) by default,
//! PostgreSQL by URL, behind one type with one behaviour (and one test suite).
//!
//! The journal is the durability point; the store is the compacted, queryable copy. Every
//! `apply_batch` is one transaction that also moves the journal checkpoint, and replays of
//! records at or below the checkpoint are skipped, so applying a batch twice changes nothing.

mod postgres;
mod sqlite;

#[cfg(test)]
pub(crate) mod tests;

pub use self::postgres::PgStore;
pub use self::sqlite::SqliteStore;

use crate::record::{CreditRecord, GiftRecord, Lsn, Record};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The SQLite file in the data dir when no database URL is given.
pub const SQLITE_FILE_NAME: &str = "giftcast.db";

/// The checkpoint row used by a single node (`Store::open`). Cluster nodes sharing one
/// PostgreSQL database each keep their own journal, hence their own checkpoint row.
pub const NODE_ID_DEFAULT: &str = "local";

/// One storage call (connect + migrate, a batch transaction, a load) must finish within this,
/// or it is abandoned (the PostgreSQL connection dropped, so the server rolls back) and reported
/// as an error: a hung database must not stall the flusher forever. Loads of a large table at
/// start-up take seconds, hence the generous bound.
pub const STORE_OPERATION_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", pg_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("storage operation timed out after {0} ms")]
    Timeout(u64),
    #[error("bad database url: {0}")]
    Url(String),
    #[error("value out of range for storage: {0}")]
    Range(String),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the store was written by a newer giftcast (shape step {found}; this build knows steps up \
         to {known}). Downgrades are not supported: run that giftcast or a newer one, or restore a \
         copy of the store taken before the upgrade"
    )]
    Newer { found: i64, known: i64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Revenue of one (stream, sticker, sender) over all stored gifts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevenueRow {
    pub stream: String,
    pub sticker: String,
    pub user_id: String,
    /// The sender's name on their latest gift.
    pub user_name: String,
    /// Gift records.
    pub gifts: u64,
    /// Sum of the gifts' sticker counts.
    pub stickers: u64,
    /// Whole coins.
    pub gross: u64,
    /// Shares in units of 1/SHARE_UNIT coin; store + streamer + platform == gross * SHARE_UNIT.
    pub store: u64,
    pub streamer: u64,
    pub platform: u64,
}

/// What the store holds, for building the in-memory ledger at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every record <= this is in the store; replay the journal after it.
    pub checkpoint_lsn: Lsn,
    /// Every wallet's balance, sorted by user id.
    pub balances: Vec<(String, u64)>,
    /// Every credit (idempotency on `reference`), in LSN order.
    pub credits: Vec<CreditRecord>,
    /// Gifts with `ts_ms >= resident_since_ms` (the resident gift-id memory), the newest
    /// `resident_max` of them, in LSN order.
    pub gifts: Vec<GiftRecord>,
    /// The other gifts since `since_ms`: only what the evicted-id filter and the daily cap
    /// need, in no particular order.
    pub gift_keys: Vec<GiftKey>,
    /// Sorted by (stream, sticker, user_id).
    pub revenue: Vec<RevenueRow>,
    /// Sum of all credits' coins.
    pub credited_total: u64,
    /// Sum of all gifts' amounts.
    pub gifted_total: u64,
    /// This node's red packet records, in LSN order (packets in flight are rebuilt from them).
    pub packets: Vec<Record>,
}

/// A stored gift older than the resident window, as the start needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GiftKey {
    /// The loaded record's own names, moved here (a start may load tens of millions of keys).
    pub user_id: Arc<str>,
    pub gift_id: Arc<str>,
    pub amount: u64,
    pub ts_ms: u64,
}

/// Which gifts a start loads, and how: since `since_ms` (the idempotency retention), the ones
/// since `resident_since_ms` whole (their ids resident), at most the newest `resident_max` of
/// them; the rest as keys.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub since_ms: u64,
    pub resident_since_ms: u64,
    pub resident_max: usize,
}

/// Loaded gift rows a progress line is logged after, at start.
const LOAD_PROGRESS_ROWS: u64 = 1_000_000;

/// Sorts loaded gifts into whole ones and keys as they come, in any order (no sort in the
/// database: a start after a busy stretch reads millions), so that it holds at most
/// `resident_max` whole records, the newest by LSN, not all of them: the ledger would evict the
/// rest at once anyway.
struct GiftSorter {
    window: Window,
    /// The newest whole gifts so far, by (LSN, row number): the row number keeps two gifts apart
    /// that share an LSN (cluster nodes sharing PostgreSQL each number their own journal).
    recent: std::collections::BTreeMap<(Lsn, u64), GiftRecord>,
    keys: Vec<GiftKey>,
    rows: u64,
}

impl GiftSorter {
    fn new(window: Window) -> GiftSorter {
        GiftSorter {
            window,
            recent: std::collections::BTreeMap::new(),
            keys: Vec::new(),
            rows: 0,
        }
    }

    fn push(&mut self, lsn: Lsn, gift: GiftRecord) {
        self.rows += 1;
        if self.rows.is_multiple_of(LOAD_PROGRESS_ROWS) {
            tracing::info!(
                rows = self.rows,
                "loading gifts of the retention from storage"
            );
        }
        if gift.ts_ms >= self.window.resident_since_ms {
            self.recent.insert((lsn, self.rows), gift);
            if self.recent.len() > self.window.resident_max {
                let (_, oldest) = self.recent.pop_first().expect("over the bound");
                self.keys.push(GiftKey::of(oldest));
            }
        } else {
            self.keys.push(GiftKey::of(gift));
        }
    }

    fn finish(self, snapshot: &mut Snapshot) {
        snapshot.gifts = self.recent.into_values().collect();
        snapshot.gift_keys = self.keys;
    }
}

impl GiftKey {
    fn of(gift: GiftRecord) -> GiftKey {
        GiftKey {
            user_id: gift.user_id,
            gift_id: gift.gift_id,
            amount: gift.amount,
            ts_ms: gift.ts_ms,
        }
    }
}

/// The columns of a stored gift, in the order both backends' row readers expect.
const GIFT_COLUMNS: &str = "user_id, user_name, gift_id, stream, sticker, count, price, amount,
    store_share, streamer_share, platform_share, message, balance_after, ts_ms";

/// Embedded SQLite or PostgreSQL. Cheap to clone (both hold an `Arc`).
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Snapshot {
    /// Byte-order sorting of balances and revenue, the same for both backends (their SQL
    /// collations differ).
    fn sort(&mut self) {
        self.balances.sort();
        self.revenue.sort_by(|a, b| {
            (&a.stream, &a.sticker, &a.user_id).cmp(&(&b.stream, &b.sticker, &b.user_id))
        });
    }
}

impl Store {
    /// `None` → `<data_dir>/giftcast.db` (SQLite, WAL); `sqlite:<path>` → that file;
    /// `postgres://…` / `postgresql://…` → PostgreSQL (connects now, so a wrong URL fails fast).
    /// Creates the schema if missing. For an isolated PostgreSQL schema add
    /// `?options=-csearch_path%3D<schema>` to the URL (the schema must exist).
    pub async fn open(database_url: Option<&str>, data_dir: &Path) -> Result<Store> {
        Store::open_node(database_url, data_dir, NODE_ID_DEFAULT).await
    }

    /// As `open`, with the checkpoint row of `node_id` (cluster nodes sharing one database).
    pub async fn open_node(
        database_url: Option<&str>,
        data_dir: &Path,
        node_id: &str,
    ) -> Result<Store> {
        match database_url {
            None => {
                std::fs::create_dir_all(data_dir)?;
                let path = data_dir.join(SQLITE_FILE_NAME);
                Ok(Store::Sqlite(SqliteStore::open(&path, node_id).await?))
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let store = PgStore::new(url, node_id)?;
                store.ping().await?;
                Ok(Store::Postgres(store))
            }
            Some(url) => match url.strip_prefix("sqlite:") {
                Some(path) => {
                    let path = Path::new(path.trim_start_matches("//"));
                    Ok(Store::Sqlite(SqliteStore::open(path, node_id).await?))
                }
                None => Err(StoreError::Url(format!(
                    "`{url}`: expected postgres://… or sqlite:<path>"
                ))),
            },
        }
    }

    /// Everything, with the gifts since `idempotency_since_ms` whole.
    pub async fn load(&self, idempotency_since_ms: u64) -> Result<Snapshot> {
        self.load_window(Window {
            since_ms: idempotency_since_ms,
            resident_since_ms: idempotency_since_ms,
            resident_max: usize::MAX,
        })
        .await
    }

    /// Everything, with the gifts of the window whole or as keys (see `Window`).
    pub async fn load_window(&self, window: Window) -> Result<Snapshot> {
        let window = Window {
            resident_since_ms: window.resident_since_ms.max(window.since_ms),
            ..window
        };
        match self {
            Store::Sqlite(s) => s.load(window).await,
            Store::Postgres(s) => s.load(window).await,
        }
    }

    /// The stored gift `gift_id` of `user_id` made in one of `spans` (gift times, `ts_ms`,
    /// half-open), if any: for a retry of an evicted id, the spans are the days of the
    /// evicted-id filter that answered "maybe" for it, where its gift is sure to be if it was
    /// evicted, and a copy made outside them is past the retention or never was evicted. The
    /// newest copy if there are several (an id used again once past the retention is a new
    /// gift, stored as such). [`since`] gives every gift made from a time on.
    pub async fn find_gift(
        &self,
        user_id: &str,
        gift_id: &str,
        spans: impl AsRef<[Range<u64>]>,
    ) -> Result<Option<GiftRecord>> {
        let spans: Vec<(i64, i64)> = spans
            .as_ref()
            .iter()
            .filter(|s| s.start < s.end)
            .map(|s| (clamp_i64(s.start), clamp_i64(s.end)))
            .collect();
        if spans.is_empty() {
            return Ok(None);
        }
        match self {
            Store::Sqlite(s) => s.find_gift(user_id, gift_id, spans).await,
            Store::Postgres(s) => s.find_gift(user_id, gift_id, spans).await,
        }
    }

    /// Stores `records` (durable journal records, in LSN order) in ONE transaction: records at
    /// or below the stored checkpoint are skipped; credits and gifts are inserted once (by their
    /// keys); each touched wallet's balance becomes the `balance_after` of its last record;
    /// revenue and totals grow by the newly inserted gifts and credits; the checkpoint becomes
    /// the last LSN.
    pub async fn apply_batch(&self, records: &[(Lsn, Arc<Record>)]) -> Result<()> {
        debug_assert!(
            records.windows(2).all(|w| w[0].0 < w[1].0),
            "records in LSN order"
        );
        if records.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(s) => s.apply_batch(records).await,
            Store::Postgres(s) => s.apply_batch(records).await,
        }
    }

    /// Cheap liveness check for /readyz.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.ping().await,
            Store::Postgres(s) => s.ping().await,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }
}

/// The schema, shared by both backends (SQLite accepts the PostgreSQL types). Append-only:
/// migration N is applied once, when the stored version is below N.
/// The gift table's columns, without its key: the shared schema's `gifts` (keyed by the two id
/// strings) and SQLite's re-keyed one (`sqlite::key_gifts_by_hash`) are made from this one list.
/// A later migration that changes `gifts` must change the re-keying too.
macro_rules! gift_column_defs {
    () => {
        "    user_id TEXT NOT NULL,
    gift_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    stream TEXT NOT NULL,
    sticker TEXT NOT NULL,
    count BIGINT NOT NULL,
    price BIGINT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount >= 0),
    store_share BIGINT NOT NULL,
    streamer_share BIGINT NOT NULL,
    platform_share BIGINT NOT NULL,
    message TEXT,
    balance_after BIGINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    lsn BIGINT NOT NULL,
"
    };
}
pub(crate) use gift_column_defs;

/// The store's shape, step by step: a store records in `schema_version` every step it has
/// taken, and each backend's `migrate` takes the missing ones at open, in one transaction.
/// **Every change of the stored shape adds a step here**, also one made in code rather than by
/// these statements (an empty step): a store at a step this build does not know was written by
/// a newer giftcast, and is refused (`StoreError::Newer`), because writing it in an older shape
/// could lose what the newer one relies on (docs/durability.md, "Upgrades only").
const MIGRATIONS: &[&str] = &[
    concat!(
        r#"
CREATE TABLE IF NOT EXISTS checkpoints (
    node_id TEXT PRIMARY KEY,
    lsn BIGINT NOT NULL,
    credited_total BIGINT NOT NULL,
    gifted_total BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS wallets (
    user_id TEXT PRIMARY KEY,
    balance BIGINT NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS credits (
    reference TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    coins BIGINT NOT NULL CHECK (coins >= 0),
    balance_after BIGINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    lsn BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS gifts (
"#,
        gift_column_defs!(),
        r#"    PRIMARY KEY (user_id, gift_id)
);
CREATE INDEX IF NOT EXISTS gifts_ts_ms ON gifts (ts_ms);
CREATE TABLE IF NOT EXISTS revenue (
    stream TEXT NOT NULL,
    sticker TEXT NOT NULL,
    user_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    gifts BIGINT NOT NULL,
    stickers BIGINT NOT NULL,
    gross BIGINT NOT NULL,
    store_share BIGINT NOT NULL,
    streamer_share BIGINT NOT NULL,
    platform_share BIGINT NOT NULL,
    PRIMARY KEY (stream, sticker, user_id)
);
"#
    ),
    r#"
CREATE TABLE IF NOT EXISTS packet_records (
    node_id TEXT NOT NULL,
    lsn BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (node_id, lsn)
);
"#,
    // Step 3 (2026-12-07), made in code by each backend's `migrate`: SQLite's gifts keyed by
    // generation and hash with `gift_generations`; PostgreSQL's gifts keyed by record. The
    // first step an older giftcast can be refused for (giftcasts before it do not check).
    "",
    // Step 4 (2026-12-07), made in code by SQLite's `migrate`: `gift_generations.ts_min`, so
    // a lookup probes only the generations of the filter's days that answered "maybe".
    "",
];

/// Red packet records are kept whole (bincode, as in the journal): the ledger rebuilds the
/// packets in flight from them at start.
pub(crate) fn encode_packet(record: &Record) -> Vec<u8> {
    bincode::serde::encode_to_vec(record, bincode::config::standard()).expect("records encode")
}

pub(crate) fn decode_packet(bytes: &[u8]) -> Result<Record> {
    let (record, _): (Record, usize) = bincode::serde::decode_from_slice(
        bytes,
        bincode::config::standard().with_limit::<{ 1024 * 1024 }>(),
    )
    .map_err(|e| StoreError::Range(format!("undecodable packet record: {e}")))?;
    Ok(record)
}

/// A record's gift part: the gift itself, or a red packet's host cut.
pub(crate) fn gift_part(record: &Record) -> Option<std::borrow::Cow<'_, GiftRecord>> {
    match record {
        Record::Gift(g) => Some(std::borrow::Cow::Borrowed(g)),
        Record::PacketCreate(p) => p.host_gift().map(std::borrow::Cow::Owned),
        _ => None,
    }
}

pub(crate) fn is_packet(record: &Record) -> bool {
    matches!(
        record,
        Record::PacketCreate(_) | Record::PacketGrab(_) | Record::PacketRefund(_)
    )
}

/// The DDL of the version table itself (always run first).
const SCHEMA_VERSION_DDL: &str =
    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)";

/// The steps of `MIGRATIONS` a store at step `version` has still to take, as `(number, ddl)`,
/// `ddl` empty for a step made in code; a store at a step this build does not know is refused
/// (a newer giftcast wrote it). Both backends' `migrate` take them the same way.
fn steps_after(version: i64) -> Result<impl Iterator<Item = (i64, &'static str)>> {
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Newer {
            found: version,
            known,
        });
    }
    Ok((1..=known)
        .zip(MIGRATIONS.iter().copied())
        .filter(move |&(number, _)| number > version))
}

/// `[since_ms, ∞)` for [`Store::find_gift`]: every gift made at `since_ms` or later.
#[allow(clippy::single_range_in_vec_init)] // one span, as a list of spans
pub fn since(since_ms: u64) -> [Range<u64>; 1] {
    [since_ms..u64::MAX]
}

/// A gift time as stored (`BIGINT`): times past `i64::MAX` (none is made) as `i64::MAX`.
fn clamp_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Whether `ts_ms` is in one of `spans` (as given to the backends' `find_gift`).
pub(crate) fn in_spans(spans: &[(i64, i64)], ts_ms: u64) -> bool {
    let ts = clamp_i64(ts_ms);
    spans.iter().any(|&(start, end)| start <= ts && ts < end)
}

/// tokio-postgres' own Display says only "db error": add the server's message and SQLSTATE,
/// or the I/O cause, so /readyz and the logs say what is wrong.
fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::Range(format!("{what} = {value}")))
}

fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| StoreError::Range(format!("{what} = {value}")))
}

/// Per-batch aggregates computed in memory, so each row is written once per transaction.
#[derive(Default)]
struct Deltas<'a> {
    credited: u64,
    gifted: u64,
    /// Keyed by (stream, sticker, user_id), the table's key, borrowed from the batch's records
    /// (a hash map: no key copied or compared per gift); upserted in key order
    /// (`revenue_in_key_order`), so each index page is visited once per batch
    /// (docs/benchmarks.md, "The store alone").
    revenue: HashMap<(&'a str, &'a str, &'a str), RevenueRow>,
}

impl<'a> Deltas<'a> {
    /// The revenue rows in the table's key order.
    fn revenue_in_key_order(&self) -> Vec<&RevenueRow> {
        let mut rows: Vec<_> = self.revenue.iter().collect();
        rows.sort_unstable_by_key(|(key, _)| *key);
        rows.into_iter().map(|(_, row)| row).collect()
    }

    fn add_credit(&mut self, credit: &CreditRecord) -> Result<()> {
        self.credited = self
            .credited
            .checked_add(credit.coins)
            .ok_or_else(|| StoreError::Range("credited total overflows".into()))?;
        Ok(())
    }

    fn add_gift(&mut self, gift: &'a GiftRecord) -> Result<()> {
        let overflow = || StoreError::Range("revenue total overflows".into());
        self.gifted = self.gifted.checked_add(gift.amount).ok_or_else(overflow)?;
        let key = (&*gift.stream, &*gift.sticker, &*gift.user_id);
        let row = self.revenue.entry(key).or_insert_with(|| RevenueRow {
            stream: gift.stream.to_string(),
            sticker: gift.sticker.to_string(),
            user_id: gift.user_id.to_string(),
            ..RevenueRow::default()
        });
        if *row.user_name != *gift.user_name {
            row.user_name = gift.user_name.to_string();
        }
        row.gifts += 1;
        row.stickers = row
            .stickers
            .checked_add(gift.count.into())
            .ok_or_else(overflow)?;
        row.gross = row.gross.checked_add(gift.amount).ok_or_else(overflow)?;
        row.store = row
            .store
            .checked_add(gift.shares.store)
            .ok_or_else(overflow)?;
        row.streamer = row
            .streamer
            .checked_add(gift.shares.streamer)
            .ok_or_else(overflow)?;
        row.platform = row
            .platform
            .checked_add(gift.shares.platform)
            .ok_or_else(overflow)?;
        Ok(())
    }
}

/// Each touched wallet's balance after its last record in `records` (LSN order), in user order
/// (the table's key order, as the revenue upserts).
fn final_balances(records: &[(Lsn, Arc<Record>)]) -> Vec<(&str, u64)> {
    let mut balances: HashMap<&str, u64> = HashMap::new();
    for (_, record) in records {
        balances.insert(record.user_id(), record.balance_after());
    }
    let mut balances: Vec<_> = balances.into_iter().collect();
    balances.sort_unstable_by_key(|(user, _)| *user);
    balances
}

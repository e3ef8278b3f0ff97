//! PostgreSQL: one connection, (re)made on demand. Any error or timeout discards the connection
//! (the server then rolls back whatever was open), and the next call connects afresh, so the
//! store recovers by itself once the database is reachable again.

use super::{
    final_balances, to_i64, to_u64, Deltas, Result, RevenueRow, Snapshot, StoreError, GIFT_COLUMNS,
    SCHEMA_VERSION_DDL, STORE_OPERATION_TIMEOUT_MS,
};
use crate::money::Shares;
use crate::record::{CreditRecord, GiftRecord, Lsn, Record};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, NoTls, Statement};

/// TCP connect timeout, when the URL sets none: a dead host must fail fast so the flusher backs
/// off and retries rather than hanging.
const PG_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Rows per bulk statement. Each statement sends one array per column (UNNEST), so this bounds
/// one message to a few hundred KiB while keeping round trips few.
pub const PG_ROWS_PER_STATEMENT_MAX: usize = 2_000;

const INSERT_CREDITS: &str = "
INSERT INTO credits (reference, user_id, coins, balance_after, ts_ms, lsn)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
ON CONFLICT DO NOTHING
RETURNING reference";

const INSERT_GIFTS: &str = "
INSERT INTO gifts (user_id, gift_id, user_name, stream, sticker, count, price, amount,
    store_share, streamer_share, platform_share, message, balance_after, ts_ms, lsn)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
    $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::text[], $13::int8[],
    $14::int8[], $15::int8[])
ON CONFLICT DO NOTHING
RETURNING lsn";

const UPSERT_WALLETS: &str = "
INSERT INTO wallets (user_id, balance)
SELECT * FROM UNNEST($1::text[], $2::int8[])
ON CONFLICT (user_id) DO UPDATE SET balance = EXCLUDED.balance";

const UPSERT_REVENUE: &str = "
INSERT INTO revenue (stream, sticker, user_id, user_name, gifts, stickers, gross, store_share,
    streamer_share, platform_share)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[],
    $7::int8[], $8::int8[], $9::int8[], $10::int8[])
ON CONFLICT (stream, sticker, user_id) DO UPDATE SET
    user_name = EXCLUDED.user_name,
    gifts = revenue.gifts + EXCLUDED.gifts,
    stickers = revenue.stickers + EXCLUDED.stickers,
    gross = revenue.gross + EXCLUDED.gross,
    store_share = revenue.store_share + EXCLUDED.store_share,
    streamer_share = revenue.streamer_share + EXCLUDED.streamer_share,
    platform_share = revenue.platform_share + EXCLUDED.platform_share";

/// A live connection and its prepared statements.
struct PgConn {
    client: Client,
    insert_credits: Statement,
    insert_gifts: Statement,
    upsert_wallets: Statement,
    upsert_revenue: Statement,
}

#[derive(Clone)]
pub struct PgStore {
    inner: Arc<PgInner>,
}

struct PgInner {
    config: tokio_postgres::Config,
    node_id: String,
    /// The current connection, if any. The lock is held only to clone or swap the `Arc`.
    conn: Mutex<Option<Arc<PgConn>>>,
}

impl PgStore {
    /// Parses the URL; connects lazily (on the first call). `Store::open` pings at once.
    pub fn new(url: &str, node_id: &str) -> Result<PgStore> {
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(format!("{e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_millis(PG_CONNECT_TIMEOUT_MS));
        }
        config.keepalives(true);
        if config.get_application_name().is_none() {
            config.application_name("giftcast");
        }
        Ok(PgStore {
            inner: Arc::new(PgInner {
                config,
                node_id: node_id.to_string(),
                conn: Mutex::new(None),
            }),
        })
    }

    async fn connect(&self) -> Result<Arc<PgConn>> {
        if let Some(conn) = self.inner.conn.lock().clone() {
            if !conn.client.is_closed() {
                return Ok(conn);
            }
        }
        let (mut client, connection) = self.inner.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres connection ended");
            }
        });
        migrate(&mut client, &self.inner.node_id).await?;
        let conn = Arc::new(PgConn {
            insert_credits: client.prepare(INSERT_CREDITS).await?,
            insert_gifts: client.prepare(INSERT_GIFTS).await?,
            upsert_wallets: client.prepare(UPSERT_WALLETS).await?,
            upsert_revenue: client.prepare(UPSERT_REVENUE).await?,
            client,
        });
        *self.inner.conn.lock() = Some(conn.clone());
        tracing::info!("postgres connected");
        Ok(conn)
    }

    /// Runs `op` on a connection within the time bound; on any failure the connection is
    /// discarded so the next call reconnects.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(Arc<PgConn>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let timeout = Duration::from_millis(STORE_OPERATION_TIMEOUT_MS);
        let attempt = async {
            let conn = self.connect().await?;
            op(conn).await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(STORE_OPERATION_TIMEOUT_MS)),
        };
        if result.is_err() {
            // Dropping the last Arc closes the connection; the server rolls back.
            self.inner.conn.lock().take();
        }
        result
    }

    pub async fn ping(&self) -> Result<()> {
        self.run(|conn| async move {
            conn.client.simple_query("SELECT 1").await?;
            Ok(())
        })
        .await
    }

    pub async fn apply_batch(&self, records: &[(Lsn, Arc<Record>)]) -> Result<()> {
        let node = self.inner.node_id.clone();
        self.run(|conn| async move {
            conn.client.batch_execute("BEGIN").await?;
            apply(&conn, &node, records).await?;
            conn.client.batch_execute("COMMIT").await?;
            Ok(())
        })
        .await
    }

    /// The newest stored copy of the gift made in one of `spans` (`Store::find_gift`): the
    /// primary key `(user_id, gift_id, lsn)` finds the copies, the spans choose among them.
    pub async fn find_gift(
        &self,
        user_id: &str,
        gift_id: &str,
        spans: Vec<(i64, i64)>,
    ) -> Result<Option<GiftRecord>> {
        let (user_id, gift_id) = (user_id.to_string(), gift_id.to_string());
        let (starts, ends): (Vec<i64>, Vec<i64>) = spans.into_iter().unzip();
        self.run(|conn| async move {
            let sql = format!(
                "SELECT {GIFT_COLUMNS} FROM gifts
                 WHERE user_id = $1 AND gift_id = $2
                     AND EXISTS (SELECT 1 FROM unnest($3::int8[], $4::int8[]) AS s (a, b)
                                 WHERE gifts.ts_ms >= s.a AND gifts.ts_ms < s.b)
                 ORDER BY lsn DESC LIMIT 1"
            );
            match conn
                .client
                .query_opt(&sql, &[&user_id, &gift_id, &starts, &ends])
                .await?
            {
                Some(row) => Ok(Some(gift_row(&row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn load(&self, window: super::Window) -> Result<Snapshot> {
        let node = self.inner.node_id.clone();
        self.run(|conn| async move {
            conn.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            let snapshot = load(&conn.client, &node, window).await?;
            conn.client.batch_execute("COMMIT").await?;
            Ok(snapshot)
        })
        .await
    }
}

async fn migrate(client: &mut Client, node: &str) -> Result<()> {
    let tx = client.transaction().await?;
    // Serialise concurrent starts of several nodes on one database.
    tx.batch_execute("SELECT pg_advisory_xact_lock(7361626);")
        .await?;
    tx.batch_execute(SCHEMA_VERSION_DDL).await?;
    let version: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::int8 FROM schema_version",
            &[],
        )
        .await?
        .get(0);
    for (number, ddl) in super::steps_after(version)? {
        if !ddl.is_empty() {
            tx.batch_execute(ddl).await?;
        }
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&number],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO checkpoints (node_id, lsn, credited_total, gifted_total) VALUES ($1, 0, 0, 0)
         ON CONFLICT (node_id) DO NOTHING",
        &[&node],
    )
    .await?;
    key_gifts_by_record(&tx).await?;
    tx.commit().await?;
    Ok(())
}

/// The shared schema keys `gifts` by `(user_id, gift_id)`: one gift per id for ever. But the
/// ledger accepts an id again once it is past the retention, and debits it, so the store must
/// hold that gift too or its totals stop balancing. The key becomes `(user_id, gift_id, lsn)`,
/// once (the primary key's index is rebuilt, in the migration's transaction): a gift is its
/// journal record, and a replayed record is still inserted once.
async fn key_gifts_by_record(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    let key_columns: i64 = tx
        .query_one(
            "SELECT COUNT(*)::int8 FROM information_schema.key_column_usage
             WHERE table_schema = current_schema() AND table_name = 'gifts'
                 AND constraint_name = 'gifts_pkey'",
            &[],
        )
        .await?
        .get(0);
    if key_columns == 2 {
        tracing::info!("postgres: keying the gift table by (user_id, gift_id, lsn) (once)");
        tx.batch_execute(
            "ALTER TABLE gifts DROP CONSTRAINT gifts_pkey;
             ALTER TABLE gifts ADD CONSTRAINT gifts_pkey PRIMARY KEY (user_id, gift_id, lsn);",
        )
        .await?;
        tracing::info!("postgres: the gift table is keyed by (user_id, gift_id, lsn)");
    }
    Ok(())
}

async fn apply(conn: &PgConn, node: &str, records: &[(Lsn, Arc<Record>)]) -> Result<()> {
    let client = &conn.client;
    let checkpoint: i64 = client
        .query_one(
            "SELECT lsn FROM checkpoints WHERE node_id = $1 FOR UPDATE",
            &[&node],
        )
        .await?
        .get(0);
    let checkpoint = to_u64(checkpoint, "checkpoint")?;
    let start = records.partition_point(|(lsn, _)| *lsn <= checkpoint);
    let records = &records[start..];
    let Some((last_lsn, _)) = records.last() else {
        return Ok(()); // a replay of what is stored already
    };
    let mut deltas = Deltas::default();

    let credits: Vec<(Lsn, &CreditRecord)> = records
        .iter()
        .filter_map(|(lsn, r)| match &**r {
            Record::Credit(c) => Some((*lsn, c)),
            _ => None,
        })
        .collect();
    for chunk in credits.chunks(PG_ROWS_PER_STATEMENT_MAX) {
        let mut columns = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (lsn, c) in chunk {
            columns.0.push(c.reference.as_str());
            columns.1.push(c.user_id.as_str());
            columns.2.push(to_i64(c.coins, "coins")?);
            columns.3.push(to_i64(c.balance_after, "balance_after")?);
            columns.4.push(to_i64(c.ts_ms, "ts_ms")?);
            columns.5.push(to_i64(*lsn, "lsn")?);
        }
        let mut inserted: HashSet<String> = client
            .query(
                &conn.insert_credits,
                &[
                    &columns.0, &columns.1, &columns.2, &columns.3, &columns.4, &columns.5,
                ],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for (_, c) in chunk {
            // remove: a key twice in one batch (a ledger bug) is inserted and counted once.
            if inserted.remove(&c.reference) {
                deltas.add_credit(c)?;
            }
        }
    }

    let gift_parts: Vec<(Lsn, std::borrow::Cow<'_, GiftRecord>)> = records
        .iter()
        .filter_map(|(lsn, r)| super::gift_part(r).map(|g| (*lsn, g)))
        .collect();
    let gifts: Vec<(Lsn, &GiftRecord)> = gift_parts.iter().map(|(lsn, g)| (*lsn, &**g)).collect();
    let packets: Vec<(i64, Vec<u8>)> = records
        .iter()
        .filter(|(_, r)| super::is_packet(r))
        .map(|(lsn, r)| Ok((to_i64(*lsn, "lsn")?, super::encode_packet(r))))
        .collect::<Result<_>>()?;
    for chunk in packets.chunks(PG_ROWS_PER_STATEMENT_MAX) {
        let lsns: Vec<i64> = chunk.iter().map(|(l, _)| *l).collect();
        let bodies: Vec<&[u8]> = chunk.iter().map(|(_, b)| b.as_slice()).collect();
        client
            .execute(
                "INSERT INTO packet_records (node_id, lsn, body)
                 SELECT $1, l, b FROM UNNEST($2::bigint[], $3::bytea[]) AS t(l, b)
                 ON CONFLICT DO NOTHING",
                &[&node, &lsns, &bodies],
            )
            .await?;
    }
    for chunk in gifts.chunks(PG_ROWS_PER_STATEMENT_MAX) {
        let mut text: [Vec<&str>; 5] = Default::default();
        let mut message: Vec<Option<&str>> = Vec::with_capacity(chunk.len());
        let mut numbers: [Vec<i64>; 9] = Default::default();
        for (lsn, g) in chunk {
            text[0].push(&g.user_id);
            text[1].push(&g.gift_id);
            text[2].push(&g.user_name);
            text[3].push(&g.stream);
            text[4].push(&g.sticker);
            message.push(g.message.as_deref());
            numbers[0].push(i64::from(g.count));
            numbers[1].push(to_i64(g.price, "price")?);
            numbers[2].push(to_i64(g.amount, "amount")?);
            numbers[3].push(to_i64(g.shares.store, "store share")?);
            numbers[4].push(to_i64(g.shares.streamer, "streamer share")?);
            numbers[5].push(to_i64(g.shares.platform, "platform share")?);
            numbers[6].push(to_i64(g.balance_after, "balance_after")?);
            numbers[7].push(to_i64(g.ts_ms, "ts_ms")?);
            numbers[8].push(to_i64(*lsn, "lsn")?);
        }
        let rows = client
            .query(
                &conn.insert_gifts,
                &[
                    &text[0],
                    &text[1],
                    &text[2],
                    &text[3],
                    &text[4],
                    &numbers[0],
                    &numbers[1],
                    &numbers[2],
                    &numbers[3],
                    &numbers[4],
                    &numbers[5],
                    &message,
                    &numbers[6],
                    &numbers[7],
                    &numbers[8],
                ],
            )
            .await?;
        // A gift is its record: the LSN says which were inserted (not a replay of one stored).
        let inserted: HashSet<i64> = rows.iter().map(|row| row.get(0)).collect();
        for (lsn, g) in chunk {
            if inserted.contains(&to_i64(*lsn, "lsn")?) {
                deltas.add_gift(g)?;
            }
        }
    }

    let balances = final_balances(records);
    for chunk in balances.chunks(PG_ROWS_PER_STATEMENT_MAX) {
        let users: Vec<&str> = chunk.iter().map(|(u, _)| *u).collect();
        let amounts = chunk
            .iter()
            .map(|(_, b)| to_i64(*b, "balance"))
            .collect::<Result<Vec<i64>>>()?;
        client
            .execute(&conn.upsert_wallets, &[&users, &amounts])
            .await?;
    }

    let revenue: Vec<&RevenueRow> = deltas.revenue_in_key_order();
    for chunk in revenue.chunks(PG_ROWS_PER_STATEMENT_MAX) {
        let mut text: [Vec<&str>; 4] = Default::default();
        let mut numbers: [Vec<i64>; 6] = Default::default();
        for row in chunk {
            text[0].push(&row.stream);
            text[1].push(&row.sticker);
            text[2].push(&row.user_id);
            text[3].push(&row.user_name);
            numbers[0].push(to_i64(row.gifts, "gifts")?);
            numbers[1].push(to_i64(row.stickers, "stickers")?);
            numbers[2].push(to_i64(row.gross, "gross")?);
            numbers[3].push(to_i64(row.store, "store share")?);
            numbers[4].push(to_i64(row.streamer, "streamer share")?);
            numbers[5].push(to_i64(row.platform, "platform share")?);
        }
        client
            .execute(
                &conn.upsert_revenue,
                &[
                    &text[0],
                    &text[1],
                    &text[2],
                    &text[3],
                    &numbers[0],
                    &numbers[1],
                    &numbers[2],
                    &numbers[3],
                    &numbers[4],
                    &numbers[5],
                ],
            )
            .await?;
    }

    client
        .execute(
            "UPDATE checkpoints SET lsn = $1, credited_total = credited_total + $2,
                 gifted_total = gifted_total + $3 WHERE node_id = $4",
            &[
                &to_i64(*last_lsn, "lsn")?,
                &to_i64(deltas.credited, "credited")?,
                &to_i64(deltas.gifted, "gifted")?,
                &node,
            ],
        )
        .await?;
    Ok(())
}

async fn load(client: &Client, node: &str, window: super::Window) -> Result<Snapshot> {
    let checkpoint: Option<i64> = client
        .query_opt("SELECT lsn FROM checkpoints WHERE node_id = $1", &[&node])
        .await?
        .map(|row| row.get(0));
    let totals = client
        .query_one(
            "SELECT COALESCE(SUM(credited_total), 0)::int8, COALESCE(SUM(gifted_total), 0)::int8
             FROM checkpoints",
            &[],
        )
        .await?;
    let mut snapshot = Snapshot {
        checkpoint_lsn: to_u64(checkpoint.unwrap_or(0), "checkpoint")?,
        credited_total: to_u64(totals.get(0), "credited total")?,
        gifted_total: to_u64(totals.get(1), "gifted total")?,
        ..Snapshot::default()
    };
    for row in client
        .query("SELECT user_id, balance FROM wallets", &[])
        .await?
    {
        snapshot
            .balances
            .push((row.get(0), to_u64(row.get(1), "balance")?));
    }
    for row in client
        .query(
            "SELECT user_id, coins, reference, balance_after, ts_ms FROM credits ORDER BY lsn",
            &[],
        )
        .await?
    {
        snapshot.credits.push(CreditRecord {
            user_id: row.get(0),
            coins: to_u64(row.get(1), "coins")?,
            reference: row.get(2),
            balance_after: to_u64(row.get(3), "balance_after")?,
            ts_ms: to_u64(row.get(4), "ts_ms")?,
        });
    }
    let sql = format!("SELECT {GIFT_COLUMNS}, lsn FROM gifts WHERE ts_ms >= $1");
    let mut gifts = super::GiftSorter::new(window);
    for row in client
        .query(&sql, &[&to_i64(window.since_ms, "since")?])
        .await?
    {
        gifts.push(to_u64(row.get(14), "lsn")?, gift_row(&row)?);
    }
    gifts.finish(&mut snapshot);
    for row in client
        .query(
            "SELECT stream, sticker, user_id, user_name, gifts, stickers, gross, store_share,
                 streamer_share, platform_share FROM revenue",
            &[],
        )
        .await?
    {
        snapshot.revenue.push(RevenueRow {
            stream: row.get(0),
            sticker: row.get(1),
            user_id: row.get(2),
            user_name: row.get(3),
            gifts: to_u64(row.get(4), "gifts")?,
            stickers: to_u64(row.get(5), "stickers")?,
            gross: to_u64(row.get(6), "gross")?,
            store: to_u64(row.get(7), "store share")?,
            streamer: to_u64(row.get(8), "streamer share")?,
            platform: to_u64(row.get(9), "platform share")?,
        });
    }
    for row in client
        .query(
            "SELECT body FROM packet_records WHERE node_id = $1 ORDER BY lsn",
            &[&node],
        )
        .await?
    {
        let body: Vec<u8> = row.get(0);
        snapshot.packets.push(super::decode_packet(&body)?);
    }
    snapshot.sort();
    Ok(snapshot)
}

/// A row of `GIFT_COLUMNS`.
fn gift_row(row: &tokio_postgres::Row) -> Result<GiftRecord> {
    Ok(GiftRecord {
        user_id: row.get::<_, &str>(0).into(),
        user_name: row.get::<_, &str>(1).into(),
        gift_id: row.get::<_, &str>(2).into(),
        stream: row.get::<_, &str>(3).into(),
        sticker: row.get::<_, &str>(4).into(),
        count: u32::try_from(row.get::<_, i64>(5))
            .map_err(|_| StoreError::Range("gift count".into()))?,
        price: to_u64(row.get(6), "price")?,
        amount: to_u64(row.get(7), "amount")?,
        shares: Shares {
            store: to_u64(row.get(8), "store share")?,
            streamer: to_u64(row.get(9), "streamer share")?,
            platform: to_u64(row.get(10), "platform share")?,
        },
        message: row.get(11),
        balance_after: to_u64(row.get(12), "balance_after")?,
        ts_ms: to_u64(row.get(13), "ts_ms")?,
    })
}

//! One suite, two backends: every test runs against SQLite in a tempdir and against the real
//! PostgreSQL on 127.0.0.1:5432 (database `test`, user `postgres`), each in its own schema.
//! A PostgreSQL test FAILS when the server is unreachable: it is never skipped.

// Lists of time spans that hold one span are what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use super::*;
use crate::money::{Coins, Split};
use crate::record::{CreditRecord, GiftRecord};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

pub(crate) const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

#[derive(Clone, Copy, Debug)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
    /// SQLite whose gift-key hash takes only 3 values: nearly every gift shares its hash with
    /// others, so every test also runs through the salted-collision path.
    SqliteCollidingKeys,
}

/// The key hash of `Backend::SqliteCollidingKeys`.
fn colliding_key_hash(user_id: &str, gift_id: &str) -> i64 {
    ((user_id.len() + gift_id.len()) % 3) as i64
}

/// A store in a fresh tempdir or a fresh PostgreSQL schema (dropped on drop).
pub(crate) struct TestDb {
    pub store: Store,
    pub dir: tempfile::TempDir,
    pub schema: Option<String>,
    backend: Backend,
    url: Option<String>,
}

static SCHEMA_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) async fn pg_admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must be reachable at 127.0.0.1:5432 for this test (it is not skipped)");
    tokio::spawn(connection);
    client
}

/// A fresh schema; returns (schema, url for the store through `host:port`).
pub(crate) async fn pg_schema(host_port: &str) -> (String, String) {
    let n = SCHEMA_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let schema = format!("gc_test_{}_{}", std::process::id(), n);
    pg_admin()
        .await
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let url = format!(
        "postgres://postgres@{host_port}/test?options=-csearch_path%3D{schema}&application_name={schema}"
    );
    (schema, url)
}

impl TestDb {
    pub(crate) async fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => {
                let store = Store::open(None, dir.path()).await.unwrap();
                assert_eq!(store.backend(), "sqlite");
                TestDb {
                    store,
                    dir,
                    schema: None,
                    backend,
                    url: None,
                }
            }
            Backend::SqliteCollidingKeys => {
                let path = dir.path().join(SQLITE_FILE_NAME);
                TestDb {
                    store: open_keyed(&path, keyed_by(colliding_key_hash)).await,
                    dir,
                    schema: None,
                    backend,
                    url: None,
                }
            }
            Backend::Postgres => {
                let (schema, url) = pg_schema("127.0.0.1:5432").await;
                let store = Store::open(Some(&url), dir.path()).await.unwrap();
                assert_eq!(store.backend(), "postgres");
                TestDb {
                    store,
                    dir,
                    schema: Some(schema),
                    backend,
                    url: Some(url),
                }
            }
        }
    }
}

impl TestDb {
    /// The same database opened again, as a restart would.
    async fn try_reopen(&self) -> Result<Store> {
        match self.backend {
            Backend::Sqlite | Backend::Postgres => {
                Store::open(self.url.as_deref(), self.dir.path()).await
            }
            Backend::SqliteCollidingKeys => Ok(Store::Sqlite(
                sqlite::SqliteStore::open_with_keys(
                    &self.dir.path().join(SQLITE_FILE_NAME),
                    NODE_ID_DEFAULT,
                    keyed_by(colliding_key_hash),
                )
                .await?,
            )),
        }
    }

    /// Runs `sql` on the store's database behind the store's back (its schema on PostgreSQL).
    async fn behind(&self, sql: &str) {
        match &self.schema {
            Some(schema) => pg_admin()
                .await
                .batch_execute(&format!("SET search_path TO {schema}; {sql}"))
                .await
                .unwrap(),
            None => rusqlite::Connection::open(self.dir.path().join(SQLITE_FILE_NAME))
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
        }
    }

    /// Sets the store's checkpoint back to `lsn`, behind the store's back.
    async fn rewind_checkpoint(&self, lsn: i64) {
        match &self.schema {
            Some(schema) => {
                pg_admin()
                    .await
                    .execute(
                        &format!("UPDATE {schema}.checkpoints SET lsn = $1"),
                        &[&lsn],
                    )
                    .await
                    .unwrap();
            }
            None => {
                rusqlite::Connection::open(self.dir.path().join(SQLITE_FILE_NAME))
                    .unwrap()
                    .execute("UPDATE checkpoints SET lsn = ?1", [lsn])
                    .unwrap();
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            drop_schema(schema);
        }
    }
}

pub(crate) fn drop_schema(schema: String) {
    // Drop may run inside a runtime: use a thread of its own.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok((client, connection)) =
                tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                    .await;
            }
        });
    })
    .join()
    .unwrap();
}

const STREAMS: [&str; 3] = ["demo", "s-alpha", "s-beta"];
const STICKERS: [(&str, u64); 3] = [("rose", 1), ("rocket", 500), ("castle", 9999)];

/// A plausible ledger history: users get credits, then gift; balances follow the records.
pub(crate) fn history(users: u64, gifts_per_user: u64) -> Vec<(Lsn, Arc<Record>)> {
    let split = Split::default();
    let mut records = Vec::new();
    let mut lsn = 0;
    let mut balances: BTreeMap<u64, u64> = BTreeMap::new();
    for u in 0..users {
        lsn += 1;
        let coins = 1_000_000 + u;
        balances.insert(u, coins);
        records.push((
            lsn,
            Arc::new(Record::Credit(CreditRecord {
                user_id: format!("user-{u}"),
                coins,
                reference: format!("welcome-{u}"),
                balance_after: coins,
                ts_ms: 1_000 + lsn,
            })),
        ));
    }
    for g in 0..gifts_per_user {
        for u in 0..users {
            lsn += 1;
            let (sticker, price) = STICKERS[((g + u) % 3) as usize];
            let count = 1 + ((g * 7 + u) % 5) as u32;
            let amount = price * u64::from(count);
            let balance = balances.get_mut(&u).unwrap();
            *balance -= amount;
            records.push((
                lsn,
                Arc::new(Record::Gift(GiftRecord {
                    user_id: format!("user-{u}").into(),
                    user_name: format!("Name {u}.{g}").into(),
                    gift_id: format!("gift-{g}").into(),
                    stream: STREAMS[((g * 3 + u) % 3) as usize].into(),
                    sticker: sticker.into(),
                    count,
                    price,
                    amount,
                    shares: split.shares(Coins(amount)).unwrap(),
                    message: (g % 3 == 0).then(|| format!("hello from {u}, gift {g}")),
                    balance_after: *balance,
                    ts_ms: 1_000 + lsn,
                })),
            ));
        }
    }
    records
}

/// What the store must hold after applying `records` (in order, each lsn once): the model. A
/// credit reference counts once (the ledger never accepts one twice); every gift record is a
/// gift (the ledger accepts a gift id again once it is past the retention: a new gift).
pub(crate) fn model(records: &[(Lsn, Arc<Record>)], since_ms: u64) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut balances = BTreeMap::new();
    let mut seen_credits = HashSet::new();
    let mut revenue: BTreeMap<(String, String, String), RevenueRow> = BTreeMap::new();
    for (lsn, record) in records {
        snapshot.checkpoint_lsn = *lsn;
        balances.insert(record.user_id().to_string(), record.balance_after());
        match &**record {
            Record::Credit(c) => {
                if seen_credits.insert(c.reference.clone()) {
                    snapshot.credited_total += c.coins;
                    snapshot.credits.push(c.clone());
                }
            }
            other => {
                if let Some(g) = super::gift_part(other) {
                    let g: &GiftRecord = &g;
                    snapshot.gifted_total += g.amount;
                    if g.ts_ms >= since_ms {
                        snapshot.gifts.push(g.clone());
                    }
                    let row = revenue
                        .entry((
                            g.stream.to_string(),
                            g.sticker.to_string(),
                            g.user_id.to_string(),
                        ))
                        .or_default();
                    row.stream = g.stream.to_string();
                    row.sticker = g.sticker.to_string();
                    row.user_id = g.user_id.to_string();
                    row.user_name = g.user_name.to_string();
                    row.gifts += 1;
                    row.stickers += u64::from(g.count);
                    row.gross += g.amount;
                    row.store += g.shares.store;
                    row.streamer += g.shares.streamer;
                    row.platform += g.shares.platform;
                }
                if super::is_packet(other) {
                    snapshot.packets.push(other.clone());
                }
            }
        }
    }
    snapshot.balances = balances.into_iter().collect();
    snapshot.revenue = revenue.into_values().collect();
    snapshot.sort();
    snapshot
}

async fn apply_and_load_round_trip(backend: Backend) {
    let db = TestDb::new(backend).await;
    let empty = db.store.load(0).await.unwrap();
    assert_eq!(empty, Snapshot::default());
    db.store.ping().await.unwrap();
    let records = history(20, 10);
    for batch in records.chunks(37) {
        db.store.apply_batch(batch).await.unwrap();
    }
    let snapshot = db.store.load(0).await.unwrap();
    assert_eq!(snapshot, model(&records, 0));
    assert_eq!(snapshot.checkpoint_lsn, 220);
    assert_eq!(snapshot.credits.len(), 20);
    assert_eq!(snapshot.gifts.len(), 200);
    // Conservation, as the audit will check it.
    let balances: u64 = snapshot.balances.iter().map(|(_, b)| b).sum();
    assert_eq!(snapshot.credited_total, balances + snapshot.gifted_total);
    // The idempotency window only limits which gifts are returned, nothing else.
    let since = 1_000 + 150;
    let recent = db.store.load(since).await.unwrap();
    assert_eq!(recent, model(&records, since));
    assert!(recent.gifts.iter().all(|g| g.ts_ms >= since));
    assert_eq!(recent.gifts.len(), 71);
}

async fn replaying_batches_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let records = history(10, 10);
    db.store.apply_batch(&records[..60]).await.unwrap();
    let once = db.store.load(0).await.unwrap();
    db.store.apply_batch(&records[..60]).await.unwrap();
    assert_eq!(
        db.store.load(0).await.unwrap(),
        once,
        "the same batch twice"
    );
    // An overlapping batch (a flusher retry after an ambiguous commit) stores only the new part.
    db.store.apply_batch(&records[30..]).await.unwrap();
    db.store.apply_batch(&records[..]).await.unwrap();
    assert_eq!(db.store.load(0).await.unwrap(), model(&records, 0));
}

async fn records_at_or_below_the_checkpoint_are_skipped(backend: Backend) {
    let db = TestDb::new(backend).await;
    let records = history(5, 4);
    db.store.apply_batch(&records).await.unwrap();
    let stored = db.store.load(0).await.unwrap();
    // Different contents under old LSNs: must not touch anything (not even balances).
    let forged: Vec<(Lsn, Arc<Record>)> = records
        .iter()
        .map(|(lsn, r)| {
            let mut r = (**r).clone();
            match &mut r {
                Record::Credit(c) => {
                    c.reference.push_str("-forged");
                    c.balance_after += 1;
                }
                Record::Gift(g) => {
                    g.gift_id = format!("{}-forged", g.gift_id).into();
                    g.balance_after += 1;
                }
                _ => {}
            }
            (*lsn, Arc::new(r))
        })
        .collect();
    db.store.apply_batch(&forged).await.unwrap();
    db.store.apply_batch(&forged[10..12]).await.unwrap();
    assert_eq!(db.store.load(0).await.unwrap(), stored);
}

async fn revenue_aggregation_is_exact(backend: Backend) {
    let db = TestDb::new(backend).await;
    let records = history(13, 17);
    for batch in records.chunks(50) {
        db.store.apply_batch(batch).await.unwrap();
    }
    let snapshot = db.store.load(0).await.unwrap();
    let expected = model(&records, 0);
    assert_eq!(snapshot.revenue, expected.revenue);
    let gross: u64 = snapshot.revenue.iter().map(|r| r.gross).sum();
    assert_eq!(gross, snapshot.gifted_total);
    for row in &snapshot.revenue {
        assert_eq!(
            row.store + row.streamer + row.platform,
            row.gross * crate::money::SHARE_UNIT
        );
    }
    // The maintained rows equal a GROUP BY over every stored gift.
    let all_gifts = db.store.load(0).await.unwrap().gifts;
    type Key = (String, String, String);
    let mut grouped: BTreeMap<Key, (u64, u64, u64, u64)> = BTreeMap::new();
    for g in &all_gifts {
        let e = grouped
            .entry((
                g.stream.to_string(),
                g.sticker.to_string(),
                g.user_id.to_string(),
            ))
            .or_default();
        e.0 += 1;
        e.1 += u64::from(g.count);
        e.2 += g.amount;
        e.3 += g.shares.streamer;
    }
    assert_eq!(grouped.len(), snapshot.revenue.len());
    for row in &snapshot.revenue {
        let e = grouped[&(row.stream.clone(), row.sticker.clone(), row.user_id.clone())];
        assert_eq!((row.gifts, row.stickers, row.gross, row.streamer), e);
    }
}

/// A gift id under a new LSN is a new gift: the ledger accepts an id again once it is past the
/// retention, and debits it, so the store keeps both and counts both, and its totals balance
/// (credited = balances + gifted). Until 2026-12-07 it kept the first and dropped the second
/// one's value while its debit stayed in the balance: the next start refused the ledger. A
/// credit reference under a new LSN is stored once (the ledger keeps every reference).
async fn a_gift_id_under_a_new_lsn_is_a_new_gift(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut records = history(3, 2);
    let Record::Gift(first) = (*records[4].1).clone() else {
        panic!("history's fifth record is a gift")
    };
    let last_balance = |records: &[(Lsn, Arc<Record>)], user: &str| {
        records
            .iter()
            .rev()
            .find(|(_, r)| r.user_id() == user)
            .unwrap()
            .1
            .balance_after()
    };
    let mut again = first.clone();
    again.balance_after = last_balance(&records, &first.user_id) - again.amount;
    again.ts_ms += 7 * 24 * 3_600_000;
    again.message = Some("the same id, a week later".into());
    let Record::Credit(mut credit) = (*records[0].1).clone() else {
        panic!("history begins with credits")
    };
    credit.balance_after = last_balance(&records, &credit.user_id);
    let next = records.len() as u64 + 1;
    records.push((next, Arc::new(Record::Gift(again.clone()))));
    records.push((next + 1, Arc::new(Record::Credit(credit))));
    db.store.apply_batch(&records).await.unwrap();
    let snapshot = db.store.load(0).await.unwrap();
    assert_eq!(snapshot, model(&records, 0));
    assert_eq!(snapshot.gifts.len(), 7);
    assert_eq!(snapshot.credits.len(), 3);
    let balances: u64 = snapshot.balances.iter().map(|(_, b)| b).sum();
    assert_eq!(
        snapshot.credited_total,
        balances + snapshot.gifted_total,
        "the store balances"
    );
    // Found: the newest copy of the window.
    let find = |from| {
        db.store
            .find_gift(&first.user_id, &first.gift_id, since(from))
    };
    assert_eq!(find(0).await.unwrap().as_ref(), Some(&again));
    assert_eq!(find(again.ts_ms).await.unwrap().as_ref(), Some(&again));
    assert_eq!(find(again.ts_ms + 1).await.unwrap(), None);
    // In spans: the newest copy made in one of them; none made in none.
    let (t1, t2) = (first.ts_ms, again.ts_ms);
    let in_spans = |spans: Vec<std::ops::Range<u64>>| {
        db.store.find_gift(&first.user_id, &first.gift_id, spans)
    };
    assert_eq!(
        in_spans(vec![t1..t1 + 1]).await.unwrap().as_ref(),
        Some(&first)
    );
    assert_eq!(
        in_spans(vec![t1..t2]).await.unwrap().as_ref(),
        Some(&first),
        "ends before"
    );
    assert_eq!(
        in_spans(vec![t2..t2 + 1, t1..t1 + 1])
            .await
            .unwrap()
            .as_ref(),
        Some(&again)
    );
    assert_eq!(
        in_spans(vec![t1 - 10..t1, t1 + 1..t2, t2 + 1..t2 + 10])
            .await
            .unwrap(),
        None
    );
    assert_eq!(in_spans(vec![]).await.unwrap(), None);
    assert_eq!(
        db.store
            .find_gift(&first.user_id, "gift-1", since(again.ts_ms))
            .await
            .unwrap(),
        None,
        "a gift made before the window is not found"
    );
}

/// The store's own idempotence, behind the checkpoint: records applied again after the
/// checkpoint was moved back (which the server never does) are each inserted once, by their
/// LSN, and counted once.
async fn a_record_applied_again_behind_the_checkpoint_is_stored_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let records = history(4, 3);
    db.store.apply_batch(&records).await.unwrap();
    let stored = db.store.load(0).await.unwrap();
    db.rewind_checkpoint(0).await;
    db.store.apply_batch(&records[2..]).await.unwrap();
    let again = db.store.load(0).await.unwrap();
    assert_eq!(again, stored);
    assert_eq!(again, model(&records, 0));
}

/// SQLite stores a batch's gifts in gift-id order, not LSN order; what is stored must not show it:
/// a gift id twice in one batch is two gifts, each as its record says, and a revenue row keeps
/// the name of the sender's latest gift by LSN. Here the ids fall as the LSNs rise.
async fn a_batch_keeps_lsn_order_semantics_whatever_its_key_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let split = Split::default();
    let mut records = vec![(
        1,
        Arc::new(Record::Credit(CreditRecord {
            user_id: "u".into(),
            coins: 1_000,
            reference: "welcome".into(),
            balance_after: 1_000,
            ts_ms: 1,
        })),
    )];
    let mut balance = 1_000;
    for (i, id) in ["z", "m", "a"].into_iter().enumerate() {
        balance -= 10;
        records.push((
            i as u64 + 2,
            Arc::new(Record::Gift(GiftRecord {
                user_id: "u".into(),
                user_name: format!("name {i}").into(),
                gift_id: id.into(),
                stream: "demo".into(),
                sticker: "rose".into(),
                count: 10,
                price: 1,
                amount: 10,
                shares: split.shares(Coins(10)).unwrap(),
                message: None,
                balance_after: balance,
                ts_ms: 10 + i as u64,
            })),
        ));
    }
    // "m" again under a later LSN with other contents: a second gift, stored and counted.
    let mut again = match &*records[2].1 {
        Record::Gift(g) => g.clone(),
        _ => unreachable!(),
    };
    again.user_name = "name 3".into();
    again.message = Some("the second one".into());
    again.balance_after = 960;
    records.push((5, Arc::new(Record::Gift(again.clone()))));
    // A plain gift whose id is the one a red packet's host cut gets ("rp:<packet>"), then that
    // packet: two gifts under one id again, both stored.
    let mut plain = match &*records[3].1 {
        Record::Gift(g) => g.clone(),
        _ => unreachable!(),
    };
    plain.gift_id = "rp:p".into();
    plain.balance_after = 950;
    records.push((6, Arc::new(Record::Gift(plain))));
    records.push((
        7,
        Arc::new(Record::PacketCreate(crate::record::PacketCreateRecord {
            user_id: "u".into(),
            user_name: "name 4".into(),
            packet_id: "p".into(),
            stream: "demo".into(),
            coins: 10,
            host_cut: 1,
            host_shares: split.shares(Coins(1)).unwrap(),
            amounts: vec![9],
            random: false,
            seed: 1,
            message: None,
            balance_after: 940,
            ts_ms: 20,
            expires_ms: 99,
        })),
    ));
    db.store.apply_batch(&records).await.unwrap();
    let snapshot = db.store.load(0).await.unwrap();
    assert_eq!(snapshot, model(&records, 0));
    let copies = |id: &str| {
        let mut found: Vec<(String, Option<String>, u64, String)> = snapshot
            .gifts
            .iter()
            .filter(|g| &*g.gift_id == id)
            .map(|g| {
                let name = g.user_name.to_string();
                (name, g.message.clone(), g.amount, g.sticker.to_string())
            })
            .collect();
        found.sort();
        found
    };
    let rose = |name: &str, message: Option<&str>| {
        (
            name.to_string(),
            message.map(String::from),
            10,
            "rose".to_string(),
        )
    };
    assert_eq!(
        copies("m"),
        [rose("name 1", None), rose("name 3", Some("the second one"))]
    );
    assert_eq!(
        copies("rp:p"),
        [
            rose("name 2", None),
            ("name 4".to_string(), None, 1, "red_packet".to_string())
        ]
    );
    assert_eq!(snapshot.gifted_total, 51);
    let rows: Vec<_> = snapshot
        .revenue
        .iter()
        .map(|r| (&*r.sticker, &*r.user_name, r.gifts, r.gross))
        .collect();
    // The latest rose gift by LSN is the plain "rp:p" (LSN 6, a copy of "a", LSN 4, so named
    // "name 2"): "a" is the first in key order, so added up in key order the row would say
    // "name 0" ("z").
    assert_eq!(
        rows,
        [("red_packet", "name 4", 1, 1), ("rose", "name 2", 5, 50)]
    );
}

/// Red packet records are stored whole and come back in order; the host cut is a gift.
async fn packet_records_round_trip(backend: Backend) {
    use crate::record::{PacketCreateRecord, PacketGrabRecord, PacketRefundRecord};
    let db = TestDb::new(backend).await;
    let mut records = history(2, 2);
    let mut lsn = records.last().unwrap().0;
    let split = Split::default();
    let create = PacketCreateRecord {
        user_id: "u0".into(),
        user_name: "U0".into(),
        packet_id: "p".into(),
        stream: "s0".into(),
        coins: 10,
        host_cut: 1,
        host_shares: split.shares(crate::money::Coins(1)).unwrap(),
        amounts: vec![5, 4],
        random: true,
        seed: 7,
        message: Some("hi".into()),
        balance_after: 0,
        ts_ms: 5,
        expires_ms: 99,
    };
    let grab = PacketGrabRecord {
        stream: "s0".into(),
        packet_id: "p".into(),
        user_id: "u1".into(),
        user_name: "U1".into(),
        index: 0,
        coins: 5,
        balance_after: 1_005,
        ts_ms: 6,
    };
    let refund = PacketRefundRecord {
        stream: "s0".into(),
        packet_id: "p".into(),
        user_id: "u0".into(),
        coins: 4,
        balance_after: 4,
        ts_ms: 100,
    };
    for r in [
        Record::PacketCreate(create),
        Record::PacketGrab(grab),
        Record::PacketRefund(refund),
    ] {
        lsn += 1;
        records.push((lsn, Arc::new(r)));
    }
    db.store.apply_batch(&records).await.unwrap();
    db.store.apply_batch(&records).await.unwrap();
    let loaded = db.store.load(0).await.unwrap();
    assert_eq!(loaded.packets.len(), 3);
    assert_eq!(loaded, model(&records, 0));
    assert!(loaded
        .gifts
        .iter()
        .any(|g| &*g.gift_id == "rp:p" && g.amount == 1));
}

async fn gifts_load_split_by_the_resident_window_and_are_found_by_id(backend: Backend) {
    let db = TestDb::new(backend).await;
    let records = history(20, 10);
    db.store.apply_batch(&records).await.unwrap();
    let (since, resident_since) = (1_000 + 50, 1_000 + 150);
    let window = |resident_max| Window {
        since_ms: since,
        resident_since_ms: resident_since,
        resident_max,
    };
    let split = db.store.load_window(window(usize::MAX)).await.unwrap();
    let whole = db.store.load(since).await.unwrap();
    // The same gifts, the older ones as keys only, nothing else different.
    assert!(split.gifts.iter().all(|g| g.ts_ms >= resident_since));
    assert!(split
        .gift_keys
        .iter()
        .all(|k| (since..resident_since).contains(&k.ts_ms)));
    let mut keys: Vec<_> = split
        .gift_keys
        .iter()
        .map(|k| {
            (
                k.user_id.to_string(),
                k.gift_id.to_string(),
                k.amount,
                k.ts_ms,
            )
        })
        .chain(split.gifts.iter().map(|g| {
            (
                g.user_id.to_string(),
                g.gift_id.to_string(),
                g.amount,
                g.ts_ms,
            )
        }))
        .collect();
    let mut expected: Vec<_> = whole
        .gifts
        .iter()
        .map(|g| {
            (
                g.user_id.to_string(),
                g.gift_id.to_string(),
                g.amount,
                g.ts_ms,
            )
        })
        .collect();
    keys.sort();
    expected.sort();
    assert_eq!(keys, expected);
    assert!(!split.gift_keys.is_empty() && !split.gifts.is_empty());
    assert_eq!(
        Snapshot {
            gifts: whole.gifts.clone(),
            gift_keys: Vec::new(),
            ..split
        },
        whole
    );
    // At most `resident_max` whole, the newest (in LSN order); the ones they push out join the
    // keys, nothing lost.
    let recent: Vec<&GiftRecord> = whole
        .gifts
        .iter()
        .filter(|g| g.ts_ms >= resident_since)
        .collect();
    assert!(recent.len() > 3);
    for resident_max in [0, 3, recent.len() - 1, recent.len()] {
        let bounded = db.store.load_window(window(resident_max)).await.unwrap();
        let newest: Vec<&GiftRecord> = recent[recent.len() - resident_max..].to_vec();
        assert_eq!(
            bounded.gifts.iter().collect::<Vec<_>>(),
            newest,
            "{resident_max}"
        );
        // From 0, every stored gift is in the window: SQLite reads the table, not the `ts_ms`
        // index; the same newest whole.
        let scanned = db
            .store
            .load_window(Window {
                since_ms: 0,
                ..window(resident_max)
            })
            .await
            .unwrap();
        assert_eq!(scanned.gifts, bounded.gifts, "table scan, {resident_max}");
        assert_eq!(
            bounded.gift_keys.len(),
            split.gift_keys.len() + recent.len() - resident_max,
            "{resident_max}"
        );
        let mut ids: Vec<_> = bounded
            .gift_keys
            .iter()
            .map(|k| k.gift_id.to_string())
            .chain(bounded.gifts.iter().map(|g| g.gift_id.to_string()))
            .collect();
        let mut all: Vec<_> = whole.gifts.iter().map(|g| g.gift_id.to_string()).collect();
        ids.sort();
        all.sort();
        assert_eq!(ids, all, "{resident_max}");
    }
    // Every stored gift is found whole by (user, id); others are not.
    for (_, record) in &records {
        if let Record::Gift(g) = &**record {
            let found = db
                .store
                .find_gift(&g.user_id, &g.gift_id, super::since(0))
                .await
                .unwrap();
            assert_eq!(found.as_ref(), Some(g));
        }
    }
    let some = whole.gifts[0].clone();
    assert_eq!(
        db.store
            .find_gift(&some.user_id, "nope", super::since(0))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        db.store
            .find_gift("nobody", &some.gift_id, super::since(0))
            .await
            .unwrap(),
        None
    );
}

/// A store at a shape step this build does not know was written by a newer giftcast: the open
/// refuses it, naming both steps, and changes nothing. At the step this build knows (the step
/// taken away again) the same store opens with everything in it.
async fn a_store_from_a_newer_giftcast_is_refused(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    let records = history(3, 4);
    db.store.apply_batch(&records).await.unwrap();
    let known = MIGRATIONS.len() as i64;
    db.behind(&format!(
        "INSERT INTO schema_version (version) VALUES ({})",
        known + 1
    ))
    .await;
    let refused = db
        .try_reopen()
        .await
        .err()
        .expect("a newer store is refused");
    assert!(
        matches!(refused, StoreError::Newer { found, known: k } if found == known + 1 && k == known),
        "{refused:?}"
    );
    let message = refused.to_string();
    assert!(
        message.contains("newer giftcast")
            && message.contains(&format!("step {}", known + 1))
            && message.contains(&format!("up to {known}")),
        "{message}"
    );
    db.behind(&format!(
        "DELETE FROM schema_version WHERE version = {}",
        known + 1
    ))
    .await;
    db.store = db
        .try_reopen()
        .await
        .expect("the step this build knows opens");
    assert_eq!(db.store.load(0).await.unwrap(), model(&records, 0));
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres_backend {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
        mod sqlite_colliding_keys {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::SqliteCollidingKeys).await })*
        }
    };
}

both_backends!(
    apply_and_load_round_trip,
    replaying_batches_changes_nothing,
    records_at_or_below_the_checkpoint_are_skipped,
    revenue_aggregation_is_exact,
    a_gift_id_under_a_new_lsn_is_a_new_gift,
    a_record_applied_again_behind_the_checkpoint_is_stored_once,
    packet_records_round_trip,
    gifts_load_split_by_the_resident_window_and_are_found_by_id,
    a_batch_keeps_lsn_order_semantics_whatever_its_key_order,
    a_store_from_a_newer_giftcast_is_refused,
);

fn pragma(path: &std::path::Path, name: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
        .unwrap()
}

/// A file the store creates gets its page size; its connection gets the page cache and FULL
/// synchronous (a commit is on disk before the journal lets go of it).
#[tokio::test]
async fn sqlite_new_file_gets_the_page_size_cache_and_synchronous() {
    use super::sqlite::{SQLITE_CACHE_MIB, SQLITE_PAGE_SIZE_BYTES};
    let db = TestDb::new(Backend::Sqlite).await;
    let path = db.dir.path().join(SQLITE_FILE_NAME);
    assert_eq!(
        pragma(&path, "page_size"),
        i64::from(SQLITE_PAGE_SIZE_BYTES)
    );
    let Store::Sqlite(sqlite) = &db.store else {
        unreachable!()
    };
    let (cache, synchronous, journal_mode) = sqlite.connection_settings().await.unwrap();
    assert_eq!(cache, -i64::from(SQLITE_CACHE_MIB) * 1024);
    assert_eq!(synchronous, 2, "FULL");
    assert_eq!(journal_mode, "wal");
}

/// A file made with SQLite's default 4 KiB pages (an older giftcast) keeps them and works.
#[tokio::test]
async fn sqlite_an_existing_file_keeps_its_page_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SQLITE_FILE_NAME);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "page_size", 4096).unwrap();
        conn.execute_batch(SCHEMA_VERSION_DDL).unwrap();
    }
    let store = Store::open(None, dir.path()).await.unwrap();
    let records = history(5, 5);
    store.apply_batch(&records).await.unwrap();
    assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
    drop(store);
    assert_eq!(pragma(&path, "page_size"), 4096);
}

/// A lookup of a stored gift (and the readiness ping) answers while the writer is inside a
/// long transaction, as under a large flusher batch: they run on the store's reader connection,
/// which in WAL mode never waits for the writer. Had they gone through the writer, the lookup
/// would wait until `release`, which is sent only after it returned: the timeout fails the test.
#[tokio::test]
async fn sqlite_a_lookup_does_not_wait_for_the_writer() {
    let db = TestDb::new(Backend::Sqlite).await;
    let records = history(3, 3);
    db.store.apply_batch(&records).await.unwrap();
    let Store::Sqlite(sqlite) = &db.store else {
        unreachable!()
    };
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let writer = tokio::spawn({
        let sqlite = sqlite.clone();
        async move { sqlite.hold_writer(held_tx, release_rx).await }
    });
    held_rx.await.unwrap();
    let wait = Duration::from_secs(10);
    for (_, record) in &records {
        if let Record::Gift(g) = &**record {
            let found =
                tokio::time::timeout(wait, db.store.find_gift(&g.user_id, &g.gift_id, since(0)))
                    .await
                    .expect("find_gift waited for the writer")
                    .unwrap();
            assert_eq!(found.as_ref(), Some(g));
        }
    }
    tokio::time::timeout(wait, db.store.ping())
        .await
        .expect("ping waited for the writer")
        .unwrap();
    release_tx.send(()).unwrap();
    writer.await.unwrap().unwrap();
    // What the writer held changed nothing, and it is free again.
    assert_eq!(db.store.load(0).await.unwrap(), model(&records, 0));
}

/// An in-memory SQLite database would lose every coin on restart (and the reader connection
/// would see another, empty database): refused with an error that says so.
#[tokio::test]
async fn sqlite_an_in_memory_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["sqlite::memory:", "sqlite:file::memory:", "sqlite:"] {
        let error = match Store::open(Some(url), dir.path()).await {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("in-memory or temporary"), "{url}: {error}");
    }
}

#[tokio::test]
async fn sqlite_reopen_keeps_everything() {
    let db = TestDb::new(Backend::Sqlite).await;
    let records = history(4, 4);
    db.store.apply_batch(&records).await.unwrap();
    let store = Store::open(None, db.dir.path()).await.unwrap();
    assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
}

/// A SQLite store on `path` keyed by `keys`.
async fn open_keyed(path: &std::path::Path, keys: sqlite::KeyScheme) -> Store {
    Store::Sqlite(
        sqlite::SqliteStore::open_with_keys(path, NODE_ID_DEFAULT, keys)
            .await
            .unwrap(),
    )
}

/// `hash` with the default generations.
fn keyed_by(hash: sqlite::KeyHash) -> sqlite::KeyScheme {
    sqlite::KeyScheme {
        hash,
        ..sqlite::KeyScheme::DEFAULT
    }
}

/// `hash` with generations of 4 LSNs (`gen_shift` 2), so a small history spans many.
fn small_generations(hash: sqlite::KeyHash) -> sqlite::KeyScheme {
    sqlite::KeyScheme { hash, gen_shift: 2 }
}

/// What a migration of an older file must keep: 20 records are stored by today's store, then
/// `older` turns the file back into an older giftcast's shape (and checks it did), and the next
/// open migrates it; `migrated` checks the key it made. Every older file also predates
/// `gift_generations`, which the open builds. Then: every gift kept and found by id, the rest of
/// the history stored, a stored id again (a new LSN, still generation 0, other contents) stored
/// and counted as a new gift and found as the newest, and a second open changes nothing.
async fn an_older_file_is_migrated(
    hash: sqlite::KeyHash,
    older: impl FnOnce(&rusqlite::Connection),
    migrated: impl FnOnce(&std::path::Path),
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SQLITE_FILE_NAME);
    let records = history(6, 5);
    let (first, rest) = records.split_at(20);
    let store = open_keyed(&path, keyed_by(hash)).await;
    store.apply_batch(first).await.unwrap();
    drop(store);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        older(&conn);
        conn.execute_batch("DROP TABLE gift_generations").unwrap();
    }
    let store = open_keyed(&path, keyed_by(hash)).await;
    migrated(&path);
    let Store::Sqlite(sqlite) = &store else {
        unreachable!()
    };
    let times = first.iter().filter_map(|(_, r)| match &**r {
        Record::Gift(g) => Some(g.ts_ms as i64),
        _ => None,
    });
    let (oldest, newest) = (times.clone().min().unwrap(), times.max().unwrap());
    assert_eq!(
        sqlite.gift_generations().await.unwrap(),
        [(0, oldest, newest)],
        "built from the gifts: all in generation 0"
    );
    assert_eq!(store.load(0).await.unwrap(), model(first, 0));
    for (_, record) in first {
        if let Record::Gift(g) = &**record {
            let found = store
                .find_gift(&g.user_id, &g.gift_id, since(0))
                .await
                .unwrap();
            assert_eq!(found.as_ref(), Some(g));
        }
    }
    store.apply_batch(rest).await.unwrap();
    let all = model(&records, 0);
    assert_eq!(store.load(0).await.unwrap(), all);
    let Record::Gift(original) = &*first[first.len() - 1].1 else {
        panic!("history ends its first part with a gift")
    };
    let mut again = original.clone();
    again.message = Some("other".into());
    let last = records.last().unwrap().0;
    let more = [(last + 1, Arc::new(Record::Gift(again.clone())))];
    store.apply_batch(&more).await.unwrap();
    let after = store.load(0).await.unwrap();
    let everything = model(&[&records[..], &more[..]].concat(), 0);
    assert_eq!(
        (&after.gifts, after.gifted_total),
        (&everything.gifts, all.gifted_total + again.amount)
    );
    let found = store
        .find_gift(&original.user_id, &original.gift_id, since(0))
        .await
        .unwrap();
    assert_eq!(found.as_ref(), Some(&again));
    drop(store);
    let store = open_keyed(&path, keyed_by(hash)).await;
    assert_eq!(
        store.load(0).await.unwrap().gifts,
        everything.gifts,
        "a second open changes nothing"
    );
}

/// A file from a giftcast before the hash key (its `gifts` keyed by `(user_id, gift_id)`, the
/// shared schema's table) is rebuilt once at open, keyed by `(key_gen, key_hash, key_salt)`
/// with each gift's own generation. Run with the real hash and with the colliding one, so the
/// copy goes through the salts too.
async fn a_file_keyed_by_the_id_strings_is_rebuilt_keyed_by(key_hash: sqlite::KeyHash) {
    let older = |conn: &rusqlite::Connection| {
        // Back to the old shape: the table exactly as the shared schema makes it.
        conn.execute_batch(&format!(
            "ALTER TABLE gifts RENAME TO gifts_keyed;
             DROP INDEX gifts_ts_ms;
             {}
             INSERT INTO gifts SELECT user_id, gift_id, user_name, stream, sticker, count, price,
                 amount, store_share, streamer_share, platform_share, message, balance_after,
                 ts_ms, lsn FROM gifts_keyed;
             DROP TABLE gifts_keyed;",
            &MIGRATIONS[0][MIGRATIONS[0]
                .find("CREATE TABLE IF NOT EXISTS gifts (")
                .unwrap()
                ..MIGRATIONS[0]
                    .find("CREATE TABLE IF NOT EXISTS revenue")
                    .unwrap()]
        ))
        .unwrap();
        let key_columns: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('gifts') WHERE name LIKE 'key_%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(key_columns, 0, "the old shape");
    };
    let migrated = |path: &std::path::Path| {
        let (gens, index) = stored_generations(path);
        assert_eq!(index, ["key_gen", "key_hash", "key_salt"]);
        assert_eq!(gens.len(), 14);
        assert!(
            gens.iter()
                .all(|&(gen, lsn)| gen == lsn >> sqlite::GIFT_KEY_GEN_SHIFT),
            "{gens:?}"
        );
    };
    an_older_file_is_migrated(key_hash, older, migrated).await;
}

#[tokio::test]
async fn sqlite_a_file_keyed_by_the_id_strings_is_rebuilt_keyed_by_hash() {
    a_file_keyed_by_the_id_strings_is_rebuilt_keyed_by(sqlite::gift_key_hash).await;
}

#[tokio::test]
async fn sqlite_a_file_keyed_by_the_id_strings_is_rebuilt_keyed_by_a_colliding_hash() {
    a_file_keyed_by_the_id_strings_is_rebuilt_keyed_by(colliding_key_hash).await;
}

/// A PostgreSQL schema of an older giftcast keys `gifts` by `(user_id, gift_id)`; the next open
/// re-keys it by `(user_id, gift_id, lsn)`, once, keeping every gift, so a gift id again under a
/// new LSN (past the retention) is stored and counted.
#[tokio::test]
async fn postgres_an_older_schema_gets_the_gift_key_by_record() {
    let (schema, url) = pg_schema("127.0.0.1:5432").await;
    let dir = tempfile::tempdir().unwrap();
    let key_columns = || async {
        pg_admin()
            .await
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                 ORDER BY array_position(i.indkey, a.attnum)",
                &[&format!("{schema}.gifts")],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let records = history(3, 4);
    let store = Store::open(Some(&url), dir.path()).await.unwrap();
    assert_eq!(key_columns().await, ["user_id", "gift_id", "lsn"]);
    store.apply_batch(&records).await.unwrap();
    drop(store);
    pg_admin()
        .await
        .batch_execute(&format!(
            "ALTER TABLE {schema}.gifts DROP CONSTRAINT gifts_pkey;
             ALTER TABLE {schema}.gifts ADD PRIMARY KEY (user_id, gift_id);"
        ))
        .await
        .unwrap();
    assert_eq!(key_columns().await, ["user_id", "gift_id"], "the old shape");
    let store = Store::open(Some(&url), dir.path()).await.unwrap();
    assert_eq!(key_columns().await, ["user_id", "gift_id", "lsn"]);
    assert_eq!(store.load(0).await.unwrap(), model(&records, 0));
    let Record::Gift(mut again) = (*records[5].1).clone() else {
        panic!("history's sixth record is a gift")
    };
    again.message = Some("a week later".into());
    let more = [
        &records[..],
        &[(records.len() as u64 + 1, Arc::new(Record::Gift(again)))],
    ]
    .concat();
    store.apply_batch(&more).await.unwrap();
    let after = store.load(0).await.unwrap();
    let all = model(&more, 0);
    assert_eq!(
        (&after.gifts, after.gifted_total),
        (&all.gifts, all.gifted_total)
    );
    drop(store);
    drop_schema(schema);
}

#[tokio::test]
async fn postgres_reconnects_after_its_connection_is_killed() {
    let db = TestDb::new(Backend::Postgres).await;
    let schema = db.schema.clone().unwrap();
    let records = history(6, 6);
    db.store.apply_batch(&records[..20]).await.unwrap();
    for round in 0..3 {
        let killed = pg_admin()
            .await
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&schema],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "round {round}: the store's one connection");
        // The first call may see the dead connection and fail; the store must then reconnect.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match db.store.apply_batch(&records[..20 + 5 * (round + 1)]).await {
                Ok(()) => break,
                Err(e) if attempts < 3 => eprintln!("round {round} attempt {attempts}: {e}"),
                Err(e) => panic!("no reconnect after {attempts} attempts: {e}"),
            }
        }
        db.store.ping().await.unwrap();
    }
    db.store.apply_batch(&records).await.unwrap();
    assert_eq!(db.store.load(0).await.unwrap(), model(&records, 0));
}

/// A PostgreSQL node that is running when a newer giftcast upgrades the shared database writes
/// nothing more into it: its next connection refuses the newer step, and every batch fails
/// (the journal keeps them) until the step is one it knows again.
#[tokio::test]
async fn postgres_a_running_node_refuses_the_database_once_a_newer_giftcast_upgraded_it() {
    let db = TestDb::new(Backend::Postgres).await;
    let schema = db.schema.clone().unwrap();
    let records = history(4, 5);
    db.store.apply_batch(&records[..10]).await.unwrap();
    let newer = MIGRATIONS.len() as i64 + 1;
    db.behind(&format!(
        "INSERT INTO schema_version (version) VALUES ({newer})"
    ))
    .await;
    pg_admin()
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&schema],
        )
        .await
        .unwrap();
    let mut refusals = 0;
    for _ in 0..3 {
        match db.store.apply_batch(&records).await {
            Err(StoreError::Newer { found, .. }) if found == newer => refusals += 1,
            Err(e) => eprintln!("the dead connection: {e}"),
            Ok(()) => panic!("a batch written into a newer giftcast's database"),
        }
    }
    assert!(refusals >= 2, "{refusals} refusals in 3 batches");
    assert_eq!(
        db.store
            .load(0)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
        StoreError::Newer {
            found: newer,
            known: newer - 1
        }
        .to_string()
    );
    db.behind(&format!(
        "DELETE FROM schema_version WHERE version = {newer}"
    ))
    .await;
    db.store.apply_batch(&records).await.unwrap();
    assert_eq!(db.store.load(0).await.unwrap(), model(&records, 0));
}

#[tokio::test]
async fn a_bad_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(Some("mysql://x"), dir.path()).await,
        Err(StoreError::Url(_))
    ));
    assert!(
        Store::open(Some("postgres://postgres@127.0.0.1:1/test"), dir.path())
            .await
            .is_err()
    );
}

/// Stored SQLite keys depend on `gift_key_hash`: these values were computed when the key was made
/// (2026-12-03), and the reference C xxHash (Python's `xxhash.xxh3_64_intdigest` over the same
/// bytes) gives the same. A change of the function or of the XXH3 crate fails here, not in a file.
#[test]
fn the_gift_key_hash_never_changes() {
    let h = sqlite::gift_key_hash;
    assert_eq!(h("u", "g"), 7313902335436326085);
    assert_eq!(
        h("user-1", "0b9e4c6a-7d35-4f0e-9a61-2c8d5e3f1a77"),
        3175733964283770317
    );
    // The sender's length is hashed too: moving a character across the boundary is another key.
    assert_ne!(h("ab", "c"), h("a", "bc"));
}

/// Every stored gift's `(key_gen, lsn)`, and the gift key index's columns.
fn stored_generations(path: &std::path::Path) -> (Vec<(i64, i64)>, Vec<String>) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let gens = conn
        .prepare("SELECT key_gen, lsn FROM gifts ORDER BY lsn")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let index = conn
        .prepare("SELECT name FROM pragma_index_info('gifts_gen_key') ORDER BY seqno")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (gens, index)
}

/// The gift key index leads with the generation (`lsn >> gen_shift`); gifts spread over many
/// generations, applied in batches that straddle them, load as the model says and are each
/// found by id (and an id never stored is not), before and after a reopen. With the real hash
/// and with the colliding one, so salts are taken per generation too.
async fn gifts_in_many_key_generations_are_stored_and_found(hash: sqlite::KeyHash) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SQLITE_FILE_NAME);
    let store = open_keyed(&path, small_generations(hash)).await;
    let records = history(6, 6);
    for batch in records.chunks(7) {
        store.apply_batch(batch).await.unwrap();
    }
    let all = model(&records, 0);
    assert_eq!(store.load(0).await.unwrap(), all);
    let (gens, index) = stored_generations(&path);
    assert_eq!(index, ["key_gen", "key_hash", "key_salt"]);
    assert_eq!(gens.len(), 36);
    assert!(gens.iter().all(|&(gen, lsn)| gen == lsn >> 2), "{gens:?}");
    assert!(gens.last().unwrap().0 >= 9, "many generations: {gens:?}");
    for store in [store, open_keyed(&path, small_generations(hash)).await] {
        for (_, record) in &records {
            if let Record::Gift(g) = &**record {
                let found = store
                    .find_gift(&g.user_id, &g.gift_id, since(0))
                    .await
                    .unwrap();
                assert_eq!(found.as_ref(), Some(g));
            }
        }
        assert_eq!(
            store.find_gift("user-0", "gift-6", since(0)).await.unwrap(),
            None
        );
        assert_eq!(
            store.find_gift("user-6", "gift-0", since(0)).await.unwrap(),
            None
        );
    }
}

#[tokio::test]
async fn sqlite_gifts_in_many_key_generations_are_stored_and_found() {
    gifts_in_many_key_generations_are_stored_and_found(sqlite::gift_key_hash).await;
}

#[tokio::test]
async fn sqlite_gifts_in_many_key_generations_are_stored_and_found_colliding() {
    gifts_in_many_key_generations_are_stored_and_found(colliding_key_hash).await;
}

/// A sender's gift id stored again under a new LSN (the ledger accepted it again past the
/// retention) is taken in its own generation (under the next salt) as in the next, and counted;
/// `find_gift` answers with the newest copy of its window. With the real hash and the colliding
/// one.
async fn a_gift_id_again_is_stored_in_any_generation_and_found_newest_first(hash: sqlite::KeyHash) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SQLITE_FILE_NAME);
    let store = open_keyed(&path, small_generations(hash)).await;
    // LSN 1 a credit, 2-4 gifts; generations of 4 LSNs: 0-3, 4-7, 8-11.
    let records = history(1, 3);
    store.apply_batch(&records).await.unwrap();
    let Record::Gift(original) = &*records[3].1 else {
        panic!("history's fourth record is a gift")
    };
    assert_eq!(records[3].0, 4, "the original is in generation 1");
    let copy = |message: &str, ts_ms: u64| {
        let mut g = original.clone();
        g.message = Some(message.into());
        g.ts_ms = ts_ms;
        g
    };
    let copies = |snapshot: &Snapshot| {
        snapshot
            .gifts
            .iter()
            .filter(|g| g.gift_id == original.gift_id)
            .cloned()
            .collect::<Vec<_>>()
    };
    let gifted = model(&records, 0).gifted_total;
    // LSN 7: the same generation. Taken, and counted.
    let second = copy("second", 50_000);
    store
        .apply_batch(&[(7, Arc::new(Record::Gift(second.clone())))])
        .await
        .unwrap();
    let snapshot = store.load(0).await.unwrap();
    assert_eq!(copies(&snapshot), [original.clone(), second.clone()]);
    assert_eq!(snapshot.gifted_total, gifted + second.amount);
    // LSN 8: the next generation. Taken, and counted.
    let third = copy("third", 90_000);
    store
        .apply_batch(&[(8, Arc::new(Record::Gift(third.clone())))])
        .await
        .unwrap();
    let snapshot = store.load(0).await.unwrap();
    assert_eq!(
        copies(&snapshot),
        [original.clone(), second.clone(), third.clone()]
    );
    assert_eq!(snapshot.gifted_total, gifted + second.amount + third.amount);
    let (gens, _) = stored_generations(&path);
    assert_eq!(&gens[gens.len() - 2..], [(1, 7), (2, 8)]);
    let find = |from| store.find_gift(&original.user_id, &original.gift_id, since(from));
    assert_eq!(find(0).await.unwrap().as_ref(), Some(&third), "the newest");
    assert_eq!(find(90_000).await.unwrap().as_ref(), Some(&third));
    assert_eq!(find(90_001).await.unwrap(), None);
    // With the third copy's generation out of the way, the newest of generation 1 answers.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM gift_generations WHERE key_gen = 2", [])
        .unwrap();
    assert_eq!(
        find(0).await.unwrap().as_ref(),
        Some(&second),
        "salt 1 over salt 0"
    );
    assert_eq!(find(50_001).await.unwrap(), None);
}

#[tokio::test]
async fn sqlite_a_gift_id_again_is_stored_in_any_generation_and_found_newest_first() {
    a_gift_id_again_is_stored_in_any_generation_and_found_newest_first(sqlite::gift_key_hash).await;
}

#[tokio::test]
async fn sqlite_a_gift_id_again_is_stored_in_any_generation_and_found_newest_first_colliding() {
    a_gift_id_again_is_stored_in_any_generation_and_found_newest_first(colliding_key_hash).await;
}

/// `gift_generations` holds each key generation's oldest and newest gift time, whatever order
/// the wall clock gave them (it went back here, inside a generation and across one), and
/// `find_gift` probes only the generations whose times overlap one of its spans: a gift made
/// outside the spans is not found, one inside them is, in whatever generation. A generation
/// whose times do not overlap is not probed at all (shown by narrowing one behind the store's
/// back). A file from before `ts_min` gets it at open, 0 for the generations stored then (every
/// gift still found), the real time for those after. With the real hash and the colliding one.
async fn find_gift_probes_the_generations_of_its_spans(hash: sqlite::KeyHash) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SQLITE_FILE_NAME);
    let store = open_keyed(&path, small_generations(hash)).await;
    let mut records = history(2, 7);
    // LSNs 3-14 are gifts, generations (4 LSNs) 0 to 3. The clock as the gifts saw it:
    let times: [u64; 12] = [
        100, // 3: generation 0
        200, 300, 9_000, 250, // 4-7: generation 1, the clock back after 9,000
        400, 500, 600, 700, // 8-11: generation 2
        800, 10, 20, // 12-14: generation 3, the clock back to 10
    ];
    for ((_, record), ts) in records[2..].iter_mut().zip(times) {
        let Record::Gift(g) = &**record else {
            panic!("history's gifts follow its 2 credits")
        };
        let mut g = g.clone();
        g.ts_ms = ts;
        *record = Arc::new(Record::Gift(g));
    }
    let (now, later) = records.split_at(14);
    for batch in now.chunks(5) {
        store.apply_batch(batch).await.unwrap();
    }
    let Store::Sqlite(sqlite) = &store else {
        unreachable!()
    };
    assert_eq!(
        sqlite.gift_generations().await.unwrap(),
        [(0, 100, 100), (1, 200, 9_000), (2, 400, 700), (3, 10, 800)]
    );
    let gift = |lsn: usize| match &*records[lsn - 1].1 {
        Record::Gift(g) => g.clone(),
        _ => unreachable!(),
    };
    let find = |store: &Store, lsn: usize, spans: &[std::ops::Range<u64>]| {
        let (g, spans, store) = (gift(lsn), spans.to_vec(), store.clone());
        async move {
            store
                .find_gift(&g.user_id, &g.gift_id, spans)
                .await
                .unwrap()
        }
    };
    // Generation 1's newest gift is at 9,000 (LSN 6, not its last): found in a span holding
    // 9,000, not in one ending there.
    assert_eq!(find(&store, 6, &since(9_000)).await, Some(gift(6)));
    assert_eq!(find(&store, 6, &[9_000..9_001]).await, Some(gift(6)));
    assert_eq!(find(&store, 6, &[0..9_000]).await, None);
    assert_eq!(find(&store, 6, &since(9_001)).await, None);
    // LSN 7 (250) sits in generation 1 too; from 260 on it is out of the window.
    assert_eq!(find(&store, 7, &since(250)).await, Some(gift(7)));
    assert_eq!(find(&store, 7, &since(260)).await, None);
    // Generation 3's last gifts went back to 10 and 20: from 15, LSN 14 (20) is found, LSN 13
    // (10) is not; a span around 10 finds it, however many other spans there are.
    assert_eq!(find(&store, 14, &since(15)).await, Some(gift(14)));
    assert_eq!(find(&store, 13, &since(15)).await, None);
    assert_eq!(
        find(&store, 13, &[800..900, 300..400, 5..11]).await,
        Some(gift(13))
    );
    assert_eq!(find(&store, 13, &[800..900, 300..400]).await, None);
    assert_eq!(find(&store, 3, &since(100)).await, Some(gift(3)));
    assert_eq!(find(&store, 3, &since(101)).await, None);
    assert_eq!(find(&store, 3, &[]).await, None, "no span, no gift");
    // Every gift from 0, and in a span of its own time.
    for lsn in 3..=14 {
        let ts = gift(lsn).ts_ms;
        assert_eq!(
            find(&store, lsn, &since(0)).await,
            Some(gift(lsn)),
            "LSN {lsn}"
        );
        assert_eq!(
            find(&store, lsn, &[ts..ts + 1]).await,
            Some(gift(lsn)),
            "LSN {lsn}"
        );
    }
    // Generation 2 (400-700) said to begin at 650: a span before that does not probe it, so
    // LSN 8 (400) is not found there, though its row is in the table.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE gift_generations SET ts_min = 650 WHERE key_gen = 2",
        [],
    )
    .unwrap();
    assert_eq!(
        find(&store, 8, &[390..410]).await,
        None,
        "generation 2 probed"
    );
    assert_eq!(
        find(&store, 8, &[9_000..9_001, 390..410]).await,
        None,
        "generation 2 probed for spans around it"
    );
    assert_eq!(find(&store, 11, &[690..710]).await, Some(gift(11)));
    // A file from before step 4: no `ts_min`.
    drop(store);
    conn.execute_batch(
        "ALTER TABLE gift_generations DROP COLUMN ts_min;
         DELETE FROM schema_version WHERE version = 4;",
    )
    .unwrap();
    let store = open_keyed(&path, small_generations(hash)).await;
    let Store::Sqlite(sqlite) = &store else {
        unreachable!()
    };
    assert_eq!(
        sqlite.gift_generations().await.unwrap(),
        [(0, 0, 100), (1, 0, 9_000), (2, 0, 700), (3, 0, 800)],
        "the times before unknown: 0"
    );
    let step: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(step, MIGRATIONS.len() as i64);
    for lsn in 3..=14 {
        let ts = gift(lsn).ts_ms;
        assert_eq!(
            find(&store, lsn, &[ts..ts + 1]).await,
            Some(gift(lsn)),
            "LSN {lsn}"
        );
    }
    // LSN 15 (at 1,015) joins generation 3, whose unknown start stays 0; LSN 16 (1,016)
    // begins generation 4, with its real time.
    store.apply_batch(later).await.unwrap();
    assert_eq!(
        sqlite.gift_generations().await.unwrap()[3..],
        [(3, 0, 1_015), (4, 1_016, 1_016)]
    );
}

#[tokio::test]
async fn sqlite_find_gift_probes_the_generations_of_its_spans() {
    find_gift_probes_the_generations_of_its_spans(sqlite::gift_key_hash).await;
}

#[tokio::test]
async fn sqlite_find_gift_probes_the_generations_of_its_spans_colliding() {
    find_gift_probes_the_generations_of_its_spans(colliding_key_hash).await;
}

/// A file keyed by `(key_hash, key_salt)` without generations (giftcast of 2026-12-03 to
/// 2026-12-06) gets them at open: its gifts all in generation 0, the key index rebuilt leading
/// with the generation and the old one dropped. With the real hash and the colliding one.
async fn a_hash_keyed_file_gets_key_generations(hash: sqlite::KeyHash) {
    let older = |conn: &rusqlite::Connection| {
        conn.execute_batch(
            "DROP INDEX gifts_gen_key;
             ALTER TABLE gifts DROP COLUMN key_gen;
             CREATE UNIQUE INDEX gifts_by_hash_key ON gifts (key_hash, key_salt);",
        )
        .unwrap();
    };
    let migrated = |path: &std::path::Path| {
        let (gens, index) = stored_generations(path);
        assert_eq!(index, ["key_gen", "key_hash", "key_salt"]);
        assert_eq!(gens.len(), 14);
        assert!(gens.iter().all(|&(gen, _)| gen == 0), "{gens:?}");
        let old: i64 = rusqlite::Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'gifts_by_hash_key'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "the old key index is dropped");
    };
    an_older_file_is_migrated(hash, older, migrated).await;
}

#[tokio::test]
async fn sqlite_a_hash_keyed_file_gets_key_generations() {
    a_hash_keyed_file_gets_key_generations(sqlite::gift_key_hash).await;
}

#[tokio::test]
async fn sqlite_a_hash_keyed_file_gets_key_generations_colliding() {
    a_hash_keyed_file_gets_key_generations(colliding_key_hash).await;
}

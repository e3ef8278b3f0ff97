//! Revenue totals per stream: gross coins and the three exact shares, by sticker and by gifter.

use crate::money::SHARE_UNIT;
use crate::record::GiftRecord;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// How many gifters `top_gifters` lists.
pub const TOP_GIFTERS_MAX: usize = 10;

#[derive(Default, Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub gifts: u64,
    pub stickers: u64,
    pub gross: u64,
    pub store: u64,
    pub streamer: u64,
    pub platform: u64,
}

impl Totals {
    pub fn add(&mut self, t: &Totals) {
        self.gifts += t.gifts;
        self.stickers += t.stickers;
        self.gross += t.gross;
        self.store += t.store;
        self.streamer += t.streamer;
        self.platform += t.platform;
    }
}

/// A stored aggregate: one (stream, sticker, gifter) group.
#[derive(Debug, Clone)]
pub struct RevenueRow {
    pub sticker: String,
    pub user_id: String,
    pub user_name: String,
    pub totals: Totals,
}

#[derive(Default, Debug)]
pub struct StreamRevenue {
    total: Totals,
    /// Keyed by the records' own shared names (no copy per sticker or gifter).
    by_sticker: HashMap<Arc<str>, Totals>,
    by_gifter: HashMap<Arc<str>, (Arc<str>, Totals)>,
}

#[derive(Debug, Serialize)]
pub struct StickerTotals {
    pub sticker: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Serialize)]
pub struct GifterTotals {
    pub user_id: String,
    pub name: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Serialize)]
pub struct RevenueReport {
    pub stream: String,
    pub gifts: u64,
    pub gross: u64,
    pub store: u64,
    pub streamer: u64,
    pub platform: u64,
    pub unit: u64,
    pub by_sticker: Vec<StickerTotals>,
    pub top_gifters: Vec<GifterTotals>,
}

impl StreamRevenue {
    pub fn add(&mut self, g: &GiftRecord) {
        let t = Totals {
            gifts: 1,
            stickers: g.count as u64,
            gross: g.amount,
            store: g.shares.store,
            streamer: g.shares.streamer,
            platform: g.shares.platform,
        };
        self.total.add(&t);
        // Keys are shared with the record, taken the first time a sticker or a gifter is seen
        // (this runs for every durable gift, on the journal's settle thread).
        match self.by_sticker.get_mut(&*g.sticker) {
            Some(totals) => totals.add(&t),
            None => {
                self.by_sticker.insert(g.sticker.clone(), t);
            }
        }
        match self.by_gifter.get_mut(&*g.user_id) {
            Some((name, totals)) => {
                if *name != g.user_name {
                    name.clone_from(&g.user_name);
                }
                totals.add(&t);
            }
            None => {
                self.by_gifter
                    .insert(g.user_id.clone(), (g.user_name.clone(), t));
            }
        }
    }

    pub fn restore(&mut self, row: RevenueRow) {
        self.total.add(&row.totals);
        self.by_sticker
            .entry(Arc::from(row.sticker))
            .or_default()
            .add(&row.totals);
        let gifter = self
            .by_gifter
            .entry(Arc::from(row.user_id))
            .or_insert_with(|| (Arc::from(row.user_name), Totals::default()));
        gifter.1.add(&row.totals);
    }

    /// The totals in parts: (total, by sticker, by gifter id with name).
    #[allow(clippy::type_complexity)]
    pub fn parts(&self) -> (Totals, Vec<(String, Totals)>, Vec<(String, String, Totals)>) {
        (
            self.total,
            self.by_sticker
                .iter()
                .map(|(k, t)| (k.to_string(), *t))
                .collect(),
            self.by_gifter
                .iter()
                .map(|(k, (n, t))| (k.to_string(), n.to_string(), *t))
                .collect(),
        )
    }

    /// Adds another node's parts (cluster mode: each gifter's wallet lives on one node).
    pub fn merge(
        &mut self,
        total: Totals,
        by_sticker: Vec<(String, Totals)>,
        by_gifter: Vec<(String, String, Totals)>,
    ) {
        self.total.add(&total);
        for (k, t) in by_sticker {
            self.by_sticker.entry(Arc::from(k)).or_default().add(&t);
        }
        for (k, n, t) in by_gifter {
            self.by_gifter
                .entry(Arc::from(k))
                .or_insert_with(|| (Arc::from(n), Totals::default()))
                .1
                .add(&t);
        }
    }

    pub fn report(&self, stream: &str) -> RevenueReport {
        debug_assert_eq!(
            self.total.store + self.total.streamer + self.total.platform,
            self.total.gross * SHARE_UNIT
        );
        let mut by_sticker: Vec<StickerTotals> = self
            .by_sticker
            .iter()
            .map(|(k, t)| StickerTotals {
                sticker: k.to_string(),
                totals: *t,
            })
            .collect();
        by_sticker.sort_by(|a, b| {
            b.totals
                .gross
                .cmp(&a.totals.gross)
                .then(a.sticker.cmp(&b.sticker))
        });
        let mut top: Vec<GifterTotals> = self
            .by_gifter
            .iter()
            .map(|(k, (name, t))| GifterTotals {
                user_id: k.to_string(),
                name: name.to_string(),
                totals: *t,
            })
            .collect();
        top.sort_by(|a, b| {
            b.totals
                .gross
                .cmp(&a.totals.gross)
                .then(a.user_id.cmp(&b.user_id))
        });
        top.truncate(TOP_GIFTERS_MAX);
        RevenueReport {
            stream: stream.to_string(),
            gifts: self.total.gifts,
            gross: self.total.gross,
            store: self.total.store,
            streamer: self.total.streamer,
            platform: self.total.platform,
            unit: SHARE_UNIT,
            by_sticker,
            top_gifters: top,
        }
    }
}

//! The money records: what the ledger decides, the journal makes durable and the store keeps.
//! Encoded with bincode 2 (serde) in the journal; the enum is append-only (new variants at the
//! end) so old journals stay readable.

use crate::money::Shares;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Journal position: the number of a record, increasing by one per record from 1.
pub type Lsn = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Credit(CreditRecord),
    Gift(GiftRecord),
    PacketCreate(PacketCreateRecord),
    PacketGrab(PacketGrabRecord),
    PacketRefund(PacketRefundRecord),
}

/// A gift record that is also the journal's record of it: one allocation, shared by the ledger,
/// the gift's completion and the journal (which owns records as `Arc<Record>`), so a gift is
/// not copied field by field on its way to durability.
#[derive(Clone, Debug)]
pub struct SharedGift(Arc<Record>);

impl SharedGift {
    pub fn new(gift: GiftRecord) -> SharedGift {
        SharedGift(Arc::new(Record::Gift(gift)))
    }

    /// The journal's record (a `Record::Gift`).
    pub fn record(&self) -> &Arc<Record> {
        &self.0
    }
}

impl std::ops::Deref for SharedGift {
    type Target = GiftRecord;

    fn deref(&self) -> &GiftRecord {
        match &*self.0 {
            Record::Gift(g) => g,
            _ => unreachable!("a SharedGift is made from a gift only"),
        }
    }
}

impl Record {
    /// The wallet this record changes.
    pub fn user_id(&self) -> &str {
        match self {
            Record::Credit(c) => &c.user_id,
            Record::Gift(g) => &g.user_id,
            Record::PacketCreate(p) => &p.user_id,
            Record::PacketGrab(p) => &p.user_id,
            Record::PacketRefund(p) => &p.user_id,
        }
    }
    /// The wallet balance right after this record was applied.
    pub fn balance_after(&self) -> u64 {
        match self {
            Record::Credit(c) => c.balance_after,
            Record::Gift(g) => g.balance_after,
            Record::PacketCreate(p) => p.balance_after,
            Record::PacketGrab(p) => p.balance_after,
            Record::PacketRefund(p) => p.balance_after,
        }
    }
}

/// Coins added to a wallet: a guest's welcome coins or an admin credit (a store purchase).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditRecord {
    pub user_id: String,
    pub coins: u64,
    /// Idempotency key: a credit with a reference already applied is not applied again.
    pub reference: String,
    pub balance_after: u64,
    pub ts_ms: u64,
}

/// One accepted gift: the debit, and the exact split of its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiftRecord {
    /// The sender, the stream and the sticker are shared, not copied: the sender's connection,
    /// the room and the catalog hold the same `Arc<str>`, so a gift allocates only its own id
    /// and message (serde writes an `Arc<str>` as a `str`: the journal format is unchanged).
    pub user_id: Arc<str>,
    pub user_name: Arc<str>,
    /// Chosen by the client, unique per user. Shared too: the wallet's resident-id map, the
    /// resident queue and the streamer's thanks queue hold this same allocation.
    pub gift_id: Arc<str>,
    pub stream: Arc<str>,
    pub sticker: Arc<str>,
    pub count: u32,
    /// Price of one sticker at the time of the gift, whole coins.
    pub price: u64,
    /// `price * count`, whole coins.
    pub amount: u64,
    pub shares: Shares,
    pub message: Option<String>,
    pub balance_after: u64,
    pub ts_ms: u64,
}

/// A red packet: coins taken from the sender's wallet, `host_cut` of them paid to the stream as
/// revenue (split like a gift), the rest held for `amounts.len()` grabbers. The amounts are
/// drawn once, from `seed`, and journaled, so replay gives exactly the same shares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCreateRecord {
    pub user_id: String,
    pub user_name: String,
    pub packet_id: String,
    pub stream: String,
    pub coins: u64,
    pub host_cut: u64,
    pub host_shares: Shares,
    pub amounts: Vec<u64>,
    pub random: bool,
    pub seed: u64,
    pub message: Option<String>,
    pub balance_after: u64,
    pub ts_ms: u64,
    pub expires_ms: u64,
}

impl PacketCreateRecord {
    /// The coins held for grabbers: `coins - host_cut`, the sum of `amounts`.
    pub fn held(&self) -> u64 {
        self.coins - self.host_cut
    }

    /// The host cut as a gift record (gift id `rp:<packet_id>`, which no client id can be), so
    /// it is stored, split and reported exactly like a gift.
    pub fn host_gift(&self) -> Option<GiftRecord> {
        (self.host_cut > 0).then(|| GiftRecord {
            user_id: self.user_id.as_str().into(),
            user_name: self.user_name.as_str().into(),
            gift_id: format!("rp:{}", self.packet_id).into(),
            stream: self.stream.as_str().into(),
            sticker: "red_packet".into(),
            count: 1,
            price: self.host_cut,
            amount: self.host_cut,
            shares: self.host_shares,
            message: None,
            balance_after: self.balance_after,
            ts_ms: self.ts_ms,
        })
    }
}

/// One share of a red packet credited to a grabber.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketGrabRecord {
    pub stream: String,
    pub packet_id: String,
    /// The grabber.
    pub user_id: String,
    pub user_name: String,
    /// Which share (index into the packet's amounts).
    pub index: u32,
    pub coins: u64,
    pub balance_after: u64,
    pub ts_ms: u64,
}

/// What nobody grabbed before the packet expired, back to its sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketRefundRecord {
    pub stream: String,
    pub packet_id: String,
    /// The packet's sender.
    pub user_id: String,
    pub coins: u64,
    pub balance_after: u64,
    pub ts_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Journals written before the names were shared read back the same, and new ones are
    /// byte for byte what the old code wrote: serde writes an `Arc<str>` as a `str`, so a gift
    /// record encodes as its variant index followed by its fields with the names as `String`s.
    #[test]
    fn shared_names_do_not_change_the_journal_bytes() {
        let config = bincode::config::standard();
        let g = GiftRecord {
            user_id: "u1".into(),
            user_name: "Ünïcode name".into(),
            gift_id: "g-42".into(),
            stream: "s1".into(),
            sticker: "rose".into(),
            count: 3,
            price: 10,
            amount: 30,
            shares: Shares {
                store: 3,
                streamer: 5,
                platform: 2,
            },
            message: Some("hi".into()),
            balance_after: 970,
            ts_ms: 1_700_000_000_000,
        };
        // The old layout: `Record::Gift` is variant 1, then the fields in order, names as Strings.
        let names: [String; 5] =
            [&g.user_id, &g.user_name, &g.gift_id, &g.stream, &g.sticker].map(|n| n.to_string());
        let fields = (
            names,
            g.count,
            g.price,
            g.amount,
            g.shares,
            g.message.clone(),
        );
        let mut old = bincode::serde::encode_to_vec(1u32, config).unwrap();
        old.extend(bincode::serde::encode_to_vec(&fields, config).unwrap());
        old.extend(bincode::serde::encode_to_vec((g.balance_after, g.ts_ms), config).unwrap());
        let record = Record::Gift(g);
        assert_eq!(bincode::serde::encode_to_vec(&record, config).unwrap(), old);
        let (back, _): (Record, usize) = bincode::serde::decode_from_slice(&old, config).unwrap();
        assert_eq!(back, record);
    }
}

//! The money records: what the ledger decides, the journal makes durable and the store keeps.
//! Encoded with bincode 2 (serde) in the journal; the enum is append-only (new variants at the
//! end) so old journals stay readable.

use crate::money::Shares;
use serde::{Deserialize, Serialize};

/// Journal position: the number of a record, increasing by one per record from 1.
pub type Lsn = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Credit(CreditRecord),
    Gift(GiftRecord),
}

impl Record {
    pub fn user_id(&self) -> &str {
        match self {
            Record::Credit(c) => &c.user_id,
            Record::Gift(g) => &g.user_id,
        }
    }
    /// The wallet balance right after this record was applied.
    pub fn balance_after(&self) -> u64 {
        match self {
            Record::Credit(c) => c.balance_after,
            Record::Gift(g) => g.balance_after,
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
    pub user_id: String,
    pub user_name: String,
    /// Chosen by the client, unique per user.
    pub gift_id: String,
    pub stream: String,
    pub sticker: String,
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

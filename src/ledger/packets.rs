//! Red packets in the ledger: a sender's coins held for the first `shares` grabbers, the rest
//! refunded at expiry. Same rules as gifts: one critical section per change, the record handed
//! to the journal inside it, idempotent on ids, never below zero.
//!
//! Lock order: a packet's map entry, then a wallet's entry (never the reverse anywhere).

use super::{Ledger, Slot, SlotState};
use crate::money::{Coins, AMOUNT_MAX};
use crate::record::{PacketCreateRecord, PacketGrabRecord, PacketRefundRecord, Record};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Shares of one packet at most.
pub const PACKET_SHARES_MAX: u32 = 100;
/// Coins in one packet at most.
pub const PACKET_COINS_MAX: u64 = 10_000_000;
/// Basis points of a packet the host may take at most.
pub const PACKET_HOST_CUT_BP_MAX: u64 = 5_000;

/// A grab, remembered so a retry answers the same.
#[derive(Debug)]
pub struct Grab {
    pub coins: u64,
    pub slot: Arc<Slot>,
}

#[derive(Debug)]
pub(super) struct Packet {
    owner: String,
    fingerprint: String,
    amounts: Vec<u64>,
    expires_ms: u64,
    grabs: HashMap<String, Arc<Grab>>,
    /// Shares handed out so far (a share whose journal write failed is never handed out again).
    next_index: usize,
    /// Coins granted to grabbers (pending or durable).
    granted: u64,
    held: u64,
    /// Refunded (or nothing left to refund).
    closed: bool,
    /// The create record is durable: grabs are taken.
    durable: bool,
    create: Arc<Slot>,
}

impl Packet {
    pub(super) fn left(&self) -> u64 {
        self.held - self.granted
    }
}

/// What a packet's create request contained, to tell a retry from a conflict; also made for
/// packets restored after a restart, so both go through this one function.
fn fingerprint(
    user_id: &str,
    coins: u64,
    shares: usize,
    random: bool,
    message: Option<&str>,
) -> String {
    format!(
        "{user_id}\u{0}{coins}\u{0}{shares}\u{0}{random}\u{0}{}",
        message.unwrap_or("\u{1}")
    )
}

pub(super) fn key(stream: &str, packet_id: &str) -> String {
    format!("{stream}\u{0}{packet_id}")
}

/// The shares of `total` coins: `equal` (the first `total % shares` get one more) or random by
/// the "double mean" draw (each share uniform in 1..=2×mean of what is left), seeded. Every
/// share is at least 1 and they sum to `total` exactly. Needs `total >= shares >= 1`.
pub fn split_shares(total: u64, shares: u32, random: bool, seed: u64) -> Vec<u64> {
    let n = shares as u64;
    assert!(
        n >= 1 && total >= n,
        "a packet needs at least one coin per share"
    );
    if !random {
        let base = total / n;
        let extra = total % n;
        return (0..n).map(|i| base + u64::from(i < extra)).collect();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut left = total;
    let mut out = Vec::with_capacity(shares as usize);
    for i in 0..n - 1 {
        let remaining = n - i;
        let upper = (2 * (left / remaining)).min(left - (remaining - 1)).max(1);
        let amount = rng.random_range(1..=upper);
        out.push(amount);
        left -= amount;
    }
    out.push(left);
    debug_assert_eq!(out.iter().sum::<u64>(), total);
    out
}

pub struct PacketRequest<'a> {
    pub user_id: &'a str,
    pub user_name: &'a str,
    pub packet_id: &'a str,
    pub stream: &'a str,
    pub coins: u64,
    pub shares: u32,
    pub random: bool,
    pub message: Option<&'a str>,
    pub host_cut_bp: u64,
    pub ttl_ms: u64,
    pub now_ms: u64,
}

pub enum PacketStart {
    New {
        slot: Arc<Slot>,
        ticket: super::DurableTicket,
        record: Arc<PacketCreateRecord>,
    },
    Retry(Arc<Slot>),
    Rejected {
        code: &'static str,
        balance: Option<u64>,
    },
}

pub enum GrabStart {
    New {
        grab: Arc<Grab>,
        ticket: super::DurableTicket,
        record: Arc<PacketGrabRecord>,
        left_shares: usize,
    },
    Retry(Arc<Grab>),
    Rejected(&'static str),
}

impl Ledger {
    pub fn begin_packet(&self, req: &PacketRequest<'_>) -> PacketStart {
        let reject = |code| PacketStart::Rejected {
            code,
            balance: None,
        };
        if req.coins == 0
            || req.coins > PACKET_COINS_MAX
            || req.shares == 0
            || req.shares > PACKET_SHARES_MAX
        {
            return reject("invalid");
        }
        let host_cut = req.coins * req.host_cut_bp.min(PACKET_HOST_CUT_BP_MAX) / 10_000;
        let held = req.coins - host_cut;
        if held < req.shares as u64 {
            return reject("invalid");
        }
        let fingerprint = fingerprint(
            req.user_id,
            req.coins,
            req.shares as usize,
            req.random,
            req.message,
        );
        let vacant = match self.packets.entry(key(req.stream, req.packet_id)) {
            dashmap::mapref::entry::Entry::Occupied(o) => {
                return if o.get().fingerprint == fingerprint {
                    PacketStart::Retry(o.get().create.clone())
                } else {
                    reject("conflict")
                };
            }
            dashmap::mapref::entry::Entry::Vacant(v) => v,
        };
        let Some(mut wallet) = self.wallets.get_mut(req.user_id) else {
            return PacketStart::Rejected {
                code: "insufficient_funds",
                balance: Some(0),
            };
        };
        let Some(balance_after) = wallet.balance.checked_sub(req.coins) else {
            return PacketStart::Rejected {
                code: "insufficient_funds",
                balance: Some(wallet.balance),
            };
        };
        let Some(host_shares) = self.split.shares(Coins(host_cut)) else {
            return reject("invalid");
        };
        let seed: u64 = rand::rng().random();
        let amounts = split_shares(held, req.shares, req.random, seed);
        let record = Arc::new(PacketCreateRecord {
            user_id: req.user_id.into(),
            user_name: req.user_name.into(),
            packet_id: req.packet_id.into(),
            stream: req.stream.into(),
            coins: req.coins,
            host_cut,
            host_shares,
            amounts: amounts.clone(),
            random: req.random,
            seed,
            message: req.message.map(str::to_string),
            balance_after,
            ts_ms: req.now_ms,
            expires_ms: req.now_ms + req.ttl_ms,
        });
        let Ok(ticket) = super::submit_ticket(&*self.sink, Record::PacketCreate((*record).clone()))
        else {
            return PacketStart::Rejected {
                code: "unavailable",
                balance: Some(wallet.balance),
            };
        };
        wallet.balance = balance_after;
        drop(wallet);
        self.gifted.fetch_add(host_cut, Ordering::SeqCst);
        self.held.fetch_add(held, Ordering::SeqCst);
        let slot = Slot::new(fingerprint.clone(), balance_after, SlotState::Pending);
        vacant.insert(Packet {
            owner: req.user_id.into(),
            fingerprint,
            amounts,
            expires_ms: record.expires_ms,
            grabs: HashMap::new(),
            next_index: 0,
            granted: 0,
            held,
            closed: false,
            durable: false,
            create: slot.clone(),
        });
        PacketStart::New {
            slot,
            ticket,
            record,
        }
    }

    /// The create record is durable: grabs are taken, the host cut counts as revenue.
    pub fn packet_durable(&self, record: &PacketCreateRecord) {
        if let Some(mut p) = self
            .packets
            .get_mut(&key(&record.stream, &record.packet_id))
        {
            p.durable = true;
        }
        if let Some(g) = record.host_gift() {
            self.gift_durable(&g);
        }
    }

    /// The journal refused the create record: undo it all.
    pub fn packet_failed(&self, record: &PacketCreateRecord, slot: &Slot) {
        if self
            .packets
            .remove(&key(&record.stream, &record.packet_id))
            .is_some()
        {
            if let Some(mut w) = self.wallets.get_mut(&record.user_id) {
                w.balance += record.coins;
            }
            self.gifted.fetch_sub(record.host_cut, Ordering::SeqCst);
            self.held.fetch_sub(record.held(), Ordering::SeqCst);
        }
        slot.settle(SlotState::Failed);
    }

    /// A grab: the next share to this grabber, at most once per grabber and packet.
    pub fn begin_grab(
        &self,
        stream: &str,
        packet_id: &str,
        user_id: &str,
        user_name: &str,
        now_ms: u64,
    ) -> GrabStart {
        let Some(mut p) = self.packets.get_mut(&key(stream, packet_id)) else {
            return GrabStart::Rejected("not_found");
        };
        if !p.durable {
            return GrabStart::Rejected("not_found");
        }
        if let Some(g) = p.grabs.get(user_id) {
            return GrabStart::Retry(g.clone());
        }
        if p.next_index >= p.amounts.len() {
            return GrabStart::Rejected("gone");
        }
        if p.closed || now_ms >= p.expires_ms {
            return GrabStart::Rejected("expired");
        }
        let index = p.next_index;
        let coins = p.amounts[index];
        let mut wallet = self.wallets.entry(user_id.to_string()).or_default();
        let Some(balance_after) = wallet
            .balance
            .checked_add(coins)
            .filter(|b| *b <= AMOUNT_MAX)
        else {
            return GrabStart::Rejected("invalid");
        };
        let record = Arc::new(PacketGrabRecord {
            stream: stream.into(),
            packet_id: packet_id.into(),
            user_id: user_id.into(),
            user_name: user_name.into(),
            index: index as u32,
            coins,
            balance_after,
            ts_ms: now_ms,
        });
        let Ok(ticket) = super::submit_ticket(&*self.sink, Record::PacketGrab((*record).clone()))
        else {
            return GrabStart::Rejected("unavailable");
        };
        wallet.balance = balance_after;
        drop(wallet);
        self.held.fetch_sub(coins, Ordering::SeqCst);
        p.next_index += 1;
        p.granted += coins;
        let grab = Arc::new(Grab {
            coins,
            slot: Slot::new(String::new(), balance_after, SlotState::Pending),
        });
        p.grabs.insert(user_id.to_string(), grab.clone());
        let left_shares = p.amounts.len() - p.next_index;
        GrabStart::New {
            grab,
            ticket,
            record,
            left_shares,
        }
    }

    /// The journal refused a grab: give the coins back to the packet (that share is not handed
    /// out again; it is refunded with the rest at expiry).
    pub fn grab_failed(&self, record: &PacketGrabRecord, grab: &Grab) {
        if let Some(mut p) = self
            .packets
            .get_mut(&key(&record.stream, &record.packet_id))
        {
            p.granted -= record.coins;
            p.grabs.remove(&record.user_id);
            if let Some(mut w) = self.wallets.get_mut(&record.user_id) {
                w.balance -= record.coins;
            }
            self.held.fetch_add(record.coins, Ordering::SeqCst);
        }
        grab.slot.settle(SlotState::Failed);
    }

    /// Packets past their expiry with coins left: (stream, packet id).
    pub fn expired_packets(&self, now_ms: u64) -> Vec<(String, String)> {
        self.packets
            .iter()
            .filter(|p| p.durable && !p.closed && now_ms >= p.expires_ms)
            .map(|p| {
                let (stream, id) = p.key().split_once('\u{0}').expect("packet key");
                (stream.to_string(), id.to_string())
            })
            .collect()
    }

    /// Refunds what is left of an expired packet to its sender. `None` when nothing is left
    /// (the packet is closed) or the journal refused (tried again later).
    pub fn begin_refund(
        &self,
        stream: &str,
        packet_id: &str,
        now_ms: u64,
    ) -> Option<(super::DurableTicket, Arc<PacketRefundRecord>)> {
        let mut p = self.packets.get_mut(&key(stream, packet_id))?;
        if p.closed || !p.durable || now_ms < p.expires_ms {
            return None;
        }
        let left = p.left();
        if left == 0 {
            p.closed = true;
            return None;
        }
        let mut wallet = self.wallets.entry(p.owner.clone()).or_default();
        let balance_after = wallet.balance.checked_add(left)?;
        let record = Arc::new(PacketRefundRecord {
            stream: stream.into(),
            packet_id: packet_id.into(),
            user_id: p.owner.clone(),
            coins: left,
            balance_after,
            ts_ms: now_ms,
        });
        let ticket =
            super::submit_ticket(&*self.sink, Record::PacketRefund((*record).clone())).ok()?;
        wallet.balance = balance_after;
        drop(wallet);
        self.held.fetch_sub(left, Ordering::SeqCst);
        p.granted += left;
        p.closed = true;
        Some((ticket, record))
    }

    pub fn refund_failed(&self, record: &PacketRefundRecord) {
        if let Some(mut p) = self
            .packets
            .get_mut(&key(&record.stream, &record.packet_id))
        {
            p.granted -= record.coins;
            p.closed = false;
            if let Some(mut w) = self.wallets.get_mut(&record.user_id) {
                w.balance -= record.coins;
            }
            self.held.fetch_add(record.coins, Ordering::SeqCst);
        }
    }

    /// Whether a packet with this id exists in this room (a retry, for the daily cap).
    pub fn has_packet(&self, stream: &str, packet_id: &str) -> bool {
        self.packets.contains_key(&key(stream, packet_id))
    }

    /// Coins held in packets in flight.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// A stored packet record (balances are already in the stored wallets): rebuilds the
    /// packets in flight and the coins they hold.
    pub fn restore_packet(&self, record: &Record) -> Result<(), String> {
        match record {
            Record::PacketCreate(c) => {
                let fingerprint = fingerprint(
                    &c.user_id,
                    c.coins,
                    c.amounts.len(),
                    c.random,
                    c.message.as_deref(),
                );
                let slot = Slot::new(
                    fingerprint.clone(),
                    c.balance_after,
                    SlotState::Done { seq: 0 },
                );
                self.packets.insert(
                    key(&c.stream, &c.packet_id),
                    Packet {
                        owner: c.user_id.clone(),
                        fingerprint,
                        amounts: c.amounts.clone(),
                        expires_ms: c.expires_ms,
                        grabs: HashMap::new(),
                        next_index: 0,
                        granted: 0,
                        held: c.held(),
                        closed: false,
                        durable: true,
                        create: slot,
                    },
                );
                self.held.fetch_add(c.held(), Ordering::SeqCst);
            }
            Record::PacketGrab(g) => {
                let mut p = self
                    .packets
                    .get_mut(&key(&g.stream, &g.packet_id))
                    .ok_or("grab of an unknown packet")?;
                if g.index as usize >= p.amounts.len() || p.amounts[g.index as usize] != g.coins {
                    return Err(format!(
                        "grab {} of packet {} does not match its shares",
                        g.index, g.packet_id
                    ));
                }
                p.next_index = p.next_index.max(g.index as usize + 1);
                p.granted += g.coins;
                let slot = Slot::new(String::new(), g.balance_after, SlotState::Done { seq: 0 });
                p.grabs.insert(
                    g.user_id.clone(),
                    Arc::new(Grab {
                        coins: g.coins,
                        slot,
                    }),
                );
                self.held.fetch_sub(g.coins, Ordering::SeqCst);
            }
            Record::PacketRefund(r) => {
                let mut p = self
                    .packets
                    .get_mut(&key(&r.stream, &r.packet_id))
                    .ok_or("refund of an unknown packet")?;
                p.granted += r.coins;
                p.closed = true;
                self.held.fetch_sub(r.coins, Ordering::SeqCst);
            }
            _ => return Err("not a packet record".into()),
        }
        Ok(())
    }

    /// A packet record from the journal tail: its wallet change (checked against
    /// `balance_after`) and the packet state.
    pub(super) fn replay_packet(&self, record: &Record) -> Result<(), String> {
        let (user, delta_in, delta_out) = match record {
            Record::PacketCreate(c) => (&c.user_id, 0, c.coins),
            Record::PacketGrab(g) => (&g.user_id, g.coins, 0),
            Record::PacketRefund(r) => (&r.user_id, r.coins, 0),
            _ => return Err("not a packet record".into()),
        };
        {
            let mut w = self.wallets.entry(user.clone()).or_default();
            let after = w
                .balance
                .checked_add(delta_in)
                .and_then(|b| b.checked_sub(delta_out))
                .ok_or_else(|| format!("packet record would take {user} below zero"))?;
            if after != record.balance_after() {
                return Err(format!(
                    "packet record: balance of {user} would be {after}, journal says {}",
                    record.balance_after()
                ));
            }
            w.balance = after;
        }
        self.restore_packet(record)?;
        if let Record::PacketCreate(c) = record {
            self.gifted.fetch_add(c.host_cut, Ordering::SeqCst);
            if let Some(g) = c.host_gift() {
                self.restore_gift(&g);
                self.gift_durable(&g);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shares_are_fair_and_exact(total in 1u64..1_000_000, shares in 1u32..=PACKET_SHARES_MAX, random: bool, seed: u64) {
            prop_assume!(total >= shares as u64);
            let a = split_shares(total, shares, random, seed);
            prop_assert_eq!(a.len(), shares as usize);
            prop_assert_eq!(a.iter().sum::<u64>(), total);
            prop_assert!(a.iter().all(|x| *x >= 1));
            if !random {
                let (min, max) = (a.iter().min().unwrap(), a.iter().max().unwrap());
                prop_assert!(max - min <= 1);
            }
            // The same seed draws the same shares.
            prop_assert_eq!(split_shares(total, shares, random, seed), a);
        }
    }
}

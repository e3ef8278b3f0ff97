//! One room: seq, history, members, fan-out task, combos and the streamer's thanks queue.

use super::moderation::{Gate, Moderation};
use super::{ConnShared, Out, OutboxSender, Text};
use crate::limits::{
    BATCH_EVENTS_MAX, COMBO_TRACKED_MAX, COMBO_WINDOW_MS, REPLAY_BATCH_EVENTS_MAX,
    ROOM_HISTORY_EVENTS_MAX, THANKS_QUEUE_MAX,
};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Notify};

struct Member {
    tx: OutboxSender,
    shared: Arc<ConnShared>,
    /// The signed-in user, so a ban can close its connections.
    user: Option<String>,
}

/// An un-thanked gift waiting in the streamer's queue.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct QueuedGift {
    pub gift_id: Arc<str>,
    pub from: QueuedUser,
    pub sticker: Arc<str>,
    pub count: u32,
    pub amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub seq: u64,
    pub ts: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct QueuedUser {
    pub id: Arc<str>,
    pub name: Arc<str>,
}

struct Inner {
    /// Last seq assigned.
    seq: u64,
    /// Last seq handed to the members' outboxes; a joiner sees history up to here, and every
    /// later event through its outbox.
    fanned_seq: u64,
    history: VecDeque<(u64, Text)>,
    /// Events (and seq-less frames, seq 0) waiting for the fan-out task.
    pending: VecDeque<(u64, Text)>,
    members: HashMap<u64, Member>,
    next_member: u64,
    last_viewers_sent: usize,
    /// Streaks by (sender, sticker), keyed by the gift record's shared names (no copy per
    /// gift): (count, last gift ms).
    combos: HashMap<(Arc<str>, Arc<str>), (u32, u64)>,
    unthanked: VecDeque<QueuedGift>,
    /// The epoch of the room's seqs: this node's run, or (for a mirror) the owner's.
    epoch: Arc<str>,
}

impl Inner {
    /// Un-thanked gifts beyond `THANKS_QUEUE_MAX` drop the oldest.
    fn queue_gift(&mut self, gift: QueuedGift) {
        if self.unthanked.len() == THANKS_QUEUE_MAX {
            self.unthanked.pop_front();
        }
        self.unthanked.push_back(gift);
    }
}

/// A fan-out round of a room this node owns, for the other nodes (cluster mode).
#[derive(Debug)]
pub struct Forward {
    pub room: String,
    pub epoch: Arc<str>,
    pub live: bool,
    pub events: Vec<(u64, Text)>,
}

/// A mirror saw a seq that does not follow its last one: it must resync from the owner.
#[derive(Debug, PartialEq, Eq)]
pub struct Gap {
    pub last: u64,
}

pub struct Room {
    /// Shared, not copied, by every gift record of the room (`GiftRecord`).
    pub id: Arc<str>,
    inner: Mutex<Inner>,
    wake: Notify,
    viewers: AtomicUsize,
    always_live: AtomicBool,
    streamer_seen: AtomicBool,
    /// Moderators, bans, timeouts, slow mode, blocked words. Its own lock, never held while the
    /// room lock is taken except in `join` (room lock, then this one: one order only).
    moderation: Mutex<Moderation>,
    /// Cluster mode, rooms this node owns: every fan-out round also goes here, in seq order.
    forward: std::sync::OnceLock<mpsc::Sender<Forward>>,
    /// Cluster mode: this room is a mirror of a room another node owns.
    mirror: AtomicBool,
    /// Registered once, when the room is made (`counter!` looks its key up on every call).
    metrics: RoomMetrics,
}

struct RoomMetrics {
    events: metrics::Counter,
    fanout_frames: metrics::Counter,
    fanout_events: metrics::Counter,
}

/// What a joiner gets: its membership (leaves the room on drop) and the resume verdict.
pub struct JoinOutcome {
    pub member: MemberHandle,
    pub resumed: Option<bool>,
}

pub struct MemberHandle {
    room: Arc<Room>,
    id: u64,
}

impl Drop for MemberHandle {
    fn drop(&mut self) {
        let mut inner = self.room.inner.lock();
        inner.members.remove(&self.id);
        self.room
            .viewers
            .store(inner.members.len(), Ordering::Relaxed);
    }
}

impl Room {
    pub(super) fn spawn(id: &str, epoch: &str, tick: std::time::Duration) -> Arc<Room> {
        let room = Arc::new(Room {
            id: Arc::from(id),
            inner: Mutex::new(Inner {
                seq: 0,
                fanned_seq: 0,
                history: VecDeque::with_capacity(64),
                pending: VecDeque::new(),
                members: HashMap::new(),
                next_member: 0,
                last_viewers_sent: 0,
                combos: HashMap::new(),
                unthanked: VecDeque::new(),
                epoch: Arc::from(epoch),
            }),
            wake: Notify::new(),
            viewers: AtomicUsize::new(0),
            always_live: AtomicBool::new(false),
            streamer_seen: AtomicBool::new(false),
            moderation: Mutex::new(Moderation::default()),
            forward: std::sync::OnceLock::new(),
            mirror: AtomicBool::new(false),
            metrics: RoomMetrics {
                events: metrics::counter!("giftcast_room_events_total"),
                fanout_frames: metrics::counter!("giftcast_fanout_frames_total"),
                fanout_events: metrics::counter!("giftcast_fanout_events_total"),
            },
        });
        tokio::spawn(room.clone().fan_out(tick));
        room
    }

    pub(super) fn set_always_live(&self) {
        self.always_live.store(true, Ordering::Relaxed);
    }

    /// The streamer connected to its room (at least once since the start): gifts are taken.
    pub fn mark_streamer_seen(&self) {
        if !self.streamer_seen.swap(true, Ordering::Relaxed) {
            if let Some(f) = self.forward.get() {
                let epoch = self.inner.lock().epoch.clone();
                let _ = f.try_send(Forward {
                    room: self.id.to_string(),
                    epoch,
                    live: true,
                    events: Vec::new(),
                });
            }
        }
    }

    /// Cluster mode: this node owns the room; its rounds go to `tx` for the other nodes.
    pub fn set_forward(&self, tx: mpsc::Sender<Forward>) {
        let _ = self.forward.set(tx);
    }

    pub fn is_mirror(&self) -> bool {
        self.mirror.load(Ordering::Relaxed)
    }

    pub fn epoch(&self) -> Arc<str> {
        self.inner.lock().epoch.clone()
    }

    /// History after `since` (all of it when `None`): (seq, event) pairs, the last seq, and
    /// whether the history reaches back to `since`.
    pub fn history_since(&self, since: Option<u64>) -> (Vec<(u64, Text)>, u64, bool) {
        let inner = self.inner.lock();
        let visible = inner.fanned_seq;
        let from = since.unwrap_or(0);
        let oldest = inner
            .history
            .front()
            .map(|(s, _)| *s)
            .unwrap_or(visible + 1);
        let complete = from <= visible && from + 1 >= oldest;
        let events = inner
            .history
            .iter()
            .filter(|(s, _)| *s > from && *s <= visible)
            .cloned()
            .collect();
        (events, visible, complete)
    }

    /// Cluster mode: makes this room a mirror of the owner's, starting from its history.
    /// Local members of an earlier epoch are told they lagged (they rejoin and resync).
    pub fn install_mirror(
        &self,
        epoch: &str,
        live: bool,
        seq: u64,
        events: Vec<(u64, Text)>,
        lost_events: bool,
    ) {
        self.mirror.store(true, Ordering::Relaxed);
        self.streamer_seen.store(live, Ordering::Relaxed);
        let mut inner = self.inner.lock();
        if &*inner.epoch != epoch || lost_events {
            inner.epoch = Arc::from(epoch);
            for m in inner.members.values() {
                m.shared.mark_lagged();
                // The outbox may be empty: wake the writer (if it is full, it wakes anyway).
                let _ = m.tx.try_send(Out::Wake);
            }
            inner.members.clear();
            self.viewers.store(0, Ordering::Relaxed);
        }
        inner.history.clear();
        for e in events.into_iter().rev().take(ROOM_HISTORY_EVENTS_MAX).rev() {
            inner.history.push_back(e);
        }
        inner.seq = seq;
        inner.fanned_seq = seq;
        inner.pending.clear();
    }

    /// Cluster mode: events the owner stamped, in order. A seq that does not follow is a gap.
    pub fn apply_remote(
        &self,
        epoch: &str,
        live: bool,
        events: Vec<(u64, Text)>,
    ) -> Result<(), Gap> {
        self.streamer_seen.store(live, Ordering::Relaxed);
        let mut inner = self.inner.lock();
        if &*inner.epoch != epoch {
            return Err(Gap { last: inner.seq });
        }
        let mut wake = false;
        for (seq, text) in events {
            if seq <= inner.seq {
                continue;
            }
            if seq != inner.seq + 1 {
                return Err(Gap { last: inner.seq });
            }
            inner.seq = seq;
            if inner.history.len() == ROOM_HISTORY_EVENTS_MAX {
                inner.history.pop_front();
            }
            inner.history.push_back((seq, text.clone()));
            wake |= inner.pending.is_empty();
            inner.pending.push_back((seq, text));
        }
        drop(inner);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    pub fn is_live(&self) -> bool {
        self.always_live.load(Ordering::Relaxed) || self.streamer_seen.load(Ordering::Relaxed)
    }

    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::Relaxed)
    }

    /// The last seq handed to the members (later ones are still waiting for the fan-out).
    #[allow(clippy::misnamed_getters)]
    pub fn seq(&self) -> u64 {
        self.inner.lock().fanned_seq
    }

    /// The room's moderation state (see `moderation.rs`). Do not hold it across other locks.
    pub fn moderation(&self) -> parking_lot::MutexGuard<'_, Moderation> {
        self.moderation.lock()
    }

    /// Adds a member. `joined` builds the `joined` frame from (seq, viewers, resumed); it is
    /// queued first, then the replay of history after `since`, then live events: no gap, no
    /// duplicate, because all three happen under the room lock. A banned `user` is refused
    /// (checked under the room lock, so a ban racing this join either refuses it or closes it).
    pub fn join(
        self: &Arc<Self>,
        tx: &OutboxSender,
        shared: Arc<ConnShared>,
        user: Option<&str>,
        since: Option<u64>,
        joined: impl FnOnce(u64, usize, Option<bool>, &str) -> String,
    ) -> Result<JoinOutcome, Gate> {
        let mut inner = self.inner.lock();
        if user.is_some_and(|u| self.moderation.lock().is_banned(u)) {
            return Err(Gate::Banned);
        }
        let visible = inner.fanned_seq;
        let oldest = inner
            .history
            .front()
            .map(|(s, _)| *s)
            .unwrap_or(visible + 1);
        let resumed = since.map(|s| s <= visible && s + 1 >= oldest);
        let viewers = inner.members.len() + 1;
        let text = joined(visible, viewers, resumed, &inner.epoch);
        // The outbox is new and empty, and OUTBOX_FRAMES_MAX exceeds the replay's frames.
        let _ = tx.try_send(Out::Frame {
            seq: 0,
            text: text.into(),
        });
        if resumed == Some(true) {
            let from = since.unwrap_or(0);
            let events: Vec<&(u64, Text)> = inner
                .history
                .iter()
                .filter(|(s, _)| *s > from && *s <= visible)
                .collect();
            for chunk in events.chunks(REPLAY_BATCH_EVENTS_MAX) {
                let last = chunk.last().map(|(s, _)| *s).unwrap_or(0);
                let text = if chunk.len() == 1 {
                    chunk[0].1.clone()
                } else {
                    batch(chunk.iter().map(|(_, t)| t))
                };
                let _ = tx.try_send(Out::Frame { seq: last, text });
            }
        }
        let id = inner.next_member;
        inner.next_member += 1;
        inner.members.insert(
            id,
            Member {
                tx: tx.clone(),
                shared,
                user: user.map(str::to_string),
            },
        );
        self.viewers.store(inner.members.len(), Ordering::Relaxed);
        Ok(JoinOutcome {
            member: MemberHandle {
                room: self.clone(),
                id,
            },
            resumed,
        })
    }

    /// Removes every connection of `user_id` from the room: each gets `frame` (an error) and
    /// then a close with `code`. Returns how many were closed.
    pub fn kick_user(&self, user_id: &str, frame: &str, code: u16, reason: &'static str) -> usize {
        let frame: Text = frame.to_string().into();
        let mut inner = self.inner.lock();
        let mut kicked = 0;
        inner.members.retain(|_, m| {
            if m.user.as_deref() != Some(user_id) {
                return true;
            }
            kicked += 1;
            let sent = m.tx.try_send(Out::Frame {
                seq: 0,
                text: frame.clone(),
            });
            if sent.is_err() || m.tx.try_send(Out::Close { code, reason }).is_err() {
                // A full outbox: the writer cuts it off as lagging instead.
                m.shared.mark_lagged();
            }
            false
        });
        self.viewers.store(inner.members.len(), Ordering::Relaxed);
        kicked
    }

    /// The author's user id of chat event `seq`, while it is in history; `None` when the seq is
    /// not in history or is not a chat.
    pub fn chat_author(&self, seq: u64) -> Option<String> {
        let text = {
            let inner = self.inner.lock();
            let (_, text) = inner.history.iter().find(|(s, _)| *s == seq)?;
            text.clone()
        };
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        if v["type"] != "chat" {
            return None;
        }
        v["from"]["id"].as_str().map(str::to_string)
    }

    /// Stamps the next seq, builds the event with it, keeps it in history and queues it for
    /// fan-out. Returns the seq.
    pub fn publish(&self, build: impl FnOnce(u64) -> String) -> u64 {
        self.publish_and(build, |_, _| {})
    }

    /// A gift's shout-out, with the gift put in the thanks queue (its `seq` set to the
    /// shout-out's) under the same lock: no member (the streamer first) can be sent the
    /// shout-out before its gift can be thanked. (Queued after the lock was let go, a streamer's
    /// thanks sent the moment the shout-out arrived could be refused `not_found`: seen 35 times
    /// in 90,000 thanks under load.) The entry is built by the caller, outside the lock.
    pub fn publish_gift(&self, build: impl FnOnce(u64) -> String, mut gift: QueuedGift) -> u64 {
        self.publish_and(build, |inner, seq| {
            gift.seq = seq;
            inner.queue_gift(gift);
        })
    }

    /// Stamps the next seq, keeps the event in the history, hands it to the fan-out task, and
    /// runs `and` before the lock is let go (so before any member can be sent the event).
    fn publish_and(
        &self,
        build: impl FnOnce(u64) -> String,
        and: impl FnOnce(&mut Inner, u64),
    ) -> u64 {
        let mut inner = self.inner.lock();
        inner.seq += 1;
        let seq = inner.seq;
        let text: Text = build(seq).into();
        if inner.history.len() == ROOM_HISTORY_EVENTS_MAX {
            inner.history.pop_front();
        }
        inner.history.push_back((seq, text.clone()));
        let wake = inner.pending.is_empty();
        inner.pending.push_back((seq, text));
        and(&mut inner, seq);
        drop(inner);
        if wake {
            self.wake.notify_one();
        }
        self.metrics.events.increment(1);
        seq
    }

    pub(super) fn publish_viewers_if_changed(&self) {
        let mut inner = self.inner.lock();
        let count = inner.members.len();
        if count == inner.last_viewers_sent {
            return;
        }
        inner.last_viewers_sent = count;
        let wake = inner.pending.is_empty();
        inner
            .pending
            .push_back((0, crate::protocol::viewers_frame(count).into()));
        drop(inner);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The fan-out task: each round takes what was queued since the last one.
    async fn fan_out(self: Arc<Self>, tick: std::time::Duration) {
        let mut taken: Vec<(u64, Text)> = Vec::with_capacity(BATCH_EVENTS_MAX);
        let mut last_round: Option<tokio::time::Instant> = None;
        loop {
            self.wake.notified().await;
            loop {
                // At most one round per tick: an event after a quiet spell goes out at once, a
                // busy room's events gather into one batch frame per tick.
                if let Some(next) = last_round.map(|t| t + tick) {
                    if tokio::time::Instant::now() < next {
                        tokio::time::sleep_until(next).await;
                    }
                }
                let mut inner = self.inner.lock();
                if inner.pending.is_empty() {
                    break;
                }
                last_round = Some(tokio::time::Instant::now());
                let n = inner.pending.len().min(BATCH_EVENTS_MAX);
                taken.extend(inner.pending.drain(..n));
                let last_seq = taken.iter().map(|(s, _)| *s).max().unwrap_or(0);
                let text = if taken.len() == 1 {
                    taken[0].1.clone()
                } else {
                    batch(taken.iter().map(|(_, t)| t))
                };
                if last_seq > 0 {
                    inner.fanned_seq = last_seq;
                }
                let mut delivered = 0u64;
                inner.members.retain(|_, m| {
                    match m.tx.try_send(Out::Frame {
                        seq: last_seq,
                        text: text.clone(),
                    }) {
                        Ok(()) => {
                            delivered += 1;
                            true
                        }
                        Err(TrySendError::Full(_)) => {
                            m.shared.mark_lagged();
                            false
                        }
                        Err(TrySendError::Closed(_)) => false,
                    }
                });
                self.viewers.store(inner.members.len(), Ordering::Relaxed);
                let epoch = inner.epoch.clone();
                drop(inner);
                if let Some(f) = self.forward.get() {
                    let events: Vec<(u64, Text)> =
                        taken.iter().filter(|(s, _)| *s > 0).cloned().collect();
                    if !events.is_empty() {
                        let live = self.is_live();
                        // A full queue drops the round: the other nodes see a gap and resync.
                        if f.try_send(Forward {
                            room: self.id.to_string(),
                            epoch,
                            live,
                            events,
                        })
                        .is_err()
                        {
                            metrics::counter!("giftcast_cluster_forward_dropped_total")
                                .increment(1);
                        }
                    }
                }
                self.metrics.fanout_frames.increment(delivered);
                self.metrics
                    .fanout_events
                    .increment(delivered * taken.len() as u64);
                taken.clear();
            }
        }
    }

    /// The streak of this sender and sticker, counting this gift.
    pub fn combo(&self, user_id: &Arc<str>, sticker: &Arc<str>, now_ms: u64) -> u32 {
        let mut inner = self.inner.lock();
        if inner.combos.len() >= COMBO_TRACKED_MAX {
            inner
                .combos
                .retain(|_, (_, last)| now_ms.saturating_sub(*last) <= COMBO_WINDOW_MS);
            if inner.combos.len() >= COMBO_TRACKED_MAX {
                inner.combos.clear();
            }
        }
        let e = inner
            .combos
            .entry((user_id.clone(), sticker.clone()))
            .or_insert((0, 0));
        if e.0 > 0 && now_ms.saturating_sub(e.1) <= COMBO_WINDOW_MS {
            e.0 += 1;
        } else {
            e.0 = 1;
        }
        e.1 = now_ms;
        e.0
    }

    /// Removes a gift from the thanks queue; `None` when it is not there.
    pub fn take_queued(&self, gift_id: &str) -> Option<QueuedGift> {
        let mut inner = self.inner.lock();
        let pos = inner
            .unthanked
            .iter()
            .position(|g| *g.gift_id == *gift_id)?;
        inner.unthanked.remove(pos)
    }

    pub fn queued(&self) -> Vec<QueuedGift> {
        self.inner.lock().unthanked.iter().cloned().collect()
    }
}

/// `{"type":"batch","events":[e1,e2,…]}` from already serialised events.
fn batch<'a>(events: impl Iterator<Item = &'a Text> + Clone) -> Text {
    let len: usize = events.clone().map(|e| e.len() + 1).sum();
    let mut s = Vec::with_capacity(len + 32);
    s.extend_from_slice(br#"{"type":"batch","events":["#);
    for (i, e) in events.enumerate() {
        if i > 0 {
            s.push(b',');
        }
        s.extend_from_slice(e);
    }
    s.extend_from_slice(b"]}");
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn gift(n: u64) -> QueuedGift {
        QueuedGift {
            gift_id: format!("g{n}").into(),
            from: QueuedUser {
                id: "u".into(),
                name: "U".into(),
            },
            sticker: "rose".into(),
            count: 1,
            amount: 1,
            message: None,
            seq: 0,
            ts: n,
        }
    }

    /// Whoever can see a gift's shout-out (it is in the room's history and on its way to the
    /// members) can thank it: an observer taking the room lock as often as it can, while gifts
    /// are published, never finds the newest shout-out without its gift queued. With the gift
    /// queued after `publish` let the lock go (the code before 2026-12-06), it does, within a
    /// few thousand gifts. Gifts go on until the observer has looked `LOOKS` times (and at least
    /// `GIFTS` were published), so a busy machine that starves the observer makes the test
    /// longer, not weaker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shout_out_is_never_seen_before_its_gift_can_be_thanked() {
        const GIFTS: u64 = 20_000;
        const LOOKS: u64 = 20_000;
        let room = Room::spawn("s", "e", std::time::Duration::from_millis(8));
        let (stop, looks) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let observer = std::thread::spawn({
            let (room, stop, looks) = (room.clone(), stop.clone(), looks.clone());
            move || {
                let mut gaps = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let inner = room.inner.lock();
                    let shown = inner.history.back().map(|(seq, _)| *seq);
                    let queued = inner.unthanked.back().map(|g| g.seq);
                    if shown.is_some() && shown != queued {
                        gaps.push((shown, queued));
                    }
                    drop(inner);
                    looks.fetch_add(1, Ordering::Relaxed);
                }
                gaps
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut n = 0;
        while n < GIFTS || looks.load(Ordering::Relaxed) < LOOKS {
            assert!(
                std::time::Instant::now() < deadline,
                "the observer looked too rarely"
            );
            room.publish_gift(|seq| format!("{{\"seq\":{seq}}}"), gift(n));
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let gaps = observer.join().unwrap();
        assert!(
            gaps.is_empty(),
            "{} gaps, e.g. {:?}",
            gaps.len(),
            &gaps[..gaps.len().min(3)]
        );
        let inner = room.inner.lock();
        assert_eq!(inner.unthanked.len(), THANKS_QUEUE_MAX);
        assert_eq!(
            &*inner.unthanked.back().unwrap().gift_id,
            format!("g{}", n - 1)
        );
    }
}

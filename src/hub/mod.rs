//! Rooms: members, outboxes, history, seq and fan-out. Never touches money.
//!
//! A room event is serialised once into a shared `Text`, stamped with the room's `seq`,
//! kept in a bounded history ring for `since` resume, and queued for the room's fan-out task.
//! The fan-out task takes everything queued since its last round and hands it to every member's
//! bounded outbox with `try_send`: one event as itself, several as one `batch` frame built once
//! and shared by every member. Under load a round carries many events, so the per-member cost
//! (one queue push, one wake-up, one socket write) is paid per round, not per event.
//!
//! A member whose outbox is full is lagging: it is removed from the room and told so by its own
//! writer; nobody ever waits for it.
//!
//! Architecture invariants: no lock is held across an `.await` (the room lock is a
//! `parking_lot::Mutex`, only taken in synchronous code); every queue is bounded.

mod moderation;
mod outbox;
mod room;

pub use moderation::{Gate, LimitReached, Moderation};
pub use outbox::{outbox, OutboxReceiver, OutboxSender};
pub use room::{Forward, Gap, JoinOutcome, MemberHandle, QueuedGift, QueuedUser, Room};

use crate::limits::{ROOMS_MAX, VIEWERS_INTERVAL_MS};
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A serialised server frame's payload: UTF-8 JSON, built once and shared by every member it
/// goes to (history, outboxes, cluster forwards) by reference count.
pub type Text = bytes::Bytes;

/// What a connection's writer receives.
#[derive(Debug)]
pub enum Out {
    /// A text frame. `seq` is the last room seq it carries (0 for direct frames).
    Frame { seq: u64, text: Text },
    /// Close the connection with this WebSocket close code and reason.
    Close { code: u16, reason: &'static str },
    /// A WebSocket Ping (heartbeat): the peer answers with a Pong.
    Ping,
    /// A WebSocket Pong answering the peer's Ping, with its payload (at most 125 bytes).
    Pong(bytes::Bytes),
    /// Nothing to send: wakes the writer so it looks at `ConnShared::lagged`.
    Wake,
}

/// State a connection's reader, writer and its room share.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Set when the outbox overflowed (or the room dropped the member): the writer delivers
    /// what is queued, tells the client and closes.
    ///
    /// The writer looks at it after every receive, and needs no separate wake-up: a full outbox
    /// holds frames, so the writer's receive returns at once; whoever sets it on a member whose
    /// outbox may be empty also queues `Out::Wake`.
    pub lagged: AtomicBool,
}

impl ConnShared {
    pub fn mark_lagged(&self) {
        if !self.lagged.swap(true, Ordering::SeqCst) {
            metrics::counter!("giftcast_lagged_total").increment(1);
        }
    }
}

pub struct Hub {
    rooms: DashMap<String, Arc<Room>>,
    /// A random id of this server run: seqs of one epoch mean nothing in another.
    epoch: String,
    /// Every room's fan-out tick (`--fanout-tick-ms`).
    tick: Duration,
    /// Cluster mode: where owned rooms forward their rounds, and which rooms this node owns.
    cluster: std::sync::OnceLock<(tokio::sync::mpsc::Sender<Forward>, OwnsRoom)>,
}

/// Whether this node owns a room (cluster mode).
pub type OwnsRoom = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Debug, PartialEq, Eq)]
pub enum HubError {
    TooManyRooms,
}

impl Hub {
    pub fn new(tick: Duration) -> Arc<Hub> {
        use rand::Rng;
        let epoch: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(12)
            .map(char::from)
            .collect();
        let hub = Arc::new(Hub {
            rooms: DashMap::new(),
            epoch,
            tick,
            cluster: std::sync::OnceLock::new(),
        });
        // The demo stream is always live.
        if let Ok(demo) = hub.room("demo") {
            demo.set_always_live();
        }
        hub
    }

    /// Cluster mode: rooms this node owns (now and later) forward their rounds to `tx`.
    pub fn set_cluster(&self, tx: tokio::sync::mpsc::Sender<Forward>, owns: OwnsRoom) {
        for r in self.rooms.iter() {
            if owns(&r.id) {
                r.set_forward(tx.clone());
            }
        }
        let _ = self.cluster.set((tx, owns));
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The room for `stream`, created on first use (a viewer may wait for a stream to start).
    pub fn room(&self, stream: &str) -> Result<Arc<Room>, HubError> {
        if let Some(r) = self.rooms.get(stream) {
            return Ok(r.clone());
        }
        if self.rooms.len() >= ROOMS_MAX {
            return Err(HubError::TooManyRooms);
        }
        let room = self
            .rooms
            .entry(stream.to_string())
            .or_insert_with(|| {
                let room = Room::spawn(stream, &self.epoch, self.tick);
                if let Some((tx, owns)) = self.cluster.get() {
                    if owns(stream) {
                        room.set_forward(tx.clone());
                    }
                }
                room
            })
            .clone();
        metrics::gauge!("giftcast_rooms").set(self.rooms.len() as f64);
        Ok(room)
    }

    pub fn get(&self, stream: &str) -> Option<Arc<Room>> {
        self.rooms.get(stream).map(|r| r.clone())
    }

    /// Every room tells its members the viewer count when it changed; runs until `stop`.
    pub async fn run_viewer_counts(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(VIEWERS_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let rooms: Vec<Arc<Room>> = self.rooms.iter().map(|r| r.clone()).collect();
            for room in rooms {
                room.publish_viewers_if_changed();
            }
        }
    }
}

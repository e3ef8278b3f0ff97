//! Every limit of giftcast, each with its reason. Limits that an operator tunes are flags in
//! `config.rs`; these are the ones fixed by the protocol or by memory arithmetic.

/// Largest WebSocket message or frame a client may send (PROTOCOL: 16 KiB). A client frame is
/// one small JSON object; anything bigger is abuse and closes the socket with 1009.
pub const FRAME_BYTES_MAX: usize = 16 * 1024;
// The WebSocket I/O itself (src/http/ws/wire.rs) keeps no per-connection buffers: a read goes
// into a buffer on the thread's stack (`READ_CHUNK_BYTES`, at least `FRAME_BYTES_MAX`) and only
// an incomplete frame is kept; frames are written from the outbox's shared payloads. A slow
// consumer therefore holds at most `OUTBOX_FRAMES_MAX` references to shared frames, plus what
// its kernel socket buffer took, and is cut off (`lagged`, 4009) beyond that.

/// The `join` frame must arrive within this time (PROTOCOL: 10 s), else close 4001.
pub const JOIN_TIMEOUT_MS: u64 = 10_000;
/// A client whose socket takes no byte for this long, while frames wait for it, is stalled: the
/// connection is closed so it holds no memory and no task forever.
pub const WRITE_TIMEOUT_MS: u64 = 10_000;
/// Frames a connection's outbox holds before the member counts as lagging. Each entry is a
/// shared `Bytes` (one event or one batch), so the cost is pointers, not copies.
pub const OUTBOX_FRAMES_MAX: usize = 1024;
/// Gifts (red packets and grabs count too) one connection may have waiting for the journal at
/// once; beyond it the next is refused `rate_limited` at once. A client that pipelines gifts
/// gets this much concurrency; a flood cannot pile up unbounded tasks behind a slow disk.
pub const CONN_GIFTS_IN_FLIGHT_MAX: usize = 64;
/// Events each room keeps for `since` resume.
pub const ROOM_HISTORY_EVENTS_MAX: usize = 1024;
/// Events a room coalesces into one batch frame at most.
pub const BATCH_EVENTS_MAX: usize = 256;
/// A room fans out at most one round per tick (default): an event after a quiet spell goes out at once,
/// a busy room's events gather into one batch frame per tick. Frames (and so writes and
/// wake-ups) per member are then bounded by the tick, not by the event rate.
///
/// 8 ms, measured (docs/benchmarks.md, "Fan-out"): a round costs one socket write per member,
/// and the kernel's loopback send path is ~70% of the hub's CPU; at 1000 members and 1000
/// msgs/s an 8 ms tick takes 2.75x fewer writes than a 2 ms one, ~20% less CPU per delivery,
/// and lower p50 and p99 (less queueing for the cores). Nobody sees 8 ms in a chat; a lone
/// event never waits for it.
/// `--fanout-tick-ms` sets it (a dedicated machine, where the hub does not share its cores with
/// anything, may prefer 2: see the pinned runs in docs/benchmarks.md).
pub const FANOUT_TICK_MS_DEFAULT: u64 = 8;
/// Longest fan-out tick `--fanout-tick-ms` accepts: beyond it back-to-back chat feels late.
pub const FANOUT_TICK_MS_MAX: u64 = 100;
/// Replay of history is sent in batch frames of at most this many events.
pub const REPLAY_BATCH_EVENTS_MAX: usize = 128;
/// Rooms one node keeps; a join that would create one more is refused.
pub const ROOMS_MAX: usize = 100_000;
/// Room id (= streamer user id) and user id length, characters of `[A-Za-z0-9_-]`.
pub const ID_CHARS_MAX: usize = 64;
/// Display name length, characters.
pub const NAME_CHARS_MAX: usize = 32;
/// Chat text length, characters (PROTOCOL: 500).
pub const CHAT_CHARS_MAX: usize = 500;
/// Gift message (public question) length, characters (PROTOCOL: 200).
pub const GIFT_MESSAGE_CHARS_MAX: usize = 200;
/// Thanks text length, characters.
pub const THANKS_CHARS_MAX: usize = 200;
/// `gift_id` length (PROTOCOL: 1–64 of `[A-Za-z0-9_-]`).
pub const GIFT_ID_CHARS_MAX: usize = 64;
/// Stickers per gift (PROTOCOL: 1–99).
pub const GIFT_COUNT_MAX: u32 = 99;
/// Un-thanked gifts a stream's queue keeps; the oldest fall off beyond it.
pub const THANKS_QUEUE_MAX: usize = 500;
/// Combo window: gifts of the same sticker by the same sender within this gap extend a streak.
pub const COMBO_WINDOW_MS: u64 = 10_000;
/// Combo streaks one room tracks; stale ones are evicted beyond it.
pub const COMBO_TRACKED_MAX: usize = 10_000;
/// How often `viewers` counts go out (only when changed).
pub const VIEWERS_INTERVAL_MS: u64 = 2_000;
/// Frames per second one connection may send, sustained, before it counts as flooding (4008).
pub const FLOOD_FRAMES_PER_SEC: u32 = 100;
/// Burst of frames allowed above the sustained flood rate.
pub const FLOOD_BURST_FRAMES: u32 = 200;
/// HTTP request bodies, bytes.
pub const HTTP_BODY_BYTES_MAX: usize = 16 * 1024;
/// HTTP request handling time limit (not WebSockets).
pub const HTTP_TIMEOUT_MS: u64 = 10_000;
/// Listen backlog: the default 128 drops SYNs under connection storms.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Guest tokens' lifetime.
pub const GUEST_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Credit references, characters.
pub const REFERENCE_CHARS_MAX: usize = 128;
/// Gift ids remembered after a restart (at least 24 h as the protocol asks; gifts older than
/// this that are retried after a restart are not recognised).
pub const IDEMPOTENCY_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Default time a stored gift's id stays in its wallet's map (the exact, lock-held answer to a
/// retry); after it the id lives on in the evicted-id filter (see `ledger::idempotency`).
/// Retries come within seconds (a reconnect), so ten minutes covers nearly all of them.
pub const IDEMPOTENCY_RESIDENT_MS_DEFAULT: u64 = 10 * 60 * 1000;
/// Default bound of stored gift ids kept in the wallets' maps (~650 B each with slot, map entry and queue key: ~130 MiB in all);
/// beyond it the oldest stored ones are evicted early. `--idempotency-resident-max`.
pub const IDEMPOTENCY_RESIDENT_MAX_DEFAULT: usize = 200_000;
/// Default budget of the evicted-id filter, all generations together, allocated as ids come
/// (2.5 B an id; ~430M ids across the retention at ~0.1% false positives: ~70 minutes of
/// 100,000 gifts/s). `--idempotency-filter-mib`.
pub const IDEMPOTENCY_FILTER_BYTES_DEFAULT: usize = 1 << 30;
/// Generations of the evicted-id filter: one more than the spans that cover the retention.
pub const IDEMPOTENCY_FILTER_GENERATIONS: usize = 8;
/// A store lookup for a possibly evicted gift id must answer within this, or the gift is
/// refused `unavailable` (nothing debited; the client retries).
pub const IDEMPOTENCY_LOOKUP_TIMEOUT_MS: u64 = 5_000;
/// Store lookups for one gift before it is refused `unavailable`: a lookup's "not found" is
/// used only if the wallet evicted nothing meanwhile, and each try that sees an eviction goes
/// round again.
pub const IDEMPOTENCY_LOOKUP_TRIES_MAX: u32 = 3;
/// How often stored (or old) gift ids are evicted when no gift arrives to do it.
pub const IDEMPOTENCY_SWEEP_MS: u64 = 1_000;
/// Ids one sweep goes through at most, in chunks of `IDEMPOTENCY_SWEEP_CHUNK` with a yield
/// between them: ~100k/s drains a restart's replayed backlog in seconds without hogging a worker.
pub const IDEMPOTENCY_SWEEP_MAX: usize = 100_000;
/// Ids evicted between two yields of the sweep task.
pub const IDEMPOTENCY_SWEEP_CHUNK: usize = 1_024;
/// Time allowed, on SIGTERM, for connections to close and money to become durable and stored.
pub const SHUTDOWN_DRAIN_MS: u64 = 10_000;

// ---- safety: hostile input, half-open sockets, slowloris, moderation, spending ----

/// Nesting depth a client frame may have. Every frame is one object of scalars (depth 1; the
/// `words` array of `blocked_words` is depth 2, and `ping.t` may carry a small structure): deeper
/// nesting only ever attacks the parser's stack and time, and is refused with `bad_frame`.
pub const JSON_DEPTH_MAX: usize = 8;
/// The server sends a WebSocket Ping this often; browsers and WebSocket libraries answer with a
/// Pong on their own.
pub const HEARTBEAT_INTERVAL_MS: u64 = 15_000;
/// A connection from which nothing at all (frame, Pong) arrives for this long is half-open (the
/// peer vanished without a FIN): it is closed with 4011, freeing its slot, task and outbox.
/// Two missed Pings are tolerated.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 45_000;
const _: () = assert!(HEARTBEAT_TIMEOUT_MS >= 2 * HEARTBEAT_INTERVAL_MS);
/// An HTTP/1 request head (request line and headers) must arrive completely within this time,
/// counted from when the server starts waiting for it (also on an idle keep-alive connection):
/// slowloris clients that dribble a header byte at a time are closed.
pub const HTTP_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Largest HTTP request head, bytes; beyond it the answer is 431. Tokens are < 1 KiB; 16 KiB
/// leaves room for cookies while bounding what one connection makes the server buffer.
pub const HTTP_HEADER_BYTES_MAX: usize = 16 * 1024;
/// Moderators a streamer may name per room: a moderation team, not an audience.
pub const ROOM_MODERATORS_MAX: usize = 100;
/// Users banned per room (in memory: ~100 B each, 1 MiB per room at most).
pub const ROOM_BANS_MAX: usize = 10_000;
/// Users timed out at once per room; expired timeouts are evicted first when it is full.
pub const ROOM_TIMEOUTS_MAX: usize = 10_000;
/// Longest timeout, seconds (two weeks, as the big platforms allow).
pub const TIMEOUT_SECS_MAX: u64 = 14 * 24 * 3600;
/// Longest slow-mode interval, seconds.
pub const SLOW_MODE_SECS_MAX: u64 = 3600;
/// Last-chat times a room keeps for slow mode; entries older than the interval are evicted
/// first, and only beyond that is the table cleared (~100 B each: 10 MiB at most per room).
pub const SLOW_MODE_TRACKED_MAX: usize = 100_000;
/// Words in a room's blocked-words list. Matching is a hash lookup per word of the chat.
pub const BLOCKED_WORDS_MAX: usize = 200;
/// Characters of one blocked word.
pub const BLOCKED_WORD_CHARS_MAX: usize = 32;
/// Deleted chat seqs a room remembers (to refuse a second delete): the history's span is enough,
/// because only events still in history can be deleted.
pub const ROOM_DELETED_TRACKED_MAX: usize = ROOM_HISTORY_EVENTS_MAX;
/// A UTC day, the period of `--daily-cap`.
pub const DAY_MS: u64 = 24 * 3600 * 1000;

/// New WebSocket connections one address may open per second, sustained (while
/// `--max-conns-per-ip` is on; `--max-conns-per-ip 0`, for load tests, turns this off too):
/// connection storms from one address cost TLS/JWT/upgrade work for nothing.
pub const CONN_ATTEMPTS_PER_IP_PER_SEC: u32 = 50;
/// Burst of new connections one address may open at once (a page load, a reconnect wave of
/// one household's devices).
pub const CONN_ATTEMPTS_PER_IP_BURST: u32 = 200;

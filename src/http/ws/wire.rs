//! The socket of one WebSocket connection: reading client frames and writing the outbox, on the
//! upgraded `TcpStream` itself, in the connection's one task.
//!
//! Memory is the point. An idle connection holds no read buffer (a read goes into a buffer on
//! the thread's stack, and only an incomplete frame is kept, see `codec::Decoder`) and no write
//! buffer (the frames taken from the outbox are written from their shared payloads with
//! `writev`, each behind a header built on the stack). What a connection holds while idle is
//! its task, its socket registration, its outbox and its room membership.

use super::codec::{self, Decoder, Fault, Message, HEADER_BYTES_MAX};
use crate::hub::{ConnShared, Out, OutboxReceiver};
use crate::protocol;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One read from the socket takes at most this many bytes, into a buffer on the stack (not in
/// the connection's state): every client frame fits (`FRAME_BYTES_MAX`).
const READ_CHUNK_BYTES: usize = 16 * 1024;
const _: () = assert!(READ_CHUNK_BYTES >= crate::limits::FRAME_BYTES_MAX);
/// Reads per wake-up before other connections get their turn; readiness stays set, so the rest
/// is read on the next turn.
const READS_PER_WAKE: usize = 4;
/// Frames one `writev` carries at most (two slices each; Linux takes up to 1024 slices).
const FRAMES_PER_WRITE: usize = 64;
/// Outbox items taken for writing at once.
const TAKE_FRAMES_MAX: usize = 256;
/// Write rounds (take from the outbox, write) one `pump` runs before it yields to the runtime.
const ROUNDS_PER_YIELD: usize = 32;
/// Capacity the in-flight queue may keep once drained; beyond it the memory goes back.
const KEEP_CAPACITY: usize = 8;
/// After the server's close frame, how long the client has to answer with its own (or to go)
/// before the socket is dropped. Reading on meanwhile keeps the kernel from answering unread
/// input with a reset, which could destroy the close frame before the client reads it.
pub const CLOSE_LINGER_MS: u64 = 1_000;

/// Why the writing side ended the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteEnd {
    /// The outbox overflowed or the room dropped the member: tell it `lagged`, then close.
    Lagged,
    /// A close was queued (by the connection or by a moderator's ban).
    Close { code: u16, reason: &'static str },
    /// Nothing could be written for the write timeout: the client is stalled.
    Stalled,
    /// The socket failed.
    Failed,
    /// Every sender of the outbox is gone.
    Gone,
}

/// The writing half: the outbox and the frames taken from it that are not fully written.
pub struct Writer {
    rx: OutboxReceiver,
    shared: Arc<ConnShared>,
    /// Taken from the outbox, not yet wholly in the kernel. The outbox is only drained again
    /// once this is empty, so a client that does not read fills its outbox (its bound) and
    /// counts as lagging.
    in_flight: VecDeque<Out>,
    /// Bytes of the front frame (header included) already written.
    front_written: usize,
    /// Since when writing has been blocked without progress.
    blocked_since: Option<Instant>,
    write_timeout: Duration,
    /// The last room seq taken for writing: where a lagging client resumes.
    last_seq: u64,
}

impl Writer {
    pub fn new(rx: OutboxReceiver, shared: Arc<ConnShared>, write_timeout: Duration) -> Writer {
        Writer {
            rx,
            shared,
            in_flight: VecDeque::new(),
            front_written: 0,
            blocked_since: None,
            write_timeout,
            last_seq: 0,
        }
    }

    /// Writes the outbox to `tcp` until something ends the connection. Cancel-safe: its
    /// progress lives in `self`, so it can be one branch of a `select!` that is polled again.
    pub async fn pump(&mut self, tcp: &TcpStream) -> WriteEnd {
        let mut rounds = 0usize;
        loop {
            // Neither the outbox nor a non-blocking write yields to the runtime: while frames
            // keep coming and the socket keeps taking them, let other tasks run now and then.
            rounds += 1;
            if rounds.is_multiple_of(ROUNDS_PER_YIELD) {
                tokio::task::yield_now().await;
            }
            if self.in_flight.is_empty() {
                if self.shared.lagged.load(Ordering::SeqCst) {
                    return WriteEnd::Lagged;
                }
                if self.in_flight.capacity() > KEEP_CAPACITY {
                    self.in_flight = VecDeque::new();
                }
                if self
                    .rx
                    .recv_many(&mut self.in_flight, TAKE_FRAMES_MAX)
                    .await
                    == 0
                {
                    return WriteEnd::Gone;
                }
                // Note the seqs first: a lagging client resumes after the last one taken.
                let close = self.note_taken();
                // What was queued before the overflow (taken or not) is delivered by `finish`,
                // in order, before `lagged`.
                if self.shared.lagged.load(Ordering::SeqCst) {
                    return WriteEnd::Lagged;
                }
                if let Some(end) = close {
                    return end;
                }
            }
            match self.write(tcp) {
                Ok(true) => {}
                Ok(false) => {
                    let since = *self.blocked_since.get_or_insert_with(Instant::now);
                    tokio::select! {
                        ready = tcp.writable() => if ready.is_err() { return WriteEnd::Failed },
                        _ = tokio::time::sleep_until(since + self.write_timeout) => {
                            metrics::counter!("giftcast_write_failures_total").increment(1);
                            return WriteEnd::Stalled;
                        }
                    }
                }
                Err(_) => {
                    metrics::counter!("giftcast_write_failures_total").increment(1);
                    return WriteEnd::Failed;
                }
            }
        }
    }

    /// Looks at what was just taken: notes the last seq, drops wake-ups, and stops at a close
    /// (which ends the connection once everything before it is written).
    fn note_taken(&mut self) -> Option<WriteEnd> {
        let mut i = 0;
        while i < self.in_flight.len() {
            match &self.in_flight[i] {
                Out::Frame { seq, .. } => {
                    if *seq > 0 {
                        self.last_seq = *seq;
                    }
                }
                Out::Wake => {
                    self.in_flight.remove(i);
                    continue;
                }
                Out::Close { code, reason } => {
                    let end = WriteEnd::Close {
                        code: *code,
                        reason,
                    };
                    self.in_flight.truncate(i);
                    return Some(end);
                }
                Out::Ping | Out::Pong(_) => {}
            }
            i += 1;
        }
        None
    }

    /// Writes as much of `in_flight` as the socket takes now. `Ok(true)`: all of it.
    fn write(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        while !self.in_flight.is_empty() {
            let count = self.in_flight.len().min(FRAMES_PER_WRITE);
            let mut heads = [[0u8; HEADER_BYTES_MAX + 2]; FRAMES_PER_WRITE];
            let mut head_lens = [0usize; FRAMES_PER_WRITE];
            for i in 0..count {
                head_lens[i] = head(&self.in_flight[i], &mut heads[i]);
            }
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let mut used = 0;
            let mut skip = self.front_written;
            for i in 0..count {
                for part in [&heads[i][..head_lens[i]], body(&self.in_flight[i])] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[used] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    used += 1;
                }
            }
            let mut written = match tcp.try_write_vectored(&slices[..used]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.blocked_since = None;
            // Pop what is wholly written; remember how far into the next frame we are.
            for len in head_lens.iter().take(count) {
                let frame_len = len + body(&self.in_flight[0]).len();
                let left = frame_len - self.front_written;
                if written < left {
                    self.front_written += written;
                    break;
                }
                written -= left;
                self.front_written = 0;
                self.in_flight.pop_front();
            }
        }
        Ok(true)
    }

    /// The last writes: after `pump` ended with `end`, or (`None`) after the reading side
    /// ended the connection, having queued its close. Delivers what should still reach the
    /// client within the write timeout, then the close frame, then lingers for the client's
    /// close. A stalled or failed socket is simply dropped.
    pub async fn finish(mut self, mut tcp: TcpStream, end: Option<WriteEnd>) {
        let end = match end {
            Some(end) => end,
            None => {
                // Everything queued, through the first close.
                while let Ok(out) = self.rx.try_recv() {
                    self.in_flight.push_back(out);
                }
                self.note_taken().unwrap_or(WriteEnd::Gone)
            }
        };
        let close = match end {
            WriteEnd::Stalled | WriteEnd::Failed => return,
            WriteEnd::Close { code, reason } => Some((code, reason)),
            WriteEnd::Gone => None,
            WriteEnd::Lagged => {
                // Every frame queued before the overflow, in order, then where to resume.
                while let Ok(out) = self.rx.try_recv() {
                    self.in_flight.push_back(out);
                }
                self.in_flight.retain(|o| matches!(o, Out::Frame { .. }));
                self.note_taken();
                self.in_flight.push_back(Out::Frame {
                    seq: 0,
                    text: protocol::lagged_frame(self.last_seq).into(),
                });
                Some((4009, "lagged"))
            }
        };
        if let Some((code, reason)) = close {
            self.in_flight.push_back(Out::Close { code, reason });
        }
        let deadline = Instant::now() + self.write_timeout;
        let written = tokio::time::timeout_at(deadline, async {
            loop {
                match self.write(&tcp) {
                    Ok(true) => return true,
                    Ok(false) => {
                        if tcp.writable().await.is_err() {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
        })
        .await;
        if !matches!(written, Ok(true)) {
            return;
        }
        let _ = tcp.shutdown().await;
        linger(&tcp).await;
    }
}

/// Reads and discards until the client closes or `CLOSE_LINGER_MS` pass.
async fn linger(tcp: &TcpStream) {
    let _ = tokio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), async {
        while tcp.readable().await.is_ok() {
            if !discard(tcp) {
                return;
            }
        }
    })
    .await;
}

/// Reads and drops what the socket holds; `false` once the client has closed (or failed).
fn discard(tcp: &TcpStream) -> bool {
    let mut scratch = [0u8; 1024];
    loop {
        match tcp.try_read(&mut scratch) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// The frame header (and, for a close, its code) of `out`; returns its length.
fn head(out: &Out, buf: &mut [u8; HEADER_BYTES_MAX + 2]) -> usize {
    let header: &mut [u8; HEADER_BYTES_MAX] = (&mut buf[..HEADER_BYTES_MAX])
        .try_into()
        .expect("the head buffer holds a header");
    match out {
        Out::Frame { text, .. } => codec::server_header(codec::OP_TEXT, text.len(), header),
        Out::Ping => codec::server_header(codec::OP_PING, 0, header),
        Out::Pong(payload) => codec::server_header(codec::OP_PONG, payload.len(), header),
        Out::Close { code, reason } => {
            debug_assert!(reason.len() <= codec::CONTROL_PAYLOAD_BYTES_MAX - 2);
            let n = codec::server_header(codec::OP_CLOSE, 2 + reason.len(), header);
            buf[n..n + 2].copy_from_slice(&code.to_be_bytes());
            n + 2
        }
        Out::Wake => unreachable!("wake-ups are dropped when taken (`note_taken`)"),
    }
}

/// The payload bytes of `out` that follow its head.
fn body(out: &Out) -> &[u8] {
    match out {
        Out::Frame { text, .. } => text,
        Out::Pong(payload) => payload,
        Out::Close { reason, .. } => reason.as_bytes(),
        Out::Ping | Out::Wake => &[],
    }
}

/// What a read brought.
pub enum ReadEnd {
    /// The client closed its side (or reset it).
    Eof,
    /// A framing fault: close with its code.
    Fault(Fault),
}

/// Reads what the socket has (up to `READS_PER_WAKE` reads) and decodes it into `out`.
/// `Ok(())` with `out` empty means nothing complete yet.
pub fn read(tcp: &TcpStream, decoder: &mut Decoder, out: &mut Vec<Message>) -> Result<(), ReadEnd> {
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    for _ in 0..READS_PER_WAKE {
        match tcp.try_read(&mut chunk) {
            Ok(0) => return Err(ReadEnd::Eof),
            Ok(n) => decoder.feed(&mut chunk[..n], out).map_err(ReadEnd::Fault)?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadEnd::Eof),
        }
        if !out.is_empty() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::outbox;
    use bytes::Bytes;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    /// A connected pair over loopback with small kernel buffers on both sides, so that writes
    /// block and are cut at arbitrary byte offsets.
    async fn small_buffered_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_send_buffer_size(4096).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = listener.listen(1).unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let (client, server) = tokio::join!(client.connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    /// Frames of every header size, far more than one `writev` takes, written to a client that
    /// reads slowly through small buffers: tungstenite, reading as a client, gets every frame
    /// whole and in order, then the pong, the ping and the close.
    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_through_partial_writes() {
        let (client, server) = small_buffered_pair().await;
        let (tx, rx) = outbox(10_000);
        let shared = Arc::new(ConnShared::default());
        let mut writer = Writer::new(rx, shared, Duration::from_secs(30));
        let sizes: Vec<usize> = (0..700)
            .map(|i| match i % 7 {
                0 => 0,
                1 => 125,
                2 => 126,
                3 => 65_535,
                4 => 65_536 + i,
                _ => (i * 37) % 3000,
            })
            .collect();
        for (i, n) in sizes.iter().enumerate() {
            let text = format!("{i:06}{}", "x".repeat(n.saturating_sub(6)));
            tx.try_send(Out::Frame {
                seq: i as u64 + 1,
                text: text.into(),
            })
            .unwrap();
        }
        tx.try_send(Out::Wake).unwrap();
        tx.try_send(Out::Pong(Bytes::from_static(b"pp"))).unwrap();
        tx.try_send(Out::Ping).unwrap();
        tx.try_send(Out::Close {
            code: 4009,
            reason: "done",
        })
        .unwrap();
        let server_side = tokio::spawn(async move {
            let end = writer.pump(&server).await;
            assert_eq!(
                end,
                WriteEnd::Close {
                    code: 4009,
                    reason: "done"
                }
            );
            writer.finish(server, Some(end)).await;
        });
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for (i, n) in sizes.iter().enumerate() {
            // Slow: let the server's writes block and resume.
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            match ws.next().await.unwrap().unwrap() {
                WsMessage::Text(t) => {
                    assert_eq!(t.len(), (*n).max(6), "frame {i}");
                    assert_eq!(&t[..6], format!("{i:06}"), "frame {i} in order");
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            WsMessage::Pong(Bytes::from_static(b"pp"))
        );
        assert!(matches!(ws.next().await.unwrap().unwrap(), WsMessage::Ping(p) if p.is_empty()));
        match ws.next().await.unwrap().unwrap() {
            WsMessage::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 4009);
                assert_eq!(f.reason.as_str(), "done");
            }
            other => panic!("{other:?}"),
        }
        server_side.await.unwrap();
    }

    /// The outbox overflows while the writer is taking frames: what it took is delivered, then
    /// `lagged` names the last of them as the resume point, then close 4009.
    #[tokio::test]
    async fn lagged_names_the_last_frame_taken() {
        let (client, server) = small_buffered_pair().await;
        let (tx, rx) = outbox(100);
        let shared = Arc::new(ConnShared::default());
        let mut writer = Writer::new(rx, shared.clone(), Duration::from_secs(30));
        let server_side = tokio::spawn(async move {
            let end = writer.pump(&server).await;
            assert_eq!(end, WriteEnd::Lagged);
            writer.finish(server, Some(end)).await;
        });
        // Let the writer wait on the empty outbox; then the overflow and the frames arrive at
        // once (this runtime has one thread: the writer runs only when this task waits).
        tokio::task::yield_now().await;
        shared.mark_lagged();
        for seq in 1..=3 {
            tx.try_send(Out::Frame {
                seq,
                text: format!("{{\"seq\":{seq}}}").into(),
            })
            .unwrap();
        }
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for seq in 1..=3 {
            let m = ws.next().await.unwrap().unwrap();
            assert_eq!(m, WsMessage::text(format!("{{\"seq\":{seq}}}")));
        }
        let lagged = ws.next().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(lagged.to_text().unwrap()).unwrap();
        assert_eq!(v["code"], "lagged");
        assert_eq!(v["last_seq"], 3);
        match ws.next().await.unwrap().unwrap() {
            WsMessage::Close(Some(f)) => assert_eq!(u16::from(f.code), 4009),
            other => panic!("{other:?}"),
        }
        server_side.await.unwrap();
    }

    /// `CLOSE_LINGER_MS` at its edge: after its close frame the server waits for the client to
    /// go, but for a client that never does, no longer than the linger; a client that closes at
    /// once is let go of at once.
    #[tokio::test]
    async fn the_close_linger_is_bounded_and_ends_when_the_client_goes() {
        for client_closes in [false, true] {
            let (client, server) = small_buffered_pair().await;
            let (tx, rx) = outbox(10);
            let writer = Writer::new(rx, Arc::new(ConnShared::default()), Duration::from_secs(30));
            drop(tx);
            let started = Instant::now();
            let finishing = tokio::spawn(writer.finish(
                server,
                Some(WriteEnd::Close {
                    code: 1001,
                    reason: "bye",
                }),
            ));
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None)
                    .await;
            assert!(matches!(
                ws.next().await.unwrap().unwrap(),
                WsMessage::Close(Some(_))
            ));
            if client_closes {
                drop(ws);
                finishing.await.unwrap();
                assert!(started.elapsed() < Duration::from_millis(CLOSE_LINGER_MS));
            } else {
                tokio::time::timeout(Duration::from_secs(10), finishing)
                    .await
                    .expect("the linger ends")
                    .unwrap();
                assert!(started.elapsed() >= Duration::from_millis(CLOSE_LINGER_MS));
                drop(ws);
            }
        }
    }

    /// A client that reads nothing: the writer gives up after the write timeout, not before.
    #[tokio::test]
    async fn a_client_that_takes_nothing_is_stalled_after_the_write_timeout() {
        let (_client, server) = small_buffered_pair().await;
        let (tx, rx) = outbox(10_000);
        let mut writer = Writer::new(
            rx,
            Arc::new(ConnShared::default()),
            Duration::from_millis(200),
        );
        for _ in 0..200 {
            tx.try_send(Out::Frame {
                seq: 0,
                text: Bytes::from(vec![b'z'; 10_000]),
            })
            .unwrap();
        }
        let started = Instant::now();
        assert_eq!(writer.pump(&server).await, WriteEnd::Stalled);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// The outbox is drained again only once what was taken is written: a client that does not
    /// read leaves its frames in the outbox, where its bound applies.
    #[tokio::test]
    async fn a_blocked_writer_leaves_the_backlog_in_the_outbox() {
        let (_client, server) = small_buffered_pair().await;
        let (tx, rx) = outbox(300);
        let mut writer = Writer::new(rx, Arc::new(ConnShared::default()), Duration::from_secs(30));
        for _ in 0..TAKE_FRAMES_MAX {
            tx.try_send(Out::Frame {
                seq: 0,
                text: Bytes::from(vec![b'z'; 10_000]),
            })
            .unwrap();
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), writer.pump(&server)).await;
        assert!(!writer.in_flight.is_empty(), "the socket is full");
        let mut queued = 0;
        while tx
            .try_send(Out::Frame {
                seq: 0,
                text: Bytes::from_static(b"{}"),
            })
            .is_ok()
        {
            queued += 1;
        }
        assert_eq!(queued, 300, "the whole bound is still free for new frames");
        let _ = tokio::time::timeout(Duration::from_millis(100), writer.pump(&server)).await;
        assert!(tx
            .try_send(Out::Frame {
                seq: 0,
                text: Bytes::from_static(b"{}"),
            })
            .is_err());
    }
}

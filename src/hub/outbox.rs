//! A connection's outbox: a bounded single-consumer queue of `Out`, with the subset of the
//! `tokio::sync::mpsc` API the hub and the connection use (`try_send`, `recv_many`,
//! `try_recv`, closed when every sender is gone).
//!
//! Why not `tokio::sync::mpsc`: its first block (32 slots) and cache-padded channel state cost
//! about 2 KB per connection even when idle, which is half the per-connection budget. This one
//! holds a `VecDeque` that is as long as the backlog and gives its memory back once drained.

use super::Out;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// Capacity a drained queue may keep; beyond it the memory goes back to the allocator.
const KEEP_CAPACITY: usize = 8;

struct State {
    queue: VecDeque<Out>,
    /// The receiver waiting for a frame.
    waker: Option<Waker>,
    senders: usize,
    receiver_alive: bool,
}

struct Shared {
    state: Mutex<State>,
    bound: usize,
}

pub struct OutboxSender(Arc<Shared>);
pub struct OutboxReceiver(Arc<Shared>);

/// A new outbox holding at most `bound` items.
pub fn outbox(bound: usize) -> (OutboxSender, OutboxReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            senders: 1,
            receiver_alive: true,
        }),
        bound,
    });
    (OutboxSender(shared.clone()), OutboxReceiver(shared))
}

impl OutboxSender {
    /// Queues `out` unless the outbox is full or its receiver is gone; never waits.
    pub fn try_send(&self, out: Out) -> Result<(), TrySendError<Out>> {
        let mut st = self.0.state.lock();
        if !st.receiver_alive {
            return Err(TrySendError::Closed(out));
        }
        if st.queue.len() >= self.0.bound {
            return Err(TrySendError::Full(out));
        }
        st.queue.push_back(out);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Clone for OutboxSender {
    fn clone(&self) -> Self {
        self.0.state.lock().senders += 1;
        OutboxSender(self.0.clone())
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.senders -= 1;
        let waker = if st.senders == 0 {
            st.waker.take()
        } else {
            None
        };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl OutboxReceiver {
    /// Moves up to `limit` queued items into `buf`, waiting while there are none. 0 means every
    /// sender is gone and nothing is left.
    pub async fn recv_many(&mut self, buf: &mut impl Extend<Out>, limit: usize) -> usize {
        poll_fn(|cx| {
            let mut st = self.0.state.lock();
            if st.queue.is_empty() {
                if st.senders == 0 {
                    return Poll::Ready(0);
                }
                match &mut st.waker {
                    Some(w) => w.clone_from(cx.waker()),
                    None => st.waker = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            let n = st.queue.len().min(limit);
            buf.extend(st.queue.drain(..n));
            if st.queue.is_empty() && st.queue.capacity() > KEEP_CAPACITY {
                st.queue = VecDeque::new();
            }
            Poll::Ready(n)
        })
        .await
    }

    pub fn try_recv(&mut self) -> Result<Out, TryRecvError> {
        let mut st = self.0.state.lock();
        match st.queue.pop_front() {
            Some(out) => Ok(out),
            None if st.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.receiver_alive = false;
        st.queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Out {
        Out::Frame {
            seq,
            text: "x".into(),
        }
    }

    #[tokio::test]
    async fn bounded_ordered_and_closed_when_senders_are_gone() {
        let (tx, mut rx) = outbox(3);
        for s in 1..=3 {
            tx.try_send(frame(s)).unwrap();
        }
        assert!(matches!(tx.try_send(frame(4)), Err(TrySendError::Full(_))));
        let mut buf = Vec::new();
        assert_eq!(rx.recv_many(&mut buf, 2).await, 2);
        assert_eq!(rx.recv_many(&mut buf, 10).await, 1);
        let seqs: Vec<u64> = buf
            .iter()
            .map(|o| match o {
                Out::Frame { seq, .. } => *seq,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        let tx2 = tx.clone();
        drop(tx);
        // A waiting receiver wakes when a frame comes, then when the last sender goes.
        let waiter = tokio::spawn(async move {
            let mut buf = Vec::new();
            let a = rx.recv_many(&mut buf, 10).await;
            let b = rx.recv_many(&mut buf, 10).await;
            (a, b, rx.try_recv().is_err())
        });
        tokio::task::yield_now().await;
        tx2.try_send(frame(5)).unwrap();
        tokio::task::yield_now().await;
        drop(tx2);
        assert_eq!(waiter.await.unwrap(), (1, 0, true));
    }

    #[test]
    fn a_gone_receiver_closes_the_outbox() {
        let (tx, rx) = outbox(3);
        drop(rx);
        assert!(matches!(
            tx.try_send(frame(1)),
            Err(TrySendError::Closed(_))
        ));
    }
}

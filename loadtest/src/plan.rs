//! What a scenario asks for, as numbers; and how the clients are split over worker processes.

use serde::{Deserialize, Serialize};

use crate::args::{Cli, Scenario};

/// A room (stream) of the run, with its streamer.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Room {
    pub id: String,
    pub streamer_user: String,
    pub streamer_token: Option<String>,
}

/// Everything a worker (in-process or child process) needs.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerPlan {
    pub cli: Cli,
    pub index: usize,
    pub count: usize,
    pub run_id: String,
    pub rooms: Vec<Room>,
    /// (sticker id, price)
    pub catalog: Vec<(String, u64)>,
}

/// The scenario reduced to client counts and rates.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    pub rooms: usize,
    pub streamers: bool,
    pub thank_ratio: f64,
    pub viewers: usize,
    pub viewer_tokens: bool,
    pub chatters: usize,
    pub chat_rates: Vec<f64>,
    pub text_bytes: usize,
    pub wallets: usize,
    pub conns_per_wallet: usize,
    pub gift_rates: Vec<f64>,
    pub inflight: usize,
    pub sticker: String,
    pub count: u32,
    pub retry_every: u64,
    pub coins: u64,
    pub gift_message: bool,
    pub churners: usize,
    pub hold_ms: u64,
    pub abrupt_ratio: f64,
    pub token_ratio: f64,
    pub steps: usize,
}

impl Shape {
    pub fn of(cli: &Cli) -> Shape {
        let mut s = Shape {
            streamers: !cli.common.no_streamer,
            conns_per_wallet: 1,
            inflight: 1,
            count: 1,
            text_bytes: 24,
            ..Default::default()
        };
        match &cli.scenario {
            Scenario::Fanout(a) => {
                s.rooms = a.rooms;
                s.viewers = a.viewers;
                s.viewer_tokens = a.viewer_tokens;
                s.chatters = a.senders;
                s.chat_rates = a.rate.clone();
                s.text_bytes = a.text_bytes;
            }
            Scenario::Gifts(a) => {
                s.rooms = a.rooms;
                s.viewers = a.viewers * a.rooms.max(1);
                s.wallets = a.wallets;
                s.conns_per_wallet = a.conns_per_wallet.max(1);
                s.gift_rates = a.rate.clone();
                s.inflight = a.inflight.max(1);
                s.sticker = a.sticker.clone();
                s.count = a.count.clamp(1, 99);
                s.retry_every = a.retry_every;
                s.coins = a.coins;
                s.gift_message = !a.no_message;
            }
            Scenario::Mixed(m) | Scenario::Soak(crate::args::SoakArgs { mixed: m, .. }) => {
                s.rooms = m.rooms;
                s.viewers = m.viewers;
                s.thank_ratio = m.thank_ratio.clamp(0.0, 1.0);
                s.chatters = m.chatters;
                s.chat_rates = m.chat_rate.clone();
                s.text_bytes = m.text_bytes;
                s.wallets = m.gifters;
                s.gift_rates = m.gift_rate.clone();
                s.sticker = m.sticker.clone();
                s.retry_every = m.retry_every;
                s.coins = m.coins;
                s.gift_message = true;
            }
            Scenario::Churn(c) => {
                s.rooms = c.rooms;
                s.viewers = c.viewers;
                s.chatters = c.senders;
                s.chat_rates = vec![c.rate];
                s.churners = c.clients;
                s.hold_ms = c.hold_ms;
                s.abrupt_ratio = c.abrupt_ratio.clamp(0.0, 1.0);
                s.token_ratio = c.token_ratio.clamp(0.0, 1.0);
            }
        }
        if !cli.common.streams.is_empty() {
            s.rooms = cli.common.streams.len();
        }
        s.rooms = s.rooms.max(1);
        if s.chat_rates.is_empty() {
            s.chat_rates = vec![0.0];
        }
        if s.gift_rates.is_empty() {
            s.gift_rates = vec![0.0];
        }
        s.steps = s.chat_rates.len().max(s.gift_rates.len()).max(1);
        s
    }

    pub fn chat_rate(&self, step: usize) -> f64 {
        *self
            .chat_rates
            .get(step)
            .or(self.chat_rates.last())
            .unwrap_or(&0.0)
    }
    pub fn gift_rate(&self, step: usize) -> f64 {
        *self
            .gift_rates
            .get(step)
            .or(self.gift_rates.last())
            .unwrap_or(&0.0)
    }
    /// Gifts as fast as acknowledged (every step's gift rate is 0).
    pub fn gifts_as_fast(&self) -> bool {
        self.wallets > 0 && self.gift_rates.iter().all(|r| *r <= 0.0)
    }
    pub fn needs_tokens(&self) -> bool {
        self.chatters > 0
            || self.wallets > 0
            || self.viewer_tokens
            || (self.churners > 0 && self.token_ratio > 0.0)
            || self.streamers
    }
    pub fn has_gifts(&self) -> bool {
        self.wallets > 0
    }
    /// Long-lived clients in total.
    pub fn total_clients(&self) -> usize {
        (if self.streamers { self.rooms } else { 0 })
            + self.viewers
            + self.chatters
            + self.wallets * self.conns_per_wallet
    }
    pub fn step_target(&self, step: usize) -> String {
        let mut parts = vec![];
        if self.chatters > 0 {
            parts.push(format!("chat {}/s", self.chat_rate(step)));
        }
        if self.wallets > 0 {
            if self.gifts_as_fast() {
                parts.push(format!(
                    "gifts as fast as acked ×{} in flight",
                    self.inflight
                ));
            } else {
                parts.push(format!("gifts {}/s", self.gift_rate(step)));
            }
        }
        if self.churners > 0 {
            parts.push(format!("{} churning", self.churners));
        }
        parts.join(", ")
    }
}

/// Does worker `index` of `count` own item `i`?
pub fn owns(i: usize, index: usize, count: usize) -> bool {
    i % count.max(1) == index
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn shapes_from_cli() {
        let cli = Cli::parse_from([
            "loadtest",
            "fanout",
            "--viewers",
            "10",
            "--rate",
            "100,200",
            "--url",
            "http://x:1",
        ]);
        let s = Shape::of(&cli);
        assert_eq!(s.viewers, 10);
        assert_eq!(s.steps, 2);
        assert_eq!(s.chat_rate(1), 200.0);
        assert_eq!(s.chat_rate(5), 200.0);
        assert_eq!(s.total_clients(), 1 + 10 + 50);
        let cli = Cli::parse_from([
            "loadtest",
            "--no-streamer",
            "gifts",
            "--wallets",
            "3",
            "--conns-per-wallet",
            "2",
        ]);
        let s = Shape::of(&cli);
        assert!(s.gifts_as_fast());
        assert_eq!(s.total_clients(), 6);
        let cli = Cli::parse_from(["loadtest", "soak", "--viewers", "5", "--gift-rate", "1,2,3"]);
        let s = Shape::of(&cli);
        assert_eq!(s.steps, 3);
        assert!(!s.gifts_as_fast());
        assert_eq!(s.chat_rate(2), 200.0);
    }

    #[test]
    fn url_lists() {
        let cli = Cli::parse_from([
            "loadtest",
            "fanout",
            "--url",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--url",
            "http://127.0.0.1:3",
            "--server-pid",
            "10,11",
        ]);
        assert_eq!(cli.common.url.len(), 3);
        assert_eq!(cli.common.primary_url(), "http://127.0.0.1:1");
        assert_eq!(
            cli.common.ws_urls(),
            vec![
                "ws://127.0.0.1:1/ws",
                "ws://127.0.0.1:2/ws",
                "ws://127.0.0.1:3/ws"
            ]
        );
        assert_eq!(cli.common.server_pid, vec![10, 11]);
        // Children of --procs get the same list (the plan travels as JSON).
        let back: Cli = serde_json::from_str(&serde_json::to_string(&cli).unwrap()).unwrap();
        assert_eq!(back.common.ws_urls(), cli.common.ws_urls());
        let one = Cli::parse_from(["loadtest", "fanout"]);
        assert_eq!(one.common.ws_urls(), vec!["ws://127.0.0.1:8080/ws"]);
        let ws = Cli::parse_from(["loadtest", "fanout", "--ws-url", "ws://a:1/ws,ws://b:2/ws"]);
        assert_eq!(ws.common.ws_urls(), vec!["ws://a:1/ws", "ws://b:2/ws"]);
    }

    #[test]
    fn ownership_partitions() {
        let n = 17;
        for count in 1..4 {
            let total: usize = (0..count)
                .map(|w| (0..n).filter(|i| owns(*i, w, count)).count())
                .sum();
            assert_eq!(total, n);
        }
    }
}

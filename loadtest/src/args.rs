//! Command line: one subcommand per scenario, common flags usable before or after it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// giftcast's bundled load harness.
///
/// Opens many WebSocket clients against a giftcast server (or a peer hub speaking the same
/// protocol subset), drives one scenario for a set time, then prints a report: deliveries/s,
/// gift acknowledgements/s, end-to-end latency percentiles (chat, shout-outs, thanks, gift
/// acks, joins), errors by code, server memory per connection, and for every gift scenario a
/// money check (acknowledged value == revenue the server reports, audit ok, no gift_id
/// acknowledged twice with different results). Exits with status 2 when a money check fails.
#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
#[command(name = "loadtest", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

const EXAMPLES: &str = "\
Examples (server started with --token-secret sekret --admin-token admintok --chat-rate 0 --gift-rate 0 --max-conns-per-ip 0):
  loadtest fanout --url http://127.0.0.1:18081 --token-secret sekret --viewers 1000 --senders 50 --rate 1000,5000,20000 --duration-secs 10
  loadtest gifts  --url http://127.0.0.1:18081 --token-secret sekret --admin-token admintok --wallets 200 --rate 0 --inflight 4
  loadtest mixed  --url http://127.0.0.1:18081 --token-secret sekret --admin-token admintok --viewers 2000 --json mixed.json --svg mixed.svg
  loadtest churn  --url http://127.0.0.1:18081 --token-secret sekret --clients 300 --hold-ms 200
  loadtest soak   --url http://127.0.0.1:18081 --token-secret sekret --admin-token admintok --duration-secs 600 --server-pid $(pidof giftcast)
  loadtest fanout --viewers 38000 --procs 2 --source-ips 4 ...   (past the 20,000 open files of one process)";

/// Flags shared by every scenario.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct Common {
    /// Server base URL; the WebSocket URL is derived from it (http→ws, https→wss, path /ws).
    /// Several nodes of a cluster: a comma-separated list or a repeated --url; connections
    /// (viewers, senders, gifters alike) are assigned to them round-robin by client index, and
    /// the HTTP calls (catalog, admin credit, revenue, audit, /metrics) go to the first.
    #[arg(
        long,
        global = true,
        env = "LOADTEST_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: Vec<String>,
    /// Override the WebSocket URL(s) (default: derived from each --url); comma separated or
    /// repeated, assigned round-robin like --url.
    #[arg(long, global = true, value_delimiter = ',')]
    pub ws_url: Vec<String>,
    /// HS256 key to mint user tokens locally (claims sub, name, role, exp). Without it, users
    /// sign up through POST /api/guest (guest sign-up must be on).
    #[arg(
        long,
        global = true,
        env = "LOADTEST_TOKEN_SECRET",
        hide_env_values = true
    )]
    pub token_secret: Option<String>,
    /// Admin bearer token: funds wallets (POST /api/admin/credit) and reads the audit and
    /// revenue for the money check. Without it wallets use what they already hold and the
    /// revenue/audit part of the check is skipped.
    #[arg(
        long,
        global = true,
        env = "LOADTEST_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Length of the measured phase in seconds (per load step when --rate lists several).
    #[arg(long, global = true, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Write the machine-readable report (JSON) to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Write an SVG chart of throughput and latency over time to this file.
    #[arg(long, global = true)]
    pub svg: Option<PathBuf>,
    /// Run as N child processes, each with a share of the connections, and merge their
    /// reports (one process may hold at most 20,000 open files here).
    #[arg(long, global = true, default_value_t = 1)]
    pub procs: usize,
    /// Runtime worker threads per harness process (0 = one per core). On a machine the server
    /// shares, `--threads 1` saves the harness its cross-thread wake-ups: a gifts run needs
    /// ~4-5 µs of harness CPU per gift (half a core at 100k gifts/s), which one thread carries
    /// (docs/benchmarks.md "Gifts through WebSockets, session 11"). With --procs, each process
    /// gets this many.
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    /// Bind client sockets to 127.0.0.1 .. 127.0.0.N round-robin (each source address has
    /// ~28k ephemeral ports). 1 = let the kernel choose.
    #[arg(long, global = true, default_value_t = 1)]
    pub source_ips: u8,
    /// Server process id: read its RSS and CPU time from /proc (otherwise from /metrics
    /// `process_resident_memory_bytes` / `process_cpu_seconds_total` when exposed). Several
    /// (comma separated or repeated, e.g. every node of a local cluster): their sum.
    #[arg(long, global = true, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// At most this many connection handshakes in flight at once.
    #[arg(long, global = true, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Give up waiting for all connections to join after this many seconds (the run goes on
    /// with those that did).
    #[arg(long, global = true, default_value_t = 120.0)]
    pub connect_timeout_secs: f64,
    /// After the measured phase, wait up to this long for outstanding gift acks and deliveries.
    #[arg(long, global = true, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Sampling interval of the timeline (ms).
    #[arg(long, global = true, default_value_t = 1000)]
    pub sample_ms: u64,
    /// WebSocket read buffer per client connection (bytes).
    #[arg(long, global = true, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Kernel receive buffer per client socket (SO_RCVBUF, bytes); default: the kernel's.
    #[arg(long, global = true)]
    pub sock_rcvbuf: Option<usize>,
    /// Reconnects allowed per client after an unexpected close (lagged, reset); rejoins with `since`.
    #[arg(long, global = true, default_value_t = 3)]
    pub max_reconnects: u32,
    /// Identifier of this run, part of every user, stream and gift id (default: random).
    #[arg(long, global = true)]
    pub run_id: Option<String>,
    /// Use these stream ids as the rooms instead of fresh ones (e.g. `demo`); comma separated.
    #[arg(long, global = true, value_delimiter = ',')]
    pub streams: Vec<String>,
    /// Do not connect the rooms' streamers (peer hubs do not need them).
    #[arg(long, global = true)]
    pub no_streamer: bool,
    /// No live progress display.
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// Also print the report as JSON on stdout instead of the text table.
    #[arg(long, global = true)]
    pub print_json: bool,
    /// Keep per-interval raw histograms in the JSON report.
    #[arg(long, global = true, hide = true)]
    pub keep_raw: bool,
    /// Executable to re-exec for --procs (default: this executable).
    #[arg(long, global = true, hide = true)]
    pub exe: Option<PathBuf>,
}

impl Common {
    /// The URL the HTTP calls go to (the first of --url).
    pub fn primary_url(&self) -> &str {
        self.url
            .first()
            .map(|s| s.as_str())
            .unwrap_or("http://127.0.0.1:8080")
    }

    /// The WebSocket URLs connections are spread over (--ws-url, else derived from --url).
    pub fn ws_urls(&self) -> Vec<String> {
        let list: Vec<String> = if self.ws_url.is_empty() {
            self.url
                .iter()
                .map(|u| crate::client::derive_ws_url(u.trim()))
                .collect()
        } else {
            self.ws_url.iter().map(|u| u.trim().to_string()).collect()
        };
        list.into_iter().filter(|u| !u.is_empty()).collect()
    }
}

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum Scenario {
    /// N read-only viewers over R rooms plus S senders chatting at a total rate; measures
    /// deliveries/s and end-to-end chat latency (each text carries its send time).
    Fanout(FanoutArgs),
    /// W funded wallets sending gifts at a set rate or as fast as acknowledged; measures
    /// gift_ok latency and checks the money at the end.
    Gifts(GiftsArgs),
    /// A realistic room: many viewers, some chatting, some gifting, the streamer thanking.
    Mixed(MixedArgs),
    /// Connect / join / disconnect storms while a room keeps chatting; join latency and errors.
    Churn(ChurnArgs),
    /// A long mixed run sampling server memory and latency drift per window.
    Soak(SoakArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Gifts(_) => "gifts",
            Scenario::Mixed(_) => "mixed",
            Scenario::Churn(_) => "churn",
            Scenario::Soak(_) => "soak",
        }
    }
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct FanoutArgs {
    /// Read-only viewers (no token), spread over the rooms.
    #[arg(long, default_value_t = 1000)]
    pub viewers: usize,
    /// Rooms (streams).
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Chatting users (with tokens), spread over the rooms.
    #[arg(long, default_value_t = 50)]
    pub senders: usize,
    /// Total chat messages per second over all senders; a comma-separated list runs one load
    /// step per value, each --duration-secs long.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub rate: Vec<f64>,
    /// Bytes of padding in each chat text (beyond the timestamp).
    #[arg(long, default_value_t = 24)]
    pub text_bytes: usize,
    /// Give the viewers tokens too (each join then verifies a JWT).
    #[arg(long)]
    pub viewer_tokens: bool,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct GiftsArgs {
    /// Wallets (users), each with its own connection(s), spread over the rooms.
    #[arg(long, default_value_t = 100)]
    pub wallets: usize,
    /// Rooms (streams) receiving the gifts.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Coins credited to each wallet before the run (needs --admin-token).
    #[arg(long, default_value_t = 1_000_000)]
    pub coins: u64,
    /// Total gifts per second over all wallets; 0 = each wallet sends as fast as acknowledged
    /// (keeping --inflight gifts outstanding). A list runs load steps.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub rate: Vec<f64>,
    /// Outstanding gifts per wallet in as-fast-as-acknowledged mode.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// Sticker id from the catalog, or `mix` for a random one per gift.
    #[arg(long, default_value = "rose")]
    pub sticker: String,
    /// Count per gift (1-99).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Re-send every Nth acknowledged gift with the same gift_id and contents and expect the
    /// identical gift_ok (0 = never).
    #[arg(long, default_value_t = 20)]
    pub retry_every: u64,
    /// Connections per wallet (gifts alternate between them: concurrent debits of one wallet).
    #[arg(long, default_value_t = 1)]
    pub conns_per_wallet: usize,
    /// Read-only viewers per room watching the shout-outs.
    #[arg(long, default_value_t = 0)]
    pub viewers: usize,
    /// Attach no message to gifts (then shout-out latency is not measured).
    #[arg(long)]
    pub no_message: bool,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct MixedArgs {
    /// Read-only viewers, spread over the rooms.
    #[arg(long, default_value_t = 1000)]
    pub viewers: usize,
    /// Rooms (streams), each with its streamer thanking.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Chatting users.
    #[arg(long, default_value_t = 50)]
    pub chatters: usize,
    /// Total chat messages per second (list = load steps).
    #[arg(long, value_delimiter = ',', default_value = "200")]
    pub chat_rate: Vec<f64>,
    /// Gifting users (wallets).
    #[arg(long, default_value_t = 20)]
    pub gifters: usize,
    /// Total gifts per second (list = load steps, paired with --chat-rate).
    #[arg(long, value_delimiter = ',', default_value = "20")]
    pub gift_rate: Vec<f64>,
    /// Coins credited to each gifter before the run.
    #[arg(long, default_value_t = 1_000_000)]
    pub coins: u64,
    /// Share of shout-outs the streamer thanks (0..1).
    #[arg(long, default_value_t = 0.5)]
    pub thank_ratio: f64,
    /// Sticker id, or `mix`.
    #[arg(long, default_value = "mix")]
    pub sticker: String,
    /// Bytes of padding in each chat text.
    #[arg(long, default_value_t = 24)]
    pub text_bytes: usize,
    /// Re-send every Nth acknowledged gift and expect the identical gift_ok (0 = never).
    #[arg(long, default_value_t = 20)]
    pub retry_every: u64,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct SoakArgs {
    #[command(flatten)]
    pub mixed: MixedArgs,
    /// Window for the drift analysis (seconds): latency and memory per window.
    #[arg(long, default_value_t = 30.0)]
    pub window_secs: f64,
}

#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ChurnArgs {
    /// Concurrent churning clients; each loops connect → join → hold → disconnect.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Mean time a churning client stays joined (ms; actual is uniform in 0..2×).
    #[arg(long, default_value_t = 500)]
    pub hold_ms: u64,
    /// Share of disconnects that drop the TCP connection without a close frame.
    #[arg(long, default_value_t = 0.2)]
    pub abrupt_ratio: f64,
    /// Share of churning clients that join with a token.
    #[arg(long, default_value_t = 0.5)]
    pub token_ratio: f64,
    /// Rooms.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Steady read-only viewers that stay for the whole run (they measure delivery under churn).
    #[arg(long, default_value_t = 100)]
    pub viewers: usize,
    /// Steady chatters.
    #[arg(long, default_value_t = 5)]
    pub senders: usize,
    /// Total chat rate of the steady chatters (msgs/s).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
}

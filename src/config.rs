//! Command line and environment: parsed once with clap into typed, validated settings.

use crate::money::Split;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "giftcast",
    version,
    about = "Live-streaming gifting server: room hub, wallets, durable revenue ledger"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a user token signed with the server's secret (the data dir's, or --token-secret).
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// User id (for a streamer, also its stream id): 1-64 of [A-Za-z0-9_-].
    #[arg(long)]
    pub user: String,
    /// Display name.
    #[arg(long)]
    pub name: String,
    /// viewer or streamer.
    #[arg(long, default_value = "viewer")]
    pub role: String,
    /// Lifetime of the token in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "GIFTCAST_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: String,
    /// Directory for the journal, the embedded database and the token secret.
    #[arg(
        long,
        env = "GIFTCAST_DATA_DIR",
        default_value = "./giftcast-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Storage: unset = embedded SQLite in the data dir; postgres://… for PostgreSQL.
    #[arg(long, env = "GIFTCAST_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Allow guest sign-up (default: on when listening on loopback only).
    #[arg(long, env = "GIFTCAST_GUEST_SIGNUP", overrides_with = "no_guest_signup", num_args = 0..=1, default_missing_value = "true")]
    pub guest_signup: Option<bool>,
    /// Refuse guest sign-up.
    #[arg(long, overrides_with = "guest_signup")]
    pub no_guest_signup: bool,
    /// Coins granted once to each new guest viewer.
    #[arg(long, env = "GIFTCAST_WELCOME_COINS", default_value_t = 1000)]
    pub welcome_coins: u64,
    /// Bearer token for /api/admin/* (no admin API when unset).
    #[arg(long, env = "GIFTCAST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// HS256 key for user tokens (default: generated once, kept in the data dir).
    #[arg(
        long,
        env = "GIFTCAST_TOKEN_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub token_secret: Option<String>,
    /// Revenue split in basis points, must sum to 10000.
    #[arg(
        long,
        env = "GIFTCAST_SPLIT",
        default_value = "store=3000,streamer=5000,platform=2000"
    )]
    pub split: String,
    /// Chat messages per user per minute (0 = no limit).
    #[arg(long, env = "GIFTCAST_CHAT_RATE", default_value_t = 60)]
    pub chat_rate: u32,
    /// Gifts per user per minute (0 = no limit).
    #[arg(long, env = "GIFTCAST_GIFT_RATE", default_value_t = 600)]
    pub gift_rate: u32,
    /// Open WebSockets per client address (0 = no limit).
    #[arg(long, env = "GIFTCAST_MAX_CONNS_PER_IP", default_value_t = 1000)]
    pub max_conns_per_ip: u32,
    /// Open WebSockets in total (0 = no limit; this machine allows 20,000 open files per process).
    #[arg(long, env = "GIFTCAST_MAX_CONNS", default_value_t = 19_000)]
    pub max_conns: u32,
    /// Red packets: seconds until unclaimed coins go back to the sender.
    #[arg(long, env = "GIFTCAST_RED_PACKET_TTL_SECS", default_value_t = 120)]
    pub red_packet_ttl_secs: u64,
    /// Red packets: the host's cut in basis points (paid to the stream, split like a gift).
    #[arg(long, env = "GIFTCAST_RED_PACKET_HOST_CUT", default_value_t = 0)]
    pub red_packet_host_cut: u64,
    /// Coins one viewer may spend on gifts per UTC day (0 = no cap).
    #[arg(long, env = "GIFTCAST_DAILY_CAP", default_value_t = 0)]
    pub daily_cap: u64,
    /// A stored gift's id stays in memory (the exact answer to a retry) at least this long;
    /// then only a compact filter remembers it and a retry is checked against storage.
    #[arg(long, env = "GIFTCAST_IDEMPOTENCY_RESIDENT_SECS", default_value_t = crate::limits::IDEMPOTENCY_RESIDENT_MS_DEFAULT / 1000)]
    pub idempotency_resident_secs: u64,
    /// At most this many stored gift ids stay in memory (~650 B each); older ones leave early.
    #[arg(long, env = "GIFTCAST_IDEMPOTENCY_RESIDENT_MAX", default_value_t = crate::limits::IDEMPOTENCY_RESIDENT_MAX_DEFAULT)]
    pub idempotency_resident_max: usize,
    /// Memory budget of the filter of gift ids that left memory (1-16384 MiB), which decides
    /// whether a new gift needs a storage lookup; allocated as ids come, ~2.5 B each. ~0.1% of
    /// new gifts need one while the 7-day retention holds fewer than ~430M ids per GiB.
    #[arg(long, env = "GIFTCAST_IDEMPOTENCY_FILTER_MIB", default_value_t = crate::limits::IDEMPOTENCY_FILTER_BYTES_DEFAULT >> 20)]
    pub idempotency_filter_mib: usize,
    /// A room sends at most one round of events per tick (1-100 ms): a lone event goes at
    /// once, back-to-back events wait for the tick and go as one batch frame. Longer: fewer
    /// socket writes and less CPU; shorter: lower latency on a machine with cores to spare.
    #[arg(long, env = "GIFTCAST_FANOUT_TICK_MS", default_value_t = crate::limits::FANOUT_TICK_MS_DEFAULT)]
    pub fanout_tick_ms: u64,
    /// Journal segment size (1-1024 MiB). Segments are deleted whole once stored, and recovery
    /// reads one at a time into memory; with preallocation each is zero-filled ahead of time.
    #[arg(long, env = "GIFTCAST_JOURNAL_SEGMENT_MIB", default_value_t = crate::journal::SEGMENT_BYTES_MAX_DEFAULT >> 20)]
    pub journal_segment_mib: u64,
    /// Append to journal segments instead of writing into ones zero-filled ahead of time (for
    /// copy-on-write filesystems such as btrfs or ZFS, where preallocation does not help).
    #[arg(long, env = "GIFTCAST_NO_JOURNAL_PREALLOCATE")]
    pub no_journal_preallocate: bool,
    /// Extra Origins allowed to open /ws, comma separated (same origin and loopback always are).
    #[arg(long, env = "GIFTCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Sticker catalog file, JSON or TOML (default: the built-in catalog).
    #[arg(long, env = "GIFTCAST_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Cluster mode: NATS server URL.
    #[arg(long, env = "GIFTCAST_NATS_URL")]
    pub nats_url: Option<String>,
    /// Cluster mode: this node's id.
    #[arg(long, env = "GIFTCAST_NODE_ID")]
    pub node_id: Option<String>,
    /// Cluster mode: the cluster's name; nodes of one cluster share it (NATS subjects are
    /// prefixed with it, so several clusters can share one NATS server).
    #[arg(long, env = "GIFTCAST_CLUSTER_ID", default_value = "main")]
    pub cluster_id: String,
    /// Cluster mode: every node's id, comma separated.
    #[arg(long, env = "GIFTCAST_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// For the crash tests' negative control only: acknowledge money before it is durable.
    #[arg(long, hide = true)]
    pub unsafe_ack_before_durable: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "GIFTCAST_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nats_url: String,
    pub cluster_id: String,
    pub node_id: String,
    pub nodes: Vec<String>,
}

/// Red packets live at most a day.
pub const RED_PACKET_TTL_SECS_MAX: u64 = 86_400;

/// `--idempotency-filter-mib` at most (16 GiB of filter holds ~6.9 billion ids at ~0.1%).
pub const IDEMPOTENCY_FILTER_MIB_MAX: usize = 16_384;
/// `--journal-segment-mib` at least and at most (recovery holds one segment in memory).
pub const JOURNAL_SEGMENT_MIB_MIN: u64 = 1;
pub const JOURNAL_SEGMENT_MIB_MAX: u64 = 1024;
/// `--idempotency-resident-secs` at most: longer keeps ids in memory for no retry pattern.
pub const IDEMPOTENCY_RESIDENT_SECS_MAX: u64 = 24 * 3600;

/// Settings after validation: what the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub guest_signup: bool,
    pub welcome_coins: u64,
    pub admin_token: Option<String>,
    pub token_secret: Option<String>,
    pub split: Split,
    pub chat_rate_per_min: u32,
    pub gift_rate_per_min: u32,
    pub max_conns_per_ip: u32,
    pub max_conns: u32,
    pub allowed_origins: Vec<String>,
    pub catalog: crate::catalog::Catalog,
    pub red_packet_ttl_ms: u64,
    pub red_packet_host_cut_bp: u64,
    /// Coins per viewer per UTC day (0 = off).
    pub daily_cap: u64,
    /// The gift-id memory's bounds (`ledger::idempotency`).
    pub idempotency: crate::ledger::IdempotencyConfig,
    /// At most one fan-out round per room per this many ms.
    pub fanout_tick_ms: u64,
    /// A client that takes no byte for this long while frames wait closes (`WRITE_TIMEOUT_MS`; tests
    /// lengthen it).
    pub write_timeout_ms: u64,
    /// The journal's segment size, preallocation and test delay.
    pub journal: crate::durable::JournalSettings,
    /// WebSocket Ping interval (`HEARTBEAT_INTERVAL_MS`; tests shorten it).
    pub heartbeat_interval_ms: u64,
    /// Silence after which a WebSocket is closed as half-open (`HEARTBEAT_TIMEOUT_MS`).
    pub heartbeat_timeout_ms: u64,
    /// Time allowed for an HTTP/1 request head (`HTTP_HEADER_READ_TIMEOUT_MS`).
    pub http_header_read_timeout_ms: u64,
    /// Cluster mode over NATS, when `--nats-url` is given.
    pub cluster: Option<ClusterConfig>,
    /// Test-only negative control (hidden flag): breaks the durability guarantee on purpose.
    pub unsafe_ack_before_durable: bool,
}

impl ServeArgs {
    /// Validates every setting; the error is one line fit for a person.
    pub fn into_config(self) -> Result<Config, String> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "--listen `{}` is not an address like 127.0.0.1:8080",
                self.listen
            )
        })?;
        let split: Split = self
            .split
            .parse()
            .map_err(|e| format!("--split `{}`: {e}", self.split))?;
        let guest_signup = if self.no_guest_signup {
            false
        } else {
            self.guest_signup.unwrap_or(listen.ip().is_loopback())
        };
        if self.welcome_coins > crate::money::AMOUNT_MAX {
            return Err(format!(
                "--welcome-coins must be at most {}",
                crate::money::AMOUNT_MAX
            ));
        }
        if let Some(t) = &self.admin_token {
            if t.len() < 8 {
                return Err("--admin-token must be at least 8 characters".into());
            }
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!("--database-url must be postgres://…, not `{url}` (leave it unset for embedded SQLite)"));
            }
        }
        if !(1..=RED_PACKET_TTL_SECS_MAX).contains(&self.red_packet_ttl_secs) {
            return Err(format!(
                "--red-packet-ttl-secs must be 1..={RED_PACKET_TTL_SECS_MAX}"
            ));
        }
        if self.red_packet_host_cut > crate::ledger::packets::PACKET_HOST_CUT_BP_MAX {
            return Err(format!(
                "--red-packet-host-cut must be at most {} basis points",
                crate::ledger::packets::PACKET_HOST_CUT_BP_MAX
            ));
        }
        let catalog = match &self.catalog {
            Some(p) => crate::catalog::Catalog::load(p).map_err(|e| e.to_string())?,
            None => crate::catalog::Catalog::default(),
        };
        if !(1..=crate::limits::FANOUT_TICK_MS_MAX).contains(&self.fanout_tick_ms) {
            return Err(format!(
                "--fanout-tick-ms must be 1 to {}",
                crate::limits::FANOUT_TICK_MS_MAX
            ));
        }
        if !(JOURNAL_SEGMENT_MIB_MIN..=JOURNAL_SEGMENT_MIB_MAX).contains(&self.journal_segment_mib)
        {
            return Err(format!(
                "--journal-segment-mib must be {JOURNAL_SEGMENT_MIB_MIN} to {JOURNAL_SEGMENT_MIB_MAX}"
            ));
        }
        if !(1..=IDEMPOTENCY_FILTER_MIB_MAX).contains(&self.idempotency_filter_mib) {
            return Err(format!(
                "--idempotency-filter-mib must be 1 to {IDEMPOTENCY_FILTER_MIB_MAX}"
            ));
        }
        if self.idempotency_resident_secs > IDEMPOTENCY_RESIDENT_SECS_MAX {
            return Err(format!(
                "--idempotency-resident-secs must be at most {IDEMPOTENCY_RESIDENT_SECS_MAX} (one day)"
            ));
        }
        if self.daily_cap > crate::money::AMOUNT_MAX {
            return Err(format!(
                "--daily-cap must be at most {}",
                crate::money::AMOUNT_MAX
            ));
        }
        let cluster = match &self.nats_url {
            None => {
                if self.node_id.is_some() || !self.nodes.is_empty() {
                    return Err("--node-id and --nodes need --nats-url (cluster mode)".into());
                }
                None
            }
            Some(url) => {
                let node_id = self.node_id.clone().ok_or("cluster mode needs --node-id")?;
                if self.nodes.is_empty() || self.nodes.len() > crate::cluster::NODES_MAX {
                    return Err(format!(
                        "cluster mode needs --nodes with 1 to {} node ids",
                        crate::cluster::NODES_MAX
                    ));
                }
                for n in &self.nodes {
                    if !crate::protocol::valid_id(n, 32) {
                        return Err(format!("node id `{n}` must be 1-32 of [A-Za-z0-9_-]"));
                    }
                }
                let mut sorted = self.nodes.clone();
                sorted.sort();
                sorted.dedup();
                if sorted.len() != self.nodes.len() {
                    return Err("--nodes lists a node twice".into());
                }
                if !self.nodes.contains(&node_id) {
                    return Err(format!("--node-id `{node_id}` is not in --nodes"));
                }
                if !crate::protocol::valid_id(&self.cluster_id, 32) {
                    return Err("--cluster-id must be 1-32 of [A-Za-z0-9_-]".into());
                }
                Some(ClusterConfig {
                    nats_url: url.clone(),
                    cluster_id: self.cluster_id.clone(),
                    node_id,
                    nodes: self.nodes.clone(),
                })
            }
        };
        Ok(Config {
            listen,
            data_dir: self.data_dir,
            database_url: self.database_url,
            guest_signup,
            welcome_coins: self.welcome_coins,
            admin_token: self.admin_token,
            token_secret: self.token_secret,
            split,
            chat_rate_per_min: self.chat_rate,
            gift_rate_per_min: self.gift_rate,
            max_conns_per_ip: self.max_conns_per_ip,
            max_conns: self.max_conns,
            allowed_origins: self.allowed_origins,
            catalog,
            daily_cap: self.daily_cap,
            idempotency: crate::ledger::IdempotencyConfig {
                resident_ms: self.idempotency_resident_secs * 1000,
                resident_max: self.idempotency_resident_max,
                filter_bytes: self.idempotency_filter_mib << 20,
                retention_ms: crate::limits::IDEMPOTENCY_RETENTION_MS,
            },
            fanout_tick_ms: self.fanout_tick_ms,
            heartbeat_interval_ms: crate::limits::HEARTBEAT_INTERVAL_MS,
            write_timeout_ms: crate::limits::WRITE_TIMEOUT_MS,
            journal: crate::durable::JournalSettings {
                segment_bytes: self.journal_segment_mib << 20,
                preallocate: !self.no_journal_preallocate,
                sync_delay_ms: 0,
            },
            heartbeat_timeout_ms: crate::limits::HEARTBEAT_TIMEOUT_MS,
            http_header_read_timeout_ms: crate::limits::HTTP_HEADER_READ_TIMEOUT_MS,
            unsafe_ack_before_durable: self.unsafe_ack_before_durable,
            red_packet_ttl_ms: self.red_packet_ttl_secs * 1000,
            red_packet_host_cut_bp: self.red_packet_host_cut,
            cluster,
        })
    }
}

impl Config {
    /// A config for tests and embedding: loopback port 0, limits as the defaults.
    pub fn for_tests(data_dir: PathBuf) -> Config {
        let args = Cli::parse_from(["giftcast", "--listen", "127.0.0.1:0"]).serve;
        let mut c = args.into_config().expect("default config is valid");
        c.data_dir = data_dir;
        // The smallest segments: every test server would otherwise zero-fill 64 MiB ahead of
        // time. The preallocating path is the same at any size.
        c.journal.segment_bytes = JOURNAL_SEGMENT_MIB_MIN << 20;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["giftcast"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .serve
            .into_config()
    }

    #[test]
    fn defaults_follow_the_protocol() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.guest_signup);
        assert_eq!(c.welcome_coins, 1000);
        assert_eq!(c.chat_rate_per_min, 60);
        assert_eq!(c.gift_rate_per_min, 600);
        assert_eq!(c.max_conns_per_ip, 1000);
        assert_eq!(c.daily_cap, 0, "no daily cap unless asked");
        assert_eq!(cfg(&["--daily-cap", "500"]).unwrap().daily_cap, 500);
    }

    #[test]
    fn fanout_tick_edges() {
        assert_eq!(cfg(&[]).unwrap().fanout_tick_ms, 8);
        assert_eq!(cfg(&["--fanout-tick-ms", "1"]).unwrap().fanout_tick_ms, 1);
        assert_eq!(
            cfg(&["--fanout-tick-ms", "100"]).unwrap().fanout_tick_ms,
            100
        );
        for bad in ["0", "101"] {
            let e = cfg(&["--fanout-tick-ms", bad]).unwrap_err();
            assert!(e.contains("--fanout-tick-ms must be 1 to 100"), "{e}");
        }
    }

    #[test]
    fn guest_signup_defaults_off_off_loopback_and_flags_win() {
        assert!(!cfg(&["--listen", "0.0.0.0:8080"]).unwrap().guest_signup);
        assert!(
            cfg(&["--listen", "0.0.0.0:8080", "--guest-signup"])
                .unwrap()
                .guest_signup
        );
        assert!(!cfg(&["--no-guest-signup"]).unwrap().guest_signup);
    }

    #[test]
    fn bad_config_is_one_line() {
        let e = cfg(&["--split", "store=1,streamer=2,platform=3"]).unwrap_err();
        assert!(e.contains("10000") && !e.contains('\n'), "{e}");
        let e = cfg(&["--listen", "nowhere"]).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
        assert!(cfg(&["--database-url", "mysql://x"]).is_err());
    }

    #[test]
    fn journal_segment_edges() {
        let c = cfg(&[]).unwrap().journal;
        assert_eq!(c.segment_bytes, crate::journal::SEGMENT_BYTES_MAX_DEFAULT);
        assert!(c.preallocate, "preallocated segments by default");
        assert!(
            !cfg(&["--no-journal-preallocate"])
                .unwrap()
                .journal
                .preallocate
        );
        for (mib, ok) in [
            (JOURNAL_SEGMENT_MIB_MIN, true),
            (JOURNAL_SEGMENT_MIB_MAX, true),
            (JOURNAL_SEGMENT_MIB_MIN - 1, false),
            (JOURNAL_SEGMENT_MIB_MAX + 1, false),
        ] {
            match cfg(&["--journal-segment-mib", &mib.to_string()]) {
                Ok(c) => {
                    assert!(ok, "{mib} MiB accepted");
                    assert_eq!(c.journal.segment_bytes, mib << 20);
                }
                Err(e) => {
                    assert!(!ok, "{mib} MiB refused: {e}");
                    assert!(e.contains("--journal-segment-mib must be 1 to 1024"), "{e}");
                }
            }
        }
    }

    #[test]
    fn idempotency_bounds_edges() {
        let c = cfg(&[]).unwrap().idempotency;
        assert_eq!(c, crate::ledger::IdempotencyConfig::default());
        assert_eq!(c.filter_bytes, 1 << 30);
        let c = cfg(&[
            "--idempotency-filter-mib",
            "1",
            "--idempotency-resident-max",
            "0",
            "--idempotency-resident-secs",
            "86400",
        ])
        .unwrap()
        .idempotency;
        assert_eq!(
            (c.filter_bytes, c.resident_max, c.resident_ms),
            (1 << 20, 0, 86_400_000)
        );
        let max = IDEMPOTENCY_FILTER_MIB_MAX.to_string();
        assert!(cfg(&["--idempotency-filter-mib", &max]).is_ok());
        for bad in ["0", &(IDEMPOTENCY_FILTER_MIB_MAX + 1).to_string()] {
            let e = cfg(&["--idempotency-filter-mib", bad]).unwrap_err();
            assert!(e.contains("--idempotency-filter-mib"), "{e}");
        }
        let e = cfg(&["--idempotency-resident-secs", "86401"]).unwrap_err();
        assert!(e.contains("--idempotency-resident-secs"), "{e}");
    }
}

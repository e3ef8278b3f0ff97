//! One WebSocket client: socket setup (source address, TCP_NODELAY, small buffers) and the
//! parsing of server frames (single events or batches).

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// A connection's frames wait in its WebSocket write buffer until this many bytes or the next
/// flush. The workers flush once per wake, after everything that wake produced, so a burst of new
/// gifts (after a burst of acks) is one `send` instead of one each. Small: only a connection
/// that writes ever grows the buffer.
pub const WRITE_COALESCE_BYTES: usize = 8 << 10;

/// One server (node) to connect to.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ws_url: String,
    pub addr: SocketAddr,
}

/// Where and how to connect: connection `idx` goes to endpoint `idx % endpoints.len()`.
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoints: Vec<Endpoint>,
    pub source_ips: u8,
    pub read_buffer: usize,
    pub sock_rcvbuf: Option<usize>,
}

/// `http://host:port/...` → `ws://host:port/ws`.
pub fn derive_ws_url(base: &str) -> String {
    let b = base.trim_end_matches('/');
    let (scheme, rest) = match b.split_once("://") {
        Some(("https", r)) => ("wss", r),
        Some((_, r)) => ("ws", r),
        None => ("ws", b),
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{hostport}/ws")
}

impl Target {
    pub async fn resolve(
        ws_urls: &[String],
        source_ips: u8,
        read_buffer: usize,
        sock_rcvbuf: Option<usize>,
    ) -> Result<Self> {
        if ws_urls.is_empty() {
            return Err(anyhow!("no server URL"));
        }
        let mut endpoints = Vec::with_capacity(ws_urls.len());
        for ws_url in ws_urls {
            let rest = ws_url.split_once("://").map(|x| x.1).unwrap_or(ws_url);
            let hostport = rest.split('/').next().unwrap_or(rest);
            let hostport = if hostport.contains(':') && !hostport.ends_with(']') {
                hostport.to_string()
            } else {
                format!("{hostport}:80")
            };
            let addr = tokio::net::lookup_host(&hostport)
                .await
                .with_context(|| format!("resolving {hostport}"))?
                .next()
                .ok_or_else(|| anyhow!("no address for {hostport}"))?;
            endpoints.push(Endpoint {
                ws_url: ws_url.clone(),
                addr,
            });
        }
        Ok(Target {
            endpoints,
            source_ips,
            read_buffer,
            sock_rcvbuf,
        })
    }

    /// The server (node) of the idx-th connection: round-robin over the endpoints.
    pub fn endpoint_for(&self, idx: usize) -> &Endpoint {
        &self.endpoints[idx % self.endpoints.len()]
    }

    /// Source address for the idx-th connection (round-robin over 127.0.0.1..N).
    pub fn source_for(&self, idx: usize) -> Option<SocketAddr> {
        let addr = self.endpoint_for(idx).addr;
        if self.source_ips <= 1 || !addr.ip().is_loopback() || !addr.is_ipv4() {
            return None;
        }
        let last = 1 + (idx % self.source_ips as usize) as u8;
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))
    }

    pub fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            // Frames written together (a wake's new gifts after its acks) go out in one
            // send at the flush that follows them, not one send each.
            .write_buffer_size(WRITE_COALESCE_BYTES)
            .max_write_buffer_size(1 << 20)
            .max_message_size(Some(8 << 20))
            .max_frame_size(Some(8 << 20))
    }

    /// Open a TCP connection and do the WebSocket handshake. The error is an error code
    /// suitable for the report (`connect:<kind>`, `handshake:<status>` ...).
    pub async fn open(&self, idx: usize) -> std::result::Result<Ws, String> {
        let ep = self.endpoint_for(idx);
        let sock = if ep.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket:{:?}", e.kind()))?;
        if let Some(src) = self.source_for(idx) {
            let _ = sock.set_reuseaddr(true);
            sock.bind(src).map_err(|e| format!("bind:{:?}", e.kind()))?;
        }
        if let Some(n) = self.sock_rcvbuf {
            let _ = sock.set_recv_buffer_size(n as u32);
        }
        let stream =
            match tokio::time::timeout(Duration::from_secs(10), sock.connect(ep.addr)).await {
                Err(_) => return Err("connect:timeout".into()),
                Ok(Err(e)) => return Err(format!("connect:{:?}", e.kind())),
                Ok(Ok(s)) => s,
            };
        let _ = stream.set_nodelay(true);
        let hs = tokio_tungstenite::client_async_with_config(
            ep.ws_url.as_str(),
            stream,
            Some(self.ws_config()),
        );
        match tokio::time::timeout(Duration::from_secs(15), hs).await {
            Err(_) => Err("handshake:timeout".into()),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(r))) => {
                Err(format!("handshake:{}", r.status().as_u16()))
            }
            Ok(Err(e)) => Err(format!("handshake:{}", short_err(&e))),
            Ok(Ok((ws, _))) => Ok(ws),
        }
    }
}

/// A short, stable name of a tungstenite error for the error table.
pub fn short_err(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::ConnectionClosed => "closed".into(),
        E::AlreadyClosed => "already_closed".into(),
        E::Io(io) => format!("io_{:?}", io.kind()),
        E::Protocol(p) => format!(
            "protocol_{}",
            format!("{p:?}")
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or("?")
        ),
        E::Capacity(_) => "capacity".into(),
        E::WriteBufferFull(_) => "write_buffer_full".into(),
        E::Utf8(_) => "utf8".into(),
        E::Http(r) => format!("http_{}", r.status().as_u16()),
        _ => "other".into(),
    }
}

/// A string that borrows from the frame when it has no escapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Str<'a>(pub Cow<'a, str>);

impl Str<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The fields of a server frame the harness looks at (everything else is skipped).
#[derive(Deserialize, Debug, Default)]
pub struct Ev<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: Option<Str<'a>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub text: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub message: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub gift_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub code: Option<Str<'a>>,
    #[serde(default)]
    pub balance: Option<i64>,
    #[serde(default)]
    pub resumed: Option<bool>,
    #[serde(default, borrow)]
    pub events: Option<Vec<Ev<'a>>>,
}

impl Ev<'_> {
    pub fn ty(&self) -> &str {
        self.ty.as_ref().map(|s| s.as_str()).unwrap_or("")
    }
}

pub fn parse(frame: &str) -> Result<Ev<'_>, serde_json::Error> {
    serde_json::from_str(frame)
}

/// Calls `f` for each event of a frame, unpacking batches. Returns the number of events.
pub fn for_each_event<'a>(ev: &'a Ev<'a>, f: &mut impl FnMut(&'a Ev<'a>)) -> usize {
    if ev.ty() == "batch" {
        let mut n = 0;
        if let Some(evs) = &ev.events {
            for e in evs {
                n += for_each_event(e, f);
            }
        }
        n
    } else {
        f(ev);
        1
    }
}

/// Harness timestamps: texts and messages start with `lt <µs since epoch>`.
pub fn parse_stamp(s: &str) -> Option<u64> {
    let rest = s.strip_prefix("lt ")?;
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_derivation() {
        assert_eq!(
            derive_ws_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(
            derive_ws_url("http://127.0.0.1:8080/"),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(
            derive_ws_url("https://example.test/x"),
            "wss://example.test/ws"
        );
        assert_eq!(derive_ws_url("127.0.0.1:9"), "ws://127.0.0.1:9/ws");
    }

    #[test]
    fn parses_single_and_batch() {
        let f = r#"{"type":"batch","events":[{"type":"chat","seq":7,"from":{"id":"a","name":"A"},"text":"lt 123 xx","ts":1},{"type":"shoutout","seq":8,"gift_id":"g1","from":{"id":"a","name":"A"},"sticker":"rose","count":1,"amount":1,"message":"lt 456","combo":1,"ts":2}]}"#;
        let ev = parse(f).unwrap();
        let mut seen = vec![];
        let n = for_each_event(&ev, &mut |e| seen.push((e.ty().to_string(), e.seq)));
        assert_eq!(n, 2);
        assert_eq!(
            seen,
            vec![
                ("chat".to_string(), Some(7)),
                ("shoutout".to_string(), Some(8))
            ]
        );
        let evs = ev.events.as_ref().unwrap();
        assert_eq!(
            parse_stamp(evs[0].text.as_ref().unwrap().as_str()),
            Some(123)
        );
        assert_eq!(
            parse_stamp(evs[1].message.as_ref().unwrap().as_str()),
            Some(456)
        );
        let ok = parse(r#"{"type":"gift_ok","gift_id":"x-1","balance":99,"seq":3}"#).unwrap();
        assert_eq!(ok.balance, Some(99));
        assert_eq!(ok.gift_id.as_ref().unwrap().as_str(), "x-1");
        let esc = parse(r#"{"type":"chat","text":"lt 5 \"q\""}"#).unwrap();
        assert_eq!(esc.text.unwrap().as_str(), "lt 5 \"q\"");
        let joined = parse(r#"{"type":"joined","stream":"s","seq":0,"viewers":1,"catalog":[{"id":"rose"}],"resumed":true}"#).unwrap();
        assert_eq!(joined.resumed, Some(true));
    }

    #[test]
    fn stamps() {
        assert_eq!(
            parse_stamp("lt 1700000000000000 pad"),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(parse_stamp("lt 42"), Some(42));
        assert_eq!(parse_stamp("hello"), None);
    }

    #[test]
    fn connections_round_robin_over_nodes() {
        let ep = |port: u16| Endpoint {
            ws_url: format!("ws://127.0.0.1:{port}/ws"),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        let t = Target {
            endpoints: vec![ep(1), ep(2), ep(3)],
            source_ips: 4,
            read_buffer: 4096,
            sock_rcvbuf: None,
        };
        let ports: Vec<u16> = (0..7).map(|i| t.endpoint_for(i).addr.port()).collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3, 1]);
        // Every node gets its share of any contiguous block of clients (viewers, then senders).
        let mut per = [0usize; 3];
        for g in 1..1051 {
            per[t.endpoint_for(g).addr.port() as usize - 1] += 1;
        }
        assert_eq!(per, [350, 350, 350]);
        let mut senders = [0usize; 3];
        for g in 1001..1051 {
            senders[t.endpoint_for(g).addr.port() as usize - 1] += 1;
        }
        assert!(senders.iter().all(|n| (16..=17).contains(n)), "{senders:?}");
        // Source addresses still rotate independently of the node.
        assert_eq!(t.source_for(0).unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(t.source_for(5).unwrap().ip().to_string(), "127.0.0.2");
        // A single URL keeps the old behaviour.
        let one = Target {
            endpoints: vec![ep(9)],
            ..t
        };
        assert!((0..5).all(|i| one.endpoint_for(i).addr.port() == 9));
    }

    #[test]
    fn source_addresses_round_robin() {
        let t = Target {
            endpoints: vec![Endpoint {
                ws_url: "ws://127.0.0.1:1/ws".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
            }],
            source_ips: 3,
            read_buffer: 4096,
            sock_rcvbuf: None,
        };
        let ips: Vec<String> = (0..4)
            .map(|i| t.source_for(i).unwrap().ip().to_string())
            .collect();
        assert_eq!(
            ips,
            vec!["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]
        );
        let one = Target { source_ips: 1, ..t };
        assert!(one.source_for(5).is_none());
    }
}

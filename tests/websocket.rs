//! The WebSocket layer at the byte level (RFC 6455), against a real server: the handshake and
//! its refusals, bytes sent right behind the handshake, fragmented messages with control frames
//! between the fragments, ping/pong, framing faults and the closing handshake. Client frames
//! are built by tungstenite (an independent implementation); the server's frames are read back
//! by tokio-tungstenite.

mod common;

use common::TestServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(10);

/// The RFC's own example key (RFC 6455 1.3) and the accept value it must produce.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn handshake(server: &TestServer, extra_headers: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\n{extra_headers}\r\n",
        server.addr
    )
}

const UPGRADE: &str =
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Sends `request` (and `after`, in the same write) and reads the response head; returns the
/// head and the stream with any bytes already read past it.
async fn send_head(
    server: &TestServer,
    request: &str,
    after: &[u8],
) -> (String, TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = request.as_bytes().to_vec();
    bytes.extend_from_slice(after);
    tcp.write_all(&bytes).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            return (head, tcp, buf[end + 4..].to_vec());
        }
    }
}

/// A masked client frame, as tungstenite encodes it.
fn frame(opcode: OpCode, payload: &[u8], fin: bool) -> Vec<u8> {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        mask: Some([0x11, 0x22, 0x33, 0x44]),
        ..FrameHeader::default()
    };
    let mut out = Vec::new();
    Frame::from_payload(header, payload.to_vec().into())
        .format(&mut out)
        .unwrap();
    out
}

fn text(payload: &str) -> Vec<u8> {
    frame(OpCode::Data(Data::Text), payload.as_bytes(), true)
}

/// Upgrades with `after` sent in the same write as the handshake; returns a client reading the
/// server's frames.
async fn upgraded(server: &TestServer, after: &[u8]) -> WebSocketStream<TcpStream> {
    let (head, tcp, rest) = send_head(server, &handshake(server, UPGRADE), after).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    WebSocketStream::from_partially_read(tcp, rest, Role::Client, None).await
}

/// The next text frame as JSON (batches are not expected in these quiet tests).
async fn next_json(ws: &mut WebSocketStream<TcpStream>) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close code the server sends next (text frames before it are skipped).
async fn close_code(ws: &mut WebSocketStream<TcpStream>) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close")
        {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_handshake_answers_with_the_rfc_accept_value() {
    let server = TestServer::start().await;
    let (head, _tcp, _) = send_head(&server, &handshake(&server, UPGRADE), b"").await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(head.contains(&format!("{ACCEPT}\r\n")), "{head}");
    // No extension or subprotocol is agreed, so frames stay plain.
    assert!(!lower.contains("sec-websocket-extensions"), "{head}");
}

#[tokio::test]
async fn a_bad_handshake_is_refused_with_a_reason() {
    let server = TestServer::start().await;
    // Not an upgrade at all.
    let (head, _, _) = send_head(&server, &handshake(&server, ""), b"").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Another protocol version: 426 and the version spoken (RFC 6455 4.4).
    let v8 = UPGRADE.replace("Version: 13", "Version: 8");
    let (head, _, _) = send_head(&server, &handshake(&server, &v8), b"").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
    // No key.
    let no_key = UPGRADE.replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
    let (head, _, _) = send_head(&server, &handshake(&server, &no_key), b"").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // None of these took a connection slot.
    assert_eq!(server.app.conns_open(), 0);
}

/// A client may send its first frame in the same segment as its handshake; the HTTP layer has
/// read it already, and it must not be lost.
#[tokio::test]
async fn a_join_right_behind_the_handshake_is_read() {
    let server = TestServer::start().await;
    let join = text(r#"{"type":"join","stream":"demo"}"#);
    let mut ws = upgraded(&server, &join).await;
    let joined = next_json(&mut ws).await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["stream"], "demo");
}

/// A message in three fragments, with a ping between the first two: the ping is answered with
/// its payload at once, and the message counts as one frame.
#[tokio::test]
async fn fragmented_messages_with_pings_between_fragments() {
    let server = TestServer::start().await;
    let mut ws = upgraded(&server, b"").await;
    let join = br#"{"type":"join","stream":"demo"}"#;
    let mut bytes = frame(OpCode::Data(Data::Text), &join[..5], false);
    bytes.extend(frame(
        OpCode::Control(Control::Ping),
        b"are you there",
        true,
    ));
    bytes.extend(frame(OpCode::Data(Data::Continue), &join[5..20], false));
    bytes.extend(frame(OpCode::Data(Data::Continue), &join[20..], true));
    ws.get_mut().write_all(&bytes).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected the pong first, got {other:?}"),
    }
    assert_eq!(next_json(&mut ws).await["type"], "joined");
}

#[tokio::test]
async fn framing_faults_close_with_1002() {
    let server = TestServer::start().await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("unmasked", vec![0x81, 0x02, b'{', b'}']),
        ("reserved bit", {
            let mut f = text("{}");
            f[0] |= 0x40;
            f
        }),
        (
            "continuation first",
            frame(OpCode::Data(Data::Continue), b"{}", true),
        ),
        ("control frame over 125 bytes", {
            let mut f = frame(OpCode::Control(Control::Ping), &[0; 100], true);
            // Patch the 7-bit length to 126 + 16-bit length of 200 (tungstenite refuses to build it).
            f.truncate(2);
            f[1] = 0x80 | 126;
            f.extend_from_slice(&200u16.to_be_bytes());
            f.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
            f.extend_from_slice(&[0; 200]);
            f
        }),
    ];
    for (what, bytes) in cases {
        let mut ws = upgraded(&server, b"").await;
        ws.get_mut().write_all(&bytes).await.unwrap();
        assert_eq!(close_code(&mut ws).await, 1002, "{what}");
    }
}

/// The client closes: the server answers with a close of its own and then ends the TCP
/// connection (RFC 6455 7.1.1: the server closes first), leaving the room.
#[tokio::test]
async fn the_closing_handshake() {
    let server = TestServer::start().await;
    let mut ws = upgraded(&server, &text(r#"{"type":"join","stream":"demo"}"#)).await;
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    let room = server.app.hub.get("demo").unwrap();
    assert_eq!(room.viewers(), 1);
    ws.send(Message::Close(None)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1000);
    // Then the stream ends.
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
    assert_eq!(room.viewers(), 0);
}

/// Bytes of a frame that straggle in one at a time still make the frame.
#[tokio::test]
async fn a_frame_dribbled_a_byte_at_a_time_is_read() {
    let server = TestServer::start().await;
    let mut ws = upgraded(&server, b"").await;
    for b in text(r#"{"type":"join","stream":"demo"}"#) {
        ws.get_mut().write_all(&[b]).await.unwrap();
        ws.get_mut().flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(next_json(&mut ws).await["type"], "joined");
}

/// Arbitrary bytes after the handshake, from a seeded generator: frames with random opcodes,
/// flags, lengths and payloads, cut garbage, and valid frames between. Whatever arrives, the
/// server answers in protocol (a pong to the probe that follows, a close with a framing code, or
/// it waits for the rest of a frame a header announced), never crashes, and lets go of every
/// connection; a normal client works afterwards.
#[tokio::test]
async fn random_bytes_after_the_handshake_break_nothing() {
    use rand::{Rng, RngCore, SeedableRng};
    let server = TestServer::start_with(|c| c.chat_rate_per_min = 0).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9c_57);
    let (mut survived, mut closed, mut waiting) = (0, 0, 0);
    for case in 0..64u32 {
        let mut bytes = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            match rng.random_range(0..4) {
                // A well-formed text frame (maybe not JSON).
                0 => {
                    let n = rng.random_range(0..300);
                    let payload: Vec<u8> = (0..n).map(|_| rng.random_range(0x20..0x7f)).collect();
                    bytes.extend(frame(OpCode::Data(Data::Text), &payload, true));
                }
                // A header with random bits and a short random payload.
                1 => {
                    bytes.push(rng.random());
                    bytes.push(rng.random::<u8>() & 0xFD);
                    let mut junk = vec![0u8; rng.random_range(0..40)];
                    rng.fill_bytes(&mut junk);
                    bytes.extend(junk);
                }
                // A ping with a random payload.
                2 => {
                    let mut p = vec![0u8; rng.random_range(0..126)];
                    rng.fill_bytes(&mut p);
                    bytes.extend(frame(OpCode::Control(Control::Ping), &p, true));
                }
                // Pure garbage.
                _ => {
                    let mut junk = vec![0u8; rng.random_range(1..64)];
                    rng.fill_bytes(&mut junk);
                    bytes.extend(junk);
                }
            }
        }
        let mut ws = upgraded(&server, b"").await;
        let probe = format!(r#"{{"type":"ping","t":{case}}}"#);
        bytes.extend(text(&probe));
        let _ = ws.get_mut().write_all(&bytes).await;
        // Until the probe's pong, or the end of the connection.
        loop {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await else {
                // A header announced more bytes than came: the server rightly waits for them.
                waiting += 1;
                break;
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("the server sends JSON");
                    if v["type"] == "pong" && v["t"] == case {
                        survived += 1;
                        break;
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                    assert!(
                        matches!(code, 1002 | 1007 | 1009 | 1000),
                        "case {case}: close {code}"
                    );
                    closed += 1;
                    break;
                }
                Some(Ok(_)) => {}
                // The client library may refuse what the server had to say about our garbage
                // (e.g. a pong to a ping it never sent is fine, a reset after a close is fine).
                Some(Err(_)) | None => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    eprintln!("{survived} answered the probe, {closed} were closed, {waiting} wait for more bytes");
    assert!(survived > 0 && closed > 0, "both paths were exercised");
    // Every connection is let go of (the clients are gone: each was dropped after its case).
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.app.conns_open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.app.conns_open(), 0, "connections still held");
    // And the server still serves.
    let (mut c, joined) = server.joined("demo", None).await;
    assert_eq!(joined["type"], "joined");
    c.send(serde_json::json!({"type": "ping", "t": "after"}))
        .await;
    assert_eq!(c.recv_type("pong").await["t"], "after");
}

//! RFC 6455 framing, the server's side, without I/O: an incremental decoder for the masked
//! frames a client sends (from any split of the byte stream into reads), and the header of the
//! unmasked frames the server sends.
//!
//! Why our own: a connection must cost a few KiB while idle (19,000 of them in one process), and
//! a general WebSocket library keeps a read buffer and a write buffer per connection for its
//! whole life. Here the decoder holds memory only while a frame is incomplete (usually never:
//! a client frame is one small JSON object in one segment), and server frames are written
//! straight from the shared, serialised-once payload with a header built on the stack.
//!
//! The decoder is checked against tungstenite (an independent implementation) as the frame
//! encoder, over random fragmentations and random splits into reads (`tests` below), and by a
//! fuzzer in the normal test run.

/// Continuation of a fragmented message.
const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest payload of a control frame (RFC 6455 5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Longest server frame header: 2 bytes, then a 64-bit length (no mask on server frames).
pub const HEADER_BYTES_MAX: usize = 10;
/// Longest client frame header: 2 bytes, a 64-bit length and the 4-byte mask.
const CLIENT_HEADER_BYTES_MAX: usize = 14;

/// A whole message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    /// Binary messages are refused by the protocol; their content is not kept.
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The close code the client gave, if any.
    Close(Option<u16>),
}

/// Why the client's byte stream cannot be read on: each ends the connection with its close code.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Fault {
    /// A framing error (RFC 6455 7.4.1: 1002).
    Protocol(&'static str),
    /// A message over the size limit (1009).
    TooBig,
    /// A text message (or close reason) that is not UTF-8 (1007).
    NotUtf8,
}

impl Fault {
    pub fn close_code(self) -> u16 {
        match self {
            Fault::Protocol(_) => 1002,
            Fault::TooBig => 1009,
            Fault::NotUtf8 => 1007,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Fault::Protocol(why) => why,
            Fault::TooBig => "frame too big",
            Fault::NotUtf8 => "invalid UTF-8",
        }
    }
}

/// Decodes a client's frames into messages. Holds heap memory only while a frame or a
/// fragmented message is incomplete.
#[derive(Debug)]
pub struct Decoder {
    /// The start of a frame whose bytes have not all arrived.
    partial: Vec<u8>,
    /// A fragmented message so far: its opcode and payload.
    message: Option<(u8, Vec<u8>)>,
    /// Largest message (and so frame) payload accepted.
    message_bytes_max: usize,
}

impl Decoder {
    pub fn new(message_bytes_max: usize) -> Decoder {
        Decoder {
            partial: Vec::new(),
            message: None,
            message_bytes_max,
        }
    }

    /// Whether the decoder holds no incomplete frame or message (and so no heap memory).
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.partial.capacity() == 0 && self.message.is_none()
    }

    /// Takes bytes as read from the socket (unmasked in place) and appends every message they
    /// complete to `out`. After a fault the stream cannot be read on.
    pub fn feed(&mut self, bytes: &mut [u8], out: &mut Vec<Message>) -> Result<(), Fault> {
        if self.partial.is_empty() {
            let used = self.frames(bytes, out)?;
            if used < bytes.len() {
                self.partial.extend_from_slice(&bytes[used..]);
            }
            return Ok(());
        }
        self.partial.extend_from_slice(bytes);
        let mut partial = std::mem::take(&mut self.partial);
        let used = self.frames(&mut partial, out);
        let used = used?;
        if used < partial.len() {
            partial.drain(..used);
            self.partial = partial;
        }
        // Otherwise `partial` is dropped: an idle decoder holds nothing.
        Ok(())
    }

    /// Decodes every complete frame at the start of `buf`; returns the bytes used.
    fn frames(&mut self, buf: &mut [u8], out: &mut Vec<Message>) -> Result<usize, Fault> {
        let mut used = 0;
        while let Some(n) = self.frame(&mut buf[used..], out)? {
            used += n;
        }
        Ok(used)
    }

    /// One frame at the start of `buf`: `None` while it is incomplete, else its length.
    fn frame(&mut self, buf: &mut [u8], out: &mut Vec<Message>) -> Result<Option<usize>, Fault> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(Fault::Protocol("reserved bits set"));
        }
        let opcode = b0 & 0x0F;
        if b1 & 0x80 == 0 {
            return Err(Fault::Protocol("client frames must be masked"));
        }
        let control = opcode & 0x8 != 0;
        let (len, mut head) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(Fault::Protocol("frame length has its top bit set"));
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        if control {
            if !fin {
                return Err(Fault::Protocol("fragmented control frame"));
            }
            if len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
                return Err(Fault::Protocol("control frame over 125 bytes"));
            }
        } else {
            // Refused as soon as the header says so: an oversized frame is never buffered.
            let so_far = self.message.as_ref().map_or(0, |(_, p)| p.len()) as u64;
            if len.saturating_add(so_far) > self.message_bytes_max as u64 {
                return Err(Fault::TooBig);
            }
        }
        if buf.len() < head + 4 {
            return Ok(None);
        }
        let mask = [buf[head], buf[head + 1], buf[head + 2], buf[head + 3]];
        head += 4;
        debug_assert!(head <= CLIENT_HEADER_BYTES_MAX);
        let len = len as usize; // bounded above by message_bytes_max or 125
        let Some(payload) = buf.get_mut(head..head + len) else {
            return Ok(None);
        };
        unmask(payload, mask);
        let payload = &*payload;
        match opcode {
            OP_CONTINUATION => {
                let Some((_, so_far)) = self.message.as_mut() else {
                    return Err(Fault::Protocol("continuation frame outside a message"));
                };
                so_far.extend_from_slice(payload);
                if fin {
                    let (opcode, payload) = self.message.take().expect("message in progress");
                    out.push(finish(opcode, payload)?);
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    return Err(Fault::Protocol("new message inside a fragmented one"));
                }
                if fin {
                    out.push(finish(opcode, payload.to_vec())?);
                } else {
                    self.message = Some((opcode, payload.to_vec()));
                }
            }
            OP_CLOSE => out.push(Message::Close(close_code(payload)?)),
            OP_PING => out.push(Message::Ping(payload.to_vec())),
            OP_PONG => out.push(Message::Pong),
            _ => return Err(Fault::Protocol("unknown opcode")),
        }
        Ok(Some(head + len))
    }
}

fn finish(opcode: u8, payload: Vec<u8>) -> Result<Message, Fault> {
    if opcode == OP_BINARY {
        return Ok(Message::Binary);
    }
    String::from_utf8(payload)
        .map(Message::Text)
        .map_err(|_| Fault::NotUtf8)
}

/// The code of a close frame's payload (RFC 6455 5.5.1, 7.4).
fn close_code(payload: &[u8]) -> Result<Option<u16>, Fault> {
    match payload {
        [] => Ok(None),
        [_] => Err(Fault::Protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(Fault::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| Fault::NotUtf8)?;
            Ok(Some(code))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Writes the header of a final, unmasked server frame of `opcode` with `len` payload bytes into
/// `out`; returns its length.
pub fn server_header(opcode: u8, len: usize, out: &mut [u8; HEADER_BYTES_MAX]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::{Frame, FrameHeader};

    const MAX: usize = 16 * 1024;

    /// A client frame as tungstenite encodes it (masked, like every client's).
    fn client_frame(opcode: OpCode, payload: &[u8], fin: bool, mask: [u8; 4]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: fin,
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let frame = Frame::from_payload(header, payload.to_vec().into());
        let mut bytes = Vec::new();
        frame.format(&mut bytes).unwrap();
        bytes
    }

    fn text(payload: &str) -> Vec<u8> {
        client_frame(
            OpCode::Data(Data::Text),
            payload.as_bytes(),
            true,
            [1, 2, 3, 4],
        )
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, Fault> {
        let mut d = Decoder::new(MAX);
        let mut out = Vec::new();
        d.feed(&mut bytes.to_vec(), &mut out)?;
        Ok(out)
    }

    #[test]
    fn a_text_frame_and_a_split_one() {
        let bytes = text(r#"{"type":"ping","t":1}"#);
        assert_eq!(
            decode_all(&bytes).unwrap(),
            [Message::Text(r#"{"type":"ping","t":1}"#.into())]
        );
        // Byte by byte: nothing until the last byte, then the message; then idle again.
        let mut d = Decoder::new(MAX);
        let mut out = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            d.feed(&mut [*b], &mut out).unwrap();
            assert_eq!(out.is_empty(), i + 1 < bytes.len());
            assert_eq!(d.is_idle(), i + 1 == bytes.len());
        }
    }

    #[test]
    fn sizes_at_the_edge() {
        // 125/126 and 65535/65536 switch header forms; MAX is the limit.
        for n in [0, 125, 126, 127, 1000, MAX] {
            let s = "a".repeat(n);
            assert_eq!(decode_all(&text(&s)).unwrap(), [Message::Text(s)], "{n}");
        }
        let over = text(&"a".repeat(MAX + 1));
        assert_eq!(decode_all(&over), Err(Fault::TooBig));
        // Refused from the header alone: no payload needed.
        let mut d = Decoder::new(MAX);
        assert_eq!(
            d.feed(&mut over[..8].to_vec(), &mut Vec::new()),
            Err(Fault::TooBig)
        );
        // A 64-bit length is refused too, without an allocation.
        let mut huge = vec![0x81, 0xFF];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(decode_all(&huge), Err(Fault::TooBig));
        huge[2] = 0x80;
        assert!(matches!(decode_all(&huge), Err(Fault::Protocol(_))));
    }

    #[test]
    fn fragmented_messages_count_against_the_limit_as_a_whole() {
        let half = "b".repeat(MAX / 2);
        let mut ok = client_frame(OpCode::Data(Data::Text), half.as_bytes(), false, [9; 4]);
        ok.extend(client_frame(
            OpCode::Data(Data::Continue),
            half.as_bytes(),
            true,
            [7; 4],
        ));
        assert_eq!(
            decode_all(&ok).unwrap(),
            [Message::Text(format!("{half}{half}"))]
        );
        let mut over = client_frame(OpCode::Data(Data::Text), half.as_bytes(), false, [9; 4]);
        over.extend(client_frame(
            OpCode::Data(Data::Continue),
            format!("{half}c").as_bytes(),
            true,
            [7; 4],
        ));
        assert_eq!(decode_all(&over), Err(Fault::TooBig));
    }

    #[test]
    fn control_frames_between_fragments_and_their_rules() {
        let mut bytes = client_frame(OpCode::Data(Data::Text), b"hel", false, [1; 4]);
        bytes.extend(client_frame(
            OpCode::Control(tungstenite::protocol::frame::coding::Control::Ping),
            b"p",
            true,
            [2; 4],
        ));
        bytes.extend(client_frame(
            OpCode::Data(Data::Continue),
            b"lo",
            true,
            [3; 4],
        ));
        assert_eq!(
            decode_all(&bytes).unwrap(),
            [Message::Ping(b"p".to_vec()), Message::Text("hello".into())]
        );
        use tungstenite::protocol::frame::coding::Control;
        let ping = |payload: &[u8], fin| {
            client_frame(OpCode::Control(Control::Ping), payload, fin, [5; 4])
        };
        assert!(decode_all(&ping(&[0; 125], true)).is_ok());
        assert!(matches!(
            decode_all(&ping(&[0; 126], true)),
            Err(Fault::Protocol(_))
        ));
        assert!(matches!(
            decode_all(&ping(b"x", false)),
            Err(Fault::Protocol(_))
        ));
    }

    #[test]
    fn protocol_faults() {
        // Unmasked.
        assert!(matches!(
            decode_all(&[0x81, 0x01, b'a']),
            Err(Fault::Protocol(_))
        ));
        // Reserved bits (no extension was negotiated).
        let mut rsv = text("a");
        rsv[0] |= 0x40;
        assert!(matches!(decode_all(&rsv), Err(Fault::Protocol(_))));
        // Unknown opcode.
        let mut op = text("a");
        op[0] = 0x83;
        assert!(matches!(decode_all(&op), Err(Fault::Protocol(_))));
        // A continuation with nothing to continue; a new message inside a fragmented one.
        let cont = client_frame(OpCode::Data(Data::Continue), b"x", true, [1; 4]);
        assert!(matches!(decode_all(&cont), Err(Fault::Protocol(_))));
        let mut two = client_frame(OpCode::Data(Data::Text), b"x", false, [1; 4]);
        two.extend(text("y"));
        assert!(matches!(decode_all(&two), Err(Fault::Protocol(_))));
        // Not UTF-8, also when the bad byte is split over fragments.
        let bad = client_frame(OpCode::Data(Data::Text), &[0xC3], true, [1; 4]);
        assert_eq!(decode_all(&bad), Err(Fault::NotUtf8));
        let mut split = client_frame(OpCode::Data(Data::Text), &[0xC3], false, [1; 4]);
        split.extend(client_frame(
            OpCode::Data(Data::Continue),
            &[0xA9],
            true,
            [1; 4],
        ));
        assert_eq!(
            decode_all(&split).unwrap(),
            [Message::Text("é".into())],
            "a character split over two fragments is fine"
        );
    }

    #[test]
    fn close_frames() {
        use tungstenite::protocol::frame::coding::Control;
        let close =
            |payload: &[u8]| client_frame(OpCode::Control(Control::Close), payload, true, [4; 4]);
        assert_eq!(decode_all(&close(b"")).unwrap(), [Message::Close(None)]);
        assert_eq!(
            decode_all(&close(&[0x03, 0xE8, b'o', b'k'])).unwrap(),
            [Message::Close(Some(1000))]
        );
        assert_eq!(
            decode_all(&close(&[0x0F, 0xA0])).unwrap(),
            [Message::Close(Some(4000))]
        );
        for bad in [&[0x03][..], &[0x03, 0xED], &[0x00, 0x00], &[0x13, 0x88]] {
            assert!(
                matches!(decode_all(&close(bad)), Err(Fault::Protocol(_))),
                "{bad:?}"
            );
        }
        assert_eq!(decode_all(&close(&[0x03, 0xE8, 0xFF])), Err(Fault::NotUtf8));
    }

    #[test]
    fn server_headers_parse_back_with_tungstenite() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let mut head = [0u8; HEADER_BYTES_MAX];
            let n = server_header(OP_TEXT, len, &mut head);
            let mut cursor = std::io::Cursor::new(&head[..n]);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(parsed_len, len as u64);
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(cursor.position() as usize, n);
        }
    }

    proptest! {
        /// Messages fragmented at random, with pings between fragments, in one byte stream cut
        /// into random reads: the decoder yields exactly the messages, in order, whatever the cuts.
        #[test]
        fn any_fragmentation_and_any_split_decode_the_same(
            messages in proptest::collection::vec(
                (".{0,300}", proptest::collection::vec(1usize..64, 0..4), any::<[u8; 4]>()),
                1..8,
            ),
            cuts in proptest::collection::vec(1usize..200, 0..40),
        ) {
            use tungstenite::protocol::frame::coding::Control;
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (text, pieces, mask) in &messages {
                let bytes = text.as_bytes();
                let mut at = 0;
                let mut first = true;
                for p in pieces {
                    let end = (at + p).min(bytes.len());
                    let op = if first { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
                    stream.extend(client_frame(op, &bytes[at..end], false, *mask));
                    stream.extend(client_frame(OpCode::Control(Control::Ping), b"hb", true, *mask));
                    expected.push(Message::Ping(b"hb".to_vec()));
                    first = false;
                    at = end;
                }
                let op = if first { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
                stream.extend(client_frame(op, &bytes[at..], true, *mask));
                expected.push(Message::Text(text.clone()));
            }
            let mut d = Decoder::new(MAX);
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts {
                let end = (at + c).min(stream.len());
                d.feed(&mut stream[at..end].to_vec(), &mut out).unwrap();
                at = end;
            }
            d.feed(&mut stream[at..].to_vec(), &mut out).unwrap();
            prop_assert_eq!(out, expected);
            prop_assert!(d.is_idle());
        }

        /// Whatever the bytes, the decoder answers (a message, a fault or "more"), never panics,
        /// and never holds more than one frame's worth.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = Decoder::new(256);
            let mut out = Vec::new();
            let mut bytes = bytes;
            if d.feed(&mut bytes, &mut out).is_ok() {
                prop_assert!(d.partial.len() <= CLIENT_HEADER_BYTES_MAX + 256);
            }
        }
    }
}

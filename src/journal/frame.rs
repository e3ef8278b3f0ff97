//! One journal frame: `u32 LE body length`, `u32 LE CRC32C of body`, body = bincode 2 (serde,
//! standard config) of `(Lsn, Record)`. Decoding is bounded by [`FRAME_BODY_BYTES_MAX`], so a
//! corrupt length can never make us allocate without bound.

use super::JournalError;
use crate::record::{Lsn, Record};
use bincode::config::{Configuration, Limit, LittleEndian, Varint};

/// Bytes before a frame's body: length (u32 LE) and CRC32C (u32 LE).
pub const FRAME_HEADER_BYTES: usize = 8;

/// The largest body a frame may have. A gift record is a few hundred bytes (ids are at most 64
/// characters, the message at most 200), so 64 KiB leaves ample room while bounding what a
/// corrupt length field or a hostile record can make recovery allocate.
pub const FRAME_BODY_BYTES_MAX: usize = 64 * 1024;

/// The smallest possible body: a one-byte varint LSN and a one-byte enum tag. Anything shorter is
/// corrupt; it also lets the resynchronising scan skip zero-filled regions cheaply.
const FRAME_BODY_BYTES_MIN: usize = 2;

/// bincode's varint encoding of a u64 takes at most 9 bytes (a marker and 8 bytes).
const LSN_ENCODED_BYTES_MAX: usize = 9;

type FrameConfig = Configuration<LittleEndian, Varint, Limit<FRAME_BODY_BYTES_MAX>>;

fn config() -> FrameConfig {
    bincode::config::standard().with_limit::<FRAME_BODY_BYTES_MAX>()
}

/// The encoded size of a gift record with short names and a short message; longer ones grow the
/// buffer once.
const RECORD_BYTES_TYPICAL: usize = 256;

/// Encodes a record alone (without its LSN), so callers can do it outside the journal's lock.
/// Fails when the frame would exceed [`FRAME_BODY_BYTES_MAX`]: such a frame could not be read back.
pub(crate) fn encode_record(record: &Record) -> Result<Vec<u8>, JournalError> {
    // One pass into a buffer sized for a typical record (`encode_to_vec` starts empty and
    // grows by doubling: five reallocations for a gift).
    let mut bytes = Vec::with_capacity(RECORD_BYTES_TYPICAL);
    bincode::serde::encode_into_std_write(record, &mut bytes, config())
        .map_err(|e| JournalError::Encode(e.to_string()))?;
    if bytes.len() + LSN_ENCODED_BYTES_MAX > FRAME_BODY_BYTES_MAX {
        return Err(JournalError::TooLarge { bytes: bytes.len() });
    }
    Ok(bytes)
}

/// Appends the frame of `(lsn, record)` to `buf`, given the record's bytes from [`encode_record`].
/// A bincode tuple is its fields' encodings back to back, so the body decodes as `(Lsn, Record)`.
pub(crate) fn append_frame(buf: &mut Vec<u8>, lsn: Lsn, record_bytes: &[u8]) {
    let mut lsn_bytes = [0u8; LSN_ENCODED_BYTES_MAX];
    let lsn_len = bincode::encode_into_slice(lsn, &mut lsn_bytes, config())
        .expect("a u64 varint always fits in 9 bytes");
    let body_len = lsn_len + record_bytes.len();
    assert!(
        body_len <= FRAME_BODY_BYTES_MAX,
        "encode_record bounds the body"
    );
    let crc = crc32c::crc32c_append(crc32c::crc32c(&lsn_bytes[..lsn_len]), record_bytes);
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&lsn_bytes[..lsn_len]);
    buf.extend_from_slice(record_bytes);
}

/// A decoded frame and the offset just past it.
pub(crate) struct Frame {
    pub lsn: Lsn,
    pub record: Record,
    pub end: usize,
}

/// What is wrong with a frame's header, length or CRC; formatted only when reported.
enum Fault {
    ShortHeader(usize),
    BadLength(usize),
    ShortBody { len: usize, present: usize },
    Crc { stored: u32, computed: u32 },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::ShortHeader(n) => {
                write!(
                    f,
                    "incomplete frame header: {n} of {FRAME_HEADER_BYTES} bytes"
                )
            }
            Fault::BadLength(len) => write!(
                f,
                "bad frame length {len} (allowed {FRAME_BODY_BYTES_MIN}..={FRAME_BODY_BYTES_MAX})"
            ),
            Fault::ShortBody { len, present } => {
                write!(
                    f,
                    "incomplete frame: body of {len} bytes, {present} present"
                )
            }
            Fault::Crc { stored, computed } => write!(
                f,
                "CRC mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
        }
    }
}

/// The body of the frame at `offset`, once its length is in range, it is all there and its CRC
/// matches; nothing is decoded or formatted, so the resynchronising scan can try every offset
/// of a large segment cheaply.
fn checked_body(data: &[u8], offset: usize) -> Result<&[u8], Fault> {
    let rest = data.get(offset..).unwrap_or(&[]);
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(Fault::ShortHeader(rest.len()));
    }
    let body_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let stored = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if !(FRAME_BODY_BYTES_MIN..=FRAME_BODY_BYTES_MAX).contains(&body_len) {
        return Err(Fault::BadLength(body_len));
    }
    let body = rest
        .get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_len)
        .ok_or(Fault::ShortBody {
            len: body_len,
            present: rest.len() - FRAME_HEADER_BYTES,
        })?;
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(Fault::Crc { stored, computed });
    }
    Ok(body)
}

/// Reads the frame starting at `offset`. The error says what is wrong with it (for the message
/// naming the segment and offset). Never panics, whatever the bytes.
pub(crate) fn read_frame(data: &[u8], offset: usize) -> Result<Frame, String> {
    let body = checked_body(data, offset).map_err(|fault| fault.to_string())?;
    let ((lsn, record), used): ((Lsn, Record), usize) =
        bincode::serde::decode_from_slice(body, config())
            .map_err(|e| format!("undecodable frame body: {e}"))?;
    if used != body.len() {
        return Err(format!(
            "frame body has {} trailing bytes",
            body.len() - used
        ));
    }
    Ok(Frame {
        lsn,
        record,
        end: offset + FRAME_HEADER_BYTES + body.len(),
    })
}

/// The size of the unit a disk writes atomically (a sector). Recovery looks for a whole zeroed
/// sector to tell pages of a preallocated segment that never reached the disk from other damage.
pub(crate) const SECTOR_BYTES: usize = 512;

/// True when every byte is zero (vectorisable: no early exit inside a 4 KiB chunk).
pub(crate) fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// True when `data[from..to]` holds a whole sector-aligned run of [`SECTOR_BYTES`] zeros.
pub(crate) fn has_zero_sector(data: &[u8], from: usize, to: usize) -> bool {
    let to = to.min(data.len());
    let mut at = from.next_multiple_of(SECTOR_BYTES);
    while at + SECTOR_BYTES <= to {
        if is_all_zero(&data[at..at + SECTOR_BYTES]) {
            return true;
        }
        at += SECTOR_BYTES;
    }
    false
}

/// The first offset in `from..` where a well-formed frame (length in range, CRC matching,
/// decodable) starts. Recovery uses it to tell a torn tail (nothing valid after the bad frame)
/// from corruption in the middle (valid frames follow). Runs of zeros (the unused end of a
/// preallocated segment) are skipped at memory speed: a frame's length is at least
/// `FRAME_BODY_BYTES_MIN`, so one of its four length bytes is non-zero.
pub(crate) fn valid_frame_after(data: &[u8], from: usize) -> Option<usize> {
    let last_start = data
        .len()
        .checked_sub(FRAME_HEADER_BYTES + FRAME_BODY_BYTES_MIN)?;
    let mut offset = from;
    while offset <= last_start {
        if data[offset..offset + 4] == [0u8; 4] {
            let nonzero = data[offset..].iter().position(|&b| b != 0)?;
            // A frame whose length bytes hold that first non-zero byte starts at most 3 before it.
            offset = (offset + nonzero).saturating_sub(3).max(offset + 1);
            continue;
        }
        if checked_body(data, offset).is_ok() && read_frame(data, offset).is_ok() {
            return Some(offset);
        }
        offset += 1;
    }
    None
}

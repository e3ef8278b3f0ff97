//! Fuzzing the journal's decoder and recovery scan (proptest, bounded cases, run by `cargo test`):
//! whatever the bytes on disk, reading them never panics, never allocates beyond the frame bound,
//! and never returns a record that was not written: corruption is an error or a cut torn tail.

use super::frame::{
    append_frame, encode_record, read_frame, valid_frame_after, FRAME_BODY_BYTES_MAX,
};
use super::recover::{scan, segment_path};
use crate::money::Shares;
use crate::record::{CreditRecord, GiftRecord, Lsn, Record};
use proptest::prelude::*;

fn record(n: u64) -> Record {
    if n.is_multiple_of(3) {
        Record::Credit(CreditRecord {
            user_id: format!("u{n}"),
            coins: 1000 + n,
            reference: format!("ref-{n}"),
            balance_after: 1000 + n,
            ts_ms: 1_700_000_000_000 + n,
        })
    } else {
        Record::Gift(GiftRecord {
            user_id: format!("u{}", n % 5).into(),
            user_name: format!("User {n}").into(),
            gift_id: format!("g{n}").into(),
            stream: "demo".into(),
            sticker: "rose".into(),
            count: 1,
            price: 10,
            amount: 10,
            shares: Shares {
                store: 30_000,
                streamer: 50_000,
                platform: 20_000,
            },
            message: n.is_multiple_of(2).then(|| format!("question {n}")),
            balance_after: 990,
            ts_ms: 1_700_000_000_000 + n,
        })
    }
}

/// Frames of records 1..=n, as one segment's bytes.
fn segment(n: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    for lsn in 1..=n {
        append_frame(&mut buf, lsn, &encode_record(&record(lsn)).unwrap());
    }
    buf
}

/// A frame header (length, CRC32C) around `body`, so the body reaches the decoder.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    buf.extend_from_slice(body);
    buf
}

/// Scans a journal directory holding `bytes` as its only segment (first lsn 1).
fn scan_bytes(bytes: &[u8]) -> Result<Vec<(Lsn, Record)>, super::JournalError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(segment_path(dir.path(), 1), bytes).unwrap();
    scan(dir.path(), 0, super::BATCH_RECORDS_MAX_DEFAULT).map(|s| s.records)
}

#[test]
fn a_body_claiming_a_huge_string_is_refused_without_allocating_it() {
    // lsn 1, variant 1 (Gift), then a string length varint of 2^62: a body with a valid CRC
    // that would make an unbounded decoder try to allocate exabytes.
    let mut body = vec![1u8, 1u8, 0xfd];
    body.extend_from_slice(&(1u64 << 62).to_le_bytes());
    body.extend_from_slice(b"abc");
    let frame = framed(&body);
    let err = read_frame(&frame, 0).err().expect("refused");
    assert!(err.contains("undecodable"), "{err}");
    // Lengths at and over the frame bound.
    let mut over = framed(&[0u8; 16]);
    over[..4].copy_from_slice(&((FRAME_BODY_BYTES_MAX + 1) as u32).to_le_bytes());
    assert!(read_frame(&over, 0)
        .err()
        .unwrap()
        .contains("bad frame length"));
    over[..4].copy_from_slice(&(u32::MAX).to_le_bytes());
    assert!(read_frame(&over, 0)
        .err()
        .unwrap()
        .contains("bad frame length"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    /// Arbitrary bytes as a frame and as a whole segment: an error or records, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = read_frame(&bytes, 0);
        let _ = read_frame(&bytes, bytes.len() / 2);
        let _ = read_frame(&bytes, usize::MAX);
        let _ = valid_frame_after(&bytes, 0);
        let _ = scan_bytes(&bytes);
    }

    /// Arbitrary bodies with a correct length and CRC: the bincode decoder itself is fuzzed.
    #[test]
    fn arbitrary_bodies_with_valid_crc_never_panic(body in prop::collection::vec(any::<u8>(), 2..1024)) {
        let frame = framed(&body);
        if let Ok(f) = read_frame(&frame, 0) {
            prop_assert_eq!(f.end, frame.len());
        }
    }

    /// A valid segment with one byte changed: recovery refuses it, or (damage in the last frame)
    /// cuts it as a torn tail; it never returns a record that differs from what was written.
    #[test]
    fn one_flipped_byte_is_detected(n in 1u64..12, at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let mut bytes = segment(n);
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        match scan_bytes(&bytes) {
            Err(_) => {}
            Ok(records) => {
                prop_assert!(records.len() < n as usize, "corruption at byte {} went unnoticed", i);
                for (lsn, r) in &records {
                    prop_assert_eq!(r, &record(*lsn));
                }
            }
        }
    }

    /// A valid segment cut anywhere (a torn write): the whole frames before the cut come back.
    #[test]
    fn a_cut_segment_keeps_its_whole_frames(n in 1u64..12, at in any::<prop::sample::Index>()) {
        let bytes = segment(n);
        let cut = at.index(bytes.len() + 1);
        let records = scan_bytes(&bytes[..cut]).unwrap();
        let whole = (1..=n).take_while(|k| segment(*k).len() <= cut).count();
        prop_assert_eq!(records.len(), whole);
    }

    /// The resynchronising scan skips runs of zeros; it must find exactly the offset that trying
    /// every offset finds, whatever mix of zeros, frames and garbage the bytes are.
    #[test]
    fn the_zero_skipping_resync_finds_what_trying_every_offset_finds(
        pieces in prop::collection::vec((0u8..3, 1usize..700), 1..10),
        from in 0usize..3000,
    ) {
        let mut data = Vec::new();
        for (i, (kind, len)) in pieces.iter().enumerate() {
            match kind {
                0 => data.resize(data.len() + len, 0),
                1 => append_frame(&mut data, *len as u64, &encode_record(&record(i as u64)).unwrap()),
                _ => data.extend((0..*len).map(|k| (k * 31 + 7) as u8)),
            }
        }
        let every_offset = (from..data.len()).find(|&o| read_frame(&data, o).is_ok());
        prop_assert_eq!(valid_frame_after(&data, from), every_offset);
    }
}

//! Reading the journal back on start: list segments, check every frame, cut a torn tail.

use super::frame::{has_zero_sector, is_all_zero, read_frame, valid_frame_after};
use super::JournalError;
use crate::record::{Lsn, Record};
use std::fs;
use std::path::{Path, PathBuf};

/// Segment files are named by their first LSN, zero-padded to this many digits (u64::MAX has 20).
const SEGMENT_NAME_DIGITS: usize = 20;
const SEGMENT_SUFFIX: &str = ".log";

/// The next segment, zero-filled and fsynced ahead of time by the writer's preparer thread, then
/// renamed to its segment name when it is taken. Not a segment: recovery ignores it, and the
/// preparer deletes a stale one (it may be half-filled) when the journal opens.
pub(crate) const PREPARED_SEGMENT_NAME: &str = "next-segment.zero";

pub(crate) fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!(
        "{first_lsn:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    ))
}

/// A segment file on disk.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub first_lsn: Lsn,
    pub path: PathBuf,
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Every segment in `dir`, in LSN order. Other files are left alone (and logged).
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<Segment>, JournalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let first_lsn = name
            .strip_suffix(SEGMENT_SUFFIX)
            .filter(|stem| stem.len() == SEGMENT_NAME_DIGITS)
            .and_then(|stem| stem.parse::<Lsn>().ok());
        match first_lsn {
            _ if name == super::LOCK_FILE_NAME || name == PREPARED_SEGMENT_NAME => {}
            Some(first_lsn) => segments.push(Segment {
                first_lsn,
                path: entry.path(),
            }),
            None => {
                tracing::warn!(file = %entry.path().display(), "ignoring a file that is not a journal segment")
            }
        }
    }
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

/// What the scan found.
pub(crate) struct Scan {
    /// Records with lsn > after_lsn, in order.
    pub records: Vec<(Lsn, Record)>,
    /// The LSN the next record gets.
    pub next_lsn: Lsn,
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Every segment still on disk, in order (the last may be empty).
    pub segments: Vec<Segment>,
    /// Bytes in the last segment after any cut.
    pub last_segment_bytes: u64,
}

fn corrupt(path: &Path, offset: usize, reason: String) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    }
}

/// Scans every segment. Segments wholly at or below `after_lsn` (the store's checkpoint) are not
/// read: the store has their records. Every other frame must be intact and LSNs must follow each
/// other with no gap above `after_lsn`. What may end a segment early:
///
/// - zeros to its end: the unused part of a preallocated segment. Cut, nothing lost (a missing
///   record shows as a gap before the next segment's first LSN).
/// - in the last segment only, damage that no well-formed frame follows: a torn write, cut.
/// - in the last segment only, damage followed by well-formed frames, when the damage holds a
///   whole zeroed sector and every frame after it could belong to the same write (its LSN is
///   within `batch_records_max` of the first missing one): pages of the last write that never
///   reached the disk before a power cut (a preallocated segment is overwritten in place, and
///   the kernel writes a write's pages back in any order). That write was never fsynced, so none
///   of it was acknowledged: cut at the damage.
///
/// Anything else is corruption, and the open stops: the operator must look.
pub(crate) fn scan(
    dir: &Path,
    after_lsn: Lsn,
    batch_records_max: usize,
) -> Result<Scan, JournalError> {
    let segments = list_segments(dir)?;
    let mut records = Vec::new();
    let mut torn_tail = None;
    let mut last_segment_bytes = 0u64;
    // The LSN the next frame must carry, once known.
    let mut expected: Option<Lsn> = None;
    let count = segments.len();
    for (index, segment) in segments.iter().enumerate() {
        let is_last = index + 1 == count;
        if let Some(next) = segments.get(index + 1) {
            if next.first_lsn <= after_lsn.saturating_add(1) {
                // Everything in this segment is at most next.first_lsn - 1 <= after_lsn: stored.
                expected = None;
                continue;
            }
        }
        if segment.first_lsn > after_lsn.saturating_add(1) && expected != Some(segment.first_lsn) {
            return Err(corrupt(
                &segment.path,
                0,
                format!(
                    "segment starts at lsn {}, but the records before it end at {} (store checkpoint {after_lsn}): records are missing",
                    segment.first_lsn,
                    expected.map_or(after_lsn, |e| e - 1).max(after_lsn),
                ),
            ));
        }
        let data = fs::read(&segment.path).map_err(|e| io_error(&segment.path, e))?;
        let mut offset = 0usize;
        let mut want = segment.first_lsn;
        while offset < data.len() {
            match read_frame(&data, offset) {
                Ok(frame) => {
                    if frame.lsn != want {
                        return Err(corrupt(
                            &segment.path,
                            offset,
                            format!("frame has lsn {}, expected {want}", frame.lsn),
                        ));
                    }
                    if frame.lsn > after_lsn {
                        records.push((frame.lsn, frame.record));
                    }
                    want += 1;
                    offset = frame.end;
                }
                Err(_) if is_all_zero(&data[offset..]) => {
                    tracing::debug!(
                        segment = %segment.path.display(),
                        offset,
                        "cutting the unused, zero-filled end of a preallocated segment"
                    );
                    cut(&segment.path, offset as u64)?;
                    break;
                }
                Err(reason) => {
                    if !is_last {
                        return Err(corrupt(&segment.path, offset, reason));
                    }
                    let dropped = match valid_frame_after(&data, offset + 1) {
                        None => 0,
                        Some(valid_at) => unwritten_pages_of_one_write(
                            &data,
                            offset,
                            valid_at,
                            want,
                            batch_records_max,
                        )
                        .map_err(|why| {
                            corrupt(
                                &segment.path,
                                offset,
                                format!("{reason}; a well-formed frame follows at offset {valid_at}, so this is not a torn tail ({why})"),
                            )
                        })?,
                    };
                    tracing::warn!(
                        segment = %segment.path.display(),
                        offset,
                        cut_bytes = data.len() - offset,
                        dropped_frames = dropped,
                        %reason,
                        "journal has a torn tail (a write cut short by a crash, never acknowledged); cutting it"
                    );
                    cut(&segment.path, offset as u64)?;
                    torn_tail = Some((segment.path.clone(), offset as u64));
                    break;
                }
            }
        }
        if is_last {
            last_segment_bytes = offset as u64;
        }
        expected = Some(want);
    }
    let next_lsn = expected.unwrap_or(1).max(after_lsn.saturating_add(1));
    Ok(Scan {
        records,
        next_lsn,
        torn_tail,
        segments,
        last_segment_bytes,
    })
}

/// Damage at `bad` with a well-formed frame at `valid_at` after it: `Ok(frames after the
/// damage)` when this can only be the last write's pages reaching the disk out of order, else
/// `Err(why not)`. Every damaged stretch must hold a whole zeroed sector (a page never written
/// over the preallocated zeros), and every frame after the damage must carry an LSN above
/// `want` (the first missing one) and below `want + batch_records_max`: one write holds at most
/// that many records, and the writer starts a write only after the previous one is fsynced, so
/// a frame from any later write would mean the damaged write had been acknowledged.
fn unwritten_pages_of_one_write(
    data: &[u8],
    bad: usize,
    valid_at: usize,
    want: Lsn,
    batch_records_max: usize,
) -> Result<usize, String> {
    let mut damage_from = bad;
    let mut at = valid_at;
    let mut frames = 0usize;
    loop {
        if !has_zero_sector(data, damage_from, at) {
            return Err(format!(
                "the damage at {damage_from}..{at} holds no zeroed sector, so it is not an unwritten page"
            ));
        }
        // Walk the run of frames that starts at `at`.
        while let Ok(frame) = read_frame(data, at) {
            if frame.lsn <= want || frame.lsn - want >= batch_records_max as u64 {
                return Err(format!(
                    "the frame at {at} has lsn {}, outside the write that held lsn {want} (at most {batch_records_max} records)",
                    frame.lsn
                ));
            }
            frames += 1;
            at = frame.end;
        }
        if at >= data.len() || is_all_zero(&data[at..]) {
            return Ok(frames);
        }
        match valid_frame_after(data, at + 1) {
            None => return Ok(frames),
            Some(next) => {
                damage_from = at;
                at = next;
            }
        }
    }
}

/// Truncates a segment at `len` and makes that durable.
fn cut(path: &Path, len: u64) -> Result<(), JournalError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.set_len(len).map_err(|e| io_error(path, e))?;
    file.sync_all().map_err(|e| io_error(path, e))
}

/// Makes a directory's entries (created or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), std::io::Error> {
    fs::File::open(dir)?.sync_all()
}

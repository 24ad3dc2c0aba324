//! Reading and verifying an audit directory.
//!
//! [`scan`] (used by `verify`, `read`, `export` and `rekey`) makes one pass
//! over `RETIRED`, every segment and `HEAD`, checking each segment on its
//! own (header MAC, record hashes, seq order, `prev` links, checkpoint MACs)
//! and as a chain (each header binds the previous segment's last hash and
//! closing MAC, tombstones bind deleted segments, `HEAD` pins the end).
//!
//! [`scan_for_open`] is what `open` runs instead, so that opening costs
//! O(last segment) and not O(whole log): it reads `HEAD`, `RETIRED`, the
//! segment listing, only the header line and the closing checkpoint (read
//! from the end of the file) of every closed segment, and the last segment
//! in full. The bodies of closed segments are not re-read: they were
//! verified when written and are checked by `verify`. When that is not
//! enough to decide (any damage, `HEAD` lagging into the middle of a closed
//! segment after a crash, a last segment without header) it defers to
//! [`scan`], so every outcome other than "closed segment bodies were not
//! read" is exactly the full scan's.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::event::AuditRecord;
use super::format::{
    self, data_len, genesis_hash, mac_matches, mac_of_prefix, parse_control, parse_segment_name, record_hash_of_prefix, unseal, zero_mac,
    Checkpoint, Head, Header, Retired, CKPT_DOMAIN, HEADER_DOMAIN, HEAD_DOMAIN, HEAD_FILE, RETIRED_DOMAIN, RETIRED_FILE,
};
use super::AuditKey;
use crate::{Error, Result};

/// Bytes after the last checkpoint of the last segment that no appender was
/// ever told were durable (a crash mid-write); [`super::AuditLog::open`] drops them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornTail {
    /// Segment holding the tail.
    pub segment: u32,
    /// Bytes dropped (or to drop).
    pub bytes_dropped: u64,
    /// Complete but unconfirmed records among them.
    pub records_dropped: u64,
}

/// What [`super::AuditLog::open`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReport {
    /// Records in the log (the next seq), counting retired ones.
    pub records: u64,
    /// Segment files present.
    pub segments: u32,
    /// Segments removed by retention (recorded in `RETIRED`).
    pub retired_segments: u32,
    /// A torn tail that was cut off, if any.
    pub torn_tail_repaired: Option<TornTail>,
}

/// The first record (or control line) that failed verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRecord {
    /// Segment where it was found.
    pub segment: u32,
    /// Seq of the first record that can no longer be trusted.
    pub seq: u64,
    /// What failed.
    pub reason: String,
}

/// Result of [`super::AuditLog::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Records verified (the next seq if the log is intact), counting retired ones.
    pub records: u64,
    /// Segment files verified.
    pub segments: u32,
    /// Segments removed by retention.
    pub retired_segments: u32,
    /// The first damage found; `None` if the log is intact.
    pub first_bad: Option<BadRecord>,
    /// The log ends with unconfirmed bytes from a crash that `open` will drop.
    pub torn_tail: bool,
}

impl VerifyReport {
    /// True when nothing was tampered with or damaged (a torn tail from a
    /// crash is not damage: no appender was told those records were durable).
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// What the chain expects the next segment's header to say.
#[derive(Clone, Debug)]
pub(crate) struct Expect {
    pub segment: u32,
    pub first_seq: u64,
    pub prev_hash: String,
    pub prev_mac: String,
}

impl Expect {
    pub(crate) fn genesis() -> Self {
        Expect { segment: 0, first_seq: 0, prev_hash: genesis_hash(), prev_mac: zero_mac() }
    }
}

/// One segment as scanned.
#[derive(Clone, Debug)]
pub(crate) struct SegState {
    pub index: u32,
    pub path: PathBuf,
    /// False when the first line is missing or partial (crash at creation).
    pub has_header: bool,
    pub first_seq: u64,
    /// Records covered by a checkpoint.
    pub records: u64,
    /// Hash of the last checkpointed record (header's prev_hash if none).
    pub last_hash: String,
    /// MAC of the last checkpoint (the header's own MAC if none).
    pub last_mac: String,
    /// Time of the newest checkpointed record (`i64::MIN` if none). When
    /// `body_verified` is false this is only a lower bound: the time of the
    /// segment's last record (authenticated by its closing checkpoint).
    pub newest_ms: i64,
    /// Every record of the segment was read and verified. False for closed
    /// segments of which [`scan_for_open`] read only the header and the
    /// closing checkpoint.
    pub body_verified: bool,
    /// Byte offset just after the last checkpoint (or the header).
    pub auth_end: u64,
    pub file_len: u64,
    /// Complete, well-chained records after the last checkpoint.
    pub tail_records: u64,
    /// The file ends with a partial line.
    pub tail_partial: bool,
}

impl SegState {
    fn has_tail(&self) -> bool {
        self.file_len > self.auth_end || !self.has_header
    }
}

/// The whole directory as scanned.
#[derive(Debug)]
pub(crate) struct Scan {
    pub retired: Vec<Retired>,
    /// Present segments after the retired ones, in order.
    pub segments: Vec<SegState>,
    /// Segment files already listed in `RETIRED` (deletion interrupted).
    pub stale_files: Vec<PathBuf>,
    pub head: Option<Head>,
    pub bad: Option<BadRecord>,
    /// Checkpointed records, counting retired ones (the next seq).
    pub records: u64,
}

impl Scan {
    pub(crate) fn torn(&self) -> Option<TornTail> {
        if self.bad.is_some() {
            return None;
        }
        let last = self.segments.last()?;
        if !last.has_tail() {
            return None;
        }
        Some(TornTail {
            segment: last.index,
            bytes_dropped: last.file_len - if last.has_header { last.auth_end } else { 0 },
            records_dropped: last.tail_records,
        })
    }

    pub(crate) fn report(&self) -> VerifyReport {
        VerifyReport {
            records: self.records,
            segments: self.segments.len() as u32,
            retired_segments: self.retired.len() as u32,
            first_bad: self.bad.clone(),
            torn_tail: self.torn().is_some(),
        }
    }

    /// Turn damage into the error `open` and `rekey` refuse with.
    pub(crate) fn into_ok(self) -> Result<Scan> {
        if let Some(b) = &self.bad {
            return Err(Error::AuditTampered { seq: b.seq, reason: format!("segment {}: {}", b.segment, b.reason) });
        }
        Ok(self)
    }
}

/// Receives each checkpointed record with its raw line (without newline).
pub(crate) type Visitor<'a> = &'a mut dyn FnMut(AuditRecord, &[u8]) -> Result<()>;

fn bad(segment: u32, seq: u64, reason: impl Into<String>) -> Option<BadRecord> {
    Some(BadRecord { segment, seq, reason: reason.into() })
}

/// What both scans start from: `HEAD`, `RETIRED` and the segment listing.
struct Prologue {
    head: Option<Head>,
    /// Why `HEAD` does not verify (checked only once the log's end is known).
    head_bad: Option<String>,
    /// `RETIRED` as far as it verified; `bad` says where it stopped.
    retired: Vec<Retired>,
    bad: Option<BadRecord>,
    /// What the first live segment's header must bind.
    expect: Expect,
    /// Segment files after the retired ones, in order.
    live: Vec<(u32, PathBuf)>,
    /// Segment files already listed in `RETIRED`.
    stale_files: Vec<PathBuf>,
}

impl Prologue {
    fn into_scan(self) -> (Scan, Option<String>, Expect, Vec<(u32, PathBuf)>) {
        let scan = Scan {
            // Damage in RETIRED: nothing counts as verified.
            records: if self.bad.is_some() { 0 } else { self.expect.first_seq },
            retired: self.retired,
            segments: Vec::new(),
            stale_files: self.stale_files,
            head: self.head,
            bad: self.bad,
        };
        (scan, self.head_bad, self.expect, self.live)
    }
}

/// Read and check `HEAD` (MAC only), `RETIRED` and the listing of `dir`;
/// refuse a log signed with another key.
fn prologue(dir: &Path, key: Option<&AuditKey>) -> Result<Prologue> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(dir, std::io::Error::other("not a directory")));
    }

    // HEAD first: it tells which record's hash to capture.
    let head_path = dir.join(HEAD_FILE);
    let head_raw = match fs::read(&head_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&head_path, e)),
    };
    let mut head_bad: Option<String> = None;
    let head: Option<Head> = match &head_raw {
        None => None,
        Some(raw) => {
            let line = raw.strip_suffix(b"\n").unwrap_or(raw);
            match parse_control::<Head>(line) {
                None => {
                    head_bad = Some("HEAD is unreadable".into());
                    None
                }
                Some((h, prefix, auth)) => {
                    if let Some(k) = key {
                        if !raw.ends_with(b"\n") || !mac_matches(&mac_of_prefix(k, HEAD_DOMAIN, prefix), auth) {
                            head_bad = Some("HEAD MAC mismatch".into());
                        } else if h.format != format::FORMAT {
                            head_bad = Some(format!("HEAD format {} unknown", h.format));
                        }
                    }
                    Some(h)
                }
            }
        }
    };

    // Segment files on disk.
    let mut present: Vec<(u32, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(i) = entry.file_name().to_str().and_then(parse_segment_name) {
            present.push((i, entry.path()));
        }
    }
    present.sort();

    // A wrong key is told apart from tampering when HEAD and the first
    // segment header agree on a key id that is not ours.
    if let Some(k) = key {
        let first_key_id = match present.first() {
            Some((_, p)) => first_header(p)?.map(|h| h.key_id),
            None => None,
        };
        let log_key = match (&head, &first_key_id) {
            (Some(h), Some(s)) => (&h.key_id == s).then(|| s.clone()),
            (None, Some(s)) => Some(s.clone()),
            (Some(h), None) => Some(h.key_id.clone()),
            (None, None) => None,
        };
        if let Some(id) = log_key {
            if id != k.id() {
                return Err(Error::Key(format!(
                    "the audit log at {} was signed with key id {id}, not with the given key ({})",
                    dir.display(),
                    k.id()
                )));
            }
        }
    }

    let mut out =
        Prologue { head, head_bad, retired: Vec::new(), bad: None, expect: Expect::genesis(), live: Vec::new(), stale_files: Vec::new() };

    // Tombstones of retired segments.
    let retired_path = dir.join(RETIRED_FILE);
    match fs::read(&retired_path) {
        Ok(raw) => {
            for (i, line) in raw.split_inclusive(|&b| b == b'\n').enumerate() {
                let seg = i as u32;
                let first_seq = out.expect.first_seq;
                let Some(l) = line.strip_suffix(b"\n") else {
                    out.bad = bad(seg, first_seq, "RETIRED ends with a partial line");
                    return Ok(out);
                };
                let Some((r, prefix, auth)) = parse_control::<Retired>(l) else {
                    out.bad = bad(seg, first_seq, "unreadable RETIRED entry");
                    return Ok(out);
                };
                if let Some(k) = key {
                    if !mac_matches(&format::mac_of_prefix(k, RETIRED_DOMAIN, prefix), auth) {
                        out.bad = bad(seg, first_seq, "RETIRED entry MAC mismatch");
                        return Ok(out);
                    }
                }
                if r.kind != "retired" || r.segment != seg || r.first_seq != first_seq || r.last_seq < r.first_seq {
                    out.bad = bad(seg, first_seq, "RETIRED entries are not a contiguous prefix of the log");
                    return Ok(out);
                }
                out.expect =
                    Expect { segment: seg + 1, first_seq: r.last_seq + 1, prev_hash: r.last_hash.clone(), prev_mac: r.closing_mac.clone() };
                out.retired.push(r);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&retired_path, e)),
    }

    for (i, p) in present {
        if (i as usize) < out.retired.len() {
            out.stale_files.push(p);
        } else {
            out.live.push((i, p));
        }
    }
    Ok(out)
}

/// The hash of record `want_seq` if it is the last record of a retired
/// segment (the only place in them `HEAD` can point to).
fn retired_hash(retired: &[Retired], want_seq: Option<u64>) -> Option<String> {
    let w = want_seq?;
    retired.iter().find(|t| t.last_seq == w).map(|t| t.last_hash.clone())
}

/// The "missing segment file" damage.
fn missing(expect: &Expect) -> Option<BadRecord> {
    bad(expect.segment, expect.first_seq, format!("segment file {} is missing", format::segment_name(expect.segment)))
}

/// Scan `dir`. With a key every MAC and `HEAD` are checked; without one
/// (reading/export) only hashes and links. I/O errors are errors; damage is
/// reported in [`Scan::bad`].
pub(crate) fn scan(dir: &Path, key: Option<&AuditKey>, mut visit: Option<Visitor<'_>>) -> Result<Scan> {
    let (mut out, head_bad, mut expect, live) = prologue(dir, key)?.into_scan();
    if out.bad.is_some() {
        return Ok(out);
    }

    let want_seq = out.head.as_ref().and_then(|h| h.records.checked_sub(1));
    let mut want_hash = retired_hash(&out.retired, want_seq);

    let n = live.len();
    for (pos, (index, path)) in live.into_iter().enumerate() {
        if index != expect.segment {
            out.bad = missing(&expect);
            return Ok(out);
        }
        let is_last = pos + 1 == n;
        let (st, b, captured) = scan_segment(&path, index, key, &expect, want_seq, &mut visit)?;
        if captured.is_some() {
            want_hash = captured;
        }
        if b.is_some() {
            out.bad = b;
            out.segments.push(st);
            return Ok(out);
        }
        if !is_last {
            if st.has_tail() {
                out.bad = bad(index, st.first_seq + st.records, "a segment before the last ends without a checkpoint");
                return Ok(out);
            }
            if st.records == 0 {
                out.bad = bad(index, st.first_seq, "empty segment before the last");
                return Ok(out);
            }
        }
        out.records = st.first_seq + st.records;
        expect = Expect {
            segment: index + 1,
            first_seq: st.first_seq + st.records,
            prev_hash: st.last_hash.clone(),
            prev_mac: st.last_mac.clone(),
        };
        out.segments.push(st);
    }

    if key.is_none() {
        return Ok(out);
    }
    check_head(&mut out, head_bad, want_hash, expect.segment);
    Ok(out)
}

/// Compare the end of the scanned log with `HEAD` (keyed scans only).
/// `want_hash` is the hash of record `HEAD.records - 1` if it was found
/// checkpointed; `next_segment` names the damage when no segment is left.
fn check_head(out: &mut Scan, head_bad: Option<String>, want_hash: Option<String>, next_segment: u32) {
    let last_seg = out.segments.last().map(|s| s.index).unwrap_or(next_segment);
    if let Some(reason) = head_bad {
        out.bad = bad(last_seg, out.records, reason);
        return;
    }
    match &out.head {
        None => {
            if !out.segments.is_empty() || !out.retired.is_empty() {
                out.bad = bad(last_seg, out.records, "HEAD is missing");
            }
        }
        Some(h) => {
            if h.records > out.records {
                out.bad = bad(
                    last_seg,
                    out.records,
                    format!("log ends after {} records but HEAD confirms {}: records were cut off", out.records, h.records),
                );
            } else if h.records == 0 {
                if h.last_hash != genesis_hash() {
                    out.bad = bad(last_seg, 0, "HEAD of an empty log does not hold the genesis hash");
                }
            } else if want_hash.as_deref() != Some(h.last_hash.as_str()) {
                out.bad = bad(last_seg, h.records - 1, format!("record {} does not match the hash in HEAD", h.records - 1));
            }
        }
    }
}

/// What `open` needs to know, reading only `HEAD`, `RETIRED`, the listing,
/// the header and closing checkpoint of every closed segment and the last
/// segment in full (keyed). Closed segments appear in [`Scan::segments`]
/// with `body_verified == false`.
///
/// Returns `None` when that is not enough to decide, and the caller must
/// run [`scan`]: on any damage (so the error names the first bad record
/// exactly as `verify` does), when `HEAD` lags to a record inside a closed
/// segment (a crash under `Durability::Off`), or when the last segment has
/// no complete header (a crash while creating it: the previous segment
/// becomes the current one and must be read in full).
///
/// Checked without reading bodies: the segment files are exactly the
/// contiguous run after the retired ones (a deleted file is caught); every
/// closed segment's header verifies, names its own index and binds the
/// previous segment's closing checkpoint (seq, hash, MAC) or tombstone (a
/// swapped, replaced or reordered file is caught); every closed segment
/// ends with a verifying checkpoint of its own right after the record it
/// covers (a truncated or extended one is caught). Not checked: records
/// and checkpoints inside closed segments, which only [`scan`] reads.
pub(crate) fn scan_for_open(dir: &Path, key: &AuditKey) -> Result<Option<Scan>> {
    let (mut out, head_bad, mut expect, live) = prologue(dir, Some(key))?.into_scan();
    if out.bad.is_some() || head_bad.is_some() {
        return Ok(None);
    }
    let want_seq = out.head.as_ref().and_then(|h| h.records.checked_sub(1));
    let mut want_hash = retired_hash(&out.retired, want_seq);

    let n = live.len();
    for (pos, (index, path)) in live.into_iter().enumerate() {
        if index != expect.segment {
            return Ok(None);
        }
        let st = if pos + 1 < n {
            let Some(st) = closed_skeleton(&path, index, key, &expect)? else {
                return Ok(None);
            };
            if want_seq == Some(st.first_seq + st.records - 1) {
                want_hash = Some(st.last_hash.clone());
            }
            st
        } else {
            let (st, b, captured) = scan_segment(&path, index, Some(key), &expect, want_seq, &mut None)?;
            if b.is_some() || !st.has_header {
                return Ok(None);
            }
            if captured.is_some() {
                want_hash = captured;
            }
            st
        };
        out.records = st.first_seq + st.records;
        expect = Expect {
            segment: index + 1,
            first_seq: st.first_seq + st.records,
            prev_hash: st.last_hash.clone(),
            prev_mac: st.last_mac.clone(),
        };
        out.segments.push(st);
    }

    check_head(&mut out, None, want_hash, expect.segment);
    if out.bad.is_some() {
        return Ok(None);
    }
    Ok(Some(out))
}

/// Check a closed segment by its first and last lines only: the header
/// (MAC, index, link to `expect`) and the closing checkpoint (MAC, segment,
/// seq after the header's first seq, covering the record line just before
/// it). Returns its state with `body_verified == false`, or `None` if any
/// of that does not hold.
fn closed_skeleton(path: &Path, index: u32, key: &AuditKey, expect: &Expect) -> Result<Option<SegState>> {
    let io = |e| Error::io(path, e);
    let mut file = crate::fs::open_read_nofollow(path).map_err(io)?;
    let mut line = Vec::with_capacity(512);
    BufReader::with_capacity(4096, &mut file).read_until(b'\n', &mut line).map_err(io)?;
    let file_len = data_len(&mut file).map_err(io)?;
    let Some(l) = line.strip_suffix(b"\n") else {
        return Ok(None);
    };
    let Some((h, prefix, auth)) = parse_control::<Header>(l) else {
        return Ok(None);
    };
    if h.kind != "header"
        || h.format != format::FORMAT
        || !mac_matches(&mac_of_prefix(key, HEADER_DOMAIN, prefix), auth)
        || h.segment != index
        || h.first_seq != expect.first_seq
        || h.prev_hash != expect.prev_hash
        || h.prev_mac != expect.prev_mac
    {
        return Ok(None);
    }

    let Some(tail) = tail_lines(&mut file, file_len, 2).map_err(io)? else {
        return Ok(None);
    };
    let [record, closing] = &tail[..] else {
        return Ok(None);
    };
    let Some((c, prefix, auth)) = parse_control::<Checkpoint>(closing) else {
        return Ok(None);
    };
    if c.kind != "checkpoint" || c.segment != index || c.seq < h.first_seq || !mac_matches(&mac_of_prefix(key, CKPT_DOMAIN, prefix), auth) {
        return Ok(None);
    }
    // The record the closing checkpoint covers: its bytes hash to the
    // checkpointed hash, so its time is authentic too.
    #[derive(Deserialize)]
    struct RecordEnd {
        seq: u64,
        time_ms: i64,
    }
    let Some((rec_prefix, rec_hash)) = unseal(record, "hash") else {
        return Ok(None);
    };
    if rec_hash != c.hash || hex::encode(record_hash_of_prefix(rec_prefix)) != c.hash {
        return Ok(None);
    }
    let Ok(r) = serde_json::from_slice::<RecordEnd>(record) else {
        return Ok(None);
    };
    if r.seq != c.seq {
        return Ok(None);
    }
    Ok(Some(SegState {
        index,
        path: path.to_path_buf(),
        has_header: true,
        first_seq: h.first_seq,
        records: c.seq + 1 - h.first_seq,
        last_hash: c.hash,
        last_mac: auth.to_string(),
        newest_ms: r.time_ms,
        body_verified: false,
        auth_end: file_len,
        file_len,
        tail_records: 0,
        tail_partial: false,
    }))
}

/// Longest stretch read from the end of a segment to find its last lines
/// (a record line is at most ~65 KiB).
const MAX_TAIL_BYTES: u64 = 1 << 20;

/// The last `n` complete lines of `file` (`len` bytes), without newlines,
/// oldest first, read from the end. `None` if the file does not end with a
/// newline, has fewer than `n` lines, or they span more than
/// [`MAX_TAIL_BYTES`].
fn tail_lines(file: &mut File, len: u64, n: usize) -> std::io::Result<Option<Vec<Vec<u8>>>> {
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = len;
    let mut chunk: u64 = 4096;
    loop {
        let start = pos.saturating_sub(chunk);
        let mut part = vec![0u8; (pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut part)?;
        part.extend_from_slice(&buf);
        buf = part;
        pos = start;
        if buf.last() != Some(&b'\n') {
            return Ok(None);
        }
        // n complete lines need n newlines after the start of the first one.
        let newlines = buf.iter().filter(|&&b| b == b'\n').count();
        if newlines > n || pos == 0 {
            break;
        }
        if len - pos >= MAX_TAIL_BYTES {
            return Ok(None);
        }
        chunk = chunk.saturating_mul(2);
    }
    let body = &buf[..buf.len() - 1];
    let mut lines: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut end = body.len();
    while lines.len() < n {
        match body[..end].iter().rposition(|&b| b == b'\n') {
            Some(i) => {
                lines.push(body[i + 1..end].to_vec());
                end = i;
            }
            None if pos == 0 => {
                lines.push(body[..end].to_vec());
                break;
            }
            None => break,
        }
    }
    if lines.len() < n {
        return Ok(None);
    }
    lines.reverse();
    Ok(Some(lines))
}

/// Read and verify a closed segment in full against what its neighbours
/// say about it: it must link to `expect`, end with its closing checkpoint
/// and that checkpoint must be (`last_seq`, `last_hash`, `closing_mac`).
/// Returns the time of its newest record. Retention runs this before it
/// tombstones a segment that `open` did not read, so a tombstone never
/// vouches for a tampered segment.
pub(crate) fn verify_closed_segment(
    path: &Path,
    index: u32,
    key: &AuditKey,
    expect: &Expect,
    last_seq: u64,
    last_hash: &str,
    closing_mac: &str,
) -> Result<i64> {
    let (st, b, _) = scan_segment(path, index, Some(key), expect, None, &mut None)?;
    let damage = |seq: u64, reason: String| Error::AuditTampered { seq, reason: format!("segment {index}: {reason}") };
    if let Some(b) = b {
        return Err(damage(b.seq, b.reason));
    }
    if st.has_tail() || st.records == 0 {
        return Err(damage(st.first_seq + st.records, "a closed segment does not end with its closing checkpoint".into()));
    }
    if st.first_seq + st.records - 1 != last_seq || st.last_hash != last_hash || st.last_mac != closing_mac {
        return Err(damage(st.first_seq, "segment does not end where the next segment's header says".into()));
    }
    Ok(st.newest_ms)
}

/// The header of a segment file if its first line parses (no checks).
pub(crate) fn first_header(path: &Path) -> Result<Option<Header>> {
    let f = crate::fs::open_read_nofollow(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(f);
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).map_err(|e| Error::io(path, e))?;
    let Some(l) = line.strip_suffix(b"\n") else {
        return Ok(None);
    };
    Ok(parse_control::<Header>(l).map(|(h, _, _)| h))
}

/// Scan one segment. Returns its state, the first damage (if any) and the
/// hash of record `want_seq` if it is checkpointed in this segment.
fn scan_segment(
    path: &Path,
    index: u32,
    key: Option<&AuditKey>,
    expect: &Expect,
    want_seq: Option<u64>,
    visit: &mut Option<Visitor<'_>>,
) -> Result<(SegState, Option<BadRecord>, Option<String>)> {
    let io = |e| Error::io(path, e);
    let mut file = crate::fs::open_read_nofollow(path).map_err(io)?;
    let file_len = data_len(&mut file).map_err(io)?;
    file.rewind().map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 16, file.take(file_len));
    let mut st = SegState {
        index,
        path: path.to_path_buf(),
        has_header: false,
        first_seq: expect.first_seq,
        records: 0,
        last_hash: expect.prev_hash.clone(),
        last_mac: expect.prev_mac.clone(),
        newest_ms: i64::MIN,
        body_verified: true,
        auth_end: 0,
        file_len,
        tail_records: 0,
        tail_partial: false,
    };
    let mut line: Vec<u8> = Vec::with_capacity(1024);

    // Header.
    let n = reader.read_until(b'\n', &mut line).map_err(io)?;
    if n == 0 || !line.ends_with(b"\n") || line.contains(&0) {
        st.tail_partial = n > 0;
        return Ok((st, None, None));
    }
    let l = &line[..n - 1];
    let Some((h, prefix, auth)) = parse_control::<Header>(l) else {
        return Ok((st, bad(index, expect.first_seq, "unreadable segment header"), None));
    };
    if h.kind != "header" || h.format != format::FORMAT {
        return Ok((st, bad(index, expect.first_seq, "not an audit segment header of a known format"), None));
    }
    if let Some(k) = key {
        if !mac_matches(&mac_of_prefix(k, HEADER_DOMAIN, prefix), auth) {
            return Ok((st, bad(index, expect.first_seq, "segment header MAC mismatch"), None));
        }
    }
    if h.segment != index {
        return Ok((st, bad(index, expect.first_seq, format!("header names segment {}", h.segment)), None));
    }
    if h.first_seq != expect.first_seq || h.prev_hash != expect.prev_hash || h.prev_mac != expect.prev_mac {
        return Ok((st, bad(index, expect.first_seq, "segment header does not link to the end of the previous segment"), None));
    }
    st.has_header = true;
    st.auth_end = n as u64;
    // Checkpoints chain to the header's MAC, then to each other.
    st.last_mac = auth.to_string();
    let mut offset = n as u64;

    let mut next_seq = expect.first_seq;
    let mut cur_hash = expect.prev_hash.clone();
    let mut pending: u64 = 0;
    let mut pending_newest = i64::MIN;
    let mut pending_recs: Vec<(AuditRecord, Vec<u8>)> = Vec::new();
    let mut captured: Option<String> = None;
    let mut captured_pending: Option<String> = None;

    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        // A NUL inside the data: the remains of a commit whose bytes did
        // not all reach the disk before a crash (see `data_len`).
        if !line.ends_with(b"\n") || line.contains(&0) {
            st.tail_partial = true;
            break;
        }
        let l = &line[..n - 1];
        if l.starts_with(b"{\"type\":\"checkpoint\"") {
            let first_pending = next_seq - pending;
            let Some((c, prefix, auth)) = parse_control::<Checkpoint>(l) else {
                return Ok((st, bad(index, first_pending, "unreadable checkpoint"), None));
            };
            if c.kind != "checkpoint" || c.segment != index || pending == 0 || c.seq + 1 != next_seq || c.hash != cur_hash {
                return Ok((st, bad(index, first_pending, "checkpoint does not cover the records before it"), None));
            }
            if c.prev_mac != st.last_mac {
                return Ok((st, bad(index, first_pending, "checkpoint does not chain to the previous checkpoint"), None));
            }
            if let Some(k) = key {
                if !mac_matches(&mac_of_prefix(k, CKPT_DOMAIN, prefix), auth) {
                    return Ok((
                        st,
                        bad(
                            index,
                            first_pending,
                            format!("checkpoint MAC mismatch: records {first_pending}..={} altered or re-chained", c.seq),
                        ),
                        None,
                    ));
                }
            }
            if let Some(v) = visit.as_mut() {
                for (r, raw) in pending_recs.drain(..) {
                    v(r, &raw)?;
                }
            }
            st.records += pending;
            pending = 0;
            st.newest_ms = pending_newest.max(st.newest_ms);
            st.last_hash = cur_hash.clone();
            st.last_mac = auth.to_string();
            st.auth_end = offset + n as u64;
            if captured_pending.is_some() {
                captured = captured_pending.take();
            }
        } else {
            let Some((prefix, auth)) = unseal(l, "hash") else {
                return Ok((st, bad(index, next_seq, "malformed record line"), None));
            };
            let computed = record_hash_of_prefix(prefix);
            if hex::encode(computed) != auth {
                return Ok((st, bad(index, next_seq, "record hash does not match its contents"), None));
            }
            let r: AuditRecord = match serde_json::from_slice(l) {
                Ok(r) => r,
                Err(e) => return Ok((st, bad(index, next_seq, format!("unreadable record: {e}")), None)),
            };
            if r.seq != next_seq {
                return Ok((st, bad(index, next_seq, format!("expected seq {next_seq}, found {}", r.seq)), None));
            }
            if r.prev != cur_hash {
                return Ok((st, bad(index, next_seq, "prev does not match the previous record's hash"), None));
            }
            if want_seq == Some(r.seq) {
                captured_pending = Some(r.hash.clone());
            }
            cur_hash = r.hash.clone();
            next_seq += 1;
            pending += 1;
            pending_newest = pending_newest.max(r.time_ms);
            if visit.is_some() {
                pending_recs.push((r, l.to_vec()));
            }
        }
        offset += n as u64;
    }
    st.tail_records = pending;
    Ok((st, None, captured))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(bytes: &[u8], n: usize) -> Option<Vec<Vec<u8>>> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, bytes).unwrap();
        let mut f = File::open(&p).unwrap();
        tail_lines(&mut f, bytes.len() as u64, n).unwrap()
    }

    #[test]
    fn tail_lines_reads_complete_lines_from_the_end() {
        assert_eq!(tail_of(b"a\nbb\nccc\n", 2), Some(vec![b"bb".to_vec(), b"ccc".to_vec()]));
        assert_eq!(tail_of(b"a\nbb\n", 2), Some(vec![b"a".to_vec(), b"bb".to_vec()]));
        assert_eq!(tail_of(b"only\n", 2), None);
        assert_eq!(tail_of(b"a\nno newline", 1), None);
        assert_eq!(tail_of(b"", 1), None);
        // Lines longer than the first 4 KiB read.
        let long = vec![b'x'; 10_000];
        let mut b = b"head\n".to_vec();
        b.extend_from_slice(&long);
        b.push(b'\n');
        b.extend_from_slice(b"end\n");
        assert_eq!(tail_of(&b, 2), Some(vec![long.clone(), b"end".to_vec()]));
        assert_eq!(tail_of(&b, 3).unwrap()[0], b"head".to_vec());
        // More than MAX_TAIL_BYTES without the lines asked for.
        let mut huge = vec![b'y'; (MAX_TAIL_BYTES + 10) as usize];
        huge.push(b'\n');
        assert_eq!(tail_of(&huge, 2), None);
    }

    #[test]
    fn report_ok_ignores_torn_tail() {
        let r = VerifyReport { records: 3, segments: 1, retired_segments: 0, first_bad: None, torn_tail: true };
        assert!(r.ok());
        let r = VerifyReport { first_bad: Some(BadRecord { segment: 0, seq: 1, reason: "x".into() }), torn_tail: false, ..r };
        assert!(!r.ok());
    }
}

//! The writer side: [`AuditLog`] with its group-commit writer thread.
//!
//! Appenders serialize their event on their own thread, take the next seq
//! under a short lock and queue the event. One writer thread drains the
//! queue, chains and writes the batch (records, then a checkpoint), fsyncs
//! once, replaces `HEAD`, and only then wakes the appenders of that batch:
//! a query is never answered before its record is durable.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::event::{AuditEvent, AuditFilter, AuditRecord};
use super::format::{
    self, checkpoint_line, genesis_hash, parse_control, record_hash, seal_control, seal_into,
    data_len, segment_name, sync_dir, write_head, Header, Retired, HEADER_DOMAIN, LOCK_FILE, RETIRED_DOMAIN,
    RETIRED_FILE,
};
use super::direct::{self, DirectTail};
use super::space::Space;
use super::scan::{
    scan, scan_for_open, verify_closed_segment, Expect, OpenReport, Scan, SegState, TornTail,
    VerifyReport,
};
use super::{AuditConfig, AuditKey, Durability, MIN_RETENTION_DAYS};
use crate::clock::Clock;
use crate::{Error, Result};

/// Largest serialized event accepted (operator-supplied strings are bounded).
const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Records a [`AuditLog::subscribe`] receiver may fall behind before it is cut off.
pub const SUBSCRIBER_BACKLOG: usize = 65_536;
const DAY_MS: i64 = 86_400_000;

/// The append-only, hash-chained audit log of one store.
///
/// `Send + Sync`: share it behind an `Arc` and append from many threads.
/// Dropping it flushes, writes the final `HEAD` and stops the writer thread.
/// See the [module docs](super) for the format and an example.
pub struct AuditLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.shared.dir)
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

/// Records queued by [`AuditLog::submit`]: [`AuditTicket::wait`] returns
/// their seqs once they are durable (per the configured [`Durability`]), or
/// the error that kept them from being written. Dropping a ticket does not
/// cancel the records; they are committed with the next batch.
#[must_use = "records are only known durable once the ticket is waited on"]
pub struct AuditTicket {
    range: std::ops::Range<u64>,
    shared: Arc<Shared>,
    submitted: Instant,
}

impl std::fmt::Debug for AuditTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTicket").field("seqs", &self.range).finish()
    }
}

impl AuditTicket {
    /// The seqs the records will have (known before they are durable).
    pub fn seqs(&self) -> std::ops::Range<u64> {
        self.range.clone()
    }

    /// Block until the records are durable; returns their seqs. If they are
    /// still queued and no commit is running, the caller commits them itself
    /// (with everything queued before them) rather than wake the writer.
    pub fn wait(self) -> Result<std::ops::Range<u64>> {
        let range = self.range;
        let sh = &*self.shared;
        if range.is_empty() {
            return Ok(range);
        }
        sh.pace.observe_wait(self.submitted.elapsed());
        if sh.done.lock().next >= range.end {
            return Ok(range);
        }
        {
            let mut q = sh.queue.lock();
            q.wanted = q.wanted.max(range.end);
        }
        let mut registered = false;
        loop {
            {
                let mut d = sh.done.lock();
                if d.next >= range.end {
                    return Ok(range);
                }
                if let Some(e) = &d.error {
                    return Err(Error::Audit(format!("audit records {range:?} not written: {e}")));
                }
                if !registered {
                    // Woken (unparked) once these records are durable, or
                    // when it is this caller's turn to commit them.
                    d.waiters.push(Waiter {
                        end: range.end,
                        thread: std::thread::current(),
                    });
                    registered = true;
                }
            }
            if lead_commit(sh, range.end)? {
                continue;
            }
            // Another commit is running (its end wakes us), or ours is in
            // it. The timeout only guards against a missed wake-up.
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }
}

/// A caller blocked in [`AuditTicket::wait`].
struct Waiter {
    end: u64,
    thread: std::thread::Thread,
}

struct Pending {
    seq: u64,
    time_ms: i64,
    event_json: String,
    event: AuditEvent,
}

struct Queue {
    items: Vec<Pending>,
    /// One past the highest seq somebody waits for (monotonic): queued
    /// records below it are committed without lingering.
    wanted: u64,
    /// When the oldest queued record arrived.
    first_at: Instant,
    next_seq: u64,
    sync_ticket: u64,
    closing: bool,
}

struct Done {
    /// Every seq below this is durable.
    next: u64,
    /// Hash of record `next - 1` (the genesis hash when there is none).
    last_hash: String,
    /// Highest flush ticket served.
    synced: u64,
    /// Set once a write failed; the log accepts nothing more.
    error: Option<String>,
    /// Callers waiting for records that are not durable yet.
    waiters: Vec<Waiter>,
}

/// A closed segment, as retention needs it.
#[derive(Clone, Debug)]
struct SegMeta {
    index: u32,
    first_seq: u64,
    last_seq: u64,
    last_hash: String,
    closing_mac: String,
    /// Time of its newest record; `None` until its records are read (`open`
    /// reads only the header and closing checkpoint of closed segments).
    newest_ms: Option<i64>,
    /// A lower bound of the newest time: its last record's time.
    newest_at_least: i64,
}

impl SegMeta {
    /// What the next segment's header binds.
    fn next_expect(&self) -> Expect {
        Expect {
            segment: self.index + 1,
            first_seq: self.last_seq + 1,
            prev_hash: self.last_hash.clone(),
            prev_mac: self.closing_mac.clone(),
        }
    }
}

/// The closed segments still on disk, oldest first.
struct Closed {
    /// What the oldest one's header binds (the last tombstone, or genesis).
    start: Expect,
    segs: Vec<SegMeta>,
}

/// What the writer has done since the log was opened: for a server's
/// metrics and for tuning [`Durability::GroupCommit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditStats {
    /// Commits (one write, and one fsync unless durability is off).
    pub commits: u64,
    /// Records committed.
    pub records: u64,
    /// Commits made at once because someone waited for a queued record.
    pub awaited: u64,
    /// Total time spent writing and fsyncing commits (durable logs only), in microseconds.
    pub sync_micros: u64,
    /// The current linger (see [`Durability::GroupCommit`]), in microseconds.
    pub linger_micros: u64,
}

struct Shared {
    dir: PathBuf,
    key: AuditKey,
    cfg: AuditConfig,
    clock: Arc<dyn Clock>,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    done: Mutex<Done>,
    done_cv: Condvar,
    subscribers: Mutex<Vec<SyncSender<AuditRecord>>>,
    stats: Mutex<AuditStats>,
    /// The chain's end and the open segment; whoever holds it commits (the
    /// writer thread, or a caller waiting for its own records). `None` once
    /// the writer has stopped.
    committer: Mutex<Option<Writer>>,
    /// How long queued records linger.
    pace: Pace,
    closed_segments: Mutex<Closed>,
    retention: Mutex<()>,
    /// Holds the advisory lock on `LOCK` for the log's lifetime.
    _lock: File,
}

/// Take the directory's advisory lock (one writer process at a time).
fn lock_dir(dir: &Path) -> Result<File> {
    crate::fs::Dir::open(dir)?.lock(LOCK_FILE)
}

/// Cut a torn tail off the last segment (or remove a segment whose header
/// never made it) and delete files of already-retired segments.
fn repair(scan: &mut Scan) -> Result<Option<TornTail>> {
    for p in scan.stale_files.drain(..) {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    let torn = scan.torn();
    if torn.is_some() {
        if let Some(last) = scan.segments.last() {
            if last.has_header {
                let f = crate::fs::open_write_nofollow(&last.path)
                    .map_err(|e| Error::io(&last.path, e))?;
                f.set_len(last.auth_end)
                    .map_err(|e| Error::io(&last.path, e))?;
                f.sync_all().map_err(|e| Error::io(&last.path, e))?;
                if let Some(l) = scan.segments.last_mut() {
                    l.file_len = l.auth_end;
                    l.tail_records = 0;
                    l.tail_partial = false;
                }
            } else {
                fs::remove_file(&last.path).map_err(|e| Error::io(&last.path, e))?;
                scan.segments.pop();
            }
        }
    }
    Ok(torn)
}

/// Where a new segment would start, from the scan.
fn next_expect(scan: &Scan) -> Expect {
    if let Some(s) = scan.segments.last() {
        return Expect {
            segment: s.index + 1,
            first_seq: s.first_seq + s.records,
            prev_hash: s.last_hash.clone(),
            prev_mac: s.last_mac.clone(),
        };
    }
    after_retired(scan)
}

/// What the first segment after the retired ones binds.
fn after_retired(scan: &Scan) -> Expect {
    if let Some(r) = scan.retired.last() {
        return Expect {
            segment: r.segment + 1,
            first_seq: r.last_seq + 1,
            prev_hash: r.last_hash.clone(),
            prev_mac: r.closing_mac.clone(),
        };
    }
    Expect::genesis()
}

/// Create a segment file holding only its header; returns it (positioned
/// after the header), the header's MAC (the first checkpoint chains to it)
/// and the header's length.
fn create_segment(
    dir: &Path,
    key: &AuditKey,
    e: &Expect,
    now_ms: i64,
    sync: bool,
) -> Result<(File, String, u64)> {
    let h = Header {
        kind: "header".into(),
        format: format::FORMAT,
        segment: e.segment,
        first_seq: e.first_seq,
        prev_hash: e.prev_hash.clone(),
        prev_mac: e.prev_mac.clone(),
        key_id: key.id(),
        created_ms: now_ms,
        mac: None,
    };
    let (line, m) = seal_control(key, HEADER_DOMAIN, &h)?;
    let path = dir.join(segment_name(e.segment));
    // Not append mode: the writer writes at its own position, into the
    // zeroed space ahead of it (see `space`). 0600, never through a link.
    let mut f = crate::fs::Dir::open(dir)?.create_new(&segment_name(e.segment))?;
    f.write_all(&line).map_err(|err| Error::io(&path, err))?;
    if sync {
        f.sync_all().map_err(|err| Error::io(&path, err))?;
        sync_dir(dir)?;
    }
    Ok((f, hex::encode(m), line.len() as u64))
}

/// Direct writes for the segment `file` whose data end at `pos`, if `want`
/// and the filesystem takes them (see [`direct`]).
fn start_direct(file: &File, pos: u64, want: bool, path: &Path) -> Result<Option<DirectTail>> {
    if !want {
        return Ok(None);
    }
    let d = DirectTail::start(file, pos).map_err(|e| Error::io(path, e))?;
    if d.is_none() {
        tracing::debug!(path = %path.display(), "audit log: no O_DIRECT here; writing through the page cache");
    }
    Ok(d)
}

/// Check and serialize an event on the appender's thread.
fn encode_event(event: &AuditEvent) -> Result<String> {
    if let Some(field) = event.non_finite_field() {
        return Err(Error::Audit(format!(
            "event field {field} is NaN or infinite"
        )));
    }
    let json = serde_json::to_string(event)
        .map_err(|e| Error::Audit(format!("serialising audit event: {e}")))?;
    if json.len() > MAX_EVENT_BYTES {
        return Err(Error::Audit(format!(
            "audit event of {} bytes exceeds the {MAX_EVENT_BYTES}-byte limit",
            json.len()
        )));
    }
    Ok(json)
}

fn json_string(s: &str) -> Result<String> {
    serde_json::to_string(s).map_err(|e| Error::Audit(format!("serialising {s:?}: {e}")))
}

impl AuditLog {
    /// Open (or create) the audit log in `dir`.
    ///
    /// Checks what appending depends on, at a cost that does not grow with
    /// the log's age: `HEAD`, `RETIRED`, the segment files (none missing,
    /// each closed one's header and closing checkpoint verify and link to
    /// their neighbours) and the whole last segment. The records inside
    /// closed segments are not re-read: [`AuditLog::verify`] checks those
    /// (and retention verifies a segment in full before deleting it). A
    /// torn tail left by a crash is cut off and reported; any damage found
    /// refuses with [`Error::AuditTampered`] naming the first bad record,
    /// so nothing is appended onto a broken chain; a log signed with
    /// another key gives [`Error::Key`]; a log held by another process
    /// gives [`Error::Locked`].
    pub fn open(
        dir: &Path,
        key: AuditKey,
        cfg: AuditConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(AuditLog, OpenReport)> {
        cfg.validate()?;
        crate::fs::Dir::create_or_open(dir)?;
        let lock = lock_dir(dir)?;
        let sync = cfg.durability != Durability::Off;

        // Anything the cheap checks cannot settle (damage, HEAD lagging
        // into a closed segment after a crash) gets the full scan.
        let mut scan = match scan_for_open(dir, &key)? {
            Some(s) => s,
            None => scan(dir, Some(&key), None)?.into_ok()?,
        };
        if scan.head.is_none() && scan.segments.is_empty() && scan.retired.is_empty() {
            // A new log: HEAD first, so a crash before the first segment
            // exists leaves a log that still verifies.
            write_head(dir, &key, 0, 0, &genesis_hash(), true)?;
        }
        let torn = repair(&mut scan)?;
        if torn.is_some() {
            sync_dir(dir)?;
        }

        let now = clock.now_unix_ms();
        let current: SegState = match scan.segments.last() {
            Some(s) => s.clone(),
            None => {
                let e = next_expect(&scan);
                let (_, header_mac, _) = create_segment(dir, &key, &e, now, true)?;
                let st = SegState {
                    index: e.segment,
                    path: dir.join(segment_name(e.segment)),
                    has_header: true,
                    first_seq: e.first_seq,
                    records: 0,
                    last_hash: e.prev_hash.clone(),
                    last_mac: header_mac,
                    newest_ms: i64::MIN,
                    body_verified: true,
                    auth_end: 0,
                    file_len: 0,
                    tail_records: 0,
                    tail_partial: false,
                };
                scan.segments.push(st.clone());
                st
            }
        };
        // Append at the end of the data, before any zeroed free space.
        let mut file = crate::fs::open_write_nofollow(&current.path)
            .map_err(|e| Error::io(&current.path, e))?;
        let pos = data_len(&mut file)
            .and_then(|n| file.seek(SeekFrom::Start(n)))
            .map_err(|e| Error::io(&current.path, e))?;
        let direct = start_direct(&file, pos, sync && cfg.direct_io, &current.path)?;
        let records = current.first_seq + current.records;
        // HEAD may lag after a crash between the log fsync and its rename.
        if scan.head.as_ref().map(|h| h.records) != Some(records) {
            write_head(dir, &key, current.index, records, &current.last_hash, true)?;
        }

        let closed = Closed {
            start: after_retired(&scan),
            segs: scan.segments[..scan.segments.len() - 1]
                .iter()
                .map(|s| SegMeta {
                    index: s.index,
                    first_seq: s.first_seq,
                    last_seq: s.first_seq + s.records - 1,
                    last_hash: s.last_hash.clone(),
                    closing_mac: s.last_mac.clone(),
                    newest_ms: s.body_verified.then_some(s.newest_ms),
                    newest_at_least: s.newest_ms,
                })
                .collect(),
        };

        let report = OpenReport {
            records,
            segments: scan.segments.len() as u32,
            retired_segments: scan.retired.len() as u32,
            torn_tail_repaired: torn,
        };

        let linger = Limits::of(cfg.durability).linger;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            key,
            cfg,
            clock,
            queue: Mutex::new(Queue {
                items: Vec::new(),
                wanted: 0,
                first_at: Instant::now(),
                next_seq: records,
                sync_ticket: 0,
                closing: false,
            }),
            queue_cv: Condvar::new(),
            done: Mutex::new(Done {
                next: records,
                last_hash: current.last_hash.clone(),
                synced: 0,
                error: None,
                waiters: Vec::new(),
            }),
            done_cv: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
            stats: Mutex::new(AuditStats::default()),
            committer: Mutex::new(None),
            pace: Pace::new(linger),
            closed_segments: Mutex::new(closed),
            retention: Mutex::new(()),
            _lock: lock,
        });
        let writer = Writer {
            site_json: json_string(&shared.cfg.site)?,
            device_json: json_string(&shared.cfg.device)?,
            shared: Arc::clone(&shared),
            file,
            pos,
            space: Space::start(
                if sync { shared.cfg.preallocate_bytes } else { 0 },
                current.index,
                current.path.clone(),
                pos,
                direct.is_some(),
            )?,
            direct,
            seg_index: current.index,
            seg_first_seq: current.first_seq,
            seg_records: current.records,
            seg_newest_ms: current.newest_ms,
            last_hash: current.last_hash.clone(),
            last_mac: current.last_mac.clone(),
            next_seq: records,
            since_ckpt: 0,
            buf: Vec::with_capacity(1 << 16),
            body: Vec::with_capacity(1024),
            sync,
            head: HeadWriter::start(Arc::clone(&shared), records)?,
            last_sync: Duration::ZERO,
            wake: Vec::new(),
        };
        *shared.committer.lock() = Some(writer);
        let sh = Arc::clone(&shared);
        let handle = match std::thread::Builder::new()
            .name("facematch-audit".into())
            .spawn(move || run_writer(sh))
        {
            Ok(h) => h,
            Err(e) => {
                // Break the Shared -> Writer -> Shared cycle so the lock is released.
                if let Some(mut w) = shared.committer.lock().take() {
                    w.head.stop();
                }
                return Err(Error::Audit(format!("starting the audit writer thread: {e}")));
            }
        };
        Ok((
            AuditLog {
                shared,
                writer: Mutex::new(Some(handle)),
            },
            report,
        ))
    }

    /// Append one event; returns its seq once the record is durable as the
    /// configured [`Durability`] says. On error the caller must not act as
    /// if the event was recorded (e.g. must not answer the query).
    pub fn append(&self, event: AuditEvent) -> Result<u64> {
        Ok(self.submit(event)?.wait()?.start)
    }

    /// Append several events with consecutive seqs, normally in one commit
    /// (e.g. an enrolment and the filing notice it triggers); returns their
    /// seqs once all are durable. Nothing is queued if any event is invalid.
    pub fn append_batch(&self, events: Vec<AuditEvent>) -> Result<std::ops::Range<u64>> {
        self.submit_batch(events)?.wait()
    }

    /// Queue one event without waiting for it to become durable; the
    /// returned [`AuditTicket`] waits. Lets one thread keep several queries
    /// in flight (answering each only once its ticket is redeemed) so that
    /// they share one fsync instead of each waiting for its own.
    pub fn submit(&self, event: AuditEvent) -> Result<AuditTicket> {
        let json = encode_event(&event)?;
        self.queue(vec![(event, json)])
    }

    /// [`AuditLog::submit`] for several events (consecutive seqs, one commit).
    pub fn submit_batch(&self, events: Vec<AuditEvent>) -> Result<AuditTicket> {
        let mut encoded = Vec::with_capacity(events.len());
        for e in events {
            let j = encode_event(&e)?;
            encoded.push((e, j));
        }
        self.queue(encoded)
    }

    fn queue(&self, events: Vec<(AuditEvent, String)>) -> Result<AuditTicket> {
        let wake;
        let range = {
            let mut q = self.shared.queue.lock();
            if q.closing {
                return Err(Error::Audit("the audit log is closing".into()));
            }
            if let Some(e) = &self.shared.done.lock().error {
                return Err(Error::Audit(format!("the audit log failed earlier: {e}")));
            }
            let start = q.next_seq;
            let was_empty = q.items.is_empty();
            if was_empty {
                q.first_at = Instant::now();
            }
            let time_ms = self.shared.clock.now_unix_ms();
            for (event, event_json) in events {
                let seq = q.next_seq;
                q.next_seq += 1;
                q.items.push(Pending {
                    seq,
                    time_ms,
                    event_json,
                    event,
                });
            }
            // The writer only needs waking when work appears or a batch is
            // full; while it lingers, each submit need not wake it.
            wake = was_empty || q.items.len() >= self.shared.cfg.durability.max_batch();
            start..q.next_seq
        };
        if wake && !range.is_empty() {
            self.shared.queue_cv.notify_one();
        }
        Ok(AuditTicket {
            range,
            shared: Arc::clone(&self.shared),
            submitted: Instant::now(),
        })
    }

    /// Make everything appended so far durable (fsync log and `HEAD`), also
    /// under [`Durability::Off`].
    pub fn flush(&self) -> Result<()> {
        let ticket = {
            let mut q = self.shared.queue.lock();
            q.sync_ticket += 1;
            q.sync_ticket
        };
        self.shared.queue_cv.notify_one();
        let mut d = self.shared.done.lock();
        while d.synced < ticket {
            if let Some(e) = &d.error {
                return Err(Error::Audit(format!("audit flush failed: {e}")));
            }
            self.shared.done_cv.wait(&mut d);
        }
        Ok(())
    }

    /// Flush and close, reporting any error (dropping closes silently).
    pub fn close(self) -> Result<()> {
        self.flush()?;
        let err = self.shared.done.lock().error.clone();
        drop(self);
        match err {
            Some(e) => Err(Error::Audit(e)),
            None => Ok(()),
        }
    }

    /// The writer's counters since open (commits, records, fsync time, linger).
    pub fn stats(&self) -> AuditStats {
        *self.shared.stats.lock()
    }

    /// Records durable so far (the next seq to be confirmed).
    pub fn records(&self) -> u64 {
        self.shared.done.lock().next
    }

    /// Records durable so far and the hash of the last of them (the chain's
    /// genesis value when there are none).
    pub fn durable_head(&self) -> (u64, String) {
        let d = self.shared.done.lock();
        (d.next, d.last_hash.clone())
    }

    /// Every record from `seq` on, in order, read from the segments that hold
    /// them (the newest ones: cheap when `seq` is recent). Reads only.
    pub fn read_from(dir: &Path, seq: u64) -> Result<Vec<AuditRecord>> {
        let mut segs: Vec<(u32, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            if let Some(i) = e.file_name().to_str().and_then(format::parse_segment_name) {
                segs.push((i, e.path()));
            }
        }
        segs.sort();
        // From the newest segment back to the one whose first record is at or before `seq`.
        let mut from = 0;
        for (k, (_, path)) in segs.iter().enumerate().rev() {
            let f = crate::fs::open_read_nofollow(path).map_err(|e| Error::io(path, e))?;
            let mut first = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(f), &mut first).map_err(|e| Error::io(path, e))?;
            let first_seq = serde_json::from_str::<serde_json::Value>(first.trim_end()).ok().and_then(|v| v.get("first_seq")?.as_u64());
            if first_seq.is_some_and(|f| f <= seq) {
                from = k;
                break;
            }
        }
        let mut out = Vec::new();
        for (_, path) in &segs[from.min(segs.len())..] {
            let f = crate::fs::open_read_nofollow(path).map_err(|e| Error::io(path, e))?;
            for line in std::io::BufRead::split(std::io::BufReader::new(f), b'\n') {
                let line = line.map_err(|e| Error::io(path, e))?;
                if !line.starts_with(b"{\"seq\":") || line.contains(&0) {
                    continue;
                }
                let r: AuditRecord = serde_json::from_slice(&line)
                    .map_err(|e| Error::AuditTampered { seq, reason: format!("unreadable record in {}: {e}", path.display()) })?;
                if r.seq >= seq {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The hash of record `seq` as its segment holds it, or `None` if no
    /// segment still holds it (retired by retention, or missing). Reads only;
    /// the chain itself is checked by [`AuditLog::open`] and [`AuditLog::verify`].
    pub fn record_hash(dir: &Path, seq: u64) -> Result<Option<String>> {
        let mut segs: Vec<(u32, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            if let Some(i) = e.file_name().to_str().and_then(format::parse_segment_name) {
                segs.push((i, e.path()));
            }
        }
        segs.sort();
        let prefix = format!("{{\"seq\":{seq},");
        for (_, path) in segs.iter().rev() {
            let f = crate::fs::open_read_nofollow(path).map_err(|e| Error::io(path, e))?;
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(f));
            let first_seq = match lines.next() {
                Some(Ok(h)) => serde_json::from_str::<serde_json::Value>(&h).ok().and_then(|v| v.get("first_seq")?.as_u64()),
                _ => None,
            };
            let Some(first_seq) = first_seq else { continue };
            if first_seq > seq {
                continue;
            }
            for line in lines {
                let line = line.map_err(|e| Error::io(path, e))?;
                if line.starts_with(&prefix) {
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| Error::AuditTampered { seq, reason: format!("unreadable record: {e}") })?;
                    return Ok(v.get("hash").and_then(|h| h.as_str()).map(str::to_string));
                }
            }
            return Ok(None);
        }
        Ok(None)
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Live feed of records, each sent once durable, in seq order. The feed
    /// ends when the log closes; a dropped receiver is forgotten. A receiver
    /// that falls more than [`SUBSCRIBER_BACKLOG`] records behind is cut off
    /// (its feed ends) rather than stalling appends or growing without
    /// bound; it can catch up with [`AuditLog::read`] from the next seq.
    pub fn subscribe(&self) -> Receiver<AuditRecord> {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_BACKLOG);
        self.shared.subscribers.lock().push(tx);
        rx
    }

    /// Check the log in `dir` with `key`: every segment on its own and as a
    /// chain, every checkpoint and `HEAD`. Damage is reported in
    /// [`VerifyReport::first_bad`], not as an error; a log signed with
    /// another key is [`Error::Key`]. Safe while a writer is appending
    /// (records after the last checkpoint it sees count as a torn tail).
    pub fn verify(dir: &Path, key: &AuditKey) -> Result<VerifyReport> {
        Ok(scan(dir, Some(key), None)?.report())
    }

    /// Records matching `filter`, in seq order. Needs no key: record hashes
    /// and links are checked (damage is [`Error::AuditTampered`]); run
    /// [`AuditLog::verify`] for the keyed checks.
    pub fn read(dir: &Path, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::new();
        let mut visit = |r: AuditRecord, _raw: &[u8]| -> Result<()> {
            if filter.matches(&r) {
                out.push(r);
            }
            Ok(())
        };
        scan(dir, None, Some(&mut visit))?.into_ok()?;
        Ok(out)
    }

    /// Write the records matching `filter` to `w` as JSON lines, exactly as
    /// stored (each line still carries `prev` and `hash`); returns how many.
    /// On damage the records before it have been written and the error is
    /// returned.
    pub fn export_jsonl(dir: &Path, filter: &AuditFilter, w: &mut dyn Write) -> Result<u64> {
        let mut n = 0u64;
        let mut visit = |r: AuditRecord, raw: &[u8]| -> Result<()> {
            if filter.matches(&r) {
                w.write_all(raw)
                    .and_then(|_| w.write_all(b"\n"))
                    .map_err(|e| Error::Audit(format!("writing the export: {e}")))?;
                n += 1;
            }
            Ok(())
        };
        scan(dir, None, Some(&mut visit))?.into_ok()?;
        w.flush()
            .map_err(|e| Error::Audit(format!("writing the export: {e}")))?;
        Ok(n)
    }

    /// Re-sign the closed log in `dir` from `old` to `new` (key rotation):
    /// verify with `old`, repair a torn tail, re-MAC every header,
    /// checkpoint, tombstone and `HEAD` under `new`, verify with `new`.
    /// Records and their hashes are unchanged. The re-signed files are built
    /// in `dir/rekey.new` and then moved into place one by one: a crash
    /// during the moves leaves a log that verifies under neither key
    /// (`rekey.new` shows where it stopped). `Engine::rotate_key` instead
    /// stages them with the rest of the store behind one commit point.
    pub fn rekey(dir: &Path, old: &AuditKey, new: &AuditKey) -> Result<()> {
        let staging = dir.join("rekey.new");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        }
        crate::fs::Dir::open(dir)?.create_subdir("rekey.new")?;
        Self::rekey_into(dir, old, new, &staging)?;
        let _lock = lock_dir(dir)?;
        for e in fs::read_dir(&staging).map_err(|e| Error::io(&staging, e))? {
            let e = e.map_err(|e| Error::io(&staging, e))?;
            let to = dir.join(e.file_name());
            fs::rename(e.path(), &to).map_err(|err| Error::io(&to, err))?;
        }
        sync_dir(dir)?;
        fs::remove_dir(&staging).map_err(|e| Error::io(&staging, e))?;
        sync_dir(dir)
    }

    /// [`AuditLog::rekey`] without touching `dir` (beyond repairing a torn
    /// tail): every re-signed file (segments, `RETIRED`, `HEAD`) is written
    /// into the empty directory `out`, which then verifies under `new`.
    pub(crate) fn rekey_into(dir: &Path, old: &AuditKey, new: &AuditKey, out_dir: &Path) -> Result<()> {
        let _lock = lock_dir(dir)?;
        let mut scan = scan(dir, Some(old), None)?.into_ok()?;
        repair(&mut scan)?;

        // Tombstones re-signed. A retired segment's closing MAC cannot be
        // recomputed (its checkpoints are gone); it stays as an opaque value
        // that the re-signed tombstone and next header both bind.
        let mut retired_bytes = Vec::new();
        let mut prev_mac = format::zero_mac();
        for r in &scan.retired {
            let t = Retired {
                key_id: new.id(),
                mac: None,
                ..r.clone()
            };
            retired_bytes.extend_from_slice(&seal_control(new, RETIRED_DOMAIN, &t)?.0);
            prev_mac = r.closing_mac.clone();
        }

        for s in &scan.segments {
            let name = s.path.file_name().ok_or_else(|| Error::Audit(format!("segment path {} has no name", s.path.display())))?;
            let tmp = out_dir.join(name);
            let mut raw = Vec::new();
            // Zeroed free space a crash left behind is not copied.
            crate::fs::open_read_nofollow(&s.path)
                .and_then(|mut f| {
                    let n = data_len(&mut f)?;
                    f.rewind()?;
                    f.take(n).read_to_end(&mut raw)
                })
                .map_err(|e| Error::io(&s.path, e))?;
            let mut out = Vec::with_capacity(raw.len());
            for line in raw.split_inclusive(|&b| b == b'\n') {
                let l = line.strip_suffix(b"\n").unwrap_or(line);
                if l.starts_with(b"{\"type\":\"header\"") {
                    let (mut h, _, _) =
                        parse_control::<Header>(l).ok_or_else(|| Error::AuditTampered {
                            seq: s.first_seq,
                            reason: "unreadable header".into(),
                        })?;
                    h.mac = None;
                    h.key_id = new.id();
                    h.prev_mac = prev_mac.clone();
                    let (hl, m) = seal_control(new, HEADER_DOMAIN, &h)?;
                    out.extend_from_slice(&hl);
                    prev_mac = hex::encode(m);
                } else if l.starts_with(b"{\"type\":\"checkpoint\"") {
                    let (c, _, _) = parse_control::<format::Checkpoint>(l).ok_or_else(|| {
                        Error::AuditTampered {
                            seq: s.first_seq,
                            reason: "unreadable checkpoint".into(),
                        }
                    })?;
                    let (cl, m) = checkpoint_line(new, c.segment, c.seq, &c.hash, &prev_mac)?;
                    out.extend_from_slice(&cl);
                    prev_mac = hex::encode(m);
                } else {
                    out.extend_from_slice(line);
                }
            }
            let mut f = crate::fs::create_output(&tmp)?;
            f.write_all(&out)
                .and_then(|_| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
        }
        if !scan.retired.is_empty() {
            format::atomic_write(out_dir, RETIRED_FILE, &retired_bytes, true)?;
        }
        sync_dir(out_dir)?;
        let (seg, records, last_hash) = match scan.segments.last() {
            Some(s) => (s.index, s.first_seq + s.records, s.last_hash.clone()),
            None => {
                let e = next_expect(&scan);
                (e.segment, e.first_seq, e.prev_hash)
            }
        };
        write_head(out_dir, new, seg, records, &last_hash, true)?;
        let check = AuditLog::verify(out_dir, new)?;
        if let Some(b) = check.first_bad {
            return Err(Error::AuditTampered {
                seq: b.seq,
                reason: format!("after rekey: {}", b.reason),
            });
        }
        Ok(())
    }

    /// Delete whole segments whose newest record is older than the
    /// retention period (never under three years), oldest first, keeping
    /// the chain verifiable: each is recorded in `RETIRED` (last seq, hash
    /// and closing MAC, signed) before its file is removed, and an
    /// [`AuditEvent::Admin`] record notes the retirement. The current
    /// segment is never deleted. Returns the number of segments deleted.
    ///
    /// A segment written before this `open` is read and verified in full
    /// before it is retired (a signed tombstone must never vouch for a
    /// tampered segment); if it does not verify, nothing is deleted and
    /// this returns [`Error::AuditTampered`].
    pub fn enforce_retention(&self) -> Result<u32> {
        let sh = &self.shared;
        let _g = sh.retention.lock();
        let days = sh.cfg.retention_days.max(MIN_RETENTION_DAYS) as i64;
        let now = sh.clock.now_unix_ms();
        let cutoff = now.saturating_sub(days.saturating_mul(DAY_MS));
        let (mut expect, closed) = {
            let c = sh.closed_segments.lock();
            (c.start.clone(), c.segs.clone())
        };
        let mut drop: Vec<SegMeta> = Vec::new();
        let mut learned: Vec<(u32, i64)> = Vec::new();
        for mut m in closed {
            // The last record's time already rules it out: nothing to read.
            if m.newest_at_least >= cutoff {
                break;
            }
            let newest = match m.newest_ms {
                Some(t) => t,
                None => {
                    let path = sh.dir.join(segment_name(m.index));
                    let t = verify_closed_segment(
                        &path,
                        m.index,
                        &sh.key,
                        &expect,
                        m.last_seq,
                        &m.last_hash,
                        &m.closing_mac,
                    )?;
                    learned.push((m.index, t));
                    t
                }
            };
            if newest >= cutoff {
                break;
            }
            m.newest_ms = Some(newest);
            expect = m.next_expect();
            drop.push(m);
        }
        if !learned.is_empty() {
            let mut c = sh.closed_segments.lock();
            for s in c.segs.iter_mut() {
                if let Some((_, t)) = learned.iter().find(|(i, _)| *i == s.index) {
                    s.newest_ms = Some(*t);
                }
            }
        }
        if drop.is_empty() {
            return Ok(0);
        }
        let path = sh.dir.join(RETIRED_FILE);
        let mut bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        for m in &drop {
            let t = Retired {
                kind: "retired".into(),
                segment: m.index,
                first_seq: m.first_seq,
                last_seq: m.last_seq,
                last_hash: m.last_hash.clone(),
                closing_mac: m.closing_mac.clone(),
                newest_ms: m.newest_ms.unwrap_or(m.newest_at_least),
                retired_ms: now,
                key_id: sh.key.id(),
                mac: None,
            };
            bytes.extend_from_slice(&seal_control(&sh.key, RETIRED_DOMAIN, &t)?.0);
        }
        format::atomic_write(&sh.dir, RETIRED_FILE, &bytes, true)?;
        for m in &drop {
            let p = sh.dir.join(segment_name(m.index));
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&p, e)),
            }
        }
        sync_dir(&sh.dir)?;
        {
            let mut c = sh.closed_segments.lock();
            c.segs.drain(..drop.len());
            c.start = expect;
        }
        let (first, last) = (&drop[0], &drop[drop.len() - 1]);
        self.append(AuditEvent::Admin {
            operator: "facematch:retention".into(),
            action: "audit-retention".into(),
            detail: format!(
                "retired audit segments {}..={} (records {}..={}); newest record older than {days} days",
                first.index, last.index, first.first_seq, last.last_seq
            ),
        })?;
        Ok(drop.len() as u32)
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shared.queue.lock().closing = true;
        self.shared.queue_cv.notify_one();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

/// The writer thread's state: the current segment and the chain's end.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    /// End of the data in `file` (the file may go on with zeroed space).
    pos: u64,
    space: Space,
    /// Direct (block-aligned) writes of the open segment, if the filesystem takes them.
    direct: Option<DirectTail>,
    seg_index: u32,
    seg_first_seq: u64,
    seg_records: u64,
    seg_newest_ms: i64,
    last_hash: String,
    last_mac: String,
    next_seq: u64,
    since_ckpt: u64,
    buf: Vec<u8>,
    body: Vec<u8>,
    site_json: String,
    device_json: String,
    sync: bool,
    head: HeadWriter,
    /// How long the last commit's write and fsync took.
    last_sync: Duration,
    /// Threads to wake after a commit (kept to reuse its allocation).
    wake: Vec<std::thread::Thread>,
}

/// Latest state for `HEAD` and how far the durable `HEAD` has got.
struct HeadState {
    want: Option<(u32, u64, String)>,
    written: u64,
    /// Someone waits in `ensure`: skip the interval.
    urgent: bool,
    error: Option<String>,
    closing: bool,
}

/// Replaces `HEAD` on its own thread, so that its two fsyncs (temp file,
/// directory) overlap the next commit's write and fsync instead of adding
/// to every commit. It is only ever given states whose records are already
/// durable, so `HEAD` never runs ahead of the log; it trails it by at most
/// the commit in flight (which verification accepts, as after a crash).
struct HeadWriter {
    state: Arc<(Mutex<HeadState>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl HeadWriter {
    fn start(shared: Arc<Shared>, written: u64) -> Result<HeadWriter> {
        let state = Arc::new((
            Mutex::new(HeadState {
                want: None,
                written,
                urgent: false,
                error: None,
                closing: false,
            }),
            Condvar::new(),
        ));
        let st = Arc::clone(&state);
        let handle = std::thread::Builder::new()
            .name("facematch-audit-head".into())
            .spawn(move || {
                let (m, cv) = &*st;
                let interval = Duration::from_millis(shared.cfg.head_interval_ms);
                let mut last_write: Option<Instant> = None;
                loop {
                    let next = {
                        let mut g = m.lock();
                        loop {
                            while g.want.is_none() && !g.closing {
                                cv.wait(&mut g);
                            }
                            // Pace routine replacements; flush/close (urgent) do not wait.
                            let due = last_write.map(|t| t + interval);
                            match due {
                                Some(due) if !g.urgent && !g.closing && Instant::now() < due => {
                                    let _ = cv.wait_until(&mut g, due);
                                }
                                _ => break,
                            }
                        }
                        g.urgent = false;
                        match g.want.take() {
                            // Already covered by the write that just finished.
                            Some(w) if w.1 <= g.written => continue,
                            Some(w) => w,
                            None => return,
                        }
                    };
                    last_write = Some(Instant::now());
                    let r = write_head(&shared.dir, &shared.key, next.0, next.1, &next.2, true);
                    let mut g = m.lock();
                    match r {
                        Ok(()) => g.written = g.written.max(next.1),
                        Err(e) => {
                            g.error = Some(e.to_string());
                            cv.notify_all();
                            return;
                        }
                    }
                    cv.notify_all();
                }
            })
            .map_err(|e| Error::Audit(format!("starting the audit HEAD thread: {e}")))?;
        Ok(HeadWriter {
            state,
            handle: Some(handle),
        })
    }

    /// Ask for `HEAD` to say (segment, records, hash); newer requests replace older ones.
    fn post(&self, segment: u32, records: u64, hash: &str) {
        let (m, cv) = &*self.state;
        m.lock().want = Some((segment, records, hash.to_string()));
        cv.notify_all();
    }

    fn error(&self) -> Option<String> {
        self.state.0.lock().error.clone()
    }

    /// Make sure a durable `HEAD` covers `records` (asking for it if no
    /// request is pending) and block until it does.
    fn ensure(&self, segment: u32, records: u64, hash: &str) -> Result<()> {
        let (m, cv) = &*self.state;
        let mut g = m.lock();
        if g.written < records {
            if g.want.as_ref().is_none_or(|w| w.1 < records) {
                g.want = Some((segment, records, hash.to_string()));
            }
            g.urgent = true;
            cv.notify_all();
        }
        while g.written < records {
            if let Some(e) = &g.error {
                return Err(Error::Audit(format!("replacing audit HEAD: {e}")));
            }
            cv.wait(&mut g);
        }
        Ok(())
    }

    fn stop(&mut self) {
        {
            let (m, cv) = &*self.state;
            m.lock().closing = true;
            cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How long queued records linger. Callers report, each time they wait
/// for a ticket, how long after submitting it they did (a caller keeping a
/// window of queries in flight waits about one window later; a blocking
/// caller at once); the estimate follows drops at once and rises slowly, so
/// it tracks the impatient end. Records linger so long that a commit started
/// then (and its fsync, twice for safety) ends before the impatient caller
/// waits, at most half the estimate, capped by the configured linger.
struct Pace {
    /// Estimated submit-to-wait time, nanoseconds.
    wait_ns: AtomicU64,
    /// Moving average of a commit's fsync, nanoseconds.
    sync_ns: AtomicU64,
}

impl Pace {
    fn new(linger: Duration) -> Pace {
        Pace {
            wait_ns: AtomicU64::new(4 * linger.as_nanos() as u64),
            sync_ns: AtomicU64::new(0),
        }
    }

    fn linger(&self, max: Duration) -> Duration {
        let wait = self.wait_ns.load(Ordering::Relaxed);
        let sync = self.sync_ns.load(Ordering::Relaxed);
        let margin = 2 * sync + 200_000;
        let ns = (wait / 2).min(wait.saturating_sub(margin));
        max.min(Duration::from_nanos(ns))
    }

    /// A caller waited for a ticket `after` submitting it (racy updates are fine: an estimate).
    fn observe_wait(&self, after: Duration) {
        let obs = after.as_nanos().min(u64::MAX as u128) as f64;
        let est = self.wait_ns.load(Ordering::Relaxed) as f64;
        let next = if obs < est { 0.7 * est + 0.3 * obs } else { 0.98 * est + 0.02 * obs };
        self.wait_ns.store(next as u64, Ordering::Relaxed);
    }

    fn observe_sync(&self, took: Duration) {
        let obs = took.as_nanos().min(u64::MAX as u128) as f64;
        let est = self.sync_ns.load(Ordering::Relaxed) as f64;
        self.sync_ns.store((0.9 * est + 0.1 * obs) as u64, Ordering::Relaxed);
    }
}

/// The limits the writer works to, from the configured [`Durability`].
#[derive(Clone, Copy)]
struct Limits {
    max_batch: usize,
    max_delay: Duration,
    linger: Duration,
}

impl Limits {
    fn of(d: Durability) -> Limits {
        match d {
            Durability::GroupCommit {
                max_delay_us,
                max_batch,
                linger_us,
            } => Limits {
                max_batch,
                max_delay: Duration::from_micros(max_delay_us),
                linger: Duration::from_micros(linger_us),
            },
            // Batched exactly like the default group commit, minus the fsync:
            // the baseline that isolates what durability costs.
            Durability::Off => Limits::of(Durability::default()),
            Durability::EveryRecord => Limits {
                max_batch: usize::MAX,
                max_delay: Duration::ZERO,
                linger: Duration::ZERO,
            },
        }
    }
}

/// Take the next batch off the queue (at most `max_batch` records).
fn take_batch(q: &mut Queue, max_batch: usize, spare: &mut Vec<Pending>) -> Vec<Pending> {
    if q.items.len() <= max_batch {
        std::mem::replace(&mut q.items, std::mem::take(spare))
    } else {
        q.first_at = Instant::now();
        q.items.drain(..max_batch).collect()
    }
}

/// A write failed: refuse everything from now on and stop the writer's helpers.
fn fail(sh: &Shared, w: &mut Writer, e: &Error) {
    let mut d = sh.done.lock();
    if d.error.is_none() {
        d.error = Some(e.to_string());
    }
    for w in d.waiters.drain(..) {
        w.thread.unpark();
    }
    drop(d);
    sh.done_cv.notify_all();
    sh.subscribers.lock().clear();
    w.head.stop();
}

/// After a committer lets go: callers waiting for records still queued
/// may now commit them themselves.
fn wake_leaders(sh: &Shared) {
    let first_queued = {
        let q = sh.queue.lock();
        match q.items.first() {
            Some(p) if q.wanted > p.seq => p.seq,
            _ => return,
        }
    };
    // Wake one: the waiter for the oldest queued record leads the next commit.
    let d = sh.done.lock();
    if let Some(w) = d.waiters.iter().filter(|w| w.end > first_queued).min_by_key(|w| w.end) {
        w.thread.unpark();
    }
}

/// Commit the queued records up to `end` on the caller's thread (it would
/// only block waiting for the writer thread otherwise). Returns false if
/// another commit is in progress (or the writer is gone).
fn lead_commit(sh: &Shared, end: u64) -> Result<bool> {
    let Some(mut guard) = sh.committer.try_lock() else {
        return Ok(false);
    };
    let Some(w) = guard.as_mut() else {
        return Ok(false);
    };
    let limits = Limits::of(sh.cfg.durability);
    let mut spare = Vec::new();
    // The first round commits the caller's own records; up to LEAD_ROUNDS - 1
    // more serve callers who queued records meanwhile and wait for them:
    // handing the lead to one of them costs a scheduling delay per commit
    // when the cores are busy.
    for round in 0..LEAD_ROUNDS {
        let items = {
            let mut q = sh.queue.lock();
            let Some(first) = q.items.first().map(|p| p.seq) else { break };
            if round == 0 && first >= end {
                return Ok(false);
            }
            // Later rounds take records someone waits for, or records that
            // would not linger longer than an fsync takes anyway (callers
            // that wait at once, e.g. one query per thread).
            if round > 0 && q.wanted <= first && sh.pace.linger(limits.linger) > w.last_sync {
                break;
            }
            take_batch(&mut q, limits.max_batch, &mut spare)
        };
        sh.stats.lock().awaited += 1;
        if let Err(e) = w.commit_items(&items) {
            fail(sh, w, &e);
            *guard = None;
            return Err(e);
        }
        spare = items;
        spare.clear();
    }
    drop(guard);
    wake_leaders(sh);
    Ok(true)
}

/// Most consecutive commits one waiting caller makes (see [`lead_commit`]).
const LEAD_ROUNDS: usize = 4;

/// The writer thread: commits what nobody waits for (after the linger),
/// serves flushes and closes the log. Callers waiting for their own records
/// commit them themselves ([`lead_commit`]) whenever no commit is running.
fn run_writer(sh: Arc<Shared>) {
    let limits = Limits::of(sh.cfg.durability);
    let mut synced_ticket = 0u64;
    let mut spare: Vec<Pending> = Vec::new();
    loop {
        {
            let mut q = sh.queue.lock();
            while q.items.is_empty() && !q.closing && q.sync_ticket <= synced_ticket {
                sh.queue_cv.wait(&mut q);
            }
            // Linger while nobody waits for a queued record: later
            // submissions share the commit (fewer fsyncs, less CPU).
            if !limits.linger.is_zero() {
                while let Some(first) = q.items.first().map(|p| p.seq) {
                    if q.wanted > first {
                        sh.stats.lock().awaited += 1;
                        break;
                    }
                    if q.items.len() >= limits.max_batch || q.closing || q.sync_ticket > synced_ticket {
                        break;
                    }
                    let deadline = q.first_at + sh.pace.linger(limits.linger);
                    if Instant::now() >= deadline {
                        break;
                    }
                    let _ = sh.queue_cv.wait_until(&mut q, deadline);
                }
            }
            if !limits.max_delay.is_zero()
                && !q.items.is_empty()
                && q.items.len() < limits.max_batch
                && !q.closing
            {
                let deadline = Instant::now() + limits.max_delay;
                while q.items.len() < limits.max_batch && !q.closing {
                    if sh.queue_cv.wait_until(&mut q, deadline).timed_out() {
                        break;
                    }
                }
            }
            sh.stats.lock().linger_micros = sh.pace.linger(limits.linger).as_micros() as u64;
        }

        let mut guard = sh.committer.lock();
        let Some(w) = guard.as_mut() else {
            return; // a caller's commit failed and shut the writer down
        };
        let (items, ticket, drained, closing) = {
            let mut q = sh.queue.lock();
            let items = take_batch(&mut q, limits.max_batch, &mut spare);
            (items, q.sync_ticket, q.items.is_empty(), q.closing)
        };
        let mut result = w.commit_items(&items);
        // A flush is served once everything queued before it is committed.
        if result.is_ok() && drained && (ticket > synced_ticket || closing) {
            result = w.sync_all();
            if result.is_ok() {
                synced_ticket = ticket;
                sh.done.lock().synced = ticket;
                sh.done_cv.notify_all();
            }
        }
        if let Err(e) = result {
            fail(&sh, w, &e);
            *guard = None;
            return;
        }
        if closing && drained {
            sh.subscribers.lock().clear();
            w.head.stop();
            // A closed log keeps no slack (best effort: readers ignore it).
            w.space.stop();
            if w.trim().is_ok() {
                let _ = w.file.sync_all();
            }
            *guard = None;
            return;
        }
        drop(guard);
        wake_leaders(&sh);
        spare = items;
        spare.clear();
    }
}

impl Writer {
    /// Commit `items` as the durability says and acknowledge them.
    fn commit_items(&mut self, items: &[Pending]) -> Result<()> {
        if let Some(e) = self.head.error() {
            return Err(Error::Audit(format!("replacing audit HEAD: {e}")));
        }
        if items.is_empty() {
            return Ok(());
        }
        if self.shared.cfg.durability == Durability::EveryRecord {
            for i in 0..items.len() {
                self.commit(&items[i..i + 1])?;
                self.ack(&items[i..i + 1]);
            }
        } else {
            self.commit(items)?;
            self.ack(items);
        }
        Ok(())
    }

    /// Mark `items` durable, wake their appenders, and have `HEAD` follow.
    fn ack(&mut self, items: &[Pending]) {
        let sh = &self.shared;
        if let Some(last) = items.last() {
            let mut d = sh.done.lock();
            if last.seq + 1 > d.next {
                d.last_hash.clone_from(&self.last_hash);
            }
            d.next = d.next.max(last.seq + 1);
            let next = d.next;
            // Wake exactly the callers whose records are now durable, after
            // releasing the lock (a wake-up is a syscall; new waiters
            // register under this lock meanwhile).
            let mut wake = std::mem::take(&mut self.wake);
            d.waiters.retain(|w| {
                let done = w.end <= next;
                if done {
                    wake.push(w.thread.clone());
                }
                !done
            });
            drop(d);
            for t in wake.drain(..) {
                t.unpark();
            }
            self.wake = wake;
        }
        if self.sync {
            self.head
                .post(self.seg_index, self.next_seq, &self.last_hash);
        }
    }

    fn push_checkpoint(&mut self) -> Result<()> {
        let (line, m) = checkpoint_line(
            &self.shared.key,
            self.seg_index,
            self.next_seq - 1,
            &self.last_hash,
            &self.last_mac,
        )?;
        self.buf.extend_from_slice(&line);
        self.last_mac = hex::encode(m);
        self.since_ckpt = 0;
        Ok(())
    }

    fn write_buf(&mut self) -> Result<()> {
        let path = || self.shared.dir.join(segment_name(self.seg_index));
        let end = self.pos + self.buf.len() as u64;
        if let Some(d) = self.direct.as_mut() {
            // The write covers whole blocks: tell the filler up to where.
            self.space.reserve(self.seg_index, direct::align_up(end));
            match d.write(&self.file, self.pos, &self.buf) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %path().display(), error = %e, "audit log: direct write refused; writing through the page cache from now on");
                    direct::disable(&self.file);
                    self.direct = None;
                    self.space.buffered();
                    self.file
                        .write_all_at(&self.buf, self.pos)
                        .map_err(|e| Error::io(path(), e))?;
                }
                Err(e) => return Err(Error::io(path(), e)),
            }
        } else {
            self.space.reserve(self.seg_index, end);
            self.file
                .write_all_at(&self.buf, self.pos)
                .map_err(|e| Error::io(path(), e))?;
        }
        self.pos = end;
        self.buf.clear();
        Ok(())
    }

    /// Stop filling the current segment and cut its zeroed slack off.
    fn trim(&mut self) -> Result<()> {
        self.space.switch(None);
        let path = self.shared.dir.join(segment_name(self.seg_index));
        self.file
            .set_len(self.pos)
            .map_err(|e| Error::io(&path, e))
    }

    /// Close the current segment (already checkpointed) and start the next.
    fn rotate(&mut self) -> Result<()> {
        self.write_buf()?;
        let path = self.shared.dir.join(segment_name(self.seg_index));
        if self.sync {
            self.file.sync_data().map_err(|e| Error::io(&path, e))?;
        }
        // Not fsynced on its own: the new segment's directory fsync (or a
        // later one) carries it, and readers ignore zeros a crash leaves.
        self.trim()?;
        self.shared.closed_segments.lock().segs.push(SegMeta {
            index: self.seg_index,
            first_seq: self.seg_first_seq,
            last_seq: self.next_seq - 1,
            last_hash: self.last_hash.clone(),
            closing_mac: self.last_mac.clone(),
            newest_ms: Some(self.seg_newest_ms),
            newest_at_least: self.seg_newest_ms,
        });
        let e = Expect {
            segment: self.seg_index + 1,
            first_seq: self.next_seq,
            prev_hash: self.last_hash.clone(),
            prev_mac: self.last_mac.clone(),
        };
        let (file, header_mac, pos) = create_segment(
            &self.shared.dir,
            &self.shared.key,
            &e,
            self.shared.clock.now_unix_ms(),
            self.sync,
        )?;
        let path = self.shared.dir.join(segment_name(e.segment));
        if self.direct.is_some() {
            self.direct = start_direct(&file, pos, true, &path)?;
        }
        self.file = file;
        self.pos = pos;
        self.space.switch(Some((e.segment, path, pos)));
        self.last_mac = header_mac;
        self.seg_index = e.segment;
        self.seg_first_seq = e.first_seq;
        self.seg_records = 0;
        self.seg_newest_ms = i64::MIN;
        Ok(())
    }

    /// Chain, write and (per durability) fsync `items`, then replace HEAD.
    fn commit(&mut self, items: &[Pending]) -> Result<()> {
        let cfg = &self.shared.cfg;
        let (seg_max, ckpt_every) = (cfg.segment_max_records, cfg.checkpoint_every);
        let want_records = !self.shared.subscribers.lock().is_empty();
        let mut links: Vec<(String, String)> = Vec::new();
        self.buf.clear();
        for p in items {
            if p.seq != self.next_seq {
                return Err(Error::Audit(format!(
                    "internal: expected seq {}, got {}",
                    self.next_seq, p.seq
                )));
            }
            if self.seg_records >= seg_max {
                if self.since_ckpt > 0 {
                    self.push_checkpoint()?;
                }
                self.rotate()?;
            }
            self.body.clear();
            let prev = std::mem::take(&mut self.last_hash);
            // Same field order as AuditRecord; the hash covers these bytes.
            let _ = write!(
                self.body,
                "{{\"seq\":{},\"time_ms\":{},\"site\":{},\"device\":{},\"event\":{},\"prev\":\"{}\"}}",
                p.seq, p.time_ms, self.site_json, self.device_json, p.event_json, prev
            );
            let h = record_hash(&self.body);
            seal_into(&mut self.buf, &self.body, "hash", &h);
            self.last_hash = hex::encode(h);
            if want_records {
                links.push((prev, self.last_hash.clone()));
            }
            self.next_seq += 1;
            self.seg_records += 1;
            self.since_ckpt += 1;
            self.seg_newest_ms = self.seg_newest_ms.max(p.time_ms);
            if self.since_ckpt >= ckpt_every {
                self.push_checkpoint()?;
            }
        }
        if self.since_ckpt > 0 {
            self.push_checkpoint()?;
        }
        // The write counts with the fsync: a direct write waits for the device.
        let started = Instant::now();
        self.write_buf()?;
        if self.sync {
            let path = self.shared.dir.join(segment_name(self.seg_index));
            self.file.sync_data().map_err(|e| Error::io(&path, e))?;
        }
        {
            let mut st = self.shared.stats.lock();
            st.commits += 1;
            st.records += items.len() as u64;
            if self.sync {
                self.last_sync = started.elapsed();
                st.sync_micros += self.last_sync.as_micros() as u64;
                self.shared.pace.observe_sync(self.last_sync);
            }
        }
        if want_records {
            let sh = &self.shared;
            let mut subs = sh.subscribers.lock();
            for (p, (prev, hash)) in items.iter().zip(links) {
                let r = AuditRecord {
                    seq: p.seq,
                    time_ms: p.time_ms,
                    site: sh.cfg.site.clone(),
                    device: sh.cfg.device.clone(),
                    event: p.event.clone(),
                    prev,
                    hash,
                };
                subs.retain(|tx| tx.try_send(r.clone()).is_ok());
            }
        }
        Ok(())
    }

    /// fsync the segment and wait for a durable HEAD (flush/close).
    fn sync_all(&mut self) -> Result<()> {
        let path = self.shared.dir.join(segment_name(self.seg_index));
        self.file.sync_all().map_err(|e| Error::io(&path, e))?;
        self.head
            .ensure(self.seg_index, self.next_seq, &self.last_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::super::scan;
    use super::*;
    use crate::clock::ManualClock;
    use std::time::UNIX_EPOCH;

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        ))
    }

    fn admin(i: u64) -> AuditEvent {
        AuditEvent::Admin {
            operator: "t".into(),
            action: "a".into(),
            detail: format!("{i}"),
        }
    }

    #[test]
    fn log_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AuditLog>();
    }

    fn lingering(linger_us: u64) -> AuditConfig {
        AuditConfig {
            durability: Durability::GroupCommit {
                max_delay_us: 0,
                max_batch: 4096,
                linger_us,
            },
            ..Default::default()
        }
    }

    #[test]
    fn queued_records_linger_until_someone_waits() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        // A one-second linger: the writer only commits early because of the wait.
        let (log, _) = AuditLog::open(d.path(), key, lingering(1_000_000), clock()).unwrap();
        let tickets: Vec<AuditTicket> = (0..10).map(|i| log.submit(admin(i)).unwrap()).collect();
        let before = log.stats();
        assert_eq!(before.commits, 0, "nothing waited, nothing committed yet");
        let last = tickets.into_iter().last().unwrap();
        assert_eq!(last.wait().unwrap(), 9..10);
        let st = log.stats();
        assert_eq!((st.commits, st.records, st.awaited), (1, 10, 1), "{st:?}");
        assert!(log.records() >= 10);
    }

    #[test]
    fn records_nobody_waits_for_still_reach_disk_and_subscribers() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let (log, _) = AuditLog::open(d.path(), key.clone(), lingering(500), clock()).unwrap();
        let rx = log.subscribe();
        for i in 0..3 {
            drop(log.submit(admin(i)).unwrap());
        }
        for i in 0..3 {
            let r = rx.recv_timeout(Duration::from_secs(30)).expect("record delivered after the linger");
            assert_eq!(r.seq, i);
        }
        assert_eq!(log.stats().awaited, 0);
        drop(log);
        assert_eq!(AuditLog::verify(d.path(), &key).unwrap().records, 3);
    }

    #[test]
    fn append_reopen_continue() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let cfg = AuditConfig {
            segment_max_records: 3,
            checkpoint_every: 2,
            ..Default::default()
        };
        {
            let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
            assert_eq!(rep.records, 0);
            for i in 0..7 {
                assert_eq!(log.append(admin(i)).unwrap(), i);
            }
        }
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg, clock()).unwrap();
        assert_eq!(rep.records, 7);
        assert_eq!(rep.segments, 3);
        assert!(rep.torn_tail_repaired.is_none());
        assert_eq!(log.append(admin(7)).unwrap(), 7);
        drop(log);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.records, 8);
        let all = AuditLog::read(d.path(), &AuditFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        assert_eq!(all[0].prev, genesis_hash());
        for w in all.windows(2) {
            assert_eq!(w[1].prev, w[0].hash);
        }
    }

    /// Direct (block-aligned) and buffered writing leave byte-identical
    /// segments, across rotations, batches that end mid-block and a reopen
    /// that must pick up a partial block.
    #[test]
    fn direct_and_buffered_writes_leave_the_same_bytes() {
        let key = AuditKey::from_bytes([3; 32]);
        let mut dirs = Vec::new();
        for direct_io in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let cfg = AuditConfig {
                segment_max_records: 40,
                checkpoint_every: 7,
                preallocate_bytes: 64 * 1024,
                direct_io,
                ..Default::default()
            };
            let clk = clock();
            let mut i = 0u64;
            for round in 0..2 {
                let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clk.clone()).unwrap();
                assert_eq!(rep.records, i);
                for batch in [1usize, 5, 17, 2, 33, 9] {
                    let events = (0..batch)
                        .map(|k| AuditEvent::Admin {
                            operator: "t".into(),
                            action: "a".into(),
                            // Records of uneven length, some longer than a block.
                            detail: "x".repeat((i as usize + k) * 37 % 5000 + round),
                        })
                        .collect();
                    let r = log.append_batch(events).unwrap();
                    assert_eq!(r, i..i + batch as u64);
                    i += batch as u64;
                }
            }
            let v = AuditLog::verify(d.path(), &key).unwrap();
            assert!(v.ok() && v.records == i, "direct_io {direct_io}: {v:?}");
            dirs.push(d);
        }
        let segs = segment_paths(dirs[0].path());
        assert!(segs.len() >= 4, "{segs:?}");
        assert_eq!(segs.len(), segment_paths(dirs[1].path()).len());
        for p in segs {
            let other = dirs[1].path().join(p.file_name().unwrap());
            assert!(fs::read(&p).unwrap() == fs::read(&other).unwrap(), "{} differs", p.display());
        }
    }

    #[test]
    fn second_open_is_locked_and_wrong_key_refused() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let (log, _) =
            AuditLog::open(d.path(), key.clone(), AuditConfig::default(), clock()).unwrap();
        log.append(admin(0)).unwrap();
        assert!(matches!(
            AuditLog::open(d.path(), key.clone(), AuditConfig::default(), clock()),
            Err(Error::Locked(_))
        ));
        drop(log);
        let other = AuditKey::from_bytes([2; 32]);
        assert!(matches!(
            AuditLog::open(d.path(), other.clone(), AuditConfig::default(), clock()),
            Err(Error::Key(_))
        ));
        assert!(matches!(
            AuditLog::verify(d.path(), &other),
            Err(Error::Key(_))
        ));
    }

    #[test]
    fn a_failed_write_stops_all_further_appends() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("audit");
        let (log, _) = AuditLog::open(
            &dir,
            AuditKey::from_bytes([1; 32]),
            AuditConfig { head_interval_ms: 0, ..AuditConfig::default() },
            clock(),
        )
        .unwrap();
        log.append(admin(0)).unwrap();
        log.flush().unwrap(); // nothing in flight while the directory goes
                              // HEAD can no longer be replaced once the directory is gone.
        fs::remove_dir_all(&dir).unwrap();
        let mut failed = false;
        for i in 1..50 {
            if log.append(admin(i)).is_err() {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "appends kept succeeding although HEAD cannot be written"
        );
        assert!(matches!(log.append(admin(99)), Err(Error::Audit(_))));
        assert!(log.flush().is_err());
    }

    fn append_bytes(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// Segment files of a log, sorted.
    fn segment_paths(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(format::parse_segment_name).is_some())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn zeroed_space_runs_ahead_of_the_writer_and_is_trimmed_on_close() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let cfg = AuditConfig {
            preallocate_bytes: 64 * 1024,
            segment_max_records: 200,
            ..Default::default()
        };
        let (log, _) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
        for i in 0..150 {
            log.append(admin(i)).unwrap();
        }
        // The filler is asynchronous: wait for it to get ahead.
        let seg0 = seg_path(d.path(), 0);
        let t0 = Instant::now();
        let (len, data) = loop {
            let mut f = File::open(&seg0).unwrap();
            let data = data_len(&mut f).unwrap();
            let len = f.metadata().unwrap().len();
            if len > data || t0.elapsed() > Duration::from_secs(20) {
                break (len, data);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(len >= data + 32 * 1024, "no zeroed space ahead: {len} bytes, {data} of data");
        let bytes = fs::read(&seg0).unwrap();
        assert!(bytes[data as usize..].iter().all(|&b| b == 0));
        assert_eq!(bytes[data as usize - 1], b'\n');
        // Rotation (at 200) trims the closed segment; close trims the last.
        for i in 150..450 {
            log.append(admin(i)).unwrap();
        }
        log.close().unwrap();
        let segs = segment_paths(d.path());
        assert_eq!(segs.len(), 3);
        for p in &segs {
            let b = fs::read(p).unwrap();
            assert_eq!(b.last(), Some(&b'\n'), "{} keeps slack", p.display());
            assert!(!b.contains(&0), "{} holds a NUL", p.display());
        }
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok() && !v.torn_tail && v.records == 450, "{v:?}");
    }

    #[test]
    fn zeros_a_crash_leaves_after_the_data_are_free_space() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let cfg = AuditConfig {
            segment_max_records: 5,
            ..Default::default()
        };
        {
            let (log, _) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
            for i in 0..12 {
                log.append(admin(i)).unwrap();
            }
        }
        // A crash before the trims: zeros after a closed segment and the last.
        append_bytes(&seg_path(d.path(), 0), &[0; 10_000]);
        append_bytes(&seg_path(d.path(), 2), &[0; 70_000]);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok() && !v.torn_tail && v.records == 12, "{v:?}");
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
        assert!(rep.torn_tail_repaired.is_none(), "{rep:?}");
        assert_eq!(rep.records, 12);
        // Appending continues at the end of the data, not after the zeros.
        assert_eq!(log.append(admin(12)).unwrap(), 12);
        drop(log);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok() && !v.torn_tail && v.records == 13, "{v:?}");
        let last = fs::read(seg_path(d.path(), 2)).unwrap();
        assert!(!last.contains(&0));
        let all = AuditLog::read(d.path(), &AuditFilter::default()).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), (0..13).collect::<Vec<_>>());
        // Rekeying copies the data, not the zeros.
        append_bytes(&seg_path(d.path(), 1), &[0; 5_000]);
        let new = AuditKey::from_bytes([2; 32]);
        AuditLog::rekey(d.path(), &key, &new).unwrap();
        let v = AuditLog::verify(d.path(), &new).unwrap();
        assert!(v.ok() && v.records == 13, "{v:?}");
        assert!(!fs::read(seg_path(d.path(), 1)).unwrap().contains(&0));
    }

    #[test]
    fn bytes_behind_a_hole_are_an_unfinished_commit() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let cfg = AuditConfig {
            head_interval_ms: 0,
            ..Default::default()
        };
        let line = {
            let (log, _) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
            for i in 0..5 {
                log.append(admin(i)).unwrap();
            }
            drop(log);
            // A whole record line to replay as the part of a commit that
            // reached the disk while a page before it did not.
            let b = fs::read(seg_path(d.path(), 0)).unwrap();
            let lines: Vec<&[u8]> = b.split_inclusive(|&c| c == b'\n').collect();
            lines[lines.len() - 2].to_vec()
        };
        let mut torn = vec![0u8; 4096];
        torn.extend_from_slice(&line);
        torn.extend_from_slice(&[0; 4096]);
        append_bytes(&seg_path(d.path(), 0), &torn);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok() && v.torn_tail && v.records == 5, "{v:?}");
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
        let t = rep.torn_tail_repaired.expect("torn tail reported");
        assert_eq!(t.bytes_dropped, 4096 + line.len() as u64);
        assert_eq!(log.append(admin(5)).unwrap(), 5);
        drop(log);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok() && !v.torn_tail && v.records == 6, "{v:?}");

        // A NUL put inside durable records is not a torn tail: the records
        // after it are missing from what HEAD vouches for.
        let p = seg_path(d.path(), 0);
        let mut b = fs::read(&p).unwrap();
        let at = b.len() / 2;
        b[at] = 0;
        fs::write(&p, &b).unwrap();
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(!v.ok(), "{v:?}");
        assert!(matches!(
            AuditLog::open(d.path(), key, cfg, clock()),
            Err(Error::AuditTampered { .. })
        ));
    }

    /// A closed log of `n` records in segments of `seg` records, the first
    /// `old` of them a year before the rest.
    fn build(dir: &Path, key: &AuditKey, seg: u64, n: u64, old: u64, clk: &Arc<ManualClock>) {
        let cfg = AuditConfig {
            segment_max_records: seg,
            checkpoint_every: 4,
            durability: Durability::Off,
            ..Default::default()
        };
        let (log, _) = AuditLog::open(dir, key.clone(), cfg, clk.clone()).unwrap();
        for i in 0..n {
            if i == old {
                clk.advance(Duration::from_secs(400 * 86_400));
            }
            log.append(admin(i)).unwrap();
        }
        log.close().unwrap();
    }

    fn seg_path(dir: &Path, i: u32) -> PathBuf {
        dir.join(segment_name(i))
    }

    /// Flip one byte inside the body (not the first or last two lines) of
    /// segment `i`.
    fn flip_in_body(dir: &Path, i: u32) {
        let p = seg_path(dir, i);
        let mut b = fs::read(&p).unwrap();
        let line_starts: Vec<usize> = std::iter::once(0)
            .chain(
                b.iter()
                    .enumerate()
                    .filter(|(_, &c)| c == b'\n')
                    .map(|(k, _)| k + 1),
            )
            .collect();
        // Line 2 is a record well inside the segment.
        let at = line_starts[2] + 20;
        b[at] ^= 0x01;
        fs::write(&p, b).unwrap();
    }

    #[test]
    fn open_reads_closed_segments_only_at_their_ends() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let clk = clock();
        build(d.path(), &key, 10, 45, 45, &clk);
        let cfg = AuditConfig {
            segment_max_records: 10,
            ..Default::default()
        };
        let scan = scan_for_open(d.path(), &key).unwrap().unwrap();
        assert_eq!(scan.segments.len(), 5);
        assert!(scan.segments[..4].iter().all(|s| !s.body_verified));
        assert!(scan.segments[4].body_verified);
        assert_eq!(scan.records, 45);
        // The cheap view agrees with the full scan on everything open uses.
        let full = scan::scan(d.path(), Some(&key), None).unwrap();
        for (a, b) in scan.segments.iter().zip(&full.segments) {
            assert_eq!(
                (a.index, a.first_seq, a.records, &a.last_hash, &a.last_mac),
                (b.index, b.first_seq, b.records, &b.last_hash, &b.last_mac)
            );
            // Records are appended in time order here: the last one is the newest.
            assert_eq!(a.newest_ms, b.newest_ms);
        }

        // Damage inside a closed segment's records: verify catches it, open
        // (which does not read them) lets it through, retention refuses to
        // tombstone the segment.
        flip_in_body(d.path(), 1);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert_eq!(v.first_bad.as_ref().map(|b| b.segment), Some(1), "{v:?}");
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clk.clone()).unwrap();
        assert_eq!(rep.records, 45);
        clk.advance(Duration::from_secs(1200 * 86_400));
        assert!(matches!(
            log.enforce_retention(),
            Err(Error::AuditTampered { .. })
        ));
        drop(log);
        assert!(seg_path(d.path(), 0).exists() && seg_path(d.path(), 1).exists());
        assert!(!d.path().join(RETIRED_FILE).exists());

        // Damage at a closed segment's ends (header, closing checkpoint) or
        // to the set of files is refused by open.
        type Mutation = fn(&Path);
        let cases: [(&str, Mutation); 4] = [
            ("delete", |d| fs::remove_file(seg_path(d, 2)).unwrap()),
            ("swap", |d| {
                let (a, b) = (
                    fs::read(seg_path(d, 2)).unwrap(),
                    fs::read(seg_path(d, 3)).unwrap(),
                );
                fs::write(seg_path(d, 2), b).unwrap();
                fs::write(seg_path(d, 3), a).unwrap();
            }),
            ("drop closing checkpoint", |d| {
                let b = fs::read(seg_path(d, 3)).unwrap();
                let cut = b[..b.len() - 1].iter().rposition(|&c| c == b'\n').unwrap() + 1;
                fs::write(seg_path(d, 3), &b[..cut]).unwrap();
            }),
            ("append a line", |d| {
                let mut b = fs::read(seg_path(d, 2)).unwrap();
                let first = b[..b.iter().position(|&c| c == b'\n').unwrap() + 1].to_vec();
                b.extend_from_slice(&first);
                fs::write(seg_path(d, 2), b).unwrap();
            }),
        ];
        for (what, mutate) in cases {
            let m = tempfile::tempdir().unwrap();
            for e in fs::read_dir(d.path()).unwrap() {
                let e = e.unwrap();
                fs::copy(e.path(), m.path().join(e.file_name())).unwrap();
            }
            flip_in_body(m.path(), 1); // undo: segment 1 intact again
            assert!(AuditLog::verify(m.path(), &key).unwrap().ok());
            mutate(m.path());
            assert!(scan_for_open(m.path(), &key).unwrap().is_none(), "{what}");
            assert!(
                matches!(
                    AuditLog::open(m.path(), key.clone(), cfg.clone(), clk.clone()),
                    Err(Error::AuditTampered { .. })
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn retention_after_reopen_verifies_and_retires_unread_segments() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let clk = clock();
        let t0 = clk.now_unix_ms();
        build(d.path(), &key, 10, 50, 30, &clk);
        let cfg = AuditConfig {
            segment_max_records: 10,
            ..Default::default()
        };
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clk.clone()).unwrap();
        assert_eq!((rep.records, rep.segments), (50, 5));
        // Inside three years of the oldest records: nothing goes (and the
        // last records' times settle it without reading the segments).
        clk.set(UNIX_EPOCH + Duration::from_millis(t0 as u64) + Duration::from_secs(1095 * 86_400));
        assert_eq!(log.enforce_retention().unwrap(), 0);
        clk.set(UNIX_EPOCH + Duration::from_millis(t0 as u64) + Duration::from_secs(1097 * 86_400));
        assert_eq!(log.enforce_retention().unwrap(), 3);
        assert_eq!(log.enforce_retention().unwrap(), 0);
        assert_eq!(log.append(admin(99)).unwrap(), 51);
        drop(log);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.records, v.retired_segments), (52, 3));
        let (_, rep) = AuditLog::open(d.path(), key.clone(), cfg, clk).unwrap();
        assert_eq!((rep.records, rep.retired_segments), (52, 3));
    }

    #[test]
    fn head_lagging_into_a_closed_segment_falls_back_to_the_full_scan() {
        // Durability::Off replaces HEAD only on flush/close: a crash leaves it
        // pointing into the middle of a segment that is closed by now.
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let cfg = AuditConfig {
            segment_max_records: 4,
            checkpoint_every: 2,
            durability: Durability::Off,
            ..Default::default()
        };
        let (log, _) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clock()).unwrap();
        for i in 0..6 {
            log.append(admin(i)).unwrap();
        }
        log.flush().unwrap();
        let head_at_6 = fs::read(d.path().join(format::HEAD_FILE)).unwrap();
        for i in 6..15 {
            log.append(admin(i)).unwrap();
        }
        drop(log);
        fs::write(d.path().join(format::HEAD_FILE), &head_at_6).unwrap();
        assert!(scan_for_open(d.path(), &key).unwrap().is_none());
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg, clock()).unwrap();
        assert_eq!((rep.records, rep.segments), (15, 4));
        assert!(rep.torn_tail_repaired.is_none());
        assert_eq!(log.append(admin(15)).unwrap(), 15);
        drop(log);
        assert!(AuditLog::verify(d.path(), &key).unwrap().ok());
    }

    #[test]
    fn crash_while_creating_a_segment_is_repaired_by_open() {
        let d = tempfile::tempdir().unwrap();
        let key = AuditKey::from_bytes([1; 32]);
        let clk = clock();
        build(d.path(), &key, 5, 10, 10, &clk);
        let cfg = AuditConfig {
            segment_max_records: 5,
            ..Default::default()
        };
        // Rotation wrote the next header, then the process died.
        let full = scan::scan(d.path(), Some(&key), None).unwrap();
        let e = next_expect(&full);
        create_segment(d.path(), &key, &e, 0, true).unwrap();
        let scan = scan_for_open(d.path(), &key).unwrap().unwrap();
        assert_eq!((scan.records, scan.segments.len()), (10, 3));
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg.clone(), clk.clone()).unwrap();
        assert_eq!((rep.records, rep.segments), (10, 3));
        assert_eq!(log.append(admin(10)).unwrap(), 10);
        drop(log);
        assert!(AuditLog::verify(d.path(), &key).unwrap().ok());

        // ... or died before the header was complete: the partial file goes
        // and the previous segment is current again.
        let next = scan::scan(d.path(), Some(&key), None).unwrap();
        let e = next_expect(&next);
        fs::write(seg_path(d.path(), e.segment), b"{\"type\":\"hea").unwrap();
        assert!(scan_for_open(d.path(), &key).unwrap().is_none());
        let (log, rep) = AuditLog::open(d.path(), key.clone(), cfg, clk).unwrap();
        assert_eq!(rep.records, 11);
        assert!(rep.torn_tail_repaired.is_some());
        assert!(!seg_path(d.path(), e.segment).exists());
        assert_eq!(log.append(admin(11)).unwrap(), 11);
        drop(log);
        let v = AuditLog::verify(d.path(), &key).unwrap();
        assert!(v.ok() && v.records == 12, "{v:?}");
    }

    #[test]
    fn non_finite_scores_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(
            d.path(),
            AuditKey::from_bytes([1; 32]),
            AuditConfig::default(),
            clock(),
        )
        .unwrap();
        let e = AuditEvent::ThresholdChange {
            operator: "o".into(),
            purpose: "p".into(),
            mode: "verify".into(),
            old: None,
            new: f32::NAN,
            version: 1,
        };
        assert!(matches!(log.append(e), Err(Error::Audit(_))));
        assert_eq!(log.append(admin(0)).unwrap(), 0);
    }
}

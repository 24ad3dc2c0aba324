//! The writer side: [`AuditLog`] with its group-commit writer thread.
//!
//! Appenders serialize their event on their own thread, take the next seq
//! under a short lock and queue the event. One writer thread drains the
//! queue, chains and writes the batch (records, then a checkpoint), fsyncs
//! once, replaces `HEAD`, and only then wakes the appenders of that batch:
//! a query is never answered before its record is durable.
//!
//! Files: this one holds the API ([`AuditLog`], [`AuditTicket`]) and the
//! shared state; `open.rs` opening and repair; `writer.rs` the group-commit
//! writer thread and the commit (the protocol, lock order and pacing are
//! documented there); `head.rs` the `HEAD` companion thread; `read.rs`
//! verify, read, export and lookups; `maintenance.rs` re-keying and
//! retention; `tests.rs`.

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

use super::direct::{self, DirectTail};
use super::event::{AuditEvent, AuditFilter, AuditRecord};
use super::format::{
    self, checkpoint_line, data_len, genesis_hash, parse_control, record_hash, seal_control, seal_into, segment_name, sync_dir, write_head,
    Header, Retired, HEADER_DOMAIN, LOCK_FILE, RETIRED_DOMAIN, RETIRED_FILE,
};
use super::scan::{scan, scan_for_open, verify_closed_segment, Expect, OpenReport, Scan, SegState, TornTail, VerifyReport};
use super::space::Space;
use super::{AuditConfig, AuditKey, Durability, MIN_RETENTION_DAYS};
use crate::clock::Clock;
use crate::{Error, Result};

mod head;
mod maintenance;
mod open;
mod read;
#[cfg(test)]
mod tests;
mod writer;

use self::head::*;
use self::open::*;
use self::writer::*;

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
        f.debug_struct("AuditLog").field("dir", &self.shared.dir).field("cfg", &self.shared.cfg).finish_non_exhaustive()
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
                    d.waiters.push(Waiter { end: range.end, thread: std::thread::current() });
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
    /// The submitter's failpoints (`audit/*`; nothing without the feature).
    fail: crate::failpoints::Carried,
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

/// Check and serialize an event on the appender's thread.
fn encode_event(event: &AuditEvent) -> Result<String> {
    if let Some(field) = event.non_finite_field() {
        return Err(Error::Audit(format!("event field {field} is NaN or infinite")));
    }
    let json = serde_json::to_string(event).map_err(|e| Error::Audit(format!("serialising audit event: {e}")))?;
    if json.len() > MAX_EVENT_BYTES {
        return Err(Error::Audit(format!("audit event of {} bytes exceeds the {MAX_EVENT_BYTES}-byte limit", json.len())));
    }
    Ok(json)
}

fn json_string(s: &str) -> Result<String> {
    serde_json::to_string(s).map_err(|e| Error::Audit(format!("serialising {s:?}: {e}")))
}

impl AuditLog {
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
            let fail = crate::failpoints::Carried::here();
            for (event, event_json) in events {
                let seq = q.next_seq;
                q.next_seq += 1;
                q.items.push(Pending { seq, time_ms, event_json, event, fail: fail.clone() });
            }
            // The writer only needs waking when work appears or a batch is
            // full; while it lingers, each submit need not wake it.
            wake = was_empty || q.items.len() >= self.shared.cfg.durability.max_batch();
            start..q.next_seq
        };
        if wake && !range.is_empty() {
            self.shared.queue_cv.notify_one();
        }
        Ok(AuditTicket { range, shared: Arc::clone(&self.shared), submitted: Instant::now() })
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

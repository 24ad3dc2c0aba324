//! The group-commit writer: batching, lingering, the committing caller, and the commit itself.

use super::*;

/// The writer thread's state: the current segment and the chain's end.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) file: File,
    /// End of the data in `file` (the file may go on with zeroed space).
    pub(super) pos: u64,
    pub(super) space: Space,
    /// Direct (block-aligned) writes of the open segment, if the filesystem takes them.
    pub(super) direct: Option<DirectTail>,
    pub(super) seg_index: u32,
    pub(super) seg_first_seq: u64,
    pub(super) seg_records: u64,
    pub(super) seg_newest_ms: i64,
    pub(super) last_hash: String,
    pub(super) last_mac: String,
    pub(super) next_seq: u64,
    pub(super) since_ckpt: u64,
    pub(super) buf: Vec<u8>,
    pub(super) body: Vec<u8>,
    pub(super) site_json: String,
    pub(super) device_json: String,
    pub(super) sync: bool,
    pub(super) head: HeadWriter,
    /// How long the last commit's write and fsync took.
    pub(super) last_sync: Duration,
    /// Threads to wake after a commit (kept to reuse its allocation).
    pub(super) wake: Vec<std::thread::Thread>,
}

/// How long queued records linger. Callers report, each time they wait
/// for a ticket, how long after submitting it they did (a caller keeping a
/// window of queries in flight waits about one window later; a blocking
/// caller at once); the estimate follows drops at once and rises slowly, so
/// it tracks the impatient end. Records linger so long that a commit started
/// then (and its fsync, twice for safety) ends before the impatient caller
/// waits, at most half the estimate, capped by the configured linger.
pub(super) struct Pace {
    /// Estimated submit-to-wait time, nanoseconds.
    pub(super) wait_ns: AtomicU64,
    /// Moving average of a commit's fsync, nanoseconds.
    pub(super) sync_ns: AtomicU64,
}

impl Pace {
    pub(super) fn new(linger: Duration) -> Pace {
        Pace { wait_ns: AtomicU64::new(4 * linger.as_nanos() as u64), sync_ns: AtomicU64::new(0) }
    }

    pub(super) fn linger(&self, max: Duration) -> Duration {
        let wait = self.wait_ns.load(Ordering::Relaxed);
        let sync = self.sync_ns.load(Ordering::Relaxed);
        let margin = 2 * sync + 200_000;
        let ns = (wait / 2).min(wait.saturating_sub(margin));
        max.min(Duration::from_nanos(ns))
    }

    /// A caller waited for a ticket `after` submitting it (racy updates are fine: an estimate).
    pub(super) fn observe_wait(&self, after: Duration) {
        let obs = after.as_nanos().min(u64::MAX as u128) as f64;
        let est = self.wait_ns.load(Ordering::Relaxed) as f64;
        let next = if obs < est { 0.7 * est + 0.3 * obs } else { 0.98 * est + 0.02 * obs };
        self.wait_ns.store(next as u64, Ordering::Relaxed);
    }

    pub(super) fn observe_sync(&self, took: Duration) {
        let obs = took.as_nanos().min(u64::MAX as u128) as f64;
        let est = self.sync_ns.load(Ordering::Relaxed) as f64;
        self.sync_ns.store((0.9 * est + 0.1 * obs) as u64, Ordering::Relaxed);
    }
}

/// The limits the writer works to, from the configured [`Durability`].
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_batch: usize,
    pub(super) max_delay: Duration,
    pub(super) linger: Duration,
}

impl Limits {
    pub(super) fn of(d: Durability) -> Limits {
        match d {
            Durability::GroupCommit { max_delay_us, max_batch, linger_us } => {
                Limits { max_batch, max_delay: Duration::from_micros(max_delay_us), linger: Duration::from_micros(linger_us) }
            }
            // Batched exactly like the default group commit, minus the fsync:
            // the baseline that isolates what durability costs.
            Durability::Off => Limits::of(Durability::default()),
            Durability::EveryRecord => Limits { max_batch: usize::MAX, max_delay: Duration::ZERO, linger: Duration::ZERO },
        }
    }
}

/// Take the next batch off the queue (at most `max_batch` records).
pub(super) fn take_batch(q: &mut Queue, max_batch: usize, spare: &mut Vec<Pending>) -> Vec<Pending> {
    if q.items.len() <= max_batch {
        std::mem::replace(&mut q.items, std::mem::take(spare))
    } else {
        q.first_at = Instant::now();
        q.items.drain(..max_batch).collect()
    }
}

/// A write failed: refuse everything from now on and stop the writer's helpers.
pub(super) fn fail(sh: &Shared, w: &mut Writer, e: &Error) {
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
pub(super) fn wake_leaders(sh: &Shared) {
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
pub(super) fn lead_commit(sh: &Shared, end: u64) -> Result<bool> {
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
pub(super) const LEAD_ROUNDS: usize = 4;

/// The writer thread: commits what nobody waits for (after the linger),
/// serves flushes and closes the log. Callers waiting for their own records
/// commit them themselves ([`lead_commit`]) whenever no commit is running.
pub(super) fn run_writer(sh: Arc<Shared>) {
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
            if !limits.max_delay.is_zero() && !q.items.is_empty() && q.items.len() < limits.max_batch && !q.closing {
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
    pub(super) fn commit_items(&mut self, items: &[Pending]) -> Result<()> {
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
    pub(super) fn ack(&mut self, items: &[Pending]) {
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
            if items.iter().any(|p| p.fail.hit("audit/head")) {
                self.head.fail_next();
            }
            self.head.post(self.seg_index, self.next_seq, &self.last_hash);
        }
    }

    pub(super) fn push_checkpoint(&mut self) -> Result<()> {
        let (line, m) = checkpoint_line(&self.shared.key, self.seg_index, self.next_seq - 1, &self.last_hash, &self.last_mac)?;
        self.buf.extend_from_slice(&line);
        self.last_mac = hex::encode(m);
        self.since_ckpt = 0;
        Ok(())
    }

    pub(super) fn write_buf(&mut self) -> Result<()> {
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
                    self.file.write_all_at(&self.buf, self.pos).map_err(|e| Error::io(path(), e))?;
                }
                Err(e) => return Err(Error::io(path(), e)),
            }
        } else {
            self.space.reserve(self.seg_index, end);
            self.file.write_all_at(&self.buf, self.pos).map_err(|e| Error::io(path(), e))?;
        }
        self.pos = end;
        self.buf.clear();
        Ok(())
    }

    /// Stop filling the current segment and cut its zeroed slack off.
    pub(super) fn trim(&mut self) -> Result<()> {
        self.space.switch(None);
        let path = self.shared.dir.join(segment_name(self.seg_index));
        self.file.set_len(self.pos).map_err(|e| Error::io(&path, e))
    }

    /// Close the current segment (already checkpointed) and start the next.
    pub(super) fn rotate(&mut self) -> Result<()> {
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
        let (file, header_mac, pos) = create_segment(&self.shared.dir, &self.shared.key, &e, self.shared.clock.now_unix_ms(), self.sync)?;
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
    pub(super) fn commit(&mut self, items: &[Pending]) -> Result<()> {
        let cfg = &self.shared.cfg;
        let (seg_max, ckpt_every) = (cfg.segment_max_records, cfg.checkpoint_every);
        let want_records = !self.shared.subscribers.lock().is_empty();
        let mut links: Vec<(String, String)> = Vec::new();
        self.buf.clear();
        for p in items {
            if p.seq != self.next_seq {
                return Err(Error::Audit(format!("internal: expected seq {}, got {}", self.next_seq, p.seq)));
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
        let seg_path = self.shared.dir.join(segment_name(self.seg_index));
        let injected = |point: &str, errno: i32| {
            items.iter().any(|p| p.fail.hit(point)).then(|| Error::io(&seg_path, std::io::Error::from_raw_os_error(errno)))
        };
        if let Some(e) = injected("audit/write", libc::ENOSPC) {
            return Err(e);
        }
        self.write_buf()?;
        if let Some(e) = injected("audit/fsync", libc::EIO) {
            return Err(e);
        }
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
    pub(super) fn sync_all(&mut self) -> Result<()> {
        let path = self.shared.dir.join(segment_name(self.seg_index));
        self.file.sync_all().map_err(|e| Error::io(&path, e))?;
        self.head.ensure(self.seg_index, self.next_seq, &self.last_hash)
    }
}

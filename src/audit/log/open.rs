//! Opening a log: the lock, the scan, repairing a torn tail, the first segment.

use super::*;

/// Take the directory's advisory lock (one writer process at a time).
pub(super) fn lock_dir(dir: &Path) -> Result<File> {
    crate::fs::Dir::open(dir)?.lock(LOCK_FILE)
}

/// Cut a torn tail off the last segment (or remove a segment whose header
/// never made it) and delete files of already-retired segments.
pub(super) fn repair(scan: &mut Scan) -> Result<Option<TornTail>> {
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
                let f = crate::fs::open_write_nofollow(&last.path).map_err(|e| Error::io(&last.path, e))?;
                f.set_len(last.auth_end).map_err(|e| Error::io(&last.path, e))?;
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
pub(super) fn next_expect(scan: &Scan) -> Expect {
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
pub(super) fn after_retired(scan: &Scan) -> Expect {
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
pub(super) fn create_segment(dir: &Path, key: &AuditKey, e: &Expect, now_ms: i64, sync: bool) -> Result<(File, String, u64)> {
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
pub(super) fn start_direct(file: &File, pos: u64, want: bool, path: &Path) -> Result<Option<DirectTail>> {
    if !want {
        return Ok(None);
    }
    let d = DirectTail::start(file, pos).map_err(|e| Error::io(path, e))?;
    if d.is_none() {
        tracing::debug!(path = %path.display(), "audit log: no O_DIRECT here; writing through the page cache");
    }
    Ok(d)
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
    pub fn open(dir: &Path, key: AuditKey, cfg: AuditConfig, clock: Arc<dyn Clock>) -> Result<(AuditLog, OpenReport)> {
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
        let mut file = crate::fs::open_write_nofollow(&current.path).map_err(|e| Error::io(&current.path, e))?;
        let pos = data_len(&mut file).and_then(|n| file.seek(SeekFrom::Start(n))).map_err(|e| Error::io(&current.path, e))?;
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
            done: Mutex::new(Done { next: records, last_hash: current.last_hash.clone(), synced: 0, error: None, waiters: Vec::new() }),
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
        let handle = match std::thread::Builder::new().name("facematch-audit".into()).spawn(move || run_writer(sh)) {
            Ok(h) => h,
            Err(e) => {
                // Break the Shared -> Writer -> Shared cycle so the lock is released.
                if let Some(mut w) = shared.committer.lock().take() {
                    w.head.stop();
                }
                return Err(Error::Audit(format!("starting the audit writer thread: {e}")));
            }
        };
        Ok((AuditLog { shared, writer: Mutex::new(Some(handle)) }, report))
    }
}

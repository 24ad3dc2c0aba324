//! Tests of the writer side (open, commit, space, retention, failures).

use super::super::scan;
use super::*;
use crate::clock::ManualClock;
use std::time::UNIX_EPOCH;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000)))
}

fn admin(i: u64) -> AuditEvent {
    AuditEvent::Admin { operator: "t".into(), action: "a".into(), detail: format!("{i}") }
}

#[test]
fn log_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<AuditLog>();
}

fn lingering(linger_us: u64) -> AuditConfig {
    AuditConfig { durability: Durability::GroupCommit { max_delay_us: 0, max_batch: 4096, linger_us }, ..Default::default() }
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
    let cfg = AuditConfig { segment_max_records: 3, checkpoint_every: 2, ..Default::default() };
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
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
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
        let cfg =
            AuditConfig { segment_max_records: 40, checkpoint_every: 7, preallocate_bytes: 64 * 1024, direct_io, ..Default::default() };
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
    let (log, _) = AuditLog::open(d.path(), key.clone(), AuditConfig::default(), clock()).unwrap();
    log.append(admin(0)).unwrap();
    assert!(matches!(AuditLog::open(d.path(), key.clone(), AuditConfig::default(), clock()), Err(Error::Locked(_))));
    drop(log);
    let other = AuditKey::from_bytes([2; 32]);
    assert!(matches!(AuditLog::open(d.path(), other.clone(), AuditConfig::default(), clock()), Err(Error::Key(_))));
    assert!(matches!(AuditLog::verify(d.path(), &other), Err(Error::Key(_))));
}

#[test]
fn a_failed_write_stops_all_further_appends() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("audit");
    let (log, _) =
        AuditLog::open(&dir, AuditKey::from_bytes([1; 32]), AuditConfig { head_interval_ms: 0, ..AuditConfig::default() }, clock())
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
    assert!(failed, "appends kept succeeding although HEAD cannot be written");
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
    let cfg = AuditConfig { preallocate_bytes: 64 * 1024, segment_max_records: 200, ..Default::default() };
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
    let cfg = AuditConfig { segment_max_records: 5, ..Default::default() };
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
    let cfg = AuditConfig { head_interval_ms: 0, ..Default::default() };
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
    assert!(matches!(AuditLog::open(d.path(), key, cfg, clock()), Err(Error::AuditTampered { .. })));
}

/// A closed log of `n` records in segments of `seg` records, the first
/// `old` of them a year before the rest.
fn build(dir: &Path, key: &AuditKey, seg: u64, n: u64, old: u64, clk: &Arc<ManualClock>) {
    let cfg = AuditConfig { segment_max_records: seg, checkpoint_every: 4, durability: Durability::Off, ..Default::default() };
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
    let line_starts: Vec<usize> = std::iter::once(0).chain(b.iter().enumerate().filter(|(_, &c)| c == b'\n').map(|(k, _)| k + 1)).collect();
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
    let cfg = AuditConfig { segment_max_records: 10, ..Default::default() };
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
    assert!(matches!(log.enforce_retention(), Err(Error::AuditTampered { .. })));
    drop(log);
    assert!(seg_path(d.path(), 0).exists() && seg_path(d.path(), 1).exists());
    assert!(!d.path().join(RETIRED_FILE).exists());

    // Damage at a closed segment's ends (header, closing checkpoint) or
    // to the set of files is refused by open.
    type Mutation = fn(&Path);
    let cases: [(&str, Mutation); 4] = [
        ("delete", |d| fs::remove_file(seg_path(d, 2)).unwrap()),
        ("swap", |d| {
            let (a, b) = (fs::read(seg_path(d, 2)).unwrap(), fs::read(seg_path(d, 3)).unwrap());
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
        assert!(matches!(AuditLog::open(m.path(), key.clone(), cfg.clone(), clk.clone()), Err(Error::AuditTampered { .. })), "{what}");
    }
}

#[test]
fn retention_after_reopen_verifies_and_retires_unread_segments() {
    let d = tempfile::tempdir().unwrap();
    let key = AuditKey::from_bytes([1; 32]);
    let clk = clock();
    let t0 = clk.now_unix_ms();
    build(d.path(), &key, 10, 50, 30, &clk);
    let cfg = AuditConfig { segment_max_records: 10, ..Default::default() };
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
    let cfg = AuditConfig { segment_max_records: 4, checkpoint_every: 2, durability: Durability::Off, ..Default::default() };
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
    let cfg = AuditConfig { segment_max_records: 5, ..Default::default() };
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
    let (log, _) = AuditLog::open(d.path(), AuditKey::from_bytes([1; 32]), AuditConfig::default(), clock()).unwrap();
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

//! Maintenance: re-signing under a new key, retention.

use super::*;

impl AuditLog {
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
            let t = Retired { key_id: new.id(), mac: None, ..r.clone() };
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
                    let (mut h, _, _) = parse_control::<Header>(l)
                        .ok_or_else(|| Error::AuditTampered { seq: s.first_seq, reason: "unreadable header".into() })?;
                    h.mac = None;
                    h.key_id = new.id();
                    h.prev_mac = prev_mac.clone();
                    let (hl, m) = seal_control(new, HEADER_DOMAIN, &h)?;
                    out.extend_from_slice(&hl);
                    prev_mac = hex::encode(m);
                } else if l.starts_with(b"{\"type\":\"checkpoint\"") {
                    let (c, _, _) = parse_control::<format::Checkpoint>(l)
                        .ok_or_else(|| Error::AuditTampered { seq: s.first_seq, reason: "unreadable checkpoint".into() })?;
                    let (cl, m) = checkpoint_line(new, c.segment, c.seq, &c.hash, &prev_mac)?;
                    out.extend_from_slice(&cl);
                    prev_mac = hex::encode(m);
                } else {
                    out.extend_from_slice(line);
                }
            }
            let mut f = crate::fs::create_output(&tmp)?;
            f.write_all(&out).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
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
            return Err(Error::AuditTampered { seq: b.seq, reason: format!("after rekey: {}", b.reason) });
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
                    let t = verify_closed_segment(&path, m.index, &sh.key, &expect, m.last_seq, &m.last_hash, &m.closing_mac)?;
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

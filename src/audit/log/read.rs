//! Reading a closed or open log without writing: verify, read, export, lookups by seq.

use super::*;

impl AuditLog {
    /// Every record from `seq` on, in order, read from the segments that hold
    /// them (the newest ones: cheap when `seq` is recent). Reads only.
    pub fn read_from(dir: &Path, seq: u64) -> Result<Vec<AuditRecord>> {
        let segs = segment_files(dir)?;
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
        let segs = segment_files(dir)?;
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
                    let v: serde_json::Value =
                        serde_json::from_str(&line).map_err(|e| Error::AuditTampered { seq, reason: format!("unreadable record: {e}") })?;
                    return Ok(v.get("hash").and_then(|h| h.as_str()).map(str::to_string));
                }
            }
            return Ok(None);
        }
        Ok(None)
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
                w.write_all(raw).and_then(|_| w.write_all(b"\n")).map_err(|e| Error::Audit(format!("writing the export: {e}")))?;
                n += 1;
            }
            Ok(())
        };
        scan(dir, None, Some(&mut visit))?.into_ok()?;
        w.flush().map_err(|e| Error::Audit(format!("writing the export: {e}")))?;
        Ok(n)
    }
}

/// The segment files of a log directory, oldest first.
fn segment_files(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut segs: Vec<(u32, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        if let Some(i) = e.file_name().to_str().and_then(format::parse_segment_name) {
            segs.push((i, e.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

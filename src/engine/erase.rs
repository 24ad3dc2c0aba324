//! Erasure: deletion, withdrawal, retention purge, compaction, snapshots.

use super::*;

impl Engine {
    pub(super) fn erase(&self, templates: Vec<u64>) -> Result<ErasureReport> {
        let mut w = self.writer.lock();
        let known: Vec<u64> = {
            let st = self.state.read();
            templates.into_iter().filter(|t| st.by_template.contains_key(t)).collect()
        };
        if known.is_empty() {
            return Ok(ErasureReport::default());
        }
        // The erasure's audit record is durable already (write-ahead): the templates stop
        // matching now, even if the frame below cannot be written (open re-applies it then).
        let mut subjects = Vec::new();
        {
            let mut st = self.state.write();
            for &t in &known {
                let subj = st.by_template.get(&t).map(|&s| st.slots[s as usize].subject);
                if let Some(slot) = st.note_delete(t) {
                    st.index.remove(slot)?;
                }
                if let Some(si) = subj {
                    if st.subjects.live[si as usize] == 0 {
                        subjects.push(st.subject_id(si).to_string());
                    }
                }
            }
        }
        w.log.append_durable(&[Op::Delete { templates: known.clone() }.encode()])?;
        drop(w);
        subjects.sort();
        subjects.dedup();
        Ok(ErasureReport { templates: known, subjects, bytes_removed: false })
    }

    pub(super) fn maybe_compact(&self, operator: &Operator, report: &mut ErasureReport) -> Result<()> {
        let frac = self.state.read().index.deleted_fraction();
        if frac >= self.manifest.read().config.compact_deleted_fraction {
            self.compact(operator)?;
            report.bytes_removed = true;
        }
        Ok(())
    }

    /// Delete templates by id. They are never returned from the moment this returns.
    pub fn delete(&self, operator: &Operator, templates: &[u64], reason: &str) -> Result<ErasureReport> {
        {
            let st = self.state.read();
            if let Some(t) = templates.iter().find(|t| !st.by_template.contains_key(t)) {
                return Err(Error::UnknownTemplate(*t));
            }
        }
        let mut ids = templates.to_vec();
        ids.sort_unstable();
        ids.dedup();
        // Write-ahead: the record first, then the erasure (see `reconcile`).
        self.audit_intent(AuditEvent::Deletion { operator: operator.as_str().into(), templates: ids.clone(), reason: reason.into() })?;
        let mut r = self.erase(ids)?;
        self.rebind()?;
        self.maybe_compact(operator, &mut r)?;
        Ok(r)
    }

    /// Withdrawal of consent: every template of `subject` is erased at once and its consents are marked withdrawn.
    pub fn withdraw(&self, operator: &Operator, subject: &SubjectId) -> Result<ErasureReport> {
        let (templates, consents) = {
            let st = self.state.read();
            let templates = st.templates_of(subject);
            let consents: Vec<ConsentRecord> = st.consents_of(subject).into_iter().filter(|c| c.withdrawn_at_ms.is_none()).collect();
            if templates.is_empty() && consents.is_empty() {
                return Err(Error::UnknownSubject(subject.to_string()));
            }
            (templates, consents)
        };
        let now = self.clock.now_unix_ms();
        // Write-ahead: the record first, then the withdrawal (see `reconcile`).
        let mut erased = templates.clone();
        erased.sort_unstable();
        self.audit_intent(AuditEvent::ConsentWithdrawn {
            operator: operator.as_str().into(),
            subject: subject.to_string(),
            templates_erased: erased,
        })?;
        if crate::failpoints::hit("withdraw/recorded") {
            return Err(Error::Cancelled);
        }
        self.mark_withdrawn(&consents, now)?;
        let mut r = self.erase(templates)?;
        r.subjects = vec![subject.to_string()];
        self.rebind()?;
        self.maybe_compact(operator, &mut r)?;
        Ok(r)
    }

    /// Erase every template whose retention has expired (also run on open).
    pub fn purge_expired(&self, operator: &Operator) -> Result<ErasureReport> {
        let now = self.clock.now_unix_ms();
        let expired: Vec<u64> = {
            let st = self.state.read();
            if st.min_expiry_ms > now {
                return Ok(ErasureReport::default());
            }
            st.by_template.iter().filter(|&(_, s)| st.slots[s as usize].expires_at_ms <= now).map(|(t, _)| t).collect()
        };
        if expired.is_empty() {
            return Ok(ErasureReport::default());
        }
        let mut expired = expired;
        expired.sort_unstable();
        self.audit_intent(AuditEvent::Purge {
            operator: operator.as_str().into(),
            templates: expired.clone(),
            reason: "retention expired".into(),
        })?;
        let mut r = self.erase(expired)?;
        r.templates.sort_unstable();
        self.rebind()?;
        self.maybe_compact(operator, &mut r)?;
        Ok(r)
    }

    /// Rewrite the store without deleted templates: their bytes leave every file; the index drops them and repairs its graph.
    ///
    /// Written ahead: a `compaction-started` record is durable first; a
    /// compaction that fails says so in a `compaction-failed` record, and one
    /// a crash cut short is reconciled on open (completed or not, from which
    /// template log is in place).
    pub fn compact(&self, operator: &Operator) -> Result<CompactionReport> {
        let key = self.key.read().clone();
        let before = hex::encode(self.writer.lock().log.file_id());
        self.audit_intent(AuditEvent::Admin {
            operator: operator.as_str().into(),
            action: "compaction-started".into(),
            detail: format!("template log {before}"),
        })?;
        if crate::failpoints::hit("compact/recorded") {
            return Err(Error::Cancelled);
        }
        let r = match self.rewrite(&key) {
            Ok(r) => r,
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => {
                let done = hex::encode(self.writer.lock().log.file_id()) != before;
                let detail = if done {
                    format!("the compacted template log is in place, but finishing failed: {e}")
                } else {
                    format!("not compacted (the previous template log stays): {e}")
                };
                let _ =
                    self.audit_intent(AuditEvent::Admin { operator: operator.as_str().into(), action: "compaction-failed".into(), detail });
                return Err(e);
            }
        };
        self.audit_append(AuditEvent::Compaction {
            operator: operator.as_str().into(),
            templates_removed: r.templates_removed,
            bytes_before: r.bytes_before,
            bytes_after: r.bytes_after,
        })?;
        Ok(r)
    }

    /// Write a new log (live templates + consents) sealed with `key`, a fresh snapshot, swap them in, shred the old log.
    pub(super) fn rewrite(&self, key: &MasterKey) -> Result<CompactionReport> {
        // Lock order: writer, manifest, state.
        let mut w = self.writer.lock();
        let mut man = self.manifest.write();
        let mut st = self.state.write();
        let bytes_before = w.log.len();
        let (nl, removed) = self.write_compacted(&mut st, key, &self.gdir, store::LOG_NEW)?;
        // The manifest accepts the new log before it is renamed in (a crash
        // between the two leaves a log the manifest names either way).
        let mut nm = man.clone();
        if let Some(b) = nm.bound.as_mut() {
            b.pending_log = Some((hex::encode(nl.file_id()), nl.frames()));
        }
        store::write_manifest(&self.gdir, &mut nm, key)?;
        *man = nm;
        drop(man);
        let logp = self.dir.join(store::LOG);
        self.gdir.rename(store::LOG_NEW, store::LOG)?;
        self.gdir.sync()?;
        if crate::failpoints::hit("compact/renamed") {
            return Err(Error::Cancelled);
        }
        let mut nl = nl;
        nl.renamed(logp);
        let bytes_after = nl.len();
        let old = std::mem::replace(&mut w.log, nl);
        old.shred()?;
        Ok(CompactionReport { templates_removed: removed, bytes_before, bytes_after })
    }

    /// Compact the index in memory and write a log holding only live
    /// templates (and the consents) to `log_path`, and a snapshot bound to it
    /// to `snap_path`, under `key`. Returns the new log (at `log_path`) and
    /// how many deleted slots were dropped. The caller holds the writer lock.
    pub(super) fn write_compacted(&self, st: &mut State, key: &MasterKey, dir: &Dir, log_name: &str) -> Result<(LogWriter, u64)> {
        let removed = (st.index.slots() - st.index.len()) as u64;
        let map = st.index.compact();
        calibrate_index(&mut st.index);
        // Renumber slots.
        let mut new_slots = vec![None; st.index.slots()];
        for (old, new) in map.iter().enumerate() {
            if let Some(n) = new {
                if st.by_template.get(&st.slots[old].template) == Some(&(old as u32)) {
                    new_slots[*n as usize] = Some(st.slots[old].clone());
                }
            }
        }
        let slots: Vec<Slot> = new_slots.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| Error::DataCorruption {
            path: self.dir.clone(),
            reason: "index compaction map disagrees with the gallery metadata".into(),
        })?;
        st.renumber(slots);

        store::recover::clear_leftover(dir, log_name)?;
        let mut nl = LogWriter::create(dir, log_name, key.store_cipher())?;
        let consents = st.all_consents();
        let mut frames: Vec<Vec<u8>> = consents.chunks(store::OPS_PER_FRAME).map(|c| Op::Consents(c.to_vec()).encode()).collect();
        for (ci, chunk) in st.slots.chunks(store::OPS_PER_FRAME).enumerate() {
            let mut items = Vec::with_capacity(chunk.len());
            for (j, s) in chunk.iter().enumerate() {
                let slot = (ci * store::OPS_PER_FRAME + j) as u32;
                let meta = st.meta(slot).ok_or(Error::UnknownTemplate(s.template))?;
                let v = st.index.vector(slot).ok_or(Error::UnknownTemplate(s.template))?;
                items.push((meta, v));
            }
            frames.push(store::encode_enrolments(&items.iter().map(|(m, v)| (m, *v)).collect::<Vec<_>>()));
            if frames.len() >= 8 {
                nl.append_durable(&frames)?;
                frames.clear();
            }
        }
        nl.append_durable(&frames)?;
        let header =
            snapshot::SnapshotHeader { log_id: nl.file_id(), frames: nl.frames(), slots: st.index.slots() as u64, vectors_in_log: true };
        let idx = &st.index;
        snapshot::write(dir, store::SNAPSHOT, &key.store_cipher(), header, |out| idx.write_structure_to(out))?;
        Ok((nl, removed))
    }

    /// Write an index snapshot so the next open loads instead of rebuilding.
    pub fn checkpoint(&self) -> Result<()> {
        let mut w = self.writer.lock();
        let st = self.state.read();
        let key = self.key.read();
        let header = snapshot::SnapshotHeader {
            log_id: w.log.file_id(),
            frames: w.log.frames(),
            slots: st.index.slots() as u64,
            vectors_in_log: true,
        };
        w.snapshot_at = None;
        // The vectors are the log's: the snapshot holds the graph, tombstones and calibration.
        snapshot::write(&self.gdir, store::SNAPSHOT, &key.store_cipher(), header, |out| st.index.write_structure_to(out))?;
        w.snapshot_at = Some((header.log_id, header.frames));
        Ok(())
    }

    /// [`Engine::checkpoint`] unless the snapshot on disk already reflects
    /// the gallery (a read-only command then closes without rewriting it).
    pub(super) fn checkpoint_if_stale(&self) -> Result<()> {
        {
            let w = self.writer.lock();
            if w.snapshot_at == Some((w.log.file_id(), w.log.frames())) {
                return Ok(());
            }
        }
        self.checkpoint()
    }

    /// Note that the snapshot on disk reflects the state as opened.
    pub(super) fn snapshot_is_current(&self, frames: u64) {
        let mut w = self.writer.lock();
        if w.log.frames() == frames {
            w.snapshot_at = Some((w.log.file_id(), frames));
        }
    }

    /// Mark consents withdrawn at `now`: durable frames, then memory.
    pub(super) fn mark_withdrawn(&self, consents: &[ConsentRecord], now: i64) -> Result<()> {
        if consents.is_empty() {
            return Ok(());
        }
        let mut w = self.writer.lock();
        let frames: Vec<Vec<u8>> = consents
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.withdrawn_at_ms = Some(now);
                Op::Consent(c).encode()
            })
            .collect();
        w.log.append_durable(&frames)?;
        let mut st = self.state.write();
        for c in consents {
            st.set_withdrawn(&c.consent_id, now);
        }
        Ok(())
    }
}

//! Binding the manifest to the rest of the gallery (format 2), write-ahead
//! audit records, and what open reconciles from them.

use super::*;

impl Engine {
    /// Write-ahead: make a change's record durable before the change (no rebind:
    /// the manifest moves past the record only once the change is made).
    pub(super) fn audit_intent(&self, event: AuditEvent) -> Result<u64> {
        Ok(self.audit_submit(event)?.wait()?.start)
    }

    /// Records after the manifest's bound are changes whose record is durable
    /// but whose effect may not be (a crash or a full disk in between):
    /// erasures are applied again (erasure wins), enrolments and consents the
    /// store lacks are recorded as not made. Returns what was done.
    pub(super) fn reconcile(&self, b: &store::Bound) -> Result<Vec<String>> {
        let records = AuditLog::read_from(&self.audit_dir(), b.audit_records)?;
        let mut owner: HashMap<u64, String> = HashMap::new();
        let mut erase: Vec<u64> = Vec::new();
        let mut withdrawn: Vec<SubjectId> = Vec::new();
        let mut not_enrolled: Vec<u64> = Vec::new();
        let mut not_consented: Vec<String> = Vec::new();
        let mut not_changed: Vec<String> = Vec::new();
        // A written-ahead compaction or key rotation with no record of its outcome after it.
        let mut compaction_open = false;
        let mut rotation_open = false;
        for r in records {
            match r.event {
                AuditEvent::Admin { action, .. } if action == "compaction-started" => compaction_open = true,
                AuditEvent::Admin { action, .. } if action == "compaction-failed" => compaction_open = false,
                AuditEvent::Compaction { .. } => compaction_open = false,
                // A rotation that completed bound the manifest past its record.
                AuditEvent::KeyRotation { .. } => rotation_open = true,
                AuditEvent::Admin { action, .. } if action == "key-rotation-failed" => rotation_open = false,
                AuditEvent::Enrolment { subject, template, .. } => {
                    if self.template(template).is_err() {
                        not_enrolled.push(template);
                    }
                    owner.insert(template, subject);
                }
                AuditEvent::ConsentRecorded { consent_id, .. } if !self.has_consent(&consent_id) => {
                    not_consented.push(consent_id);
                }
                AuditEvent::ConsentWithdrawn { subject, templates_erased, .. } => {
                    erase.extend(templates_erased.into_iter().filter(|t| self.template(*t).is_ok_and(|m| m.subject.as_str() == subject)));
                    if let Ok(s) = SubjectId::new(subject) {
                        withdrawn.push(s);
                    }
                }
                AuditEvent::ThresholdChange { purpose, mode, version, .. } => {
                    let applied = Purpose::new(purpose.as_str())
                        .ok()
                        .and_then(|p| self.manifest.read().config.purpose(&p).map(|x| x.threshold_version >= version))
                        .unwrap_or(true);
                    if !applied {
                        not_changed.push(format!("{purpose} {mode} version {version}"));
                    }
                }
                AuditEvent::Deletion { templates, .. } | AuditEvent::Purge { templates, .. } => {
                    erase.extend(templates.into_iter().filter(|t| self.template(*t).is_ok()));
                }
                _ => {}
            }
        }
        let mut done = Vec::new();
        let now = self.clock.now_unix_ms();
        for s in withdrawn {
            let open: Vec<ConsentRecord> = self.consents_of(&s).into_iter().filter(|c| c.withdrawn_at_ms.is_none()).collect();
            if !open.is_empty() {
                self.mark_withdrawn(&open, now)?;
                done.push(format!("withdrawal of {s}'s consent completed"));
            }
        }
        erase.sort_unstable();
        erase.dedup();
        if !erase.is_empty() {
            self.erase(erase.clone())?;
            done.push(format!("recorded erasure of templates {erase:?} completed"));
        }
        not_enrolled.retain(|t| self.template(*t).is_err());
        if !not_enrolled.is_empty() {
            done.push(format!("recorded enrolment of templates {not_enrolled:?} was not stored (the write failed or a crash came first): they are not enrolled"));
        }
        if !not_changed.is_empty() {
            done.push(format!("recorded threshold changes {not_changed:?} were not stored: the previous thresholds stay in force"));
        }
        if compaction_open {
            let id = hex::encode(self.writer.lock().log.file_id());
            done.push(if id != b.log_id {
                "a compaction a crash cut short had completed (the compacted template log is in place); its own record was not written"
                    .to_string()
            } else {
                "a compaction a crash cut short did not complete: the previous template log stays (compact again to remove erased bytes)"
                    .to_string()
            });
        }
        if rotation_open {
            done.push("a recorded key rotation did not complete (a failure or crash came before its commit): the gallery stays under the previous key".into());
        }
        if !not_consented.is_empty() {
            done.push(format!("recorded consents {not_consented:?} were not stored: they are not recorded"));
        }
        if !done.is_empty() {
            self.record_admin(&Operator::system(), "reconciled-on-open", &done.join("; "))?;
        }
        Ok(done)
    }

    /// Bind the manifest to the gallery as it is now (after a change and its
    /// audit record): the template log's id and frame count and the audit
    /// log's durable head. A later open refuses files older than this.
    pub(super) fn rebind(&self) -> Result<()> {
        // Lock order: writer, manifest, (state), audit.
        let w = self.writer.lock();
        let mut m = self.manifest.write();
        let Some((records, hash)) = self.audit.read().as_ref().map(|a| a.durable_head()) else { return Ok(()) };
        let bound = store::Bound {
            log_id: hex::encode(w.log.file_id()),
            log_frames: w.log.frames(),
            pending_log: None,
            audit_records: records,
            audit_hash: if records == 0 { String::new() } else { hash },
        };
        if m.bound.as_ref() == Some(&bound) && m.version == store::FORMAT_VERSION {
            return Ok(());
        }
        let mut nm = m.clone();
        nm.bound = Some(bound);
        nm.generation += 1;
        // The change and its record are durable already: a manifest that
        // cannot be rewritten (a full disk) only lags, which open accepts
        // (it proves less, never more). The caller's change stands.
        match store::write_manifest(&self.gdir, &mut nm, &self.key.read()) {
            Ok(()) => *m = nm,
            Err(e) => tracing::warn!(error = %e, "the manifest could not be rebound after a change; it lags until the next change"),
        }
        Ok(())
    }

    /// The audit log holds at least what the manifest proves, and it is this gallery's.
    pub(super) fn check_audit_binding(&self, b: &store::Bound) -> Result<()> {
        let held = self.audit.read().as_ref().map(|a| a.records()).unwrap_or(0);
        match audit_shortfall(&self.audit_dir(), held, b.audit_records, &b.audit_hash, "the manifest")? {
            Some((seq, reason)) => Err(Error::AuditTampered { seq, reason }),
            None => Ok(()),
        }
    }

    /// Erase again every live template whose erasure the audit log records
    /// (withdrawals, deletions, purges): after a repair cut the log, or a
    /// restored older template log. A template counts as the erased one only
    /// if it belongs to the subject the audit log names for it and was
    /// enrolled before the erasure (template ids can be reused after a cut).
    /// Returns the templates erased (one audited deletion).
    pub fn reapply_recorded_erasures(&self, operator: &Operator) -> Result<Vec<u64>> {
        let records = AuditLog::read(&self.audit_dir(), &crate::audit::AuditFilter::default())?;
        let mut owner: HashMap<u64, String> = HashMap::new();
        let mut erased: Vec<(u64, Option<String>, i64)> = Vec::new();
        for r in records {
            match r.event {
                AuditEvent::Enrolment { subject, template, .. } => {
                    owner.insert(template, subject);
                }
                AuditEvent::ConsentWithdrawn { subject, templates_erased, .. } => {
                    erased.extend(templates_erased.into_iter().map(|t| (t, Some(subject.clone()), r.time_ms)));
                }
                AuditEvent::Deletion { templates, .. } | AuditEvent::Purge { templates, .. } => {
                    erased.extend(templates.into_iter().map(|t| (t, owner.get(&t).cloned(), r.time_ms)));
                }
                _ => {}
            }
        }
        let mut again: Vec<u64> = erased
            .into_iter()
            .filter(|(t, subject, at)| {
                self.template(*t).is_ok_and(|m| subject.as_deref() == Some(m.subject.as_str()) && m.enrolled_at_ms <= *at)
            })
            .map(|(t, _, _)| t)
            .collect();
        again.sort_unstable();
        again.dedup();
        if !again.is_empty() {
            self.delete(operator, &again, "erasure recorded in the audit log re-applied (repair)")?;
        }
        Ok(again)
    }
}

/// What is wrong, if anything, with an audit log in `adir` holding `held`
/// records, against what `what` (the manifest, an anchor) proves: at least
/// `records` records, the last of which has `hash` (a record retention has
/// retired cannot be checked). Returns the first bad seq and why.
pub(super) fn audit_shortfall(adir: &Path, held: u64, records: u64, hash: &str, what: &str) -> Result<Option<(u64, String)>> {
    if held < records {
        return Ok(Some((
            held,
            format!("the audit log holds {held} records, {what} proves {records}: deleted, cut or rolled back; restore it from a backup"),
        )));
    }
    if records > 0 {
        if let Some(h) = AuditLog::record_hash(adir, records - 1)? {
            if h != hash {
                return Ok(Some((
                    records - 1,
                    format!("record {} differs from the one {what} names: not this gallery's audit log, or rewritten", records - 1),
                )));
            }
        }
    }
    Ok(None)
}

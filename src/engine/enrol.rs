//! Consents and enrolments (checked, written ahead in the audit log, then stored).

use super::*;

impl Engine {
    /// Record a consent (required before enrolment). Refuses a minor under 14 without guardian consent.
    pub fn record_consent(&self, operator: &Operator, consent: ConsentRecord) -> Result<()> {
        self.record_consents(operator, vec![consent])
    }

    /// Record many consents with one fsync (migration, bulk import). All are checked first; nothing is written if one fails.
    ///
    /// Consents recorded for enrolments that follow are better recorded
    /// with them ([`Engine::import_with_consents`]): then a failure between
    /// the two cannot leave a consent for a person with no template.
    pub fn record_consents(&self, operator: &Operator, mut consents: Vec<ConsentRecord>) -> Result<()> {
        if consents.is_empty() {
            return Ok(());
        }
        self.prepare_consents(&mut consents)?;
        let mut w = self.writer.lock();
        check_consent_owners(&self.state.read(), &consents)?;
        let frames: Vec<Vec<u8>> = consents.chunks(store::OPS_PER_FRAME).map(|c| Op::Consents(c.to_vec()).encode()).collect();
        // Write-ahead: the records first, then the consents (see `reconcile`).
        let events = consents.iter().map(|c| consent_event(operator, c)).collect();
        self.audit_batch_intent(events)?;
        if let Err(e) = w.log.append_durable(&frames) {
            let ids: Vec<&str> = consents.iter().map(|c| c.consent_id.as_str()).collect();
            let _ = self.audit_intent(AuditEvent::Admin {
                operator: operator.as_str().into(),
                action: "consent-failed".into(),
                detail: format!("consents {ids:?} were not stored: {e}"),
            });
            return Err(e);
        }
        {
            let mut st = self.state.write();
            for c in &consents {
                st.put_consent(c);
            }
        }
        drop(w);
        self.rebind()
    }

    /// Validate consents and stamp those with no time with now.
    fn prepare_consents(&self, consents: &mut [ConsentRecord]) -> Result<()> {
        let declared = self.manifest.read().config.purpose_names();
        let now = self.clock.now_unix_ms();
        for c in consents.iter_mut() {
            c.validate(&declared)?;
            if c.given_at_ms == 0 {
                c.given_at_ms = now;
            }
        }
        Ok(())
    }

    /// [`Engine::audit_intent`] for a batch.
    pub(super) fn audit_batch_intent(&self, events: Vec<AuditEvent>) -> Result<std::ops::Range<u64>> {
        match self.audit.read().as_ref() {
            Some(a) => a.append_batch(events),
            None => Err(Error::Audit("the audit log is closed".into())),
        }
    }

    /// Check one enrolment against the state; `batch` holds consents recorded with it (they win over the state's).
    pub(super) fn check_enrolment(
        &self,
        cfg: &GalleryConfig,
        st: &State,
        batch: &HashMap<&str, &ConsentRecord>,
        e: &Enrolment,
        now: i64,
    ) -> Result<(TemplateMeta, Vec<f32>)> {
        if let Some(m) = &e.model_id {
            if m != &cfg.model_id {
                return Err(Error::config("model_id", format!("embedding from model {m}, gallery holds {}", cfg.model_id)));
            }
        }
        if e.purposes.is_empty() {
            return Err(Error::PolicyViolation { rule: "specific-purpose", reason: "enrolment names no purpose".into() });
        }
        let consent = batch.get(e.consent_id.as_str()).map(|c| (*c).clone()).or_else(|| st.consent(&e.consent_id)).ok_or_else(|| {
            Error::PolicyViolation {
                rule: "consent-required",
                reason: format!("no consent record {} (record consent before enrolling)", e.consent_id),
            }
        })?;
        if consent.subject != e.subject {
            return Err(Error::PolicyViolation {
                rule: "consent-required",
                reason: format!("consent {} is not {}'s", e.consent_id, e.subject),
            });
        }
        consent.check_guardian()?;
        // Kept until its last purpose's retention ends (each purpose stops matching at its own).
        let mut retention = 0i64;
        for p in &e.purposes {
            let pol = cfg.purpose(p).ok_or_else(|| Error::PolicyViolation {
                rule: "specific-purpose",
                reason: format!("purpose {p} is not declared by this gallery"),
            })?;
            if !consent.covers(p) {
                return Err(Error::PolicyViolation {
                    rule: "consent-required",
                    reason: format!("consent {} does not cover purpose {p} (or was withdrawn)", e.consent_id),
                });
            }
            retention = retention.max(pol.retention_days as i64 * DAY_MS);
        }
        let vector = normalise(cfg.dim, &e.embedding)?;
        let template = match e.template {
            Some(t) => {
                if st.by_template.contains_key(&t) {
                    return Err(Error::DuplicateTemplate(t));
                }
                t
            }
            None => st.next_template,
        };
        if !e.force {
            // Another template of someone already enrolled must look like them.
            let live = st.subject_index(&e.subject).map(|si| st.live_slots(si)).unwrap_or_default();
            if !live.is_empty() {
                let best = live.iter().filter_map(|&slot| st.index.vector(slot)).map(|v| dot(v, &vector)).fold(f32::MIN, f32::max);
                let need = e.purposes.iter().filter_map(|p| cfg.purpose(p)).map(|p| p.verify_threshold).fold(f32::MAX, f32::min);
                if best < need {
                    return Err(Error::PolicyViolation {
                        rule: "enrolment-consistency",
                        reason: format!(
                            "the face does not match {}'s enrolled templates (below the verify threshold {need}): another person? enrol with force only if you are sure",
                            e.subject
                        ),
                    });
                }
            }
        }
        let meta = TemplateMeta {
            template,
            subject: e.subject.clone(),
            purposes: e.purposes.clone(),
            enrolled_at_ms: now,
            expires_at_ms: now.saturating_add(retention),
            consent_id: e.consent_id.clone(),
            model_id: cfg.model_id.clone(),
        };
        Ok((meta, vector))
    }

    /// Enrol one template. Returns its template id once it is durable.
    pub fn enrol(&self, operator: &Operator, e: Enrolment) -> Result<u64> {
        let ids = self.enrol_batch(operator, vec![e])?;
        Ok(ids[0])
    }

    /// Enrol many templates with one fsync (import, migration). All are checked first; nothing is written if one fails.
    pub fn enrol_batch(&self, operator: &Operator, batch: Vec<Enrolment>) -> Result<Vec<u64>> {
        self.enrol_many(operator, Vec::new(), batch, false)
    }

    /// [`Engine::enrol_batch`] for bulk loads: the templates are stored,
    /// audited and matched at once (by the exact scan), but the graph is
    /// not extended until [`Engine::build_graph`]. Building it once after
    /// millions of rows costs what building it row by row would, without
    /// slowing the load itself; until then `Auto` and `Graph` searches scan.
    pub fn import_batch(&self, operator: &Operator, batch: Vec<Enrolment>) -> Result<Vec<u64>> {
        self.enrol_many(operator, Vec::new(), batch, true)
    }

    /// [`Engine::import_batch`] with the consents its rows need, committed
    /// together: each frame of the template log holds up to
    /// 1,024 enrolments and the new consents they are the first to use, so
    /// a full disk or a crash at any point leaves every consent of the
    /// batch with its template, or neither (the write-ahead records of what
    /// was not stored are then reconciled as not stored). Every consent
    /// must be used by an enrolment of the batch; all are checked before
    /// anything is written.
    ///
    /// ```no_run
    /// # fn f(e: &facematch::engine::Engine, op: &facematch::compliance::Operator,
    /// #      c: facematch::compliance::ConsentRecord, r: facematch::engine::Enrolment) -> facematch::Result<()> {
    /// let ids = e.import_with_consents(op, vec![c], vec![r])?;
    /// # Ok(()) }
    /// ```
    pub fn import_with_consents(&self, operator: &Operator, consents: Vec<ConsentRecord>, batch: Vec<Enrolment>) -> Result<Vec<u64>> {
        self.enrol_many(operator, consents, batch, true)
    }

    /// Put every template a bulk load left out ([`Engine::import_batch`])
    /// into the graph, calibrate it and write a snapshot (so the next open
    /// loads it). Holds the gallery's write lock meanwhile: searches wait.
    /// Returns how many templates were added to the graph.
    pub fn build_graph(&self) -> Result<usize> {
        let n = {
            let mut st = self.state.write();
            let n = st.index.graph_pending();
            if n == 0 {
                return Ok(0);
            }
            st.index.build_graph();
            calibrate_index(&mut st.index);
            n
        };
        self.checkpoint()?;
        Ok(n)
    }

    fn enrol_many(
        &self,
        operator: &Operator,
        mut consents: Vec<ConsentRecord>,
        batch: Vec<Enrolment>,
        defer_graph: bool,
    ) -> Result<Vec<u64>> {
        if batch.is_empty() {
            if !consents.is_empty() {
                return Err(unused_consent(&consents[0].consent_id));
            }
            return Ok(Vec::new());
        }
        self.prepare_consents(&mut consents)?;
        let cfg = self.manifest.read().config.clone();
        let now = self.clock.now_unix_ms();
        let mut w = self.writer.lock();
        let mut planned = Vec::with_capacity(batch.len());
        {
            let st = self.state.read();
            check_consent_owners(&st, &consents)?;
            let with: HashMap<&str, &ConsentRecord> = consents.iter().map(|c| (c.consent_id.as_str(), c)).collect();
            let mut taken = std::collections::HashSet::new();
            let mut next = st.next_template;
            for e in &batch {
                let mut e2 = e.clone();
                if e2.template.is_none() {
                    while st.by_template.contains_key(&next) || taken.contains(&next) {
                        next += 1;
                    }
                    e2.template = Some(next);
                    next += 1;
                }
                let (meta, v) = match self.check_enrolment(&cfg, &st, &with, &e2, now) {
                    Ok(x) => x,
                    Err(err @ Error::PolicyViolation { rule: "enrolment-consistency", .. }) => {
                        drop(st);
                        drop(w);
                        // The refusal is recorded (who, whom; no biometric data).
                        self.audit_intent(AuditEvent::Admin {
                            operator: operator.as_str().into(),
                            action: "enrolment-refused".into(),
                            detail: format!("subject {}: the face does not match the subject's enrolled templates", e2.subject),
                        })?;
                        return Err(err);
                    }
                    Err(err) => return Err(err),
                };
                if !taken.insert(meta.template) {
                    return Err(Error::DuplicateTemplate(meta.template));
                }
                planned.push((meta, v));
            }
        }
        // One frame per chunk of enrolments, holding the new consents that chunk is the first to use.
        let mut placed: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let by_id: HashMap<&str, &ConsentRecord> = consents.iter().map(|c| (c.consent_id.as_str(), c)).collect();
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(planned.len().div_ceil(store::OPS_PER_FRAME));
        for chunk in planned.chunks(store::OPS_PER_FRAME) {
            let items: Vec<(&TemplateMeta, &[f32])> = chunk.iter().map(|(m, v)| (m, v.as_slice())).collect();
            let mut cs: Vec<ConsentRecord> = Vec::new();
            for (m, _) in chunk {
                if let Some(c) = by_id.get(m.consent_id.as_str()) {
                    if placed.insert(c.consent_id.as_str()) {
                        cs.push((*c).clone());
                    }
                }
            }
            frames.push(if cs.is_empty() { store::encode_enrolments(&items) } else { store::encode_import(&cs, &items) });
        }
        if let Some(c) = consents.iter().find(|c| !placed.contains(c.consent_id.as_str())) {
            return Err(unused_consent(&c.consent_id));
        }
        let ids: Vec<u64> = planned.iter().map(|(m, _)| m.template).collect();
        // Write-ahead: the records first, then the consents and templates (see `reconcile`).
        let events: Vec<AuditEvent> = consents
            .iter()
            .map(|c| consent_event(operator, c))
            .chain(planned.iter().map(|(meta, _)| AuditEvent::Enrolment {
                operator: operator.as_str().into(),
                subject: meta.subject.to_string(),
                template: meta.template,
                purposes: meta.purposes.iter().map(|p| p.to_string()).collect(),
                consent_id: meta.consent_id.clone(),
            }))
            .collect();
        self.audit_batch_intent(events)?;
        if crate::failpoints::hit("enrol/recorded") {
            return Err(Error::Cancelled);
        }
        if let Err(e) = w.log.append_durable(&frames) {
            if matches!(e, Error::Cancelled) {
                return Err(e); // a crash point: nothing more happens
            }
            let cids: Vec<&str> = consents.iter().map(|c| c.consent_id.as_str()).collect();
            let also = if cids.is_empty() { String::new() } else { format!(" (nor consents {cids:?})") };
            let _ = self.audit_intent(AuditEvent::Admin {
                operator: operator.as_str().into(),
                action: "enrolment-failed".into(),
                detail: format!("templates {ids:?} were not stored{also}: {e}"),
            });
            return Err(e);
        }
        let people_after;
        {
            let mut st = self.state.write();
            for c in &consents {
                st.put_consent(c);
            }
            let flat: Vec<f32> = planned.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let range = if defer_graph { st.index.add_batch_deferred(&flat)? } else { st.index.add_batch(&flat)? };
            for ((meta, _), slot) in planned.iter().zip(range) {
                st.note_enrol(&cfg, meta, slot);
            }
            people_after = st.people();
        }
        drop(w);
        self.rebind()?;
        self.check_filing(people_after)?;
        self.recalibrate_if_stale();
        Ok(ids)
    }

    /// After the gallery grew past twice the size the index was calibrated
    /// at: measure again under the read lock (searches go on), then install
    /// the result under a brief write lock.
    pub(super) fn recalibrate_if_stale(&self) {
        let c = {
            let st = self.state.read();
            if !st.index.needs_calibration() {
                return;
            }
            st.index.measure_calibration(CALIBRATION_TARGET, CALIBRATION_PROBES, CALIBRATION_SEED)
        };
        tracing::debug!(ef = ?c.ef, agreement = c.agreement, live = c.live, "index recalibrated after growth");
        self.state.write().index.set_calibration(c);
    }

    pub(super) fn check_filing(&self, people: u64) -> Result<()> {
        let mut m = self.manifest.write();
        if m.filing_notice_ms.is_some() || people < m.config.filing_threshold {
            return Ok(());
        }
        let at = self.clock.now_unix_ms();
        let threshold = m.config.filing_threshold;
        // Written ahead (lock order: manifest, then audit): the record, then
        // the manifest's mark. A mark that cannot be written only means the
        // notice is raised, and recorded, again.
        self.audit_intent(AuditEvent::FilingNotice { distinct_subjects: people, threshold })?;
        let mut nm = m.clone();
        nm.filing_notice_ms = Some(at);
        store::write_manifest(&self.gdir, &mut nm, &self.key.read())?;
        *m = nm;
        drop(m);
        tracing::warn!(
            people,
            threshold,
            "stored people reached the filing threshold: file with the provincial cyberspace office within 30 working days"
        );
        self.notices.lock().push(Notice::FilingRequired { people, threshold, at_ms: at });
        self.rebind()
    }
}

/// The audit record of a consent.
fn consent_event(operator: &Operator, c: &ConsentRecord) -> AuditEvent {
    AuditEvent::ConsentRecorded {
        operator: operator.as_str().into(),
        subject: c.subject.to_string(),
        consent_id: c.consent_id.clone(),
        basis: c.basis.label(),
        purposes: c.purposes.iter().map(|p| p.to_string()).collect(),
        age_bracket: c.age_bracket.label().into(),
        guardian: c.guardian.is_some(),
    }
}

/// A consent id may name one subject only, in the gallery and in the batch.
fn check_consent_owners(st: &State, consents: &[ConsentRecord]) -> Result<()> {
    let mut batch: HashMap<&str, &SubjectId> = HashMap::new();
    for c in consents {
        let owner = st.consent_owner(&c.consent_id).or(batch.get(c.consent_id.as_str()).map(|s| s.as_str()));
        if owner.is_some_and(|s| s != c.subject.as_str()) {
            return Err(Error::PolicyViolation {
                rule: "consent-record",
                reason: format!("consent id {} belongs to another subject", c.consent_id),
            });
        }
        batch.insert(&c.consent_id, &c.subject);
    }
    Ok(())
}

fn unused_consent(id: &str) -> Error {
    Error::PolicyViolation {
        rule: "consent-record",
        reason: format!("consent {id} is used by no enrolment of the batch (record it on its own with record_consents)"),
    }
}

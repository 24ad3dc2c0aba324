//! Administration: key rotation, thresholds and calibration, export, statistics, close.

use super::*;

impl Engine {
    /// Re-encrypt the whole store (and re-sign the audit log) under a new key.
    ///
    /// Crash-safe: the re-encrypted log and snapshot, the manifest with the
    /// new key check and the re-signed audit log are built in a staging
    /// directory (`rotate.new`); one durable commit marker then decides. A
    /// crash before it leaves the gallery under the old key (the next open
    /// shreds the staging); after it, the next open finishes moving the files
    /// and the gallery is under the new key. Either way the next open records
    /// what it did in the audit log. The replaced log and snapshot are shredded.
    pub fn rotate_key(&self, operator: &Operator, new_key: MasterKey) -> Result<()> {
        let old = self.key.read().clone();
        let (old_ak, new_ak) = (AuditKey::from_bytes(old.audit_key_bytes()), AuditKey::from_bytes(new_key.audit_key_bytes()));
        // Written ahead, not bound: the rotated manifest binds past it; a
        // rotation that never commits leaves it past the bound for `reconcile`.
        self.audit_intent(AuditEvent::KeyRotation { operator: operator.as_str().into() })?;
        // Lock order: writer, manifest, state, audit (as everywhere).
        let mut w = self.writer.lock();
        let mut man = self.manifest.write();
        let mut st = self.state.write();
        let mut slot = self.audit.write();
        let staging = store::recover::begin_rotation(&self.gdir)?;
        let audit_cfg = man.config.audit.clone();
        let audit_dir = self.dir.join(store::AUDIT_DIR);
        // Everything up to the commit can fail without harm: undo it and keep the old key.
        let staged = (|| -> Result<(LogWriter, store::Manifest)> {
            let (nl, _) = self.write_compacted(&mut st, &new_key, &staging, store::LOG)?;
            let mut nm = man.clone();
            nm.key_check = store::new_manifest(nm.config.clone(), &new_key, nm.created_ms).key_check;
            if let Some(a) = slot.take() {
                // Re-signing keeps every record and hash: the staged manifest binds the same head.
                let (audit_records, audit_hash) = a.durable_head();
                a.close()?;
                nm.bound = Some(store::Bound {
                    log_id: hex::encode(nl.file_id()),
                    log_frames: nl.frames(),
                    pending_log: None,
                    audit_records,
                    audit_hash: if audit_records == 0 { String::new() } else { audit_hash },
                });
            }
            nm.generation += 1;
            store::write_manifest(&staging, &mut nm, &new_key)?;
            AuditLog::rekey_into(&audit_dir, &old_ak, &new_ak, &staging.join(store::AUDIT_DIR))?;
            Ok((nl, nm))
        })();
        // Before the commit: undo, reopen the audit log under the old key and
        // say so there (the rotation's record is already written ahead).
        let roll_back = |e: Error, slot: &mut Option<AuditLog>| -> Error {
            let _ = store::recover::discard_rotation(&self.gdir, &mut Vec::new());
            if slot.is_none() {
                *slot = AuditLog::open(&audit_dir, old_ak.clone(), audit_cfg.clone(), self.clock.clone()).ok().map(|(a, _)| a);
            }
            e
        };
        let (mut nl, nm) = match staged {
            Ok(x) => x,
            Err(e) => {
                let e = roll_back(e, &mut slot);
                drop((slot, st, man, w));
                return Err(self.rotation_failed(operator, e));
            }
        };
        if crate::failpoints::hit("rotate-key/staged") {
            return Ok(());
        }
        if let Err(e) = store::recover::commit_rotation(&self.gdir, &staging) {
            // Not committed unless the marker is there (then the next open finishes it).
            if !store::recover::committed(&staging).unwrap_or(true) {
                let e = roll_back(e, &mut slot);
                drop((slot, st, man, w));
                return Err(self.rotation_failed(operator, e));
            }
            return Err(e);
        }
        if crate::failpoints::hit("rotate-key/committed") {
            return Ok(());
        }
        store::recover::finish_rotation(&self.gdir, &staging)?;
        nl.renamed(self.dir.join(store::LOG));
        // The old log's file was shredded and replaced by finish_rotation.
        drop(std::mem::replace(&mut w.log, nl));
        *man = nm;
        let (a, _) = AuditLog::open(&audit_dir, new_ak, audit_cfg, self.clock.clone())?;
        *slot = Some(a);
        drop((slot, st, man, w));
        *self.key.write() = new_key;
        Ok(())
    }

    /// A rotation failed before its commit and was undone: record that its
    /// written-ahead record did not take effect. Returns `e`.
    fn rotation_failed(&self, operator: &Operator, e: Error) -> Error {
        let detail = format!("rolled back: the rotation failed before its commit ({e}); the gallery stays under the previous key");
        if let Err(err) = self.record_admin(operator, "key-rotation-failed", &detail) {
            tracing::warn!(error = %err, "the failed key rotation could not be recorded; the next open reconciles it");
        }
        e
    }

    /// Measure, on a labelled calibration set, the lowest threshold for
    /// `purpose` and `mode` whose false-match rate is at most `target` (see
    /// [`crate::calibration`]), and the false-non-match rate it costs.
    /// `probes` is `labels.len()` rows of the gallery's dimension; a label is
    /// the probe's subject if enrolled, `None` for a person who is not.
    /// Nothing changes: apply the result with [`Engine::set_threshold`]. One
    /// audit record says who calibrated what and the result (no scores); the
    /// probes are compared with the templates serving the purpose by exact
    /// scan (probes x templates dot products: seconds for 1,000 x 100k).
    pub fn calibrate_threshold(
        &self,
        operator: &Operator,
        purpose: &Purpose,
        mode: Mode,
        probes: &[f32],
        labels: &[Option<SubjectId>],
        target: f64,
    ) -> Result<crate::calibration::ThresholdCalibration> {
        use crate::calibration::{rate_at, threshold_above, ThresholdCalibration};
        use rayon::prelude::*;
        let policy = self.policy(purpose)?;
        let (dim, bit) = {
            let m = self.manifest.read();
            (m.config.dim, m.config.purpose_bit(purpose).unwrap_or(0))
        };
        if probes.len() != labels.len() * dim {
            return Err(Error::WrongDimension { expected: labels.len() * dim, got: probes.len() });
        }
        let qs: Vec<Vec<f32>> = probes.chunks_exact(dim).map(|p| normalise(dim, p)).collect::<Result<_>>()?;
        let cutoff = self.clock.now_unix_ms().saturating_sub(policy.retention_days as i64 * DAY_MS);
        let st = self.state.read();
        // Templates serving the purpose, grouped by subject.
        let mut subjects: Vec<(u32, Vec<u32>)> = Vec::new();
        for si in st.live_subjects() {
            let slots: Vec<u32> = st
                .live_slots(si)
                .into_iter()
                .filter(|&s| {
                    let sl = &st.slots[s as usize];
                    sl.mask & (1 << bit) != 0 && sl.enrolled_at_ms > cutoff
                })
                .collect();
            if !slots.is_empty() {
                subjects.push((si, slots));
            }
        }
        if subjects.is_empty() {
            return Err(Error::config("calibration", format!("no template serves purpose {purpose}")));
        }
        let own: Vec<Option<u32>> = labels
            .iter()
            .map(|l| l.as_ref().and_then(|s| st.subject_index(s)).filter(|si| subjects.iter().any(|(x, _)| x == si)))
            .collect();
        // Upper tail of non-mated scores kept per probe (enough to place any threshold at the target).
        let trials: u64 = match mode {
            Mode::Identify => own.iter().filter(|o| o.is_none()).count() as u64,
            Mode::Verify => own.iter().map(|o| (subjects.len() - o.is_some() as usize) as u64).sum(),
        };
        let keep = ((target.clamp(0.0, 1.0) * trials as f64).floor() as usize + 1).min(1 << 20);
        struct ProbeResult {
            non_mated: Vec<f32>,
            /// The best-scoring subject and its score (identify's rank 1).
            best: Option<(u32, f32)>,
            /// The probe's own subject's best score (verify), if mated.
            own_score: Option<f32>,
        }
        let results: Vec<ProbeResult> = qs
            .par_iter()
            .zip(&own)
            .map(|(q, o)| {
                let mut per_subject: Vec<(u32, f32)> = subjects
                    .iter()
                    .map(|(si, slots)| {
                        (*si, slots.iter().filter_map(|&s| st.index.vector(s)).map(|v| dot(q, v)).fold(f32::NEG_INFINITY, f32::max))
                    })
                    .collect();
                let own_score = o.and_then(|o| per_subject.iter().find(|(si, _)| *si == o).map(|x| x.1));
                let best = per_subject.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
                let non_mated = match mode {
                    Mode::Identify if o.is_none() => best.map(|b| vec![b.1]).unwrap_or_default(),
                    Mode::Identify => Vec::new(),
                    Mode::Verify => {
                        per_subject.retain(|(si, _)| Some(*si) != *o);
                        let k = keep.min(per_subject.len());
                        if k > 0 && k < per_subject.len() {
                            per_subject.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                            per_subject.truncate(k);
                        }
                        per_subject.into_iter().map(|x| x.1).collect()
                    }
                };
                ProbeResult { non_mated, best, own_score }
            })
            .collect();
        drop(st);
        let mut top: Vec<f32> = results.iter().flat_map(|r| r.non_mated.iter().copied()).collect();
        if top.len() > keep {
            top.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a));
            top.truncate(keep);
        }
        let threshold = threshold_above(&mut top, trials, target)?;
        let mated: Vec<&ProbeResult> = results.iter().zip(&own).filter(|(_, o)| o.is_some()).map(|(r, _)| r).collect();
        let fnr = (!mated.is_empty()).then(|| {
            let missed = mated
                .iter()
                .zip(own.iter().filter_map(|o| *o))
                .filter(|(r, o)| match mode {
                    Mode::Identify => !r.best.is_some_and(|(si, s)| si == *o && s >= threshold),
                    Mode::Verify => !r.own_score.is_some_and(|s| s >= threshold),
                })
                .count();
            missed as f64 / mated.len() as f64
        });
        let cal = ThresholdCalibration {
            mode,
            target,
            threshold,
            false_match_rate: rate_at(&top, trials, threshold),
            false_non_match_rate: fnr,
            mated: mated.len(),
            non_mated_trials: trials,
        };
        let detail = serde_json::json!({
            "purpose": purpose.as_str(), "mode": mode.as_str(), "probes": labels.len(), "mated": cal.mated,
            "non_mated_trials": trials, "target": target, "threshold": threshold,
            "false_match_rate": cal.false_match_rate, "false_non_match_rate": cal.false_non_match_rate,
        });
        self.record_admin(operator, "threshold-calibration", &detail.to_string())?;
        Ok(cal)
    }

    /// Change a purpose's threshold for a mode; versioned and audited.
    pub fn set_threshold(&self, operator: &Operator, purpose: &Purpose, mode: Mode, value: f32) -> Result<Threshold> {
        let mut m = self.manifest.write();
        let mut cfg = m.config.clone();
        let p = cfg.purposes.iter_mut().find(|p| &p.name == purpose).ok_or_else(|| Error::PolicyViolation {
            rule: "specific-purpose",
            reason: format!("purpose {purpose} is not declared by this gallery"),
        })?;
        let t = Threshold::new(value, p.threshold_version + 1)?;
        let old = match mode {
            Mode::Verify => std::mem::replace(&mut p.verify_threshold, value),
            Mode::Identify => std::mem::replace(&mut p.identify_threshold, value),
        };
        p.threshold_version += 1;
        cfg.validate()?;
        // Write-ahead: the record first, then the manifest (see `reconcile`).
        self.audit_intent(AuditEvent::ThresholdChange {
            operator: operator.as_str().into(),
            purpose: purpose.to_string(),
            mode: mode.as_str().into(),
            old: Some(old),
            new: value,
            version: t.version(),
        })?;
        let mut nm = m.clone();
        nm.config = cfg;
        store::write_manifest(&self.gdir, &mut nm, &self.key.read())?;
        *m = nm;
        drop(m);
        self.rebind()?;
        Ok(t)
    }

    /// Export live templates (optionally of one purpose) as an `.npy` matrix plus a JSON manifest of
    /// subjects, into `dest` on this machine. An explicit, audited act.
    pub fn export(&self, operator: &Operator, purpose: Option<&Purpose>, dest: &Path) -> Result<u64> {
        let bit = match purpose {
            Some(p) => Some(
                self.manifest
                    .read()
                    .config
                    .purpose_bit(p)
                    .ok_or_else(|| Error::PolicyViolation { rule: "specific-purpose", reason: format!("purpose {p} is not declared") })?,
            ),
            None => None,
        };
        let st = self.state.read();
        let dim = st.index.dim();
        let mut data = Vec::new();
        let mut rows = Vec::new();
        for (i, s) in st.slots.iter().enumerate() {
            if !st.by_template.contains_key(&s.template) || bit.is_some_and(|b| s.mask & (1 << b) == 0) {
                continue;
            }
            if let Some(v) = st.index.vector(i as u32) {
                data.extend_from_slice(v);
                rows.push(serde_json::json!({"template": s.template, "subject": st.subject_id(s.subject)}));
            }
        }
        drop(st);
        let n = rows.len() as u64;
        self.audit_append(AuditEvent::Export {
            operator: operator.as_str().into(),
            templates: n,
            destination: dest.display().to_string(),
        })?;
        // Plaintext templates: a 0700 directory, 0600 files, whatever the umask.
        let out = Dir::create_or_open(dest)?;
        crate::npy::write_f32_matrix(dest.join("templates.npy"), &data, n as usize, dim)?;
        let j = serde_json::to_vec_pretty(&rows).map_err(|e| Error::config("export", e.to_string()))?;
        out.write_atomic("templates.json", &j, true)?;
        Ok(n)
    }

    /// Gallery statistics (people count against the filing threshold among them).
    pub fn stats(&self) -> Stats {
        // Same lock order as the writers (writer, manifest, state).
        let w = self.writer.lock();
        let m = self.manifest.read();
        let st = self.state.read();
        let per_purpose = m.config.purposes.iter().enumerate().map(|(i, p)| (p.name.to_string(), st.per_purpose[i])).collect();
        Stats {
            templates: st.index.len() as u64,
            people: st.people(),
            filing_threshold: m.config.filing_threshold,
            filing_notice_ms: m.filing_notice_ms,
            slots: st.index.slots() as u64,
            deleted_fraction: st.index.deleted_fraction(),
            per_purpose,
            consents: st.consent_count(),
            log_bytes: w.log.len(),
            index_memory_bytes: st.index.memory_bytes() as u64,
            metadata_memory_bytes: st.memory_bytes() as u64,
            graph_pending: st.index.graph_pending() as u64,
            dim: m.config.dim,
            model_id: m.config.model_id.clone(),
        }
    }

    /// Metadata of a live template.
    pub fn template(&self, template: u64) -> Result<TemplateMeta> {
        self.state.read().meta_of(template).ok_or(Error::UnknownTemplate(template))
    }

    /// The live template of `subject` that holds exactly this embedding (after
    /// normalisation), if any: lets a bulk import that was interrupted resume
    /// without enrolling rows twice. It reveals nothing the caller does not hold.
    pub fn enrolled_copy(&self, subject: &SubjectId, embedding: &[f32]) -> Result<Option<u64>> {
        let dim = self.manifest.read().config.dim;
        let v = normalise(dim, embedding)?;
        let st = self.state.read();
        let Some(si) = st.subject_index(subject) else { return Ok(None) };
        Ok(st
            .live_slots(si)
            .into_iter()
            .find(|&slot| st.index.vector(slot).is_some_and(|x| x.iter().zip(&v).all(|(a, b)| (a - b).abs() <= 1e-6)))
            .map(|slot| st.slots[slot as usize].template))
    }

    /// Live template ids of a subject.
    pub fn templates_of(&self, subject: &SubjectId) -> Vec<u64> {
        self.state.read().templates_of(subject)
    }

    /// Whether a consent record with this id exists (withdrawn or not).
    pub fn has_consent(&self, consent_id: &str) -> bool {
        self.state.read().has_consent(consent_id)
    }

    /// Consent records of a subject (kept for the audit trail, withdrawn ones included).
    pub fn consents_of(&self, subject: &SubjectId) -> Vec<ConsentRecord> {
        self.state.read().consents_of(subject)
    }

    /// Flush the audit log and write a snapshot if many frames are not in it.
    pub fn close(self) -> Result<()> {
        // The audit log is closed cleanly even if the snapshot cannot be written.
        let snap = self.checkpoint_if_stale();
        if let Some(a) = self.audit.write().take() {
            a.close()?;
        }
        snap
    }
}

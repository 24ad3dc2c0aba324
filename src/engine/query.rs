//! Queries: 1:1 verification and 1:N identification, each with its audit record.

use super::*;

impl Engine {
    /// The policy for a query's purpose; a refusal is recorded too (refusals
    /// are processing: who asked, for which purpose and mode, why; no probe data).
    pub(super) fn query_policy(&self, ctx: &QueryContext, mode: Mode) -> Result<crate::compliance::PurposePolicy> {
        self.policy(&ctx.purpose).inspect_err(|e| {
            let _ = self.audit_intent(AuditEvent::Admin {
                operator: ctx.operator.as_str().into(),
                action: "query-refused".into(),
                detail: format!("{} for purpose {}: {e}", mode.as_str(), ctx.purpose),
            });
        })
    }

    pub(super) fn policy(&self, purpose: &Purpose) -> Result<crate::compliance::PurposePolicy> {
        self.manifest.read().config.purpose(purpose).cloned().ok_or_else(|| Error::PolicyViolation {
            rule: "specific-purpose",
            reason: format!("purpose {purpose} is not declared by this gallery"),
        })
    }

    pub(super) fn decide(policy: &crate::compliance::PurposePolicy, mode: Mode, best: Option<Candidate>) -> (Decision, Threshold) {
        let t = policy.threshold(mode);
        let d = match best {
            Some(c) if t.accepts(c.score) => {
                if policy.assist_only {
                    Decision::NeedsHumanReview { subject: c.subject, template: c.template, score: c.score }
                } else {
                    Decision::Match { subject: c.subject, template: c.template, score: c.score }
                }
            }
            Some(c) => Decision::NoMatch { best_score: Some(c.score) },
            None => Decision::NoMatch { best_score: None },
        };
        (d, t)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn audit_query(
        &self,
        ctx: &QueryContext,
        mode: Mode,
        t: Threshold,
        k: usize,
        decision: &Decision,
        top: Option<f32>,
        faces: (u32, u32),
        started: Instant,
    ) -> Result<AuditTicket> {
        let ev = self.query_event(ctx, mode, t, k, decision, top, faces, started);
        self.audit_submit(ev)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn query_event(
        &self,
        ctx: &QueryContext,
        mode: Mode,
        t: Threshold,
        k: usize,
        decision: &Decision,
        top: Option<f32>,
        faces: (u32, u32),
        started: Instant,
    ) -> AuditEvent {
        let (kind, subject, template) = match decision {
            Decision::Match { subject, template, .. } => (DecisionKind::Match, Some(subject.to_string()), Some(*template)),
            Decision::NeedsHumanReview { subject, template, .. } => {
                (DecisionKind::NeedsHumanReview, Some(subject.to_string()), Some(*template))
            }
            Decision::NoMatch { .. } => (DecisionKind::NoMatch, None, None),
        };
        let model_id = self.manifest.read().config.model_id.clone();
        AuditEvent::Query(QueryAudit {
            operator: ctx.operator.as_str().to_string(),
            purpose: ctx.purpose.as_str().to_string(),
            mode: match mode {
                Mode::Verify => QueryMode::Verify,
                Mode::Identify => QueryMode::Identify,
            },
            model_id,
            threshold: t.value(),
            threshold_version: t.version(),
            k: k as u32,
            faces_found: faces.0,
            faces_discarded: faces.1,
            decision: kind,
            subject,
            template,
            top_score: top,
            latency_us: started.elapsed().as_micros() as u64,
        })
    }

    /// 1:1 verification of `probe` against `subject`'s templates enrolled for the context's purpose.
    pub fn verify(&self, ctx: &QueryContext, probe: &[f32], subject: &SubjectId) -> Result<Verification> {
        self.verify_with_faces(ctx, probe, subject, (1, 0))
    }

    /// [`Engine::verify`] recording how many faces the image held and how many were discarded as unrelated.
    pub fn verify_with_faces(&self, ctx: &QueryContext, probe: &[f32], subject: &SubjectId, faces: (u32, u32)) -> Result<Verification> {
        self.verify_deferred_with_faces(ctx, probe, subject, faces)?.wait()
    }

    /// [`Engine::verify`] without waiting for the audit record: see [`Pending`].
    pub fn verify_deferred(&self, ctx: &QueryContext, probe: &[f32], subject: &SubjectId) -> Result<Pending<Verification>> {
        self.verify_deferred_with_faces(ctx, probe, subject, (1, 0))
    }

    /// [`Engine::verify_with_faces`] without waiting for the audit record: see [`Pending`].
    pub fn verify_deferred_with_faces(
        &self,
        ctx: &QueryContext,
        probe: &[f32],
        subject: &SubjectId,
        faces: (u32, u32),
    ) -> Result<Pending<Verification>> {
        let started = Instant::now();
        let policy = self.query_policy(ctx, Mode::Verify)?;
        let dim = self.manifest.read().config.dim;
        let q = normalise(dim, probe)?;
        let now = self.clock.now_unix_ms();
        let bit = self.manifest.read().config.purpose_bit(&ctx.purpose).unwrap_or(0);
        let cutoff = now.saturating_sub(policy.retention_days as i64 * DAY_MS);
        let best = {
            let st = self.state.read();
            let si = st.subject_index(subject).ok_or_else(|| Error::UnknownSubject(subject.to_string()))?;
            let live = st.live_slots(si);
            if live.is_empty() {
                return Err(Error::UnknownSubject(subject.to_string()));
            }
            let mut best: Option<Candidate> = None;
            for slot in live {
                let s = &st.slots[slot as usize];
                if s.mask & (1 << bit) == 0 || s.enrolled_at_ms <= cutoff {
                    continue;
                }
                if let Some(v) = st.index.vector(slot) {
                    let score = dot(&q, v);
                    if best.as_ref().is_none_or(|b| score > b.score) {
                        best = Some(Candidate { subject: subject.clone(), template: s.template, score });
                    }
                }
            }
            best
        };
        let score = best.as_ref().map(|c| c.score);
        let (decision, threshold) = Self::decide(&policy, Mode::Verify, best);
        let ticket = self.audit_query(ctx, Mode::Verify, threshold, 1, &decision, score, faces, started)?;
        let audit_seq = ticket.seqs().start;
        Ok(Pending { value: Verification { decision, score, threshold, audit_seq }, ticket })
    }

    /// 1:N identification: the `k` best templates enrolled for the context's purpose, and a decision on the best.
    pub fn identify(&self, ctx: &QueryContext, probe: &[f32], k: usize) -> Result<Identification> {
        self.identify_with(ctx, probe, k, SearchOptions::default(), (1, 0))
    }

    /// [`Engine::identify`] with search options and face counts for the audit record.
    pub fn identify_with(
        &self,
        ctx: &QueryContext,
        probe: &[f32],
        k: usize,
        opts: SearchOptions,
        faces: (u32, u32),
    ) -> Result<Identification> {
        self.identify_deferred_with(ctx, probe, k, opts, faces)?.wait()
    }

    /// [`Engine::identify`] without waiting for the audit record: see [`Pending`].
    pub fn identify_deferred(&self, ctx: &QueryContext, probe: &[f32], k: usize) -> Result<Pending<Identification>> {
        self.identify_deferred_with(ctx, probe, k, SearchOptions::default(), (1, 0))
    }

    /// [`Engine::identify_with`] without waiting for the audit record: see [`Pending`].
    pub fn identify_deferred_with(
        &self,
        ctx: &QueryContext,
        probe: &[f32],
        k: usize,
        opts: SearchOptions,
        faces: (u32, u32),
    ) -> Result<Pending<Identification>> {
        let started = Instant::now();
        let policy = self.query_policy(ctx, Mode::Identify)?;
        let candidates = self.search_candidates(ctx, probe, k, opts)?;
        let top = candidates.first().map(|c| c.score);
        let (decision, threshold) = Self::decide(&policy, Mode::Identify, candidates.first().cloned());
        let ticket = self.audit_query(ctx, Mode::Identify, threshold, k, &decision, top, faces, started)?;
        let audit_seq = ticket.seqs().start;
        Ok(Pending { value: Identification { candidates, decision, threshold, audit_seq }, ticket })
    }

    /// 1:N for every face of one image: one audit record per face (written with one fsync), each
    /// carrying how many faces the image held and how many matched nobody (to be discarded by the caller).
    pub fn identify_faces(&self, ctx: &QueryContext, probes: &[Vec<f32>], k: usize) -> Result<Vec<Identification>> {
        let started = Instant::now();
        let policy = self.query_policy(ctx, Mode::Identify)?;
        let mut out = Vec::with_capacity(probes.len());
        for p in probes {
            let candidates = self.search_candidates(ctx, p, k, SearchOptions::default())?;
            let (decision, threshold) = Self::decide(&policy, Mode::Identify, candidates.first().cloned());
            out.push(Identification { candidates, decision, threshold, audit_seq: 0 });
        }
        let found = probes.len() as u32;
        let discarded = out.iter().filter(|r| matches!(r.decision, Decision::NoMatch { .. })).count() as u32;
        let events: Vec<AuditEvent> = out
            .iter()
            .map(|r| {
                self.query_event(
                    ctx,
                    Mode::Identify,
                    r.threshold,
                    k,
                    &r.decision,
                    r.candidates.first().map(|c| c.score),
                    (found, discarded),
                    started,
                )
            })
            .collect();
        if events.is_empty() {
            return Ok(out);
        }
        let seqs = self.audit_batch_intent(events)?;
        for (r, s) in out.iter_mut().zip(seqs) {
            r.audit_seq = s;
        }
        Ok(out)
    }

    pub(super) fn search_candidates(&self, ctx: &QueryContext, probe: &[f32], k: usize, opts: SearchOptions) -> Result<Vec<Candidate>> {
        Ok(self.search_candidates_many(ctx, 1, |_| probe, k, opts, false)?.pop().unwrap_or_default())
    }

    /// [`Engine::search_candidates`] for `n` probes through [`crate::index::VectorIndex::search_batch`].
    pub(super) fn search_candidates_many<'p>(
        &self,
        ctx: &QueryContext,
        n: usize,
        probe: impl Fn(usize) -> &'p [f32],
        k: usize,
        opts: SearchOptions,
        batched: bool,
    ) -> Result<Vec<Vec<Candidate>>> {
        let (dim, bit, max_k, retention_ms) = {
            let m = self.manifest.read();
            let bit = m.config.purpose_bit(&ctx.purpose).ok_or_else(|| Error::PolicyViolation {
                rule: "specific-purpose",
                reason: format!("purpose {} is not declared by this gallery", ctx.purpose),
            })?;
            let retention_ms = m.config.purpose(&ctx.purpose).map_or(0, |p| p.retention_days as i64 * DAY_MS);
            (m.config.dim, bit, m.config.max_k, retention_ms)
        };
        if k == 0 || k > max_k {
            return Err(Error::config("k", format!("must be in 1..={max_k}, got {k}")));
        }
        let mut qs = Vec::with_capacity(n * dim);
        for i in 0..n {
            qs.extend_from_slice(&normalise(dim, probe(i))?);
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let now = self.clock.now_unix_ms();
        let st = self.state.read();
        if st.index.is_empty() {
            return Ok(vec![Vec::new(); n]);
        }
        let live = st.index.len() as u64;
        let for_purpose = st.per_purpose[bit as usize];
        let slots = &st.slots;
        let mask = 1u64 << bit;
        // This purpose's retention: templates enrolled at or before the cutoff no longer serve it.
        let cutoff = now.saturating_sub(retention_ms);
        let filter = move |slot: u32| slots.get(slot as usize).is_some_and(|s| s.mask & mask != 0 && s.enrolled_at_ms > cutoff);
        let needs_filter = for_purpose < live || st.min_enrolled_ms <= cutoff;
        let mut strategy = opts.strategy;
        if needs_filter && strategy == SearchStrategy::Auto && (for_purpose as f64) < 0.3 * live as f64 {
            // A narrow filter starves the graph walk: scan the few that pass.
            strategy = SearchStrategy::Exact;
        }
        let params = SearchParams { k, ef: opts.ef, strategy, filter: if needs_filter { Some(&filter) } else { None } };
        let hits: Vec<Vec<Hit>> = if batched && n > 1 {
            st.index.search_batch(&qs, &params)?
        } else {
            qs.chunks_exact(dim).map(|q| st.index.search(q, &params)).collect::<Result<_>>()?
        };
        use zeroize::Zeroize;
        qs.zeroize();
        Ok(hits
            .into_iter()
            .map(|hs| {
                hs.into_iter()
                    .filter_map(|h| {
                        let s = st.slots.get(h.slot as usize)?;
                        Some(Candidate { subject: st.subject_id(s.subject), template: s.template, score: h.score })
                    })
                    .collect()
            })
            .collect())
    }
}

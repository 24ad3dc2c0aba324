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
        faces: FaceCount,
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
        faces: FaceCount,
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
            faces_found: faces.found,
            faces_discarded: faces.discarded,
            decision: kind,
            subject,
            template,
            top_score: top,
            latency_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Run one [`Query`] and return its answer once the audit record is
    /// durable: [`Identification`] for [`Query::identify`], [`Verification`]
    /// for [`Query::verify`]. "No match" is an answer, not an error; errors
    /// are an undeclared purpose (refusal audited), a probe of the wrong
    /// dimension or not finite, `k` out of range, an unknown subject, or an
    /// audit record that could not be written (then nothing is answered).
    pub fn query<A: Ask>(&self, ctx: &QueryContext, query: Query<'_, A>) -> Result<A::Answer> {
        self.query_deferred(ctx, query)?.wait()
    }

    /// [`Engine::query`] without waiting for the audit record: the answer is
    /// held in a [`Pending`] until [`Pending::wait`] sees the record durable.
    pub fn query_deferred<A: Ask>(&self, ctx: &QueryContext, query: Query<'_, A>) -> Result<Pending<A::Answer>> {
        query.ask.run(self, ctx, query.probe, query.faces)
    }

    pub(super) fn verify_one(
        &self,
        ctx: &QueryContext,
        probe: &[f32],
        subject: &SubjectId,
        faces: FaceCount,
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

    pub(super) fn identify_one(
        &self,
        ctx: &QueryContext,
        probe: &[f32],
        ask: &Identify,
        faces: FaceCount,
    ) -> Result<Pending<Identification>> {
        let started = Instant::now();
        let k = ask.k;
        let policy = self.query_policy(ctx, Mode::Identify)?;
        let candidates = self.search_candidates(ctx, probe, k, ask.search)?;
        let top = candidates.first().map(|c| c.score);
        let (decision, threshold) = Self::decide(&policy, Mode::Identify, candidates.first().cloned());
        let ticket = self.audit_query(ctx, Mode::Identify, threshold, k, &decision, top, faces, started)?;
        let audit_seq = ticket.seqs().start;
        Ok(Pending { value: Identification { candidates, decision, threshold, audit_seq }, ticket })
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

//! Batched queries: many probes per engine call, their audit records queued
//! together and released by one [`Pending`] once durable.
//!
//! Used by [`crate::batch`]: the exact scan scores up to 64 probes per pass
//! over the gallery, and a batch's records share one commit with everything
//! else in flight.

use std::time::Instant;

use super::{Engine, FaceCount, Identification, Identify, Pending, QueryContext, SearchOptions};
use crate::audit::AuditEvent;
use crate::compliance::{Decision, Mode};
use crate::{Error, Result};

impl Engine {
    /// 1:N for `probes` (row-major, `dim` values per probe) in one call: the
    /// index searches them as a batch (the exact scan scores blocks of probes
    /// per pass), and their audit records, one per probe in order, are queued
    /// together. The answers are released by [`Pending::wait`] once every
    /// record is durable. Any invalid probe fails the whole call before
    /// anything is searched or recorded.
    ///
    /// ```
    /// # use facematch::compliance::*;
    /// # use facematch::config::GalleryConfig;
    /// # use facematch::engine::{EngineBuilder, Enrolment, Identify, QueryContext};
    /// # use facematch::store::MasterKey;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let door = Purpose::new("door-access").unwrap();
    /// # let mut cfg = GalleryConfig::default();
    /// # cfg.dim = 4;
    /// # cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    /// # let engine = EngineBuilder::new(dir.path().join("g")).key(MasterKey::generate()).create(cfg).unwrap();
    /// # let op = Operator::new("clerk-1").unwrap();
    /// # let consent = ConsentRecord::new("form-1", "alice", ConsentBasis::SeparateConsent, vec![door.clone()], "clerk-1", AgeBracket::Adult);
    /// # engine.record_consent(&op, consent).unwrap();
    /// # let alice = SubjectId::new("alice").unwrap();
    /// # engine.enrol(&op, Enrolment::new(alice, "form-1", vec![door.clone()], vec![1.0, 0.0, 0.0, 0.0])).unwrap();
    /// let ctx = QueryContext::new(op, door);
    /// let probes = [0.9, 0.1, 0.0, 0.0, /* second probe */ 0.0, 0.0, 1.0, 0.0];
    /// let answers = engine.identify_batch_deferred(&ctx, &probes, Identify::top(5)).unwrap().wait().unwrap();
    /// assert!(answers[0].decision.is_match());
    /// assert_eq!(answers[1].decision.kind(), "no_match");
    /// ```
    pub fn identify_batch_deferred(&self, ctx: &QueryContext, probes: &[f32], ask: Identify) -> Result<Pending<Vec<Identification>>> {
        let dim = self.manifest.read().config.dim;
        if dim == 0 || !probes.len().is_multiple_of(dim) {
            return Err(Error::WrongDimension { expected: dim, got: probes.len() % dim.max(1) });
        }
        let n = probes.len() / dim;
        self.identify_many_deferred(ctx, n, |i| &probes[i * dim..(i + 1) * dim], ask.k, ask.search, true, |_| FaceCount::default())
    }

    /// 1:N for every face of one image: one audit record per face, queued
    /// together, each carrying how many faces the image held and how many
    /// matched nobody (to be discarded by the caller); released by
    /// [`Pending::wait`] once durable. One search per face, as a single
    /// query would (a batch may take another path). No probe at all gives an
    /// empty answer and no record.
    pub fn identify_faces_deferred(&self, ctx: &QueryContext, probes: &[Vec<f32>], ask: Identify) -> Result<Pending<Vec<Identification>>> {
        let found = probes.len() as u32;
        self.identify_many_deferred(
            ctx,
            probes.len(),
            |i| &probes[i],
            ask.k,
            ask.search,
            false,
            |out| {
                let discarded = out.iter().filter(|r| matches!(r.decision, Decision::NoMatch { .. })).count() as u32;
                FaceCount { found, discarded }
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn identify_many_deferred<'p>(
        &self,
        ctx: &QueryContext,
        n: usize,
        probe: impl Fn(usize) -> &'p [f32],
        k: usize,
        opts: SearchOptions,
        batched: bool,
        faces: impl Fn(&[Identification]) -> FaceCount,
    ) -> Result<Pending<Vec<Identification>>> {
        let started = Instant::now();
        let policy = self.query_policy(ctx, Mode::Identify)?;
        let hits = self.search_candidates_many(ctx, n, probe, k, opts, batched)?;
        let mut out = Vec::with_capacity(n);
        for candidates in hits {
            let (decision, threshold) = Self::decide(&policy, Mode::Identify, candidates.first().cloned());
            out.push(Identification { candidates, decision, threshold, audit_seq: 0 });
        }
        let counts = faces(&out);
        let events: Vec<AuditEvent> = out
            .iter()
            .map(|r| {
                self.query_event(ctx, Mode::Identify, r.threshold, k, &r.decision, r.candidates.first().map(|c| c.score), counts, started)
            })
            .collect();
        let ticket = match self.audit.read().as_ref() {
            Some(a) => a.submit_batch(events)?,
            None => return Err(Error::Audit("the audit log is closed (key rotation failed?)".into())),
        };
        for (r, s) in out.iter_mut().zip(ticket.seqs()) {
            r.audit_seq = s;
        }
        Ok(Pending { value: out, ticket })
    }
}

//! The engine's public request, answer and report types.

use super::*;

/// Who asks, and for which declared purpose. Every query carries one.
#[derive(Clone, Debug)]
pub struct QueryContext {
    /// The operator performing the query.
    pub operator: Operator,
    /// The declared purpose the query serves.
    pub purpose: Purpose,
}

impl QueryContext {
    /// A context for `operator` acting for `purpose`.
    pub fn new(operator: Operator, purpose: Purpose) -> Self {
        QueryContext { operator, purpose }
    }
}

/// A request to enrol one template. Its embedding is wiped when the request
/// is dropped and never printed by `Debug`.
#[derive(Clone)]
pub struct Enrolment {
    /// Whose template.
    pub subject: SubjectId,
    /// The consent record it rests on (must be recorded first and cover the purposes).
    pub consent_id: String,
    /// Purposes it is enrolled for (a subset of the gallery's).
    pub purposes: Vec<Purpose>,
    /// The embedding (normalised on enrolment); zeroed on drop.
    pub embedding: Zeroizing<Vec<f32>>,
    /// A caller-chosen template id; the engine assigns one when `None`.
    pub template: Option<u64>,
    /// Model that made the embedding; refused if it differs from the gallery's.
    pub model_id: Option<String>,
    /// Enrol even if the face does not resemble the subject's templates
    /// already enrolled (otherwise refused, and the refusal audited).
    pub force: bool,
}

impl Enrolment {
    /// An enrolment with an engine-assigned template id.
    pub fn new(subject: SubjectId, consent_id: impl Into<String>, purposes: Vec<Purpose>, embedding: Vec<f32>) -> Self {
        Enrolment {
            subject,
            consent_id: consent_id.into(),
            purposes,
            embedding: Zeroizing::new(embedding),
            template: None,
            model_id: None,
            force: false,
        }
    }
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("subject", &self.subject)
            .field("consent_id", &self.consent_id)
            .field("purposes", &self.purposes)
            .field("embedding", &format_args!("[{} values, not shown]", self.embedding.len()))
            .field("template", &self.template)
            .field("model_id", &self.model_id)
            .field("force", &self.force)
            .finish()
    }
}

/// One ranked candidate of a 1:N query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The candidate's subject.
    pub subject: SubjectId,
    /// The template that scored.
    pub template: u64,
    /// Cosine similarity.
    pub score: f32,
}

/// Result of a 1:1 verification.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verification {
    /// Match / no match / needs human review.
    pub decision: Decision,
    /// Best cosine over the subject's templates for this purpose (`None` if it has none).
    pub score: Option<f32>,
    /// The threshold applied.
    pub threshold: Threshold,
    /// Audit record sequence number.
    pub audit_seq: u64,
}

/// Result of a 1:N identification.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identification {
    /// Best candidates, best first (at most `k`).
    pub candidates: Vec<Candidate>,
    /// Decision on the top candidate.
    pub decision: Decision,
    /// The threshold applied.
    pub threshold: Threshold,
    /// Audit record sequence number.
    pub audit_seq: u64,
}

/// One query: a probe, what is asked of it ([`Identify`] or [`Verify`]), and
/// the face counts of the image it came from. Run it with [`Engine::query`]
/// (answer once its audit record is durable) or [`Engine::query_deferred`]
/// (a [`Pending`] answer, so that many queries in flight share a commit).
/// The answer's type follows what is asked: [`Identification`] for
/// [`Identify`], [`Verification`] for [`Verify`].
///
/// ```
/// # use facematch::compliance::*;
/// # use facematch::config::GalleryConfig;
/// # use facematch::engine::{EngineBuilder, Enrolment, FaceCount, Query, QueryContext, SearchOptions};
/// # use facematch::index::SearchStrategy;
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
/// let alice = SubjectId::new("alice").unwrap();
/// # engine.enrol(&op, Enrolment::new(alice.clone(), "form-1", vec![door.clone()], vec![1.0, 0.0, 0.0, 0.0])).unwrap();
/// let ctx = QueryContext::new(op, door);
/// let probe = [0.9, 0.1, 0.0, 0.0];
/// // 1:N, the 5 best; the exact scan forced.
/// let exact = SearchOptions { strategy: SearchStrategy::Exact, ef: None };
/// let id = engine.query(&ctx, Query::identify(&probe, 5).search(exact)).unwrap();
/// assert!(id.decision.is_match());
/// // 1:1 from an image that held 3 faces, 2 of them discarded as unrelated.
/// let v = engine.query(&ctx, Query::verify(&probe, &alice).faces(FaceCount { found: 3, discarded: 2 })).unwrap();
/// assert!(v.decision.is_match());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Query<'a, A> {
    /// The probe embedding (the gallery's dimension; the engine normalises a copy).
    pub probe: &'a [f32],
    /// What is asked: [`Identify`] (1:N) or [`Verify`] (1:1).
    pub ask: A,
    /// Faces of the probe's image, for the audit record (default: one, none discarded).
    pub faces: FaceCount,
}

impl<'a> Query<'a, Identify> {
    /// 1:N: the `k` best templates enrolled for the context's purpose, and a decision on the best.
    pub fn identify(probe: &'a [f32], k: usize) -> Self {
        Query { probe, ask: Identify::top(k), faces: FaceCount::default() }
    }

    /// The same query with these search options.
    pub fn search(mut self, search: SearchOptions) -> Self {
        self.ask.search = search;
        self
    }
}

impl<'a> Query<'a, Verify<'a>> {
    /// 1:1: `probe` against `subject`'s templates enrolled for the context's purpose.
    pub fn verify(probe: &'a [f32], subject: &'a SubjectId) -> Self {
        Query { probe, ask: Verify { subject }, faces: FaceCount::default() }
    }
}

impl<A> Query<'_, A> {
    /// The same query recording these face counts.
    pub fn faces(mut self, faces: FaceCount) -> Self {
        self.faces = faces;
        self
    }
}

/// 1:N identification: the `k` best candidates (at most the gallery's `max_k`).
#[derive(Clone, Copy, Debug)]
pub struct Identify {
    /// How many candidates to return.
    pub k: usize,
    /// Search knobs (default: the engine picks).
    pub search: SearchOptions,
}

impl Identify {
    /// The `k` best, with default search options.
    pub fn top(k: usize) -> Self {
        Identify { k, search: SearchOptions::default() }
    }
}

/// 1:1 verification against one subject's templates.
#[derive(Clone, Copy, Debug)]
pub struct Verify<'a> {
    /// The subject claimed.
    pub subject: &'a SubjectId,
}

/// How many faces a probe's image held and how many of them were discarded
/// as unrelated (the unrelated-faces rule); recorded in the query's audit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaceCount {
    /// Faces detected in the image.
    pub found: u32,
    /// Faces discarded without being kept or answered about.
    pub discarded: u32,
}

impl Default for FaceCount {
    /// A bare embedding: one face, none discarded.
    fn default() -> Self {
        FaceCount { found: 1, discarded: 0 }
    }
}

/// What a [`Query`] can ask: [`Identify`] or [`Verify`] (sealed). `Answer`
/// is what [`Engine::query`] returns for it.
pub trait Ask: sealed::Run {}

impl Ask for Identify {}
impl Ask for Verify<'_> {}

pub(super) mod sealed {
    use super::*;

    /// How the engine runs an [`super::Ask`] (kept out of the public API).
    pub trait Run {
        /// The answer: [`Identification`] or [`Verification`].
        type Answer;
        /// Compute the answer and queue its audit record.
        fn run(&self, engine: &Engine, ctx: &QueryContext, probe: &[f32], faces: FaceCount) -> Result<Pending<Self::Answer>>;
    }

    impl Run for Identify {
        type Answer = Identification;
        fn run(&self, engine: &Engine, ctx: &QueryContext, probe: &[f32], faces: FaceCount) -> Result<Pending<Identification>> {
            engine.identify_one(ctx, probe, self, faces)
        }
    }

    impl Run for Verify<'_> {
        type Answer = Verification;
        fn run(&self, engine: &Engine, ctx: &QueryContext, probe: &[f32], faces: FaceCount) -> Result<Pending<Verification>> {
            engine.verify_one(ctx, probe, self.subject, faces)
        }
    }
}

/// An answer held back until its audit record is durable.
///
/// [`Engine::query_deferred`] (and the batched [`Engine::identify_batch_deferred`]) compute the
/// decision and queue its audit record, but the answer is released only by
/// [`Pending::wait`], once that record is durable: a server thread can keep
/// many queries in flight (e.g. one per connection of an async runtime) and
/// let them share one fsync, and still never answers before the record is on
/// disk. Dropping a `Pending` discards the answer; its record is still written.
///
/// ```
/// # use facematch::compliance::*;
/// # use facematch::config::GalleryConfig;
/// # use facematch::engine::{EngineBuilder, Enrolment, Query, QueryContext};
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
/// let probes = [[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]];
/// // Both queries in flight at once: their records share one commit.
/// let in_flight: Vec<_> = probes.iter().map(|p| engine.query_deferred(&ctx, Query::identify(p, 5)).unwrap()).collect();
/// let answers: Vec<_> = in_flight.into_iter().map(|p| p.wait().unwrap()).collect(); // durable now
/// assert!(answers[0].decision.is_match());
/// assert_eq!(answers[1].decision.kind(), "no_match");
/// ```
#[must_use = "the answer is released only by wait()"]
#[derive(Debug)]
pub struct Pending<T> {
    pub(super) value: T,
    pub(super) ticket: AuditTicket,
}

impl<T> Pending<T> {
    /// Sequence number of the audit record (known before it is durable).
    pub fn audit_seq(&self) -> u64 {
        self.ticket.seqs().start
    }

    /// Wait until the audit record is durable and release the answer.
    /// An error means the record could not be written: do not answer.
    pub fn wait(self) -> Result<T> {
        self.ticket.wait()?;
        Ok(self.value)
    }
}

/// Search knobs for callers that need them (benchmarks, evaluation).
#[derive(Clone, Copy, Debug, Default)]
pub struct SearchOptions {
    /// Force the exact scan or the graph (default: the engine picks).
    pub strategy: SearchStrategy,
    /// Graph search breadth (default: the index's `ef_search`).
    pub ef: Option<usize>,
}

/// What an erasure removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ErasureReport {
    /// Templates erased (no longer searchable).
    pub templates: Vec<u64>,
    /// Subjects with no template left.
    pub subjects: Vec<String>,
    /// True when the bytes are already gone from disk (a compaction ran);
    /// otherwise they go at the next compaction (automatic past the deleted-share threshold).
    pub bytes_removed: bool,
}

/// What a compaction did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CompactionReport {
    /// Deleted slots whose bytes were removed.
    pub templates_removed: u64,
    /// Template log size before.
    pub bytes_before: u64,
    /// Template log size after.
    pub bytes_after: u64,
}

/// A warning the operator must act on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// Stored people reached the filing threshold: file with the provincial
    /// cyberspace office within 30 working days.
    FilingRequired {
        /// Distinct enrolled people.
        people: u64,
        /// The threshold (100,000 by law).
        threshold: u64,
        /// When it was reached (unix ms).
        at_ms: i64,
    },
}

/// Numbers about the gallery.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Live templates.
    pub templates: u64,
    /// Distinct people with at least one live template.
    pub people: u64,
    /// Filing threshold.
    pub filing_threshold: u64,
    /// When the filing notice was raised, if it was.
    pub filing_notice_ms: Option<i64>,
    /// Slots incl. deleted ones awaiting compaction.
    pub slots: u64,
    /// Share of slots deleted.
    pub deleted_fraction: f32,
    /// Live templates per purpose.
    pub per_purpose: BTreeMap<String, u64>,
    /// Consent records kept.
    pub consents: u64,
    /// Template log bytes on disk.
    pub log_bytes: u64,
    /// Index memory (vectors, int8 codes, graph).
    pub index_memory_bytes: u64,
    /// Memory of the per-template metadata, subjects and consents (an
    /// estimate from capacities and string lengths).
    #[serde(default)]
    pub metadata_memory_bytes: u64,
    /// Templates stored but not yet in the graph (a bulk import defers the
    /// build; [`crate::engine::Engine::build_graph`]); searches scan until then.
    #[serde(default)]
    pub graph_pending: u64,
    /// Embedding dimension.
    pub dim: usize,
    /// Model id.
    pub model_id: String,
}

/// What [`EngineBuilder::repair`] found and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    /// What needed repairing.
    pub plan: store::repair::RepairPlan,
    /// Whether the repair was carried out (false: only planned).
    pub applied: bool,
    /// Where the removed bytes and entries were kept.
    pub repair_dir: Option<PathBuf>,
    /// Templates erased again because the audit log records their erasure.
    pub erasures_reapplied: Vec<u64>,
}

/// What happened while opening.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// A key rotation a crash interrupted was finished (`Some(true)`: the
    /// new key opened the gallery) or rolled back (`Some(false)`).
    pub key_rotation_recovered: Option<bool>,
    /// A torn write found at the end of the template log: ignored, and cut
    /// by the next append (opening changes no file).
    pub torn_log_tail: Option<TornTail>,
    /// Changes whose audit record was durable but whose effect was not (a
    /// crash or a full disk in between), and what open did about each
    /// (erasures completed; enrolments and consents recorded as not made).
    pub reconciled: Vec<String>,
    /// The gallery was upgraded from this format version on open (audited).
    pub upgraded_from: Option<u32>,
    /// Entries at the store's temporary names that facematch could not prove
    /// its own (links, hard-linked or foreign files): left exactly as they were.
    pub left_alone: Vec<String>,
    /// Entries whose permissions were looser than 0700 / 0600 and were taken down.
    pub modes_tightened: Vec<PathBuf>,
    /// The index snapshot was used (false: rebuilt from the log).
    pub snapshot_used: bool,
    /// Templates purged on open because their retention expired.
    pub purged_on_open: usize,
}

//! The engine a server holds: gallery + index + compliance + audit, `Send + Sync`.
//!
//! Built once by [`EngineBuilder`] (create or open a gallery directory with a
//! key), then shared: many threads call [`Engine::verify`] /
//! [`Engine::identify`] while one enrols or deletes. Every query names an
//! operator and a declared [`Purpose`], sees only templates enrolled for that
//! purpose, and is answered only after its audit record is durable.
//!
//! ```
//! use facematch::compliance::*;
//! use facematch::config::GalleryConfig;
//! use facematch::engine::{EngineBuilder, Enrolment, QueryContext};
//! use facematch::store::MasterKey;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let door = Purpose::new("door-access").unwrap();
//! let mut cfg = GalleryConfig::default();
//! cfg.dim = 4;
//! cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
//! let engine = EngineBuilder::new(dir.path().join("g")).key(MasterKey::generate()).create(cfg).unwrap();
//!
//! let op = Operator::new("clerk-1").unwrap();
//! let consent = ConsentRecord::new("form-1", "alice", ConsentBasis::SeparateConsent, vec![door.clone()], "clerk-1", AgeBracket::Adult);
//! engine.record_consent(&op, consent).unwrap();
//! let alice = SubjectId::new("alice").unwrap();
//! engine.enrol(&op, Enrolment::new(alice.clone(), "form-1", vec![door.clone()], vec![1.0, 0.0, 0.0, 0.0])).unwrap();
//!
//! let ctx = QueryContext::new(op, door);
//! let v = engine.verify(&ctx, &[0.9, 0.1, 0.0, 0.0], &alice).unwrap();
//! assert!(v.decision.is_match());
//! let id = engine.identify(&ctx, &[0.0, 0.0, 1.0, 0.0], 5).unwrap();
//! assert_eq!(id.decision.kind(), "no_match"); // "no match" is a result, not an error
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditConfig, AuditEvent, AuditKey, AuditLog, AuditTicket, DecisionKind, QueryAudit, QueryMode};
use crate::clock::{Clock, SystemClock};
use crate::compliance::{ConsentRecord, Decision, Mode, Operator, Purpose, SubjectId, Threshold};
use crate::config::GalleryConfig;
use crate::index::{Hit, SearchParams, SearchStrategy, VectorIndex};
use crate::store::{self, snapshot, LogWriter, Manifest, MasterKey, Op, TemplateMeta, TornTail};
use crate::{Error, Result};

const DAY_MS: i64 = 86_400_000;

// Batched queries (many probes per call): additive, kept apart.
mod batched;

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

/// A request to enrol one template.
#[derive(Clone, Debug)]
pub struct Enrolment {
    /// Whose template.
    pub subject: SubjectId,
    /// The consent record it rests on (must be recorded first and cover the purposes).
    pub consent_id: String,
    /// Purposes it is enrolled for (a subset of the gallery's).
    pub purposes: Vec<Purpose>,
    /// The embedding (normalised on enrolment).
    pub embedding: Vec<f32>,
    /// A caller-chosen template id; the engine assigns one when `None`.
    pub template: Option<u64>,
    /// Model that made the embedding; refused if it differs from the gallery's.
    pub model_id: Option<String>,
}

impl Enrolment {
    /// An enrolment with an engine-assigned template id.
    pub fn new(subject: SubjectId, consent_id: impl Into<String>, purposes: Vec<Purpose>, embedding: Vec<f32>) -> Self {
        Enrolment { subject, consent_id: consent_id.into(), purposes, embedding, template: None, model_id: None }
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

/// An answer held back until its audit record is durable.
///
/// [`Engine::identify_deferred`] and [`Engine::verify_deferred`] compute the
/// decision and queue its audit record, but the answer is released only by
/// [`Pending::wait`], once that record is durable: a server thread can keep
/// many queries in flight (e.g. one per connection of an async runtime) and
/// let them share one fsync, and still never answers before the record is on
/// disk. Dropping a `Pending` discards the answer; its record is still written.
///
/// ```
/// # use facematch::compliance::*;
/// # use facematch::config::GalleryConfig;
/// # use facematch::engine::{EngineBuilder, Enrolment, QueryContext};
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
/// let in_flight: Vec<_> = probes.iter().map(|p| engine.identify_deferred(&ctx, p, 5).unwrap()).collect();
/// let answers: Vec<_> = in_flight.into_iter().map(|p| p.wait().unwrap()).collect(); // durable now
/// assert!(answers[0].decision.is_match());
/// assert_eq!(answers[1].decision.kind(), "no_match");
/// ```
#[must_use = "the answer is released only by wait()"]
#[derive(Debug)]
pub struct Pending<T> {
    value: T,
    ticket: AuditTicket,
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
    /// Index memory.
    pub index_memory_bytes: u64,
    /// Embedding dimension.
    pub dim: usize,
    /// Model id.
    pub model_id: String,
}

/// Where [`Engine::rotate_key_until`] stops, as a crash would (crash tests).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationStep {
    /// Everything staged, not committed.
    Staged,
    /// Committed, no file moved yet.
    Committed,
}

/// What happened while opening.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// A key rotation a crash interrupted was finished (`Some(true)`: the
    /// new key opened the gallery) or rolled back (`Some(false)`).
    pub key_rotation_recovered: Option<bool>,
    /// A torn write cut off the template log.
    pub torn_log_tail: Option<TornTail>,
    /// The index snapshot was used (false: rebuilt from the log).
    pub snapshot_used: bool,
    /// Templates purged on open because their retention expired.
    pub purged_on_open: usize,
}

#[derive(Clone, Debug)]
struct Slot {
    template: u64,
    subject: u32,
    mask: u64,
    /// Enrolment time: the template serves purpose `p` while
    /// `enrolled_at_ms > now - retention(p)`.
    enrolled_at_ms: i64,
    /// When its last purpose expires (then it is purged).
    expires_at_ms: i64,
}

struct State {
    index: VectorIndex,
    slots: Vec<Slot>,
    metas: HashMap<u64, TemplateMeta>,
    by_template: HashMap<u64, u32>,
    subject_ids: Vec<SubjectId>,
    subject_idx: HashMap<SubjectId, u32>,
    live_by_subject: HashMap<u32, Vec<u64>>,
    consents: HashMap<String, ConsentRecord>,
    per_purpose: [u64; 64],
    next_template: u64,
    /// Earliest expiry among slots (a lower bound: deleted slots may keep it low until compaction).
    min_expiry_ms: i64,
    /// Oldest enrolment among the slots (a purpose's retention filter is needed once it expires).
    min_enrolled_ms: i64,
}

impl State {
    fn new(index: VectorIndex) -> Self {
        State {
            index,
            slots: Vec::new(),
            metas: HashMap::new(),
            by_template: HashMap::new(),
            subject_ids: Vec::new(),
            subject_idx: HashMap::new(),
            live_by_subject: HashMap::new(),
            consents: HashMap::new(),
            per_purpose: [0; 64],
            next_template: 1,
            min_expiry_ms: i64::MAX,
            min_enrolled_ms: i64::MAX,
        }
    }

    fn subject(&mut self, s: &SubjectId) -> u32 {
        if let Some(&i) = self.subject_idx.get(s) {
            return i;
        }
        let i = self.subject_ids.len() as u32;
        self.subject_ids.push(s.clone());
        self.subject_idx.insert(s.clone(), i);
        i
    }

    fn people(&self) -> u64 {
        self.live_by_subject.values().filter(|v| !v.is_empty()).count() as u64
    }

    /// Register metadata of an enrolment whose vector sits at `slot`.
    fn note_enrol(&mut self, cfg: &GalleryConfig, meta: TemplateMeta, slot: u32) {
        let subject = self.subject(&meta.subject);
        let mut mask = 0u64;
        for p in &meta.purposes {
            if let Some(b) = cfg.purpose_bit(p) {
                mask |= 1 << b;
                self.per_purpose[b as usize] += 1;
            }
        }
        debug_assert_eq!(slot as usize, self.slots.len());
        // Each purpose expires on its own retention (from the current config);
        // the template is kept until its last purpose expires.
        let expires_at_ms = meta
            .purposes
            .iter()
            .filter_map(|p| cfg.purpose(p))
            .map(|pol| meta.enrolled_at_ms.saturating_add(pol.retention_days as i64 * DAY_MS))
            .max()
            .unwrap_or(meta.expires_at_ms);
        self.min_expiry_ms = self.min_expiry_ms.min(expires_at_ms);
        self.min_enrolled_ms = self.min_enrolled_ms.min(meta.enrolled_at_ms);
        self.slots.push(Slot { template: meta.template, subject, mask, enrolled_at_ms: meta.enrolled_at_ms, expires_at_ms });
        self.by_template.insert(meta.template, slot);
        self.live_by_subject.entry(subject).or_default().push(meta.template);
        self.next_template = self.next_template.max(meta.template + 1);
        self.metas.insert(meta.template, meta);
    }

    /// Forget a template's metadata (the index tombstone is set by the caller).
    fn note_delete(&mut self, template: u64) -> Option<u32> {
        let slot = self.by_template.remove(&template)?;
        self.metas.remove(&template);
        let s = &self.slots[slot as usize];
        for b in 0..64 {
            if s.mask & (1 << b) != 0 {
                self.per_purpose[b] = self.per_purpose[b].saturating_sub(1);
            }
        }
        if let Some(v) = self.live_by_subject.get_mut(&s.subject) {
            v.retain(|&t| t != template);
        }
        Some(slot)
    }
}

/// Builds an [`Engine`]: create a new gallery or open an existing one.
#[derive(Debug)]
pub struct EngineBuilder {
    dir: PathBuf,
    key: Option<MasterKey>,
    clock: Arc<dyn Clock>,
    allow_core_dumps: bool,
}

impl EngineBuilder {
    /// A builder for the gallery at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EngineBuilder { dir: dir.into(), key: None, clock: Arc::new(SystemClock), allow_core_dumps: false }
    }
    /// Let this process write core dumps. By default opening or creating an
    /// engine makes the process non-dumpable (Linux `PR_SET_DUMPABLE` 0;
    /// elsewhere on Unix a core size limit of 0), because a dump would hold
    /// the decrypted templates and any probe in flight. Non-dumpable also
    /// stops debuggers of the same user from attaching.
    pub fn allow_core_dumps(mut self, allow: bool) -> Self {
        self.allow_core_dumps = allow;
        self
    }
    /// The master key (required).
    pub fn key(mut self, key: MasterKey) -> Self {
        self.key = Some(key);
        self
    }
    /// An injectable clock (tests); the system clock by default.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Create a new gallery (the directory must not hold one).
    pub fn create(self, config: GalleryConfig) -> Result<Engine> {
        config.validate()?;
        let key = self.key.ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let dir = self.dir;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock = store::DirLock::acquire(&dir)?;
        if dir.join(store::MANIFEST).exists() || dir.join(store::LOG).exists() {
            return Err(Error::config("gallery", format!("{} already holds a gallery", dir.display())));
        }
        let manifest = store::new_manifest(config, &key, self.clock.now_unix_ms());
        let log = LogWriter::create(&dir.join(store::LOG), key.store_cipher())?;
        store::sync_dir(&dir)?;
        store::write_manifest(&dir, &manifest)?;
        Engine::assemble(dir, lock, key, self.clock, manifest, log, OpenReport::default(), None)
    }

    /// Open an existing gallery: check the key, replay the log, load or rebuild the index, purge expired templates.
    pub fn open(self) -> Result<Engine> {
        let key = self.key.ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let dir = self.dir;
        store::read_manifest(&dir)?; // a gallery is here (before creating LOCK)
        let lock = store::DirLock::acquire(&dir)?;
        // The key must open the gallery as it will be once a key rotation a
        // crash interrupted is finished or undone; then that is done, first.
        // Recovery leaves exactly this manifest in place (moves the staged one, or keeps the old).
        let manifest = store::effective_manifest(&dir)?;
        manifest.config.validate()?;
        store::check_key(&dir, &manifest, &key)?;
        let rotation = store::recover_rotation(&dir)?;
        if let Some(r) = rotation {
            tracing::warn!(?r, "an interrupted key rotation was completed on open");
        }
        // Leftovers of a compaction or snapshot a crash cut short hold template ciphertext.
        for leftover in ["templates.log.new", "index.snap.tmp"] {
            let p = dir.join(leftover);
            if p.exists() {
                store::shred_file(&p)?;
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                tracing::info!(file = leftover, "shredded a leftover of an interrupted write");
            }
        }
        let cfg = &manifest.config;
        let cipher = key.store_cipher();

        let mut ops: Vec<Op> = Vec::new();
        let logp = dir.join(store::LOG);
        let (log, torn) = LogWriter::open(&logp, cipher.clone(), |i, b| {
            let op = Op::decode(b).map_err(|e| Error::DataCorruption { path: logp.clone(), reason: format!("frame {i}: {e}") })?;
            ops.push(op);
            Ok(())
        })?;
        let mut report = OpenReport {
            torn_log_tail: torn,
            key_rotation_recovered: rotation.map(|r| r == store::RotationRecovery::Finished),
            ..Default::default()
        };

        // Load the snapshot when it belongs to this log.
        let snapp = dir.join(store::SNAPSHOT);
        let mut index = None;
        if let Some(h) = snapshot::read_header(&snapp)? {
            if h.log_id == log.file_id() && h.frames <= log.frames() {
                match snapshot::read(&snapp, &cipher, &h, |r| VectorIndex::read_from(r)) {
                    Ok(ix) if ix.dim() == cfg.dim && ix.slots() as u64 == h.slots => index = Some(ix),
                    Ok(_) => tracing::warn!("index snapshot does not match the gallery; rebuilding"),
                    Err(e) => tracing::warn!(error = %e, "index snapshot unreadable; rebuilding"),
                }
            } else if h.log_id == log.file_id() && snapshot::read(&snapp, &cipher, &h, |r| VectorIndex::read_from(r)).is_ok() {
                // An authentic snapshot of this very log covers frames the log no longer has:
                // acknowledged writes (a deletion, a withdrawal) were lost. A crash only ever
                // tears an unacknowledged last frame, so this is truncation or damage: serving
                // the shorter log would bring erased templates back.
                return Err(Error::DataCorruption {
                    path: logp.clone(),
                    reason: format!(
                        "the template log ends at frame {} but the index snapshot proves {} frames were written: acknowledged writes were lost (truncation or damage); restore the gallery from a backup",
                        log.frames(),
                        h.frames
                    ),
                });
            }
        }
        report.snapshot_used = index.is_some();
        let index = match index {
            Some(ix) => ix,
            None => VectorIndex::new(cfg.dim, cfg.index.clone())?,
        };
        let mut st = State::new(index);
        let have = st.index.slots();
        let mut pending: Vec<f32> = Vec::new();
        let mut enrol_ordinal = 0usize;
        let mut deletes: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Enrol { meta, vector } => {
                    if vector.len() != cfg.dim {
                        return Err(Error::DataCorruption { path: logp.clone(), reason: format!("template {} has dimension {}", meta.template, vector.len()) });
                    }
                    if enrol_ordinal >= have {
                        pending.extend_from_slice(&vector);
                    }
                    st.note_enrol(cfg, meta, enrol_ordinal as u32);
                    enrol_ordinal += 1;
                }
                Op::Delete { templates } => {
                    for t in templates {
                        if let Some(slot) = st.note_delete(t) {
                            deletes.push(slot as u64);
                        }
                    }
                }
                Op::Consent(c) => {
                    st.consents.insert(c.consent_id.clone(), c);
                }
            }
        }
        if have > enrol_ordinal {
            return Err(Error::DataCorruption { path: snapp, reason: "snapshot holds more templates than the log".into() });
        }
        if !pending.is_empty() {
            st.index.add_batch(&pending)?;
        }
        for slot in deletes {
            st.index.remove(slot as u32)?;
        }
        calibrate_index(&mut st.index);
        let stale = log.frames().saturating_sub(snapshot::read_header(&snapp)?.map(|h| h.frames).unwrap_or(0));
        let engine = Engine::assemble(dir, lock, key, self.clock, manifest, log, report, Some(st))?;
        if !engine.open_report.snapshot_used || stale > 10_000 {
            engine.checkpoint()?;
        }
        if let Some(r) = rotation {
            let detail = match r {
                store::RotationRecovery::Finished => "finished on open: the rotation had committed before the crash; the gallery is under the new key",
                store::RotationRecovery::RolledBack => "rolled back on open: the crash came before the commit; the gallery stays under the previous key",
            };
            engine.record_admin(&Operator::system(), "key-rotation-recovery", detail)?;
        }
        let purged = engine.purge_expired(&Operator::system())?;
        let mut engine = engine;
        engine.open_report.purged_on_open = purged.templates.len();
        Ok(engine)
    }
}

/// Keep decrypted templates and probes out of core dumps (see
/// [`EngineBuilder::allow_core_dumps`]). Idempotent.
pub fn forbid_core_dumps() -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_DUMPABLE takes one integer argument.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(Error::Io { path: PathBuf::from("prctl(PR_SET_DUMPABLE)"), source: std::io::Error::last_os_error() });
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        let lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid rlimit for RLIMIT_CORE.
        if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) } != 0 {
            return Err(Error::Io { path: PathBuf::from("setrlimit(RLIMIT_CORE)"), source: std::io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// True when this process may write core dumps (Linux; `None` elsewhere).
pub fn core_dumps_allowed() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_DUMPABLE takes no argument and returns the flag.
        Some(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 1)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Let the index measure how wide a graph search must be to find what the
/// exact scan finds (top-1 on 99% of 200 probes); with no affordable width,
/// `Auto` scans. Skipped where `Auto` scans anyway.
fn calibrate_index(index: &mut VectorIndex) {
    if index.len() >= index.config().exact_below && index.config().graph {
        let c = index.calibrate(CALIBRATION_TARGET, CALIBRATION_PROBES, CALIBRATION_SEED);
        tracing::debug!(ef = ?c.ef, agreement = c.agreement, live = c.live, "index calibrated");
    }
}

const CALIBRATION_TARGET: f32 = 0.99;
const CALIBRATION_PROBES: usize = 200;
const CALIBRATION_SEED: u64 = 0xCA11_B2A7;

struct Writer {
    log: LogWriter,
}

/// The engine. `Send + Sync`: share it in an `Arc`.
pub struct Engine {
    dir: PathBuf,
    _lock: store::DirLock,
    key: RwLock<MasterKey>,
    clock: Arc<dyn Clock>,
    manifest: RwLock<Manifest>,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    audit: RwLock<Option<AuditLog>>,
    notices: Mutex<Vec<Notice>>,
    open_report: OpenReport,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Check an embedding (dimension, finite, non-zero) and L2-normalise it, exactly as the engine stores it.
///
/// ```
/// let v = facematch::engine::normalise(2, &[3.0, 4.0]).unwrap();
/// assert_eq!(v, vec![0.6, 0.8]);
/// assert!(facematch::engine::normalise(2, &[0.0, 0.0]).is_err());
/// ```
pub fn normalise(dim: usize, v: &[f32]) -> Result<Vec<f32>> {
    if v.len() != dim {
        return Err(Error::WrongDimension { expected: dim, got: v.len() });
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::InvalidEmbedding { reason: "contains NaN or infinity".into() });
    }
    let n = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if n < 1e-12 {
        return Err(Error::InvalidEmbedding { reason: "zero norm".into() });
    }
    Ok(v.iter().map(|x| (*x as f64 / n) as f32).collect())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dir: PathBuf,
        lock: store::DirLock,
        key: MasterKey,
        clock: Arc<dyn Clock>,
        manifest: Manifest,
        log: LogWriter,
        report: OpenReport,
        state: Option<State>,
    ) -> Result<Engine> {
        let cfg = manifest.config.clone();
        let state = match state {
            Some(s) => s,
            None => State::new(VectorIndex::new(cfg.dim, cfg.index.clone())?),
        };
        let (audit, _) = AuditLog::open(
            &dir.join(store::AUDIT_DIR),
            AuditKey::from_bytes(key.audit_key_bytes()),
            cfg.audit.clone(),
            clock.clone(),
        )?;
        let mut notices = Vec::new();
        if let Some(at) = manifest.filing_notice_ms {
            notices.push(Notice::FilingRequired { people: state.people(), threshold: cfg.filing_threshold, at_ms: at });
        }
        Ok(Engine {
            dir,
            _lock: lock,
            key: RwLock::new(key),
            clock,
            manifest: RwLock::new(manifest),
            state: RwLock::new(state),
            writer: Mutex::new(Writer { log }),
            audit: RwLock::new(Some(audit)),
            notices: Mutex::new(notices),
            open_report: report,
        })
    }

    /// The gallery directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// What happened at open (torn tail repaired, snapshot used, purged templates).
    pub fn open_report(&self) -> &OpenReport {
        &self.open_report
    }
    /// A copy of the configuration in force.
    pub fn config(&self) -> GalleryConfig {
        self.manifest.read().config.clone()
    }
    /// Append an event to the audit log; returns once it is durable.
    fn audit_append(&self, event: AuditEvent) -> Result<u64> {
        Ok(self.audit_submit(event)?.wait()?.start)
    }

    /// Queue an event; the ticket says when it is durable.
    fn audit_submit(&self, event: AuditEvent) -> Result<AuditTicket> {
        match self.audit.read().as_ref() {
            Some(a) => a.submit(event),
            None => Err(Error::Audit("the audit log is closed (key rotation failed?)".into())),
        }
    }

    /// Record an administrative act (open, configuration, maintenance) in the audit log.
    pub fn record_admin(&self, operator: &Operator, action: &str, detail: &str) -> Result<u64> {
        self.audit_append(AuditEvent::Admin { operator: operator.as_str().into(), action: action.into(), detail: detail.into() })
    }

    /// Live audit records, delivered once durable (a server can stream them to an off-device anchor).
    pub fn subscribe_audit(&self) -> Result<std::sync::mpsc::Receiver<crate::audit::AuditRecord>> {
        match self.audit.read().as_ref() {
            Some(a) => Ok(a.subscribe()),
            None => Err(Error::Audit("the audit log is closed".into())),
        }
    }

    /// The audit writer's counters since open (commits, records, fsync time, linger): for metrics.
    pub fn audit_stats(&self) -> Result<crate::audit::AuditStats> {
        match self.audit.read().as_ref() {
            Some(a) => Ok(a.stats()),
            None => Err(Error::Audit("the audit log is closed".into())),
        }
    }

    /// The audit directory of this gallery (for [`AuditLog::verify`], [`AuditLog::read`]).
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join(store::AUDIT_DIR)
    }
    /// Warnings for the operator (the filing notice).
    pub fn notices(&self) -> Vec<Notice> {
        self.notices.lock().clone()
    }

    fn policy(&self, purpose: &Purpose) -> Result<crate::compliance::PurposePolicy> {
        self.manifest.read().config.purpose(purpose).cloned().ok_or_else(|| Error::PolicyViolation {
            rule: "specific-purpose",
            reason: format!("purpose {purpose} is not declared by this gallery"),
        })
    }

    fn decide(policy: &crate::compliance::PurposePolicy, mode: Mode, best: Option<Candidate>) -> (Decision, Threshold) {
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
    fn audit_query(&self, ctx: &QueryContext, mode: Mode, t: Threshold, k: usize, decision: &Decision, top: Option<f32>, faces: (u32, u32), started: Instant) -> Result<AuditTicket> {
        let ev = self.query_event(ctx, mode, t, k, decision, top, faces, started);
        self.audit_submit(ev)
    }

    #[allow(clippy::too_many_arguments)]
    fn query_event(&self, ctx: &QueryContext, mode: Mode, t: Threshold, k: usize, decision: &Decision, top: Option<f32>, faces: (u32, u32), started: Instant) -> AuditEvent {
        let (kind, subject, template) = match decision {
            Decision::Match { subject, template, .. } => (DecisionKind::Match, Some(subject.to_string()), Some(*template)),
            Decision::NeedsHumanReview { subject, template, .. } => (DecisionKind::NeedsHumanReview, Some(subject.to_string()), Some(*template)),
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
    pub fn verify_deferred_with_faces(&self, ctx: &QueryContext, probe: &[f32], subject: &SubjectId, faces: (u32, u32)) -> Result<Pending<Verification>> {
        let started = Instant::now();
        let policy = self.policy(&ctx.purpose)?;
        let dim = self.manifest.read().config.dim;
        let q = normalise(dim, probe)?;
        let now = self.clock.now_unix_ms();
        let bit = self.manifest.read().config.purpose_bit(&ctx.purpose).unwrap_or(0);
        let cutoff = now.saturating_sub(policy.retention_days as i64 * DAY_MS);
        let best = {
            let st = self.state.read();
            let si = *st.subject_idx.get(subject).ok_or_else(|| Error::UnknownSubject(subject.to_string()))?;
            let templates = st.live_by_subject.get(&si).cloned().unwrap_or_default();
            if templates.is_empty() {
                return Err(Error::UnknownSubject(subject.to_string()));
            }
            let mut best: Option<Candidate> = None;
            for t in templates {
                let Some(&slot) = st.by_template.get(&t) else { continue };
                let s = &st.slots[slot as usize];
                if s.mask & (1 << bit) == 0 || s.enrolled_at_ms <= cutoff {
                    continue;
                }
                if let Some(v) = st.index.vector(slot) {
                    let score = dot(&q, v);
                    if best.as_ref().is_none_or(|b| score > b.score) {
                        best = Some(Candidate { subject: subject.clone(), template: t, score });
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
    pub fn identify_with(&self, ctx: &QueryContext, probe: &[f32], k: usize, opts: SearchOptions, faces: (u32, u32)) -> Result<Identification> {
        self.identify_deferred_with(ctx, probe, k, opts, faces)?.wait()
    }

    /// [`Engine::identify`] without waiting for the audit record: see [`Pending`].
    pub fn identify_deferred(&self, ctx: &QueryContext, probe: &[f32], k: usize) -> Result<Pending<Identification>> {
        self.identify_deferred_with(ctx, probe, k, SearchOptions::default(), (1, 0))
    }

    /// [`Engine::identify_with`] without waiting for the audit record: see [`Pending`].
    pub fn identify_deferred_with(&self, ctx: &QueryContext, probe: &[f32], k: usize, opts: SearchOptions, faces: (u32, u32)) -> Result<Pending<Identification>> {
        let started = Instant::now();
        let candidates = self.search_candidates(ctx, probe, k, opts)?;
        let policy = self.policy(&ctx.purpose)?;
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
        let policy = self.policy(&ctx.purpose)?;
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
            .map(|r| self.query_event(ctx, Mode::Identify, r.threshold, k, &r.decision, r.candidates.first().map(|c| c.score), (found, discarded), started))
            .collect();
        if events.is_empty() {
            return Ok(out);
        }
        let seqs = self.audit_batch(events)?;
        for (r, s) in out.iter_mut().zip(seqs) {
            r.audit_seq = s;
        }
        Ok(out)
    }

    fn search_candidates(&self, ctx: &QueryContext, probe: &[f32], k: usize, opts: SearchOptions) -> Result<Vec<Candidate>> {
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
        let q = normalise(dim, probe)?;
        let now = self.clock.now_unix_ms();
        let st = self.state.read();
        if st.index.is_empty() {
            return Ok(Vec::new());
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
        let hits: Vec<Hit> = st.index.search(&q, &params)?;
        Ok(hits
            .into_iter()
            .filter_map(|h| {
                let s = st.slots.get(h.slot as usize)?;
                Some(Candidate { subject: st.subject_ids[s.subject as usize].clone(), template: s.template, score: h.score })
            })
            .collect())
    }

    /// Record a consent (required before enrolment). Refuses a minor under 14 without guardian consent.
    pub fn record_consent(&self, operator: &Operator, consent: ConsentRecord) -> Result<()> {
        self.record_consents(operator, vec![consent])
    }

    /// Record many consents with one fsync (migration, bulk import). All are checked first; nothing is written if one fails.
    pub fn record_consents(&self, operator: &Operator, mut consents: Vec<ConsentRecord>) -> Result<()> {
        if consents.is_empty() {
            return Ok(());
        }
        let declared = self.manifest.read().config.purpose_names();
        let now = self.clock.now_unix_ms();
        for c in &mut consents {
            c.validate(&declared)?;
            if c.given_at_ms == 0 {
                c.given_at_ms = now;
            }
        }
        let mut w = self.writer.lock();
        {
            let st = self.state.read();
            let mut batch: HashMap<&str, &SubjectId> = HashMap::new();
            for c in &consents {
                let owner = st.consents.get(&c.consent_id).map(|o| &o.subject).or(batch.get(c.consent_id.as_str()).copied());
                if owner.is_some_and(|s| s != &c.subject) {
                    return Err(Error::PolicyViolation { rule: "consent-record", reason: format!("consent id {} belongs to another subject", c.consent_id) });
                }
                batch.insert(&c.consent_id, &c.subject);
            }
        }
        let frames: Vec<Vec<u8>> = consents.iter().map(|c| Op::Consent(c.clone()).encode()).collect();
        w.log.append_durable(&frames)?;
        {
            let mut st = self.state.write();
            for c in &consents {
                st.consents.insert(c.consent_id.clone(), c.clone());
            }
        }
        drop(w);
        let events = consents
            .iter()
            .map(|c| AuditEvent::ConsentRecorded {
                operator: operator.as_str().into(),
                subject: c.subject.to_string(),
                consent_id: c.consent_id.clone(),
                basis: c.basis.label(),
                purposes: c.purposes.iter().map(|p| p.to_string()).collect(),
                age_bracket: c.age_bracket.label().into(),
                guardian: c.guardian.is_some(),
            })
            .collect();
        self.audit_batch(events)?;
        Ok(())
    }

    fn audit_batch(&self, events: Vec<AuditEvent>) -> Result<std::ops::Range<u64>> {
        match self.audit.read().as_ref() {
            Some(a) => a.append_batch(events),
            None => Err(Error::Audit("the audit log is closed".into())),
        }
    }

    fn check_enrolment(&self, cfg: &GalleryConfig, st: &State, e: &Enrolment, now: i64) -> Result<(TemplateMeta, Vec<f32>)> {
        if let Some(m) = &e.model_id {
            if m != &cfg.model_id {
                return Err(Error::config("model_id", format!("embedding from model {m}, gallery holds {}", cfg.model_id)));
            }
        }
        if e.purposes.is_empty() {
            return Err(Error::PolicyViolation { rule: "specific-purpose", reason: "enrolment names no purpose".into() });
        }
        let consent = st.consents.get(&e.consent_id).ok_or_else(|| Error::PolicyViolation {
            rule: "consent-required",
            reason: format!("no consent record {} (record consent before enrolling)", e.consent_id),
        })?;
        if consent.subject != e.subject {
            return Err(Error::PolicyViolation { rule: "consent-required", reason: format!("consent {} is not {}'s", e.consent_id, e.subject) });
        }
        consent.check_guardian()?;
        // Kept until its last purpose's retention ends (each purpose stops matching at its own).
        let mut retention = 0i64;
        for p in &e.purposes {
            let pol = cfg.purpose(p).ok_or_else(|| Error::PolicyViolation { rule: "specific-purpose", reason: format!("purpose {p} is not declared by this gallery") })?;
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
                if st.by_template.contains_key(&t) || st.metas.contains_key(&t) {
                    return Err(Error::DuplicateTemplate(t));
                }
                t
            }
            None => st.next_template,
        };
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
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let cfg = self.manifest.read().config.clone();
        let now = self.clock.now_unix_ms();
        let mut w = self.writer.lock();
        let mut planned = Vec::with_capacity(batch.len());
        {
            let st = self.state.read();
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
                let (meta, v) = self.check_enrolment(&cfg, &st, &e2, now)?;
                if !taken.insert(meta.template) {
                    return Err(Error::DuplicateTemplate(meta.template));
                }
                planned.push((meta, v));
            }
        }
        let frames: Vec<Vec<u8>> = planned.iter().map(|(m, v)| Op::Enrol { meta: m.clone(), vector: v.clone() }.encode()).collect();
        w.log.append_durable(&frames)?;
        let ids: Vec<u64> = planned.iter().map(|(m, _)| m.template).collect();
        let people_after;
        {
            let mut st = self.state.write();
            let flat: Vec<f32> = planned.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let range = st.index.add_batch(&flat)?;
            for ((meta, _), slot) in planned.iter().zip(range) {
                st.note_enrol(&cfg, meta.clone(), slot);
            }
            people_after = st.people();
        }
        drop(w);
        let events: Vec<AuditEvent> = planned
            .iter()
            .map(|(meta, _)| AuditEvent::Enrolment {
                operator: operator.as_str().into(),
                subject: meta.subject.to_string(),
                template: meta.template,
                purposes: meta.purposes.iter().map(|p| p.to_string()).collect(),
                consent_id: meta.consent_id.clone(),
            })
            .collect();
        self.audit_batch(events)?;
        self.check_filing(people_after)?;
        self.recalibrate_if_stale();
        Ok(ids)
    }

    /// After the gallery grew past twice the size the index was calibrated
    /// at: measure again under the read lock (searches go on), then install
    /// the result under a brief write lock.
    fn recalibrate_if_stale(&self) {
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

    fn check_filing(&self, people: u64) -> Result<()> {
        let mut m = self.manifest.write();
        if m.filing_notice_ms.is_some() || people < m.config.filing_threshold {
            return Ok(());
        }
        let at = self.clock.now_unix_ms();
        m.filing_notice_ms = Some(at);
        store::write_manifest(&self.dir, &m)?;
        let threshold = m.config.filing_threshold;
        drop(m);
        tracing::warn!(people, threshold, "stored people reached the filing threshold: file with the provincial cyberspace office within 30 working days");
        self.audit_append(AuditEvent::FilingNotice { distinct_subjects: people, threshold })?;
        self.notices.lock().push(Notice::FilingRequired { people, threshold, at_ms: at });
        Ok(())
    }

    fn erase(&self, templates: Vec<u64>) -> Result<ErasureReport> {
        let mut w = self.writer.lock();
        let known: Vec<u64> = {
            let st = self.state.read();
            templates.into_iter().filter(|t| st.by_template.contains_key(t)).collect()
        };
        if known.is_empty() {
            return Ok(ErasureReport::default());
        }
        w.log.append_durable(&[Op::Delete { templates: known.clone() }.encode()])?;
        let mut subjects = Vec::new();
        {
            let mut st = self.state.write();
            for &t in &known {
                let subj = st.by_template.get(&t).map(|&s| st.slots[s as usize].subject);
                if let Some(slot) = st.note_delete(t) {
                    st.index.remove(slot)?;
                }
                if let Some(si) = subj {
                    if st.live_by_subject.get(&si).is_none_or(|v| v.is_empty()) {
                        subjects.push(st.subject_ids[si as usize].to_string());
                    }
                }
            }
        }
        drop(w);
        subjects.sort();
        subjects.dedup();
        Ok(ErasureReport { templates: known, subjects, bytes_removed: false })
    }

    fn maybe_compact(&self, operator: &Operator, report: &mut ErasureReport) -> Result<()> {
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
        let mut r = self.erase(templates.to_vec())?;
        self.audit_append(AuditEvent::Deletion { operator: operator.as_str().into(), templates: r.templates.clone(), reason: reason.into() })?;
        self.maybe_compact(operator, &mut r)?;
        Ok(r)
    }

    /// Withdrawal of consent: every template of `subject` is erased at once and its consents are marked withdrawn.
    pub fn withdraw(&self, operator: &Operator, subject: &SubjectId) -> Result<ErasureReport> {
        let (templates, consents) = {
            let st = self.state.read();
            let templates = st.subject_idx.get(subject).and_then(|i| st.live_by_subject.get(i)).cloned().unwrap_or_default();
            let consents: Vec<ConsentRecord> = st.consents.values().filter(|c| &c.subject == subject && c.withdrawn_at_ms.is_none()).cloned().collect();
            if templates.is_empty() && consents.is_empty() {
                return Err(Error::UnknownSubject(subject.to_string()));
            }
            (templates, consents)
        };
        let now = self.clock.now_unix_ms();
        {
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
                if let Some(x) = st.consents.get_mut(&c.consent_id) {
                    x.withdrawn_at_ms = Some(now);
                }
            }
        }
        let mut r = self.erase(templates)?;
        r.subjects = vec![subject.to_string()];
        self.audit_append(AuditEvent::ConsentWithdrawn { operator: operator.as_str().into(), subject: subject.to_string(), templates_erased: r.templates.clone() })?;
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
            st.by_template.iter().filter(|(_, &s)| st.slots[s as usize].expires_at_ms <= now).map(|(&t, _)| t).collect()
        };
        if expired.is_empty() {
            return Ok(ErasureReport::default());
        }
        let mut r = self.erase(expired)?;
        r.templates.sort_unstable();
        self.audit_append(AuditEvent::Purge { operator: operator.as_str().into(), templates: r.templates.clone(), reason: "retention expired".into() })?;
        self.maybe_compact(operator, &mut r)?;
        Ok(r)
    }

    /// Rewrite the store without deleted templates: their bytes leave every file; the index drops them and repairs its graph.
    pub fn compact(&self, operator: &Operator) -> Result<CompactionReport> {
        let key = self.key.read().clone();
        let r = self.rewrite(&key)?;
        self.audit_append(AuditEvent::Compaction {
            operator: operator.as_str().into(),
            templates_removed: r.templates_removed,
            bytes_before: r.bytes_before,
            bytes_after: r.bytes_after,
        })?;
        Ok(r)
    }

    /// Write a new log (live templates + consents) sealed with `key`, a fresh snapshot, swap them in, shred the old log.
    fn rewrite(&self, key: &MasterKey) -> Result<CompactionReport> {
        let mut w = self.writer.lock();
        let mut st = self.state.write();
        let bytes_before = w.log.len();
        let tmp = self.dir.join("templates.log.new");
        let (nl, removed) = self.write_compacted(&mut st, key, &tmp, &self.dir.join(store::SNAPSHOT))?;
        let logp = self.dir.join(store::LOG);
        std::fs::rename(&tmp, &logp).map_err(|e| Error::io(&logp, e))?;
        store::sync_dir(&self.dir)?;
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
    fn write_compacted(&self, st: &mut State, key: &MasterKey, log_path: &Path, snap_path: &Path) -> Result<(LogWriter, u64)> {
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
        st.by_template = slots.iter().enumerate().map(|(i, s)| (s.template, i as u32)).collect();
        st.min_expiry_ms = slots.iter().map(|s| s.expires_at_ms).min().unwrap_or(i64::MAX);
        st.min_enrolled_ms = slots.iter().map(|s| s.enrolled_at_ms).min().unwrap_or(i64::MAX);
        st.slots = slots;

        if log_path.exists() {
            store::shred_file(log_path)?;
            std::fs::remove_file(log_path).map_err(|e| Error::io(log_path, e))?;
        }
        let mut nl = LogWriter::create(log_path, key.store_cipher())?;
        let mut frames: Vec<Vec<u8>> = st.consents.values().map(|c| Op::Consent(c.clone()).encode()).collect();
        frames.sort();
        for (i, s) in st.slots.iter().enumerate() {
            let meta = st.metas.get(&s.template).cloned().ok_or(Error::UnknownTemplate(s.template))?;
            let v = st.index.vector(i as u32).ok_or(Error::UnknownTemplate(s.template))?.to_vec();
            frames.push(Op::Enrol { meta, vector: v }.encode());
            if frames.len() >= 8192 {
                nl.append_durable(&frames)?;
                frames.clear();
            }
        }
        nl.append_durable(&frames)?;
        let header = snapshot::SnapshotHeader { log_id: nl.file_id(), frames: nl.frames(), slots: st.index.slots() as u64 };
        let idx = &st.index;
        snapshot::write(snap_path, &key.store_cipher(), header, |out| idx.write_to(out))?;
        Ok((nl, removed))
    }

    /// Write an index snapshot so the next open loads instead of rebuilding.
    pub fn checkpoint(&self) -> Result<()> {
        let w = self.writer.lock();
        let st = self.state.read();
        let key = self.key.read();
        let header = snapshot::SnapshotHeader { log_id: w.log.file_id(), frames: w.log.frames(), slots: st.index.slots() as u64 };
        snapshot::write(&self.dir.join(store::SNAPSHOT), &key.store_cipher(), header, |out| st.index.write_to(out))
    }

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
        self.rotate_key_until(operator, new_key, None)
    }

    /// [`Engine::rotate_key`] that stops (as a crash would) after `stop`:
    /// for crash tests only.
    #[doc(hidden)]
    pub fn rotate_key_until(&self, operator: &Operator, new_key: MasterKey, stop: Option<RotationStep>) -> Result<()> {
        let old = self.key.read().clone();
        let (old_ak, new_ak) = (AuditKey::from_bytes(old.audit_key_bytes()), AuditKey::from_bytes(new_key.audit_key_bytes()));
        self.audit_append(AuditEvent::KeyRotation { operator: operator.as_str().into() })?;
        // Lock order: writer, manifest, state, audit (as everywhere).
        let mut w = self.writer.lock();
        let mut man = self.manifest.write();
        let mut st = self.state.write();
        let mut slot = self.audit.write();
        let staging = store::begin_rotation(&self.dir)?;
        let audit_cfg = man.config.audit.clone();
        let audit_dir = self.dir.join(store::AUDIT_DIR);
        // Everything up to the commit can fail without harm: undo it and keep the old key.
        let staged = (|| -> Result<(LogWriter, store::Manifest)> {
            let (nl, _) = self.write_compacted(&mut st, &new_key, &staging.join(store::LOG), &staging.join(store::SNAPSHOT))?;
            let mut nm = man.clone();
            nm.key_check = store::new_manifest(nm.config.clone(), &new_key, nm.created_ms).key_check;
            store::write_manifest(&staging, &nm)?;
            if let Some(a) = slot.take() {
                a.close()?;
            }
            AuditLog::rekey_into(&audit_dir, &old_ak, &new_ak, &staging.join(store::AUDIT_DIR))?;
            Ok((nl, nm))
        })();
        let (mut nl, nm) = match staged {
            Ok(x) => x,
            Err(e) => {
                let _ = store::discard_rotation(&self.dir);
                if slot.is_none() {
                    *slot = AuditLog::open(&audit_dir, old_ak, audit_cfg, self.clock.clone()).ok().map(|(a, _)| a);
                }
                return Err(e);
            }
        };
        if stop == Some(RotationStep::Staged) {
            return Ok(());
        }
        store::commit_rotation(&self.dir)?;
        if stop == Some(RotationStep::Committed) {
            return Ok(());
        }
        store::finish_rotation(&self.dir)?;
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

    /// Measure, on a labelled calibration set, the lowest threshold for
    /// `purpose` and `mode` whose false-match rate is at most `target` (see
    /// [`crate::calibration`]), and the false-non-match rate it costs.
    /// `probes` is `labels.len()` rows of the gallery's dimension; a label is
    /// the probe's subject if enrolled, `None` for a person who is not.
    /// Nothing changes: apply the result with [`Engine::set_threshold`]. One
    /// audit record says who calibrated what and the result (no scores); the
    /// probes are compared with the templates serving the purpose by exact
    /// scan (probes x templates dot products: seconds for 1,000 x 100k).
    pub fn calibrate_threshold(&self, operator: &Operator, purpose: &Purpose, mode: Mode, probes: &[f32], labels: &[Option<SubjectId>], target: f64) -> Result<crate::calibration::ThresholdCalibration> {
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
        for (&si, ts) in &st.live_by_subject {
            let slots: Vec<u32> = ts
                .iter()
                .filter_map(|t| st.by_template.get(t).copied())
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
        let own: Vec<Option<u32>> = labels.iter().map(|l| l.as_ref().and_then(|s| st.subject_idx.get(s).copied()).filter(|si| subjects.iter().any(|(x, _)| x == si))).collect();
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
                    .map(|(si, slots)| (*si, slots.iter().filter_map(|&s| st.index.vector(s)).map(|v| dot(q, v)).fold(f32::NEG_INFINITY, f32::max)))
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
        let mut nm = m.clone();
        nm.config = cfg;
        store::write_manifest(&self.dir, &nm)?;
        *m = nm;
        drop(m);
        self.audit_append(AuditEvent::ThresholdChange {
            operator: operator.as_str().into(),
            purpose: purpose.to_string(),
            mode: mode.as_str().into(),
            old: Some(old),
            new: value,
            version: t.version(),
        })?;
        Ok(t)
    }

    /// Export live templates (optionally of one purpose) as an `.npy` matrix plus a JSON manifest of
    /// subjects, into `dest` on this machine. An explicit, audited act.
    pub fn export(&self, operator: &Operator, purpose: Option<&Purpose>, dest: &Path) -> Result<u64> {
        let bit = match purpose {
            Some(p) => Some(self.manifest.read().config.purpose_bit(p).ok_or_else(|| Error::PolicyViolation { rule: "specific-purpose", reason: format!("purpose {p} is not declared") })?),
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
                rows.push(serde_json::json!({"template": s.template, "subject": st.subject_ids[s.subject as usize]}));
            }
        }
        drop(st);
        let n = rows.len() as u64;
        self.audit_append(AuditEvent::Export { operator: operator.as_str().into(), templates: n, destination: dest.display().to_string() })?;
        std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
        crate::npy::write_f32_matrix(dest.join("templates.npy"), &data, n as usize, dim)?;
        let j = serde_json::to_vec_pretty(&rows).map_err(|e| Error::config("export", e.to_string()))?;
        store::write_atomic(&dest.join("templates.json"), &j)?;
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
            consents: st.consents.len() as u64,
            log_bytes: w.log.len(),
            index_memory_bytes: st.index.memory_bytes() as u64,
            dim: m.config.dim,
            model_id: m.config.model_id.clone(),
        }
    }

    /// Metadata of a live template.
    pub fn template(&self, template: u64) -> Result<TemplateMeta> {
        self.state.read().metas.get(&template).cloned().ok_or(Error::UnknownTemplate(template))
    }

    /// Live template ids of a subject.
    pub fn templates_of(&self, subject: &SubjectId) -> Vec<u64> {
        let st = self.state.read();
        st.subject_idx.get(subject).and_then(|i| st.live_by_subject.get(i)).cloned().unwrap_or_default()
    }

    /// Whether a consent record with this id exists (withdrawn or not).
    pub fn has_consent(&self, consent_id: &str) -> bool {
        self.state.read().consents.contains_key(consent_id)
    }

    /// Consent records of a subject (kept for the audit trail, withdrawn ones included).
    pub fn consents_of(&self, subject: &SubjectId) -> Vec<ConsentRecord> {
        self.state.read().consents.values().filter(|c| &c.subject == subject).cloned().collect()
    }

    /// Flush the audit log and write a snapshot if many frames are not in it.
    pub fn close(self) -> Result<()> {
        self.checkpoint()?;
        if let Some(a) = self.audit.write().take() {
            a.close()?;
        }
        Ok(())
    }
}

/// Default audit configuration re-exported for callers building configs.
pub fn default_audit_config() -> AuditConfig {
    AuditConfig::default()
}

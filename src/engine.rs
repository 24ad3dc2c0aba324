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
use zeroize::Zeroizing;

use crate::audit::{AuditConfig, AuditEvent, AuditKey, AuditLog, AuditTicket, DecisionKind, QueryAudit, QueryMode};
use crate::clock::{Clock, SystemClock};
use crate::compliance::{ConsentRecord, Decision, Mode, Operator, Purpose, SubjectId, Threshold};
use crate::config::GalleryConfig;
use crate::index::{Hit, SearchParams, SearchStrategy, VectorIndex};
use crate::fs::Dir;
use crate::store::{self, snapshot, LogWriter, Manifest, MasterKey, Op, TemplateMeta, TornTail};
use crate::{Error, Result};

const DAY_MS: i64 = 86_400_000;

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
        Enrolment { subject, consent_id: consent_id.into(), purposes, embedding: Zeroizing::new(embedding), template: None, model_id: None, force: false }
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
    /// Repair: accept a template log or audit log older than the manifest
    /// proves, then bind the manifest to what is there.
    rebind: bool,
}

impl EngineBuilder {
    /// A builder for the gallery at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EngineBuilder { dir: dir.into(), key: None, clock: Arc::new(SystemClock), allow_core_dumps: false, rebind: false }
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
        let gdir = Dir::create_or_open(&dir)?;
        let lock = store::DirLock::acquire(&gdir)?;
        if gdir.exists(store::MANIFEST)? || gdir.exists(store::LOG)? {
            return Err(Error::config("gallery", format!("{} already holds a gallery", dir.display())));
        }
        let report = OpenReport { modes_tightened: gdir.tighten(&[store::AUDIT_DIR])?, ..Default::default() };
        let mut manifest = store::new_manifest(config, &key, self.clock.now_unix_ms());
        let log = LogWriter::create(&gdir, store::LOG, key.store_cipher())?;
        gdir.sync()?;
        manifest.bound = Some(store::Bound {
            log_id: hex::encode(log.file_id()),
            log_frames: 0,
            pending_log: None,
            audit_records: 0,
            audit_hash: String::new(),
        });
        store::write_manifest(&gdir, &mut manifest, &key)?;
        let id = manifest.gallery_id.clone().unwrap_or_default();
        let engine = Engine::assemble(dir, gdir, lock, key, self.clock, manifest, log, report, None)?;
        // The chain starts with this gallery's id: another gallery's audit log never matches it.
        engine.record_admin(&Operator::system(), "gallery-created", &format!("gallery {id}"))?;
        Ok(engine)
    }

    /// Repair a gallery that open refuses (`facematch repair`), or with
    /// `apply: false` only say what would be done.
    ///
    /// The plan: cut the template log after its last whole, authentic frame;
    /// set aside a snapshot that covers frames the log no longer has, and
    /// entries at the store's temporary names that are not provably ours.
    /// Applying writes an audit record of the plan first (durable before
    /// anything changes), keeps every removed byte in `repair-<unix ms>/`
    /// inside the gallery, then opens the gallery and re-applies every
    /// erasure the audit log records that the store lacks (a template is
    /// erased again only if it belongs to the recorded subject and was
    /// enrolled before the erasure), so frames lost with the cut do not
    /// bring erased people back. Enrolments after the cut are lost: their
    /// records stay in the audit log.
    pub fn repair(self, operator: &Operator, apply: bool) -> Result<RepairReport> {
        let key = self.key.clone().ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let gdir = Dir::open(&self.dir)?;
        store::read_manifest_in(&gdir)?;
        let mut report = RepairReport::default();
        {
            let _lock = store::DirLock::acquire(&gdir)?;
            let manifest = store::recover::effective_manifest(&gdir)?;
            store::check_key(&gdir, &manifest, &key)?;
            report.plan = store::repair::plan(&gdir, &key.store_cipher())?;
            if apply && !report.plan.is_empty() {
                let detail = serde_json::to_string(&report.plan).map_err(|e| Error::Audit(e.to_string()))?;
                let (audit, _) = AuditLog::open(
                    &self.dir.join(store::AUDIT_DIR),
                    AuditKey::from_bytes(key.audit_key_bytes()),
                    manifest.config.audit.clone(),
                    self.clock.clone(),
                )?;
                audit
                    .submit(AuditEvent::Admin { operator: operator.as_str().into(), action: "repair".into(), detail })?
                    .wait()?;
                audit.close()?;
                report.repair_dir = Some(store::repair::apply(&gdir, &report.plan, self.clock.now_unix_ms())?);
            }
        }
        if apply {
            report.applied = true;
            let engine = EngineBuilder { rebind: true, ..self }.open()?;
            report.erasures_reapplied = engine.reapply_recorded_erasures(operator)?;
            engine.close()?;
        }
        Ok(report)
    }

    /// Open an existing gallery: check the key, replay the log, load or rebuild the index, purge expired templates.
    pub fn open(self) -> Result<Engine> {
        let key = self.key.ok_or_else(|| Error::Key("no key given".into()))?;
        if !self.allow_core_dumps {
            forbid_core_dumps()?;
        }
        let dir = self.dir;
        let gdir = Dir::open(&dir)?;
        store::read_manifest_in(&gdir)?; // a gallery is here (before creating LOCK)
        let lock = store::DirLock::acquire(&gdir)?;
        // The key must open the gallery as it will be once a key rotation a
        // crash interrupted is finished or undone; then that is done, first.
        // Recovery leaves exactly this manifest in place (moves the staged one, or keeps the old).
        let manifest = store::recover::effective_manifest(&gdir)?;
        manifest.config.validate()?;
        store::check_key(&gdir, &manifest, &key)?;
        let authenticated = store::verify_manifest(&gdir, &manifest, &key)?;
        if let (Some(b), false) = (&manifest.bound, self.rebind) {
            // A deleted audit directory is refused before anything would recreate it.
            let segments = match gdir.subdir(store::AUDIT_DIR)? {
                Some(a) => a.list()?.iter().filter(|n| n.starts_with("seg-")).count(),
                None => 0,
            };
            if b.audit_records > 0 && segments == 0 {
                return Err(Error::AuditTampered {
                    seq: 0,
                    reason: format!(
                        "the audit log is gone but the manifest proves {} records were written: the audit directory was deleted or replaced; restore it from a backup",
                        b.audit_records
                    ),
                });
            }
        }
        let mut left_alone = Vec::new();
        let rotation = store::recover::recover_rotation(&gdir, &mut left_alone)?;
        if let Some(r) = rotation {
            tracing::warn!(?r, "an interrupted key rotation was completed on open");
        }
        // Leftovers of a compaction or snapshot a crash cut short hold template ciphertext.
        left_alone.extend(store::recover::clear_leftovers(&gdir)?);
        let modes_tightened = gdir.tighten(&[store::AUDIT_DIR])?;
        let cfg = &manifest.config;
        let cipher = key.store_cipher();

        let mut ops: Vec<Op> = Vec::new();
        let logp = dir.join(store::LOG);
        let (log, torn) = LogWriter::open(&gdir, store::LOG, cipher.clone(), |i, b| {
            let op = Op::decode(b).map_err(|e| Error::DataCorruption { path: logp.clone(), reason: format!("frame {i}: {e}") })?;
            ops.push(op);
            Ok(())
        })?;
        if let (Some(b), false) = (&manifest.bound, self.rebind) {
            check_log_binding(&logp, b, &log)?;
        }
        let mut report = OpenReport {
            upgraded_from: (!authenticated).then_some(manifest.version),
            torn_log_tail: torn,
            key_rotation_recovered: rotation.map(|r| r == store::RotationRecovery::Finished),
            left_alone,
            modes_tightened,
            ..Default::default()
        };

        // Load the snapshot when it belongs to this log.
        let snapp = dir.join(store::SNAPSHOT);
        let mut index = None;
        if let Some(h) = snapshot::read_header(&gdir, store::SNAPSHOT)? {
            if h.log_id == log.file_id() && h.frames <= log.frames() {
                match snapshot::read(&gdir, store::SNAPSHOT, &cipher, &h, |r| VectorIndex::read_from(r)) {
                    Ok(ix) if ix.dim() == cfg.dim && ix.slots() as u64 == h.slots => index = Some(ix),
                    Ok(_) => tracing::warn!("index snapshot does not match the gallery; rebuilding"),
                    Err(e) => tracing::warn!(error = %e, "index snapshot unreadable; rebuilding"),
                }
            } else if h.log_id == log.file_id() && snapshot::read(&gdir, store::SNAPSHOT, &cipher, &h, |r| VectorIndex::read_from(r)).is_ok() {
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
        let stale = log.frames().saturating_sub(snapshot::read_header(&gdir, store::SNAPSHOT)?.map(|h| h.frames).unwrap_or(0));
        let bound = if self.rebind { None } else { manifest.bound.clone() };
        let engine = Engine::assemble(dir, gdir, lock, key, self.clock, manifest, log, report, Some(st))?;
        let mut engine = engine;
        if let Some(b) = &bound {
            engine.check_audit_binding(b)?;
            let done = engine.reconcile(b)?;
            for d in &done {
                tracing::warn!(what = %d, "reconciled on open");
            }
            engine.open_report.reconciled = done;
        }
        if !authenticated {
            // Format 1: authenticate the manifest and bind it to what is here now.
            engine.manifest.write().gallery_id = Some(store::new_gallery_id());
            engine.record_admin(
                &Operator::system(),
                "format-upgrade",
                &format!(
                    "gallery format 1 -> 2 on open: the manifest is now authenticated and bound to the template log and the audit log; gallery {}",
                    engine.manifest.read().gallery_id.clone().unwrap_or_default()
                ),
            )?;
        } else if self.rebind {
            engine.rebind()?;
        }
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

/// The template log is the one the manifest names (or a compaction's new
/// log it accepted) and holds at least the frames it proves.
fn check_log_binding(path: &Path, b: &store::Bound, log: &LogWriter) -> Result<()> {
    let id = hex::encode(log.file_id());
    let proven = if id == b.log_id {
        b.log_frames
    } else if let Some((pid, pframes)) = b.pending_log.as_ref().filter(|(pid, _)| *pid == id) {
        let _ = pid;
        *pframes
    } else {
        return Err(Error::DataCorruption {
            path: path.into(),
            reason: "is not the template log this gallery's manifest names (another gallery's, or a copy from another time); `facematch repair --yes` adopts it and erases again everyone the audit log says was erased".into(),
        });
    };
    if log.frames() < proven {
        return Err(Error::DataCorruption {
            path: path.into(),
            reason: format!(
                "holds {} frames, the manifest proves {proven} were written: an older copy (a restored backup) or cut short; erasures may be missing. `facematch repair --yes` erases again everyone the audit log says was erased",
                log.frames()
            ),
        });
    }
    Ok(())
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
    /// The gallery directory's descriptor: every file operation goes through it.
    gdir: Dir,
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
        gdir: Dir,
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
        // A real directory, never a link planted in its place.
        gdir.create_subdir(store::AUDIT_DIR)?;
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
            gdir,
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
        let seq = self.audit_submit(event)?.wait()?.start;
        self.rebind()?;
        Ok(seq)
    }

    /// Write-ahead: make a change's record durable before the change (no rebind:
    /// the manifest moves past the record only once the change is made).
    fn audit_intent(&self, event: AuditEvent) -> Result<u64> {
        Ok(self.audit_submit(event)?.wait()?.start)
    }

    /// Records after the manifest's bound are changes whose record is durable
    /// but whose effect may not be (a crash or a full disk in between):
    /// erasures are applied again (erasure wins), enrolments and consents the
    /// store lacks are recorded as not made. Returns what was done.
    fn reconcile(&self, b: &store::Bound) -> Result<Vec<String>> {
        let records = AuditLog::read_from(&self.audit_dir(), b.audit_records)?;
        let mut owner: HashMap<u64, String> = HashMap::new();
        let mut erase: Vec<u64> = Vec::new();
        let mut withdrawn: Vec<SubjectId> = Vec::new();
        let mut not_enrolled: Vec<u64> = Vec::new();
        let mut not_consented: Vec<String> = Vec::new();
        for r in records {
            match r.event {
                AuditEvent::Enrolment { subject, template, .. } => {
                    if self.template(template).is_err() {
                        not_enrolled.push(template);
                    }
                    owner.insert(template, subject);
                }
                AuditEvent::ConsentRecorded { consent_id, .. } => {
                    if !self.has_consent(&consent_id) {
                        not_consented.push(consent_id);
                    }
                }
                AuditEvent::ConsentWithdrawn { subject, templates_erased, .. } => {
                    erase.extend(templates_erased.into_iter().filter(|t| self.template(*t).is_ok_and(|m| m.subject.as_str() == subject)));
                    if let Ok(s) = SubjectId::new(subject) {
                        withdrawn.push(s);
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
                let frames: Vec<Vec<u8>> = open
                    .iter()
                    .map(|c| {
                        let mut c = c.clone();
                        c.withdrawn_at_ms = Some(now);
                        Op::Consent(c).encode()
                    })
                    .collect();
                let mut w = self.writer.lock();
                w.log.append_durable(&frames)?;
                let mut st = self.state.write();
                for c in open {
                    if let Some(x) = st.consents.get_mut(&c.consent_id) {
                        x.withdrawn_at_ms = Some(now);
                    }
                }
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
    fn rebind(&self) -> Result<()> {
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
        store::write_manifest(&self.gdir, &mut nm, &self.key.read())?;
        *m = nm;
        Ok(())
    }

    /// The audit log holds at least what the manifest proves, and it is this gallery's.
    fn check_audit_binding(&self, b: &store::Bound) -> Result<()> {
        let records = self.audit.read().as_ref().map(|a| a.records()).unwrap_or(0);
        if records < b.audit_records {
            return Err(Error::AuditTampered {
                seq: records,
                reason: format!(
                    "the audit log holds {records} records, the manifest proves {} were written: it was rolled back or cut; restore it from a backup",
                    b.audit_records
                ),
            });
        }
        if b.audit_records > 0 {
            let seq = b.audit_records - 1;
            if let Some(h) = AuditLog::record_hash(&self.audit_dir(), seq)? {
                if h != b.audit_hash {
                    return Err(Error::AuditTampered {
                        seq,
                        reason: "record differs from the one the manifest names: this audit log is not this gallery's (or was rewritten)".into(),
                    });
                }
            }
        }
        Ok(())
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

    /// The policy for a query's purpose; a refusal is recorded too (refusals
    /// are processing: who asked, for which purpose and mode, why; no probe data).
    fn query_policy(&self, ctx: &QueryContext, mode: Mode) -> Result<crate::compliance::PurposePolicy> {
        self.policy(&ctx.purpose).inspect_err(|e| {
            let _ = self.audit_intent(AuditEvent::Admin {
                operator: ctx.operator.as_str().into(),
                action: "query-refused".into(),
                detail: format!("{} for purpose {}: {e}", mode.as_str(), ctx.purpose),
            });
        })
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
        let policy = self.query_policy(ctx, Mode::Verify)?;
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
            .map(|r| self.query_event(ctx, Mode::Identify, r.threshold, k, &r.decision, r.candidates.first().map(|c| c.score), (found, discarded), started))
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
        // Write-ahead: the records first, then the consents (see `reconcile`).
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
                st.consents.insert(c.consent_id.clone(), c.clone());
            }
        }
        drop(w);
        self.rebind()
    }

    /// [`Engine::audit_intent`] for a batch.
    fn audit_batch_intent(&self, events: Vec<AuditEvent>) -> Result<std::ops::Range<u64>> {
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
        if !e.force {
            // Another template of someone already enrolled must look like them.
            let live = st.subject_idx.get(&e.subject).and_then(|si| st.live_by_subject.get(si));
            if let Some(live) = live.filter(|l| !l.is_empty()) {
                let best = live
                    .iter()
                    .filter_map(|t| st.by_template.get(t))
                    .filter_map(|&slot| st.index.vector(slot))
                    .map(|v| dot(v, &vector))
                    .fold(f32::MIN, f32::max);
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
                let (meta, v) = match self.check_enrolment(&cfg, &st, &e2, now) {
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
        let frames: Vec<Vec<u8>> = planned.iter().map(|(m, v)| Op::Enrol { meta: m.clone(), vector: v.clone() }.encode()).collect();
        let ids: Vec<u64> = planned.iter().map(|(m, _)| m.template).collect();
        // Write-ahead: the records first, then the templates (see `reconcile`).
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
        self.audit_batch_intent(events)?;
        if crate::failpoints::hit("enrol/recorded") {
            return Err(Error::Cancelled);
        }
        if let Err(e) = w.log.append_durable(&frames) {
            let _ = self.audit_intent(AuditEvent::Admin {
                operator: operator.as_str().into(),
                action: "enrolment-failed".into(),
                detail: format!("templates {ids:?} were not stored: {e}"),
            });
            return Err(e);
        }
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
        self.rebind()?;
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
        store::write_manifest(&self.gdir, &mut m, &self.key.read())?;
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
                    if st.live_by_subject.get(&si).is_none_or(|v| v.is_empty()) {
                        subjects.push(st.subject_ids[si as usize].to_string());
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
            let templates = st.subject_idx.get(subject).and_then(|i| st.live_by_subject.get(i)).cloned().unwrap_or_default();
            let consents: Vec<ConsentRecord> = st.consents.values().filter(|c| &c.subject == subject && c.withdrawn_at_ms.is_none()).cloned().collect();
            if templates.is_empty() && consents.is_empty() {
                return Err(Error::UnknownSubject(subject.to_string()));
            }
            (templates, consents)
        };
        let now = self.clock.now_unix_ms();
        // Write-ahead: the record first, then the withdrawal (see `reconcile`).
        let mut erased = templates.clone();
        erased.sort_unstable();
        self.audit_intent(AuditEvent::ConsentWithdrawn { operator: operator.as_str().into(), subject: subject.to_string(), templates_erased: erased })?;
        if crate::failpoints::hit("withdraw/recorded") {
            return Err(Error::Cancelled);
        }
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
            st.by_template.iter().filter(|(_, &s)| st.slots[s as usize].expires_at_ms <= now).map(|(&t, _)| t).collect()
        };
        if expired.is_empty() {
            return Ok(ErasureReport::default());
        }
        let mut expired = expired;
        expired.sort_unstable();
        self.audit_intent(AuditEvent::Purge { operator: operator.as_str().into(), templates: expired.clone(), reason: "retention expired".into() })?;
        let mut r = self.erase(expired)?;
        r.templates.sort_unstable();
        self.rebind()?;
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
    fn write_compacted(&self, st: &mut State, key: &MasterKey, dir: &Dir, log_name: &str) -> Result<(LogWriter, u64)> {
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

        store::recover::clear_leftover(dir, log_name)?;
        let mut nl = LogWriter::create(dir, log_name, key.store_cipher())?;
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
        snapshot::write(dir, store::SNAPSHOT, &key.store_cipher(), header, |out| idx.write_to(out))?;
        Ok((nl, removed))
    }

    /// Write an index snapshot so the next open loads instead of rebuilding.
    pub fn checkpoint(&self) -> Result<()> {
        let w = self.writer.lock();
        let st = self.state.read();
        let key = self.key.read();
        let header = snapshot::SnapshotHeader { log_id: w.log.file_id(), frames: w.log.frames(), slots: st.index.slots() as u64 };
        snapshot::write(&self.gdir, store::SNAPSHOT, &key.store_cipher(), header, |out| st.index.write_to(out))
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
        let old = self.key.read().clone();
        let (old_ak, new_ak) = (AuditKey::from_bytes(old.audit_key_bytes()), AuditKey::from_bytes(new_key.audit_key_bytes()));
        self.audit_append(AuditEvent::KeyRotation { operator: operator.as_str().into() })?;
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
        let (mut nl, nm) = match staged {
            Ok(x) => x,
            Err(e) => {
                let _ = store::recover::discard_rotation(&self.gdir, &mut Vec::new());
                if slot.is_none() {
                    *slot = AuditLog::open(&audit_dir, old_ak, audit_cfg, self.clock.clone()).ok().map(|(a, _)| a);
                }
                return Err(e);
            }
        };
        if crate::failpoints::hit("rotate-key/staged") {
            return Ok(());
        }
        store::recover::commit_rotation(&self.gdir, &staging)?;
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
        store::write_manifest(&self.gdir, &mut nm, &self.key.read())?;
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
            consents: st.consents.len() as u64,
            log_bytes: w.log.len(),
            index_memory_bytes: st.index.memory_bytes() as u64,
            dim: m.config.dim,
            model_id: m.config.model_id.clone(),
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
        // The audit log is closed cleanly even if the snapshot cannot be written.
        let snap = self.checkpoint();
        if let Some(a) = self.audit.write().take() {
            a.close()?;
        }
        snap
    }
}

/// Default audit configuration re-exported for callers building configs.
pub fn default_audit_config() -> AuditConfig {
    AuditConfig::default()
}

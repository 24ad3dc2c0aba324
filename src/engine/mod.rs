//! The engine a server holds: gallery + index + compliance + audit, `Send + Sync`.
//!
//! Built once by [`EngineBuilder`] (create or open a gallery directory with a
//! key), then shared: many threads call [`Engine::query`] (1:1
//! [`Query::verify`] or 1:N [`Query::identify`]) while one enrols or deletes. Every query names an
//! operator and a declared [`Purpose`], sees only templates enrolled for that
//! purpose, and is answered only after its audit record is durable.
//!
//! ```
//! use facematch::compliance::*;
//! use facematch::config::GalleryConfig;
//! use facematch::engine::{EngineBuilder, Enrolment, Query, QueryContext};
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
//! let v = engine.query(&ctx, Query::verify(&[0.9, 0.1, 0.0, 0.0], &alice)).unwrap();
//! assert!(v.decision.is_match());
//! let id = engine.query(&ctx, Query::identify(&[0.0, 0.0, 1.0, 0.0], 5)).unwrap();
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
use crate::fs::Dir;
use crate::index::{Hit, SearchParams, SearchStrategy, VectorIndex};
use crate::store::{self, snapshot, LogWriter, Manifest, MasterKey, Op, TemplateMeta, TornTail};
use crate::{Error, Result};

const DAY_MS: i64 = 86_400_000;

// One file per duty: `types` (requests, answers, reports), `state` (the
// in-memory gallery), `open` (create, open, repair), `query`, `enrol`,
// `erase` (delete, withdraw, purge, compact), `bind` (manifest bindings,
// write-ahead records, reconciliation), `admin` (keys, thresholds, export,
// stats). This file: the `Engine` itself and its audit plumbing.
mod admin;
// Batched queries (many probes per call): additive, kept apart.
mod anchor;
mod batched;
mod bind;
mod enrol;
mod erase;
mod open;
mod prefault;
mod query;
mod state;
mod tables;
mod types;

pub use self::anchor::{verify_audit, Anchor, AuditVerification};
use self::open::{calibrate_index, CALIBRATION_PROBES, CALIBRATION_SEED, CALIBRATION_TARGET};
pub use self::open::{core_dumps_allowed, forbid_core_dumps, EngineBuilder};
use self::state::{Slot, State};
pub use self::types::*;

struct Writer {
    log: LogWriter,
    /// What the snapshot on disk reflects: (log id, frames), when it is
    /// known to match the state in memory (then closing need not write it).
    snapshot_at: Option<([u8; 16], u64)>,
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
        let (audit, _) =
            AuditLog::open(&dir.join(store::AUDIT_DIR), AuditKey::from_bytes(key.audit_key_bytes()), cfg.audit.clone(), clock.clone())?;
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
            writer: Mutex::new(Writer { log, snapshot_at: None }),
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
}

/// Default audit configuration re-exported for callers building configs.
pub fn default_audit_config() -> AuditConfig {
    AuditConfig::default()
}

//! The gallery directory on disk: manifest, encrypted template log, encrypted
//! index snapshot, audit log, lock.
//!
//! ```text
//! gallery/
//!   LOCK              exclusive lock: one process per gallery
//!   gallery.json      manifest: format version, config, key check (no biometric data)
//!   templates.log     encrypted append-only log of enrolments, deletions, consents (log.rs)
//!   index.snap        encrypted snapshot of the index, bound to the log (snapshot.rs)
//!   audit/            hash-chained audit log (crate::audit)
//!   rotate.new/       only during a key rotation: the re-keyed store, then COMMIT
//! ```
//! Every write is crash-safe: log appends are fsynced before they are
//! acknowledged, whole-file replacements go through tmp + fsync + rename +
//! directory fsync. Compaction writes a new log holding only live templates,
//! swaps it in and overwrites the old one with zeros before it is freed.

mod crypto;
mod log;
mod ops;
pub(crate) mod recover;
pub mod repair;
pub(crate) mod snapshot;

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub(crate) use self::crypto::{ct_eq, Cipher};
pub use self::crypto::{MasterKey, KEY_ENV};
pub use self::log::TornTail;
pub(crate) use self::log::{good_prefix, peek, LogWriter};
pub(crate) use self::ops::{
    encode_enrolments, encode_import, enrolments_frame, f32s_from_le, import_consents, import_frame, visit_enrolments, MetaRef, Op,
    OPS_PER_FRAME,
};
pub use self::recover::RotationRecovery;
use crate::compliance::{Purpose, SubjectId};
use crate::config::GalleryConfig;
use crate::fs::Dir;
use crate::{Error, Result};

/// Version of the gallery format this build writes (and the newest it reads).
///
/// 2: the manifest is authenticated (HMAC under a key derived from the
/// master key) and carries the gallery's id, a generation number and what
/// the rest of the gallery must at least hold ([`Bound`]). A version-1
/// gallery is upgraded on open, with an audit record and a notice.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_NAME: &str = "facematch-gallery";
pub(crate) const MANIFEST: &str = "gallery.json";
pub(crate) const LOG: &str = "templates.log";
pub(crate) const SNAPSHOT: &str = "index.snap";
pub(crate) const AUDIT_DIR: &str = "audit";
/// Where compaction writes the new log before it is renamed over [`LOG`].
pub(crate) const LOG_NEW: &str = "templates.log.new";
/// Where a snapshot is written before it is renamed over [`SNAPSHOT`].
pub(crate) const SNAPSHOT_TMP: &str = "index.snap.tmp";
const LOCK: &str = "LOCK";
const KEY_CHECK_PLAINTEXT: &[u8] = b"facematch key check v1";

/// The manifest: what the gallery is, in plain JSON (no biometric data).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "facematch-gallery".
    pub format: String,
    /// On-disk format version.
    pub version: u32,
    /// Creation time (unix ms).
    pub created_ms: i64,
    /// Sealed known text: proves the key before anything is read.
    pub key_check: String,
    /// The gallery's configuration.
    pub config: GalleryConfig,
    /// When the filing notice was raised (unix ms), once.
    #[serde(default)]
    pub filing_notice_ms: Option<i64>,
    /// Random id of this gallery (format 2).
    #[serde(default)]
    pub gallery_id: Option<String>,
    /// Incremented at every change of the gallery (format 2).
    #[serde(default)]
    pub generation: u64,
    /// What the template log and the audit log must at least hold (format 2).
    #[serde(default)]
    pub bound: Option<Bound>,
    /// HMAC-SHA256 of everything above under a key derived from the master
    /// key (format 2): a manifest edited outside facematch is refused.
    #[serde(default)]
    pub mac: Option<String>,
}

/// What the manifest proves about the other files of the gallery, as of its
/// last change: a template log or audit log older than this (a restored
/// backup, a deleted or rolled-back audit directory, another gallery's file)
/// is refused on open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    /// File id of the template log (hex).
    pub log_id: String,
    /// Frames the template log held (it may hold more: a crash after an append).
    pub log_frames: u64,
    /// A compaction's new log, written but perhaps not yet renamed in: (file id, frames).
    #[serde(default)]
    pub pending_log: Option<(String, u64)>,
    /// Audit records durable at the change.
    pub audit_records: u64,
    /// Hash of the last of them (hex; empty when there are none).
    pub audit_hash: String,
}

/// Metadata of one enrolled template (no biometric data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Template id (unique in the gallery).
    pub template: u64,
    /// Whose template.
    pub subject: SubjectId,
    /// Purposes it was enrolled for.
    pub purposes: Vec<Purpose>,
    /// Enrolment time (unix ms).
    pub enrolled_at_ms: i64,
    /// Expiry (unix ms) when it was enrolled: the end of its longest purpose
    /// retention (each purpose stops matching at its own; open recomputes
    /// both from the current configuration).
    pub expires_at_ms: i64,
    /// The consent it rests on.
    pub consent_id: String,
    /// The embedding model that made it.
    pub model_id: String,
}

/// The exclusive lock on a gallery directory (released on drop).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Dir) -> Result<Self> {
        Ok(DirLock { _file: dir.lock(LOCK)? })
    }
}

/// Largest manifest accepted (it holds configuration, not data).
const MAX_MANIFEST: u64 = 1 << 20;

/// Read and check a manifest (format, version), without the key.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    read_manifest_in(&Dir::open(dir)?)
}

/// [`read_manifest`] through an open directory.
pub(crate) fn read_manifest_in(dir: &Dir) -> Result<Manifest> {
    let p = dir.join(MANIFEST);
    let Some(bytes) = dir.read_bounded(MANIFEST, MAX_MANIFEST)? else {
        return Err(Error::IncompatibleStore { path: dir.path().into(), reason: "no gallery here (gallery.json missing)".into() });
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::IncompatibleStore { path: p.clone(), reason: format!("not a facematch manifest: {e}") })?;
    if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(Error::IncompatibleStore { path: p, reason: "not a facematch gallery manifest".into() });
    }
    let version = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0);
    if version > FORMAT_VERSION as u64 {
        return Err(Error::IncompatibleStore {
            path: p,
            reason: format!("written by a newer facematch (format {version}, this build reads up to {FORMAT_VERSION})"),
        });
    }
    serde_json::from_value(v).map_err(|e| Error::DataCorruption { path: p, reason: format!("manifest: {e}") })
}

/// Seal (format 2, MAC under `key`) and write the manifest atomically.
pub(crate) fn write_manifest(dir: &Dir, m: &mut Manifest, key: &MasterKey) -> Result<()> {
    m.version = FORMAT_VERSION;
    m.mac = Some(manifest_mac(m, key)?);
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| Error::config("manifest", e.to_string()))?;
    dir.write_atomic(MANIFEST, &bytes, true)
}

/// The MAC of a manifest: HMAC-SHA256 of its JSON without the `mac` field.
fn manifest_mac(m: &Manifest, key: &MasterKey) -> Result<String> {
    let mut body = m.clone();
    body.mac = None;
    let bytes = serde_json::to_vec(&body).map_err(|e| Error::config("manifest", e.to_string()))?;
    Ok(key.mac_hex(b"facematch/manifest-mac/v2", &bytes))
}

/// Check a format-2 manifest's MAC (the key has been checked already).
/// Returns false for a format-1 manifest (not authenticated: to be upgraded).
pub(crate) fn verify_manifest(dir: &Dir, m: &Manifest, key: &MasterKey) -> Result<bool> {
    if m.version < 2 {
        return Ok(false);
    }
    let want = manifest_mac(m, key)?;
    let ok = m.mac.as_deref().is_some_and(|got| crypto::ct_eq(got.as_bytes(), want.as_bytes()));
    if !ok || m.gallery_id.is_none() || m.bound.is_none() {
        return Err(Error::DataCorruption {
            path: dir.join(MANIFEST),
            reason: "gallery.json was changed outside facematch (its MAC does not verify); configuration changes go through facematch (threshold, calibrate --apply); restore the file or the gallery from a backup".into(),
        });
    }
    Ok(true)
}

/// Make a new manifest for `config` sealed with `key`.
pub(crate) fn new_manifest(config: GalleryConfig, key: &MasterKey, now_ms: i64) -> Manifest {
    Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        created_ms: now_ms,
        key_check: hex::encode(key.store_cipher().seal(b"key-check", KEY_CHECK_PLAINTEXT)),
        config,
        filing_notice_ms: None,
        gallery_id: Some(new_gallery_id()),
        generation: 0,
        bound: None,
        mac: None,
    }
}

/// A fresh random gallery id (hex).
pub(crate) fn new_gallery_id() -> String {
    use rand::RngCore;
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    hex::encode(id)
}

/// Check that `key` opens this gallery.
pub(crate) fn check_key(dir: &Dir, m: &Manifest, key: &MasterKey) -> Result<()> {
    let sealed =
        hex::decode(&m.key_check).map_err(|_| Error::DataCorruption { path: dir.join(MANIFEST), reason: "bad key_check".into() })?;
    match key.store_cipher().open(b"key-check", &sealed) {
        Some(p) if &p[..] == KEY_CHECK_PLAINTEXT => Ok(()),
        _ => Err(Error::Key(format!("the key (fingerprint {}) does not open the gallery at {}", key.fingerprint(), dir.path().display()))),
    }
}

/// Test support (the `failpoints` feature only: it decrypts every template).
/// Decrypt every frame and snapshot chunk in a gallery directory and return
/// all the plaintext, concatenated, plus every raw file's bytes. For
/// forensic checks ("are the erased template's bytes anywhere?") and tests.
#[cfg(feature = "failpoints")]
pub fn forensic_dump(dir: &Path, key: &MasterKey) -> Result<(Vec<u8>, Vec<u8>)> {
    let cipher = key.store_cipher();
    let mut plain = Vec::new();
    let mut raw = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let e = e.map_err(|e| Error::io(&d, e))?;
            let p = e.path();
            let ft = e.file_type().map_err(|err| Error::io(&p, err))?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                raw.extend_from_slice(&std::fs::read(&p).map_err(|e| Error::io(&p, e))?);
            }
        }
    }
    let gdir = Dir::open(dir)?;
    if gdir.exists(LOG)? {
        // Opening a log never changes it.
        LogWriter::open(&gdir, LOG, cipher.clone(), |_, b| {
            plain.extend_from_slice(b);
            Ok(())
        })?;
    }
    let snap = dir.join(SNAPSHOT);
    if let Some(h) = snapshot::read_header(&gdir, SNAPSHOT)? {
        let _ = snapshot::read(&gdir, SNAPSHOT, &cipher, &h, |r| {
            r.read_to_end(&mut plain).map_err(|e| Error::io(&snap, e))?;
            Ok(())
        });
    }
    Ok((plain, raw))
}

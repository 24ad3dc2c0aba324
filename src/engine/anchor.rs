//! Anchors: a small signed checkpoint of a gallery, kept off the machine, that
//! a later open or `audit verify` checks the gallery against.
//!
//! Everything inside a gallery directory can be restored together from an
//! older copy (a whole-directory rollback): then the manifest, the template
//! log and the audit log agree with each other, and nothing inside can tell.
//! An anchor written earlier and kept elsewhere can: it names the gallery,
//! its generation and its audit head, and a gallery older than that (or
//! another gallery, or a rewritten audit chain) is refused.

use serde::{Deserialize, Serialize};

use super::*;

const ANCHOR_FORMAT: &str = "facematch-anchor";

/// A signed checkpoint of a gallery (no biometric data): HMAC-SHA256 under a
/// key derived from the master key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// Always "facematch-anchor".
    pub format: String,
    /// The gallery's id.
    pub gallery_id: String,
    /// The manifest's generation when the anchor was made.
    pub generation: u64,
    /// Audit records durable then.
    pub audit_records: u64,
    /// Hash of the last of them.
    pub audit_hash: String,
    /// When it was made (unix ms).
    pub created_ms: i64,
    /// HMAC of the fields above.
    pub mac: String,
}

fn anchor_mac(a: &Anchor, key: &MasterKey) -> Result<String> {
    let mut body = a.clone();
    body.mac = String::new();
    let bytes = serde_json::to_vec(&body).map_err(|e| Error::config("anchor", e.to_string()))?;
    Ok(key.mac_hex(b"facematch/anchor/v1", &bytes))
}

impl Anchor {
    /// Parse an anchor and check its signature under `key`.
    pub fn from_json(text: &str, key: &MasterKey) -> Result<Anchor> {
        let a: Anchor = serde_json::from_str(text).map_err(|e| Error::config("anchor", format!("not a facematch anchor: {e}")))?;
        if a.format != ANCHOR_FORMAT {
            return Err(Error::config("anchor", "not a facematch anchor"));
        }
        if !crate::store::ct_eq(anchor_mac(&a, key)?.as_bytes(), a.mac.as_bytes()) {
            return Err(Error::Key("the anchor's signature does not verify under this key (edited, or made with another key)".into()));
        }
        Ok(a)
    }

    /// Why a gallery with manifest `m` is not this anchor's gallery at this
    /// anchor's generation or later, if it is not.
    fn older_or_other(&self, m: &Manifest) -> Option<String> {
        if m.gallery_id.as_deref() != Some(self.gallery_id.as_str()) {
            return Some("this is not the gallery the anchor names".into());
        }
        (m.generation < self.generation).then(|| {
            format!(
                "the gallery is at generation {}, older than the anchor's {} (made at unix ms {}): the directory was rolled back",
                m.generation, self.generation, self.created_ms
            )
        })
    }

    /// The anchor as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Engine {
    /// A signed checkpoint of the gallery as it is now, to keep off the
    /// machine (see the module docs). Making one is audited.
    pub fn anchor(&self, operator: &Operator) -> Result<Anchor> {
        self.record_admin(operator, "anchor", "an anchor of the gallery was made")?;
        let m = self.manifest.read();
        let b = m.bound.clone().ok_or_else(|| Error::config("anchor", "the gallery is not bound (format 1)"))?;
        let mut a = Anchor {
            format: ANCHOR_FORMAT.into(),
            gallery_id: m.gallery_id.clone().unwrap_or_default(),
            generation: m.generation,
            audit_records: b.audit_records,
            audit_hash: b.audit_hash,
            created_ms: self.clock.now_unix_ms(),
            mac: String::new(),
        };
        a.mac = anchor_mac(&a, &self.key.read())?;
        Ok(a)
    }

    /// Refuse a gallery older than `a`, another gallery, or an audit chain
    /// that does not continue the one `a` names.
    pub fn check_anchor(&self, a: &Anchor) -> Result<()> {
        if let Some(reason) = a.older_or_other(&self.manifest.read()) {
            return Err(Error::DataCorruption { path: self.dir.join(store::MANIFEST), reason });
        }
        let held = self.audit.read().as_ref().map(|l| l.records()).unwrap_or(0);
        if let Some((seq, reason)) = super::bind::audit_shortfall(&self.audit_dir(), held, a.audit_records, &a.audit_hash, "the anchor")? {
            return Err(Error::AuditTampered { seq, reason });
        }
        Ok(())
    }
}

/// What `audit verify` found for a whole gallery: the audit chain itself, and
/// whether it holds what the gallery's manifest (and an anchor, if given) prove.
#[derive(Clone, Debug, Serialize)]
pub struct AuditVerification {
    /// The chain: every record, hash and MAC.
    #[serde(flatten)]
    pub chain: crate::audit::VerifyReport,
    /// Records the manifest proves were written (format 2).
    pub proven_records: Option<u64>,
    /// Everything wrong beyond the chain (empty when all holds).
    pub problems: Vec<String>,
}

impl AuditVerification {
    /// The chain verifies and holds what the manifest and the anchor prove.
    pub fn ok(&self) -> bool {
        self.chain.ok() && self.problems.is_empty()
    }
}

/// Verify a gallery's audit log as a whole, read-only: the chain
/// ([`AuditLog::verify`]), and that it is at least as long as the
/// authenticated manifest proves, with the hash the manifest names (a deleted,
/// rolled-back or foreign audit log is a problem, not a clean empty log), and
/// not older than `anchor`.
pub fn verify_audit(dir: &Path, key: &MasterKey, anchor: Option<&Anchor>) -> Result<AuditVerification> {
    let gdir = Dir::open(dir)?;
    if gdir.subdir(store::recover::ROTATION_DIR).ok().flatten().is_some() {
        return Err(Error::config(
            "audit verify",
            "a key rotation was interrupted by a crash: open the gallery once (any command) to finish or roll it back, then verify",
        ));
    }
    let manifest = store::recover::effective_manifest(&gdir)?;
    store::check_key(&gdir, &manifest, key)?;
    let authenticated = store::verify_manifest(&gdir, &manifest, key)?;
    let adir = dir.join(store::AUDIT_DIR);
    let chain = if adir.exists() {
        AuditLog::verify(&adir, &AuditKey::from_bytes(key.audit_key_bytes()))?
    } else {
        crate::audit::VerifyReport::default()
    };
    let mut problems = Vec::new();
    let shortfall = |what: &str, records: u64, hash: &str| super::bind::audit_shortfall(&adir, chain.records, records, hash, what);
    let proven = manifest.bound.as_ref().filter(|_| authenticated).map(|b| b.audit_records);
    if let (Some(b), true) = (&manifest.bound, authenticated) {
        problems.extend(shortfall("the manifest", b.audit_records, &b.audit_hash)?.map(|(_, r)| r));
    }
    if let Some(a) = anchor {
        problems.extend(a.older_or_other(&manifest));
        problems.extend(shortfall("the anchor", a.audit_records, &a.audit_hash)?.map(|(_, r)| r));
    }
    Ok(AuditVerification { chain, proven_records: proven, problems })
}

//! Anchors: a small signed checkpoint of a gallery, kept off the machine, that
//! a later open or `audit verify` checks the gallery against.
//!
//! Everything inside a gallery directory can be restored together from an
//! older copy (a whole-directory rollback): then the manifest, the template
//! log and the audit log agree with each other, and nothing inside can tell.
//! An anchor written earlier and kept elsewhere can: it names the gallery,
//! its generation and its audit head, and a gallery older than that (or
//! another gallery, or a rewritten audit chain) is refused.

use hmac::{Hmac, Mac};
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
    let k = key.derive(b"facematch/anchor/v1");
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&k[..]).map_err(|e| Error::Key(e.to_string()))?;
    mac.update(&bytes);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

impl Anchor {
    /// Parse an anchor and check its signature under `key`.
    pub fn from_json(text: &str, key: &MasterKey) -> Result<Anchor> {
        let a: Anchor = serde_json::from_str(text).map_err(|e| Error::config("anchor", format!("not a facematch anchor: {e}")))?;
        if a.format != ANCHOR_FORMAT {
            return Err(Error::config("anchor", "not a facematch anchor"));
        }
        if anchor_mac(&a, key)? != a.mac {
            return Err(Error::Key("the anchor's signature does not verify under this key (edited, or made with another key)".into()));
        }
        Ok(a)
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
        let m = self.manifest.read();
        let stale = |reason: String| Error::DataCorruption { path: self.dir.join(store::MANIFEST), reason };
        if m.gallery_id.as_deref() != Some(a.gallery_id.as_str()) {
            return Err(stale("this is not the gallery the anchor names".into()));
        }
        if m.generation < a.generation {
            return Err(stale(format!(
                "the gallery is at generation {}, older than the anchor's {} (made at unix ms {}): the directory was rolled back",
                m.generation, a.generation, a.created_ms
            )));
        }
        drop(m);
        let records = self.audit.read().as_ref().map(|l| l.records()).unwrap_or(0);
        if records < a.audit_records {
            return Err(Error::AuditTampered {
                seq: records,
                reason: format!("the audit log holds {records} records, the anchor proves {}", a.audit_records),
            });
        }
        if a.audit_records > 0 {
            if let Some(h) = AuditLog::record_hash(&self.audit_dir(), a.audit_records - 1)? {
                if h != a.audit_hash {
                    return Err(Error::AuditTampered {
                        seq: a.audit_records - 1,
                        reason: "the audit chain does not continue the one the anchor names".into(),
                    });
                }
            }
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
    let check = |problems: &mut Vec<String>, what: &str, records: u64, hash: &str| -> Result<()> {
        if chain.records < records {
            problems.push(format!("the audit log holds {} records, {what} proves {records}: deleted, cut or rolled back", chain.records));
        } else if records > 0 {
            if let Some(h) = AuditLog::record_hash(&adir, records - 1)? {
                if h != hash {
                    problems
                        .push(format!("record {} differs from the one {what} names: not this gallery's chain, or rewritten", records - 1));
                }
            }
        }
        Ok(())
    };
    let proven = manifest.bound.as_ref().filter(|_| authenticated).map(|b| b.audit_records);
    if let (Some(b), true) = (&manifest.bound, authenticated) {
        check(&mut problems, "the manifest", b.audit_records, &b.audit_hash)?;
    }
    if let Some(a) = anchor {
        if manifest.gallery_id.as_deref() != Some(a.gallery_id.as_str()) {
            problems.push("this is not the gallery the anchor names".into());
        } else if manifest.generation < a.generation {
            problems.push(format!(
                "the gallery is at generation {}, older than the anchor's {}: rolled back",
                manifest.generation, a.generation
            ));
        }
        check(&mut problems, "the anchor", a.audit_records, &a.audit_hash)?;
    }
    Ok(AuditVerification { chain, proven_records: proven, problems })
}

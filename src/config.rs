//! Gallery configuration: one serde struct with defaults, validated once.
//!
//! It is stored in the gallery's manifest, so a gallery always carries the
//! purposes, thresholds and retention it was created with; threshold changes
//! go through [`crate::engine::Engine::set_threshold`] and are audited.
//!
//! ```
//! use facematch::config::GalleryConfig;
//! use facematch::compliance::{Purpose, PurposePolicy};
//! let mut cfg = GalleryConfig::default();
//! cfg.purposes.push(PurposePolicy::new(Purpose::new("door-access").unwrap(), 365));
//! cfg.validate().unwrap();
//! let json = serde_json::to_string(&cfg).unwrap();
//! let back: GalleryConfig = serde_json::from_str(&json).unwrap();
//! assert_eq!(back.purposes.len(), 1);
//! ```

use serde::{Deserialize, Serialize};

use crate::audit::AuditConfig;
use crate::compliance::{Purpose, PurposePolicy, FILING_THRESHOLD};
use crate::index::IndexConfig;
use crate::{Error, Result};

/// Most purposes a gallery can declare (purposes are a bit set per template).
pub const MAX_PURPOSES: usize = 64;

/// Everything that shapes a gallery.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GalleryConfig {
    /// Embedding dimension (128 for SFace).
    pub dim: usize,
    /// Id of the embedding model; probes from another model are refused.
    pub model_id: String,
    /// The purposes this gallery serves, with their retention and thresholds.
    pub purposes: Vec<PurposePolicy>,
    /// Index parameters.
    pub index: IndexConfig,
    /// Audit log parameters.
    pub audit: AuditConfig,
    /// People count at which the filing notice is raised (the law: 100,000).
    pub filing_threshold: u64,
    /// Compact automatically when this share of slots is deleted.
    pub compact_deleted_fraction: f32,
    /// Largest `k` a 1:N query may ask for.
    pub max_k: usize,
    /// Enrolling from an image with several faces takes the largest only if
    /// its area is at least this many times the next one's; otherwise the
    /// face must be chosen (`probe::enrol_image_face`).
    pub enrol_face_dominance: f32,
}

impl Default for GalleryConfig {
    fn default() -> Self {
        GalleryConfig {
            dim: 128,
            model_id: "sface-2021dec".into(),
            purposes: Vec::new(),
            index: IndexConfig::default(),
            audit: AuditConfig::default(),
            filing_threshold: FILING_THRESHOLD,
            compact_deleted_fraction: 0.2,
            max_k: 100,
            enrol_face_dominance: 2.0,
        }
    }
}

impl GalleryConfig {
    /// Check every field; called by the engine before anything is created or opened.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.dim > 4096 {
            return Err(Error::config("dim", format!("{} is not in 1..=4096", self.dim)));
        }
        if self.model_id.trim().is_empty() {
            return Err(Error::config("model_id", "must not be empty"));
        }
        if self.purposes.is_empty() {
            return Err(Error::config("purposes", "a gallery must declare at least one purpose"));
        }
        if self.purposes.len() > MAX_PURPOSES {
            return Err(Error::config("purposes", format!("at most {MAX_PURPOSES} purposes")));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.purposes {
            p.validate()?;
            if !seen.insert(p.name.clone()) {
                return Err(Error::config("purposes", format!("purpose {} declared twice", p.name)));
            }
        }
        if self.filing_threshold == 0 || self.filing_threshold > FILING_THRESHOLD {
            return Err(Error::config("filing_threshold", format!("must be in 1..={FILING_THRESHOLD} (the law's count)")));
        }
        if !(0.01..=0.9).contains(&self.compact_deleted_fraction) {
            return Err(Error::config("compact_deleted_fraction", "must be in 0.01..=0.9"));
        }
        if self.max_k == 0 || self.max_k > 10_000 {
            return Err(Error::config("max_k", "must be in 1..=10000"));
        }
        if !(1.0..=100.0).contains(&self.enrol_face_dominance) {
            return Err(Error::config("enrol_face_dominance", "must be in 1..=100"));
        }
        self.index.validate()?;
        self.audit.validate()?;
        Ok(())
    }

    /// The policy of a declared purpose.
    pub fn purpose(&self, p: &Purpose) -> Option<&PurposePolicy> {
        self.purposes.iter().find(|x| &x.name == p)
    }

    /// Index (bit position) of a declared purpose.
    pub fn purpose_bit(&self, p: &Purpose) -> Option<u32> {
        self.purposes.iter().position(|x| &x.name == p).map(|i| i as u32)
    }

    /// The declared purposes.
    pub fn purpose_names(&self) -> Vec<Purpose> {
        self.purposes.iter().map(|p| p.name.clone()).collect()
    }
}

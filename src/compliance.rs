//! The rules of the Measures as types: purposes, consent, age brackets,
//! thresholds, decisions and the 100,000-person filing duty.
//!
//! Nothing here is a loose string or float: a [`Purpose`] is validated once,
//! a [`Threshold`] is a checked cosine, a [`ConsentRecord`] refuses a minor
//! without a guardian, and a [`Decision`] makes "no match" a normal result.
//!
//! ```
//! use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord, Purpose};
//! let p = Purpose::new("door-access").unwrap();
//! let mut c = ConsentRecord::new("c-1", "alice", ConsentBasis::SeparateConsent, vec![p], "clerk-7", AgeBracket::Under14);
//! assert!(c.check_guardian().is_err()); // a child needs a guardian's consent
//! c.guardian = Some(facematch::compliance::GuardianConsent { guardian: "parent of alice".into(), relationship: "mother".into() });
//! assert!(c.check_guardian().is_ok());
//! ```

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// People count at which the operator must file with the provincial cyberspace office.
pub const FILING_THRESHOLD: u64 = 100_000;

/// Minimum audit retention the engine accepts: three years, in days.
pub const MIN_AUDIT_RETENTION_DAYS: u32 = 1095;

fn check_name(kind: &'static str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() || s.len() > max {
        return Err(Error::config(kind, format!("must be 1..={max} bytes, got {}", s.len())));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':')) {
        return Err(Error::config(kind, format!("{s:?}: only ASCII letters, digits and - _ . @ : are allowed")));
    }
    Ok(())
}

/// A declared processing purpose (e.g. `door-access`), validated: lowercase
/// ASCII letters, digits and `-`, 1..=64 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Purpose(String);

impl Purpose {
    /// Validate and wrap a purpose name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(Error::PolicyViolation {
                rule: "specific-purpose",
                reason: format!("{name:?} is not a valid purpose name (lowercase letters, digits, '-', 1-64 bytes)"),
            });
        }
        Ok(Purpose(name))
    }
}

/// String newtypes that validate on construction and (de)serialise as plain strings.
macro_rules! string_id {
    ($t:ident) => {
        impl TryFrom<String> for $t {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                $t::new(s)
            }
        }
        impl From<$t> for String {
            fn from(p: $t) -> String {
                p.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl $t {
            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        // Hashes and compares as its string: maps keyed by it are looked up by `&str`.
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}
string_id!(Purpose);
string_id!(SubjectId);
string_id!(Operator);

/// A person's identifier in the gallery (never their name in clear, by convention).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubjectId(String);

impl SubjectId {
    /// Validate and wrap a subject id (ASCII letters, digits, `-_.@:`, 1..=128 bytes).
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        check_name("subject", &id, 128)?;
        Ok(SubjectId(id))
    }

    /// A subject id the gallery validated when it first stored it.
    pub(crate) fn from_trusted(id: &str) -> Self {
        SubjectId(id.to_string())
    }
}

/// Who performs an operation (an operator account, a service identity).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Operator(String);

impl Operator {
    /// The engine itself, for what it does on its own (purge on open).
    pub fn system() -> Self {
        Operator("facematch-system".into())
    }

    /// Validate and wrap an operator id.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        check_name("operator", &id, 128)?;
        Ok(Operator(id))
    }
}

/// A cosine-similarity threshold in [-1, 1], with the version of the
/// configuration it came from (every change bumps the version and is audited).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    value: f32,
    version: u32,
}

impl Threshold {
    /// A checked threshold.
    pub fn new(value: f32, version: u32) -> Result<Self> {
        if !value.is_finite() || !(-1.0..=1.0).contains(&value) {
            return Err(Error::config("threshold", format!("{value} is not a cosine in [-1, 1]")));
        }
        Ok(Threshold { value, version })
    }
    /// The cosine value: a score `>=` it is a match.
    pub fn value(&self) -> f32 {
        self.value
    }
    /// The configuration version this threshold belongs to.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Whether `score` passes.
    pub fn accepts(&self, score: f32) -> bool {
        score >= self.value
    }
}

/// 1:1 verification or 1:N identification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Is this probe the claimed subject?
    Verify,
    /// Who among the enrolled is this probe?
    Identify,
}

impl Mode {
    /// "verify" / "identify".
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Verify => "verify",
            Mode::Identify => "identify",
        }
    }
}

/// The outcome of a query. "No match" is a normal result, not an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// The best candidate passed the threshold.
    Match {
        /// Matched subject.
        subject: SubjectId,
        /// Matched template.
        template: u64,
        /// Its cosine score.
        score: f32,
    },
    /// Nobody passed the threshold.
    NoMatch {
        /// The best score seen, if any candidate was compared.
        best_score: Option<f32>,
    },
    /// The purpose is "assist only": a person must decide; the candidate is a suggestion.
    NeedsHumanReview {
        /// Suggested subject.
        subject: SubjectId,
        /// Suggested template.
        template: u64,
        /// Its cosine score.
        score: f32,
    },
}

impl Decision {
    /// "match" / "no_match" / "needs_human_review".
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Match { .. } => "match",
            Decision::NoMatch { .. } => "no_match",
            Decision::NeedsHumanReview { .. } => "needs_human_review",
        }
    }
    /// True only for [`Decision::Match`].
    pub fn is_match(&self) -> bool {
        matches!(self, Decision::Match { .. })
    }
}

/// Per-purpose policy: retention, thresholds, assist-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposePolicy {
    /// The purpose.
    pub name: Purpose,
    /// Templates enrolled for this purpose expire this many days after enrolment.
    pub retention_days: u32,
    /// 1:1 verification threshold (cosine). OpenCV's published same-person threshold for SFace is 0.363.
    pub verify_threshold: f32,
    /// 1:N identification threshold (cosine): must be higher than the 1:1 one and grow with the gallery.
    pub identify_threshold: f32,
    /// Decisions only assist a human (social assistance, real estate...): a would-be match becomes `NeedsHumanReview`.
    #[serde(default)]
    pub assist_only: bool,
    /// Version of the thresholds; bumped on every change.
    #[serde(default = "one")]
    pub threshold_version: u32,
}

fn one() -> u32 {
    1
}

impl PurposePolicy {
    /// A policy with SFace-calibrated defaults (verify 0.363, identify 0.50) and the given retention.
    pub fn new(name: Purpose, retention_days: u32) -> Self {
        PurposePolicy { name, retention_days, verify_threshold: 0.363, identify_threshold: 0.50, assist_only: false, threshold_version: 1 }
    }
    /// Check ranges.
    pub fn validate(&self) -> Result<()> {
        if self.retention_days == 0 {
            return Err(Error::config(format!("purposes.{}.retention_days", self.name), "must be > 0"));
        }
        Threshold::new(self.verify_threshold, self.threshold_version)?;
        Threshold::new(self.identify_threshold, self.threshold_version)?;
        Ok(())
    }
    /// The threshold for a mode.
    pub fn threshold(&self, mode: Mode) -> Threshold {
        let v = match mode {
            Mode::Verify => self.verify_threshold,
            Mode::Identify => self.identify_threshold,
        };
        // validated at construction of the engine; clamp defensively
        Threshold { value: v.clamp(-1.0, 1.0), version: self.threshold_version }
    }
}

/// The legal ground for processing a person's face information.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", content = "detail", rename_all = "snake_case")]
pub enum ConsentBasis {
    /// Separate, informed, voluntary consent.
    SeparateConsent,
    /// Written consent (where the law asks for it).
    WrittenConsent,
    /// Another legal basis, named by the operator (e.g. the statute).
    LegalBasis(String),
}

impl ConsentBasis {
    /// Short label for audit records.
    pub fn label(&self) -> String {
        match self {
            ConsentBasis::SeparateConsent => "separate_consent".into(),
            ConsentBasis::WrittenConsent => "written_consent".into(),
            ConsentBasis::LegalBasis(s) => format!("legal_basis:{s}"),
        }
    }
}

/// Age bracket of the person (not their age: the least data that serves).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgeBracket {
    /// Under 14: a parent's or guardian's consent is required.
    Under14,
    /// 14 to 17.
    Minor14To17,
    /// 18 or older.
    Adult,
}

impl AgeBracket {
    /// Label for audit records.
    pub fn label(&self) -> &'static str {
        match self {
            AgeBracket::Under14 => "under_14",
            AgeBracket::Minor14To17 => "14_to_17",
            AgeBracket::Adult => "adult",
        }
    }
}

/// A parent's or guardian's consent for a person under 14.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuardianConsent {
    /// Who the guardian is (an id or reference, as the operator records it).
    pub guardian: String,
    /// Relationship to the child.
    pub relationship: String,
}

/// A consent record: kept for the audit trail, never holds biometric data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRecord {
    /// Unique id of this consent (e.g. the form's number).
    pub consent_id: String,
    /// Whose consent.
    pub subject: SubjectId,
    /// On which basis.
    pub basis: ConsentBasis,
    /// For which purposes.
    pub purposes: Vec<Purpose>,
    /// When it was given (unix ms). Filled from the engine's clock when 0.
    pub given_at_ms: i64,
    /// Who collected it.
    pub collected_by: String,
    /// The person's age bracket.
    pub age_bracket: AgeBracket,
    /// Guardian consent (required under 14).
    pub guardian: Option<GuardianConsent>,
    /// When it was withdrawn (unix ms), if it was.
    #[serde(default)]
    pub withdrawn_at_ms: Option<i64>,
}

impl ConsentRecord {
    /// A consent record without guardian, given "now" (time filled at recording).
    pub fn new(
        consent_id: impl Into<String>,
        subject: &str,
        basis: ConsentBasis,
        purposes: Vec<Purpose>,
        collected_by: impl Into<String>,
        age_bracket: AgeBracket,
    ) -> Self {
        ConsentRecord {
            consent_id: consent_id.into(),
            subject: SubjectId(subject.to_string()),
            basis,
            purposes,
            given_at_ms: 0,
            collected_by: collected_by.into(),
            age_bracket,
            guardian: None,
            withdrawn_at_ms: None,
        }
    }

    /// Refuse a person under 14 without a guardian's consent.
    pub fn check_guardian(&self) -> Result<()> {
        if self.age_bracket == AgeBracket::Under14 {
            match &self.guardian {
                Some(g) if !g.guardian.trim().is_empty() => {}
                _ => {
                    return Err(Error::PolicyViolation {
                        rule: "guardian-consent-under-14",
                        reason: format!("subject {} is under 14 and no guardian consent is recorded", self.subject),
                    })
                }
            }
        }
        Ok(())
    }

    /// Full validation: ids, guardian, purposes present and declared.
    pub fn validate(&self, declared: &[Purpose]) -> Result<()> {
        SubjectId::new(self.subject.as_str())?;
        check_name("consent_id", &self.consent_id, 128)?;
        if self.collected_by.trim().is_empty() {
            return Err(Error::PolicyViolation { rule: "consent-record", reason: "collected_by is empty".into() });
        }
        if let ConsentBasis::LegalBasis(s) = &self.basis {
            if s.trim().is_empty() {
                return Err(Error::PolicyViolation { rule: "consent-record", reason: "legal basis must be named".into() });
            }
        }
        if self.purposes.is_empty() {
            return Err(Error::PolicyViolation { rule: "specific-purpose", reason: "consent names no purpose".into() });
        }
        for p in &self.purposes {
            if !declared.contains(p) {
                return Err(Error::PolicyViolation {
                    rule: "specific-purpose",
                    reason: format!("purpose {p} is not declared by this gallery"),
                });
            }
        }
        self.check_guardian()
    }

    /// Whether this consent covers `purpose` and is not withdrawn.
    pub fn covers(&self, purpose: &Purpose) -> bool {
        self.withdrawn_at_ms.is_none() && self.purposes.contains(purpose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purpose_names_are_checked() {
        assert!(Purpose::new("door-access").is_ok());
        assert!(Purpose::new("").is_err());
        assert!(Purpose::new("Door Access").is_err());
        assert!(serde_json::from_str::<Purpose>("\"x y\"").is_err());
    }

    #[test]
    fn thresholds_are_cosines() {
        assert!(Threshold::new(0.4, 1).is_ok());
        assert!(Threshold::new(f32::NAN, 1).is_err());
        assert!(Threshold::new(1.5, 1).is_err());
        assert!(Threshold::new(0.4, 1).unwrap().accepts(0.4));
    }

    #[test]
    fn consent_needs_declared_purposes() {
        let declared = vec![Purpose::new("a").unwrap()];
        let c = ConsentRecord::new("c1", "s1", ConsentBasis::SeparateConsent, vec![Purpose::new("b").unwrap()], "op", AgeBracket::Adult);
        assert!(c.validate(&declared).is_err());
        let c = ConsentRecord::new("c1", "s1", ConsentBasis::SeparateConsent, vec![Purpose::new("a").unwrap()], "op", AgeBracket::Adult);
        assert!(c.validate(&declared).is_ok());
    }
}

//! What an audit record says: events, records and filters.
//!
//! No type here has a field that could hold biometric data (embedding,
//! image, crop, score vector): a query is recorded by its purpose, mode,
//! model, threshold, decision and at most the single top score.

use serde::{Deserialize, Serialize};

/// 1:1 verification or 1:N identification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    /// 1:1 — is this the claimed person?
    Verify,
    /// 1:N — who is this, if anyone enrolled?
    Identify,
}

/// The decision reported to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Score at or above the threshold.
    Match,
    /// No candidate reached the threshold.
    NoMatch,
    /// The purpose requires a person to review the result.
    NeedsHumanReview,
}

/// One query (verification or identification), without any biometric data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueryAudit {
    /// Who ran the query.
    pub operator: String,
    /// The declared purpose.
    pub purpose: String,
    /// 1:1 or 1:N.
    pub mode: QueryMode,
    /// Embedding model id.
    pub model_id: String,
    /// Threshold applied.
    pub threshold: f32,
    /// Version of the threshold configuration applied.
    pub threshold_version: u32,
    /// Candidates asked for.
    pub k: u32,
    /// Faces detected in the probe image.
    pub faces_found: u32,
    /// Faces dropped at once because they were not the subject.
    pub faces_discarded: u32,
    /// The decision.
    pub decision: DecisionKind,
    /// The matched (or claimed) subject, if any.
    pub subject: Option<String>,
    /// The matched template, if any.
    pub template: Option<u64>,
    /// The best score, if any candidate was scored.
    pub top_score: Option<f32>,
    /// End-to-end latency in microseconds.
    pub latency_us: u64,
}

/// Everything the audit trail records.
///
/// Serialized as an internally tagged JSON object, e.g.
/// `{"kind":"deletion","operator":"bob","templates":[3],"reason":"request"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A verification or identification.
    Query(QueryAudit),
    /// A template was enrolled.
    Enrolment {
        /// Who enrolled it.
        operator: String,
        /// The person.
        subject: String,
        /// The new template id.
        template: u64,
        /// Purposes the template may be used for.
        purposes: Vec<String>,
        /// The consent record it rests on.
        consent_id: String,
    },
    /// A person's consent was recorded.
    ConsentRecorded {
        /// Who recorded it.
        operator: String,
        /// The person.
        subject: String,
        /// Consent record id.
        consent_id: String,
        /// Legal basis / how consent was given.
        basis: String,
        /// Purposes consented to.
        purposes: Vec<String>,
        /// Age bracket (e.g. "under14", "adult").
        age_bracket: String,
        /// Whether a parent or guardian consented.
        guardian: bool,
    },
    /// A person withdrew consent; their templates were erased.
    ConsentWithdrawn {
        /// Who processed it.
        operator: String,
        /// The person.
        subject: String,
        /// Templates erased as a result.
        templates_erased: Vec<u64>,
    },
    /// Templates deleted on request.
    Deletion {
        /// Who deleted them.
        operator: String,
        /// Template ids.
        templates: Vec<u64>,
        /// Why.
        reason: String,
    },
    /// Templates purged because their retention expired.
    Purge {
        /// Who (or which job) purged them.
        operator: String,
        /// Template ids.
        templates: Vec<u64>,
        /// Why.
        reason: String,
    },
    /// Gallery files were compacted (deleted bytes physically removed).
    Compaction {
        /// Who ran it.
        operator: String,
        /// Templates whose bytes were removed.
        templates_removed: u64,
        /// Size before.
        bytes_before: u64,
        /// Size after.
        bytes_after: u64,
    },
    /// A decision threshold changed.
    ThresholdChange {
        /// Who changed it.
        operator: String,
        /// For which purpose.
        purpose: String,
        /// "verify" or "identify".
        mode: String,
        /// Previous value, if any.
        old: Option<f32>,
        /// New value.
        new: f32,
        /// New configuration version.
        version: u32,
    },
    /// The gallery or audit key was rotated.
    KeyRotation {
        /// Who rotated it.
        operator: String,
    },
    /// Templates were exported (an explicit act).
    Export {
        /// Who exported.
        operator: String,
        /// How many templates.
        templates: u64,
        /// Where to.
        destination: String,
    },
    /// The count of distinct enrolled people reached the filing threshold.
    FilingNotice {
        /// Distinct subjects now enrolled.
        distinct_subjects: u64,
        /// The threshold (100,000 under the Measures).
        threshold: u64,
    },
    /// Open, close, configuration and other administrative acts.
    Admin {
        /// Who.
        operator: String,
        /// What (e.g. "open", "config").
        action: String,
        /// Free-form details (no biometric data).
        detail: String,
    },
}

/// The kind of an [`AuditEvent`], for filtering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum EventKind {
    Query,
    Enrolment,
    ConsentRecorded,
    ConsentWithdrawn,
    Deletion,
    Purge,
    Compaction,
    ThresholdChange,
    KeyRotation,
    Export,
    FilingNotice,
    Admin,
}

impl EventKind {
    /// Parse the snake_case name used in JSON (`"consent_recorded"`).
    pub fn parse(s: &str) -> Option<EventKind> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

impl AuditEvent {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self {
            AuditEvent::Query(_) => EventKind::Query,
            AuditEvent::Enrolment { .. } => EventKind::Enrolment,
            AuditEvent::ConsentRecorded { .. } => EventKind::ConsentRecorded,
            AuditEvent::ConsentWithdrawn { .. } => EventKind::ConsentWithdrawn,
            AuditEvent::Deletion { .. } => EventKind::Deletion,
            AuditEvent::Purge { .. } => EventKind::Purge,
            AuditEvent::Compaction { .. } => EventKind::Compaction,
            AuditEvent::ThresholdChange { .. } => EventKind::ThresholdChange,
            AuditEvent::KeyRotation { .. } => EventKind::KeyRotation,
            AuditEvent::Export { .. } => EventKind::Export,
            AuditEvent::FilingNotice { .. } => EventKind::FilingNotice,
            AuditEvent::Admin { .. } => EventKind::Admin,
        }
    }

    /// The operator who caused the event (`None` for automatic notices).
    pub fn operator(&self) -> Option<&str> {
        match self {
            AuditEvent::Query(q) => Some(&q.operator),
            AuditEvent::Enrolment { operator, .. }
            | AuditEvent::ConsentRecorded { operator, .. }
            | AuditEvent::ConsentWithdrawn { operator, .. }
            | AuditEvent::Deletion { operator, .. }
            | AuditEvent::Purge { operator, .. }
            | AuditEvent::Compaction { operator, .. }
            | AuditEvent::ThresholdChange { operator, .. }
            | AuditEvent::KeyRotation { operator }
            | AuditEvent::Export { operator, .. }
            | AuditEvent::Admin { operator, .. } => Some(operator),
            AuditEvent::FilingNotice { .. } => None,
        }
    }

    /// The person concerned, when the event names one.
    pub fn subject(&self) -> Option<&str> {
        match self {
            AuditEvent::Query(q) => q.subject.as_deref(),
            AuditEvent::Enrolment { subject, .. }
            | AuditEvent::ConsentRecorded { subject, .. }
            | AuditEvent::ConsentWithdrawn { subject, .. } => Some(subject),
            _ => None,
        }
    }

    /// Whether the event concerns `purpose` (queries and threshold changes
    /// name one purpose, enrolments and consents a list).
    pub fn has_purpose(&self, purpose: &str) -> bool {
        match self {
            AuditEvent::Query(q) => q.purpose == purpose,
            AuditEvent::ThresholdChange { purpose: p, .. } => p == purpose,
            AuditEvent::Enrolment { purposes, .. } | AuditEvent::ConsentRecorded { purposes, .. } => purposes.iter().any(|p| p == purpose),
            _ => false,
        }
    }

    /// Name of the first float field that is NaN or infinite (JSON cannot
    /// carry those, so such an event is refused rather than written unreadable).
    pub(crate) fn non_finite_field(&self) -> Option<&'static str> {
        match self {
            AuditEvent::Query(q) => {
                if !q.threshold.is_finite() {
                    Some("threshold")
                } else if q.top_score.is_some_and(|s| !s.is_finite()) {
                    Some("top_score")
                } else {
                    None
                }
            }
            AuditEvent::ThresholdChange { old, new, .. } => {
                if !new.is_finite() {
                    Some("new")
                } else if old.is_some_and(|s| !s.is_finite()) {
                    Some("old")
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// One record of the log as stored and exported (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// Unix time in milliseconds when the record was appended.
    pub time_ms: i64,
    /// Deployment site.
    pub site: String,
    /// Device id.
    pub device: String,
    /// What happened.
    pub event: AuditEvent,
    /// Hex SHA-256 of the previous record (genesis value for seq 0).
    pub prev: String,
    /// Hex SHA-256 of this record's canonical bytes (the line up to `prev`).
    pub hash: String,
}

/// Which records [`crate::audit::AuditLog::read`] and `export_jsonl` return.
/// Every set criterion must hold; the default matches everything.
///
/// ```
/// use facematch::audit::{AuditFilter, EventKind};
/// let f = AuditFilter { operator: Some("alice".into()), kinds: vec![EventKind::Query], ..Default::default() };
/// assert!(f.kinds.contains(&EventKind::Query));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditFilter {
    /// Records at or after this Unix ms.
    pub from_ms: Option<i64>,
    /// Records strictly before this Unix ms.
    pub until_ms: Option<i64>,
    /// Records at or after this seq.
    pub from_seq: Option<u64>,
    /// Records by this operator.
    pub operator: Option<String>,
    /// Records concerning this purpose.
    pub purpose: Option<String>,
    /// Records concerning this subject.
    pub subject: Option<String>,
    /// Records of these kinds (empty: all kinds).
    pub kinds: Vec<EventKind>,
}

impl AuditFilter {
    /// Whether `r` passes the filter.
    pub fn matches(&self, r: &AuditRecord) -> bool {
        if self.from_ms.is_some_and(|t| r.time_ms < t) {
            return false;
        }
        if self.until_ms.is_some_and(|t| r.time_ms >= t) {
            return false;
        }
        if self.from_seq.is_some_and(|s| r.seq < s) {
            return false;
        }
        if let Some(op) = &self.operator {
            if r.event.operator() != Some(op.as_str()) {
                return false;
            }
        }
        if let Some(p) = &self.purpose {
            if !r.event.has_purpose(p) {
                return false;
            }
        }
        if let Some(s) = &self.subject {
            if r.event.subject() != Some(s.as_str()) {
                return false;
            }
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&r.event.kind()) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> QueryAudit {
        QueryAudit {
            operator: "op".into(),
            purpose: "access".into(),
            mode: QueryMode::Identify,
            model_id: "sface".into(),
            threshold: 0.363,
            threshold_version: 2,
            k: 5,
            faces_found: 3,
            faces_discarded: 2,
            decision: DecisionKind::Match,
            subject: Some("s1".into()),
            template: Some(9),
            top_score: Some(0.71234),
            latency_us: 812,
        }
    }

    #[test]
    fn event_json_is_tagged_and_roundtrips() {
        let e = AuditEvent::Query(q());
        let j = serde_json::to_string(&e).unwrap();
        assert!(j.starts_with(r#"{"kind":"query","#), "{j}");
        let back: AuditEvent = serde_json::from_str(&j).unwrap();
        assert_eq!(back, e);
        let e = AuditEvent::KeyRotation { operator: "x".into() };
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(j, r#"{"kind":"key_rotation","operator":"x"}"#);
        assert_eq!(EventKind::parse("consent_withdrawn"), Some(EventKind::ConsentWithdrawn));
        assert_eq!(EventKind::parse("nope"), None);
    }

    #[test]
    fn f32_fields_roundtrip_through_json() {
        // Records are re-read from JSON; the floats must come back identical.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            let mut qa = q();
            qa.top_score = Some(f);
            let j = serde_json::to_string(&AuditEvent::Query(qa)).unwrap();
            let back: AuditEvent = serde_json::from_str(&j).unwrap();
            match back {
                AuditEvent::Query(b) => {
                    assert_eq!(b.top_score.map(f32::to_bits), Some(f.to_bits()))
                }
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn accessors_and_filter() {
        let e = AuditEvent::Query(q());
        assert_eq!(e.operator(), Some("op"));
        assert_eq!(e.subject(), Some("s1"));
        assert!(e.has_purpose("access"));
        assert!(!e.has_purpose("payment"));
        let r =
            AuditRecord { seq: 4, time_ms: 1000, site: "s".into(), device: "d".into(), event: e, prev: String::new(), hash: String::new() };
        assert!(AuditFilter::default().matches(&r));
        assert!(!AuditFilter { from_ms: Some(1001), ..Default::default() }.matches(&r));
        assert!(!AuditFilter { until_ms: Some(1000), ..Default::default() }.matches(&r));
        assert!(AuditFilter { until_ms: Some(1001), ..Default::default() }.matches(&r));
        assert!(!AuditFilter { kinds: vec![EventKind::Admin], ..Default::default() }.matches(&r));
        assert!(!AuditFilter { subject: Some("s2".into()), ..Default::default() }.matches(&r));
        assert!(AuditFilter { from_seq: Some(4), ..Default::default() }.matches(&r));
        let notice = AuditEvent::FilingNotice { distinct_subjects: 100_000, threshold: 100_000 };
        assert_eq!(notice.operator(), None);
        let mut bad = q();
        bad.top_score = Some(f32::NAN);
        assert_eq!(AuditEvent::Query(bad).non_finite_field(), Some("top_score"));
    }
}

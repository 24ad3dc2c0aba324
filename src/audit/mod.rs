//! TEMPORARY interface stand-in (replaced by the `audit` branch at merge).
#![allow(missing_docs, unused_variables)]
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use crate::{clock::Clock, Result};
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct AuditConfig { pub site: String, pub device: String, pub retention_days: u32, pub segment_max_records: u64, pub checkpoint_every: u64 }
impl AuditConfig { pub fn validate(&self) -> Result<()> { Ok(()) } }
pub struct AuditKey([u8; 32]);
impl AuditKey { pub fn from_bytes(b: [u8; 32]) -> Self { AuditKey(b) } }
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum QueryMode { Verify, Identify }
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum DecisionKind { Match, NoMatch, NeedsHumanReview }
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueryAudit { pub operator: String, pub purpose: String, pub mode: QueryMode, pub model_id: String, pub threshold: f32, pub threshold_version: u32, pub k: u32, pub faces_found: u32, pub faces_discarded: u32, pub decision: DecisionKind, pub subject: Option<String>, pub template: Option<u64>, pub top_score: Option<f32>, pub latency_us: u64 }
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AuditEvent {
  Query(QueryAudit),
  Enrolment { operator: String, subject: String, template: u64, purposes: Vec<String>, consent_id: String },
  ConsentRecorded { operator: String, subject: String, consent_id: String, basis: String, purposes: Vec<String>, age_bracket: String, guardian: bool },
  ConsentWithdrawn { operator: String, subject: String, templates_erased: Vec<u64> },
  Deletion { operator: String, templates: Vec<u64>, reason: String },
  Purge { operator: String, templates: Vec<u64>, reason: String },
  Compaction { operator: String, templates_removed: u64, bytes_before: u64, bytes_after: u64 },
  ThresholdChange { operator: String, purpose: String, mode: String, old: Option<f32>, new: f32, version: u32 },
  KeyRotation { operator: String },
  Export { operator: String, templates: u64, destination: String },
  FilingNotice { distinct_subjects: u64, threshold: u64 },
  Admin { operator: String, action: String, detail: String },
}
pub struct OpenReport { pub records: u64 }
pub struct AuditLog {}
impl AuditLog {
  pub fn open(dir: &Path, key: AuditKey, cfg: AuditConfig, clock: Arc<dyn Clock>) -> Result<(AuditLog, OpenReport)> { unimplemented!() }
  pub fn append(&self, event: AuditEvent) -> Result<u64> { unimplemented!() }
  pub fn rekey(dir: &Path, old: &AuditKey, new: &AuditKey) -> Result<()> { unimplemented!() }
  pub fn flush(&self) -> Result<()> { unimplemented!() }
}

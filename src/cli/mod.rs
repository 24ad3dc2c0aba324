//! Gallery, compliance and audit subcommands of the `facematch` binary.
//! Thin clients of the library's public API; `anyhow` lives only here.

pub mod batch;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use facematch::audit::{AuditFilter, AuditLog};
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::store::{MasterKey, KEY_ENV};

/// Options every gallery command takes.
#[derive(Args, Debug, Clone)]
pub struct GalleryOpts {
    /// Gallery directory.
    #[arg(long, short = 'g', value_name = "DIR")]
    pub gallery: PathBuf,
    /// Key file (64 hex digits or 32 raw bytes); otherwise the FACEMATCH_KEY environment variable (hex).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Operator identity recorded in the audit log (default: FACEMATCH_OPERATOR, then USER).
    #[arg(long)]
    pub operator: Option<String>,
    /// Refuse the gallery if it is older than this anchor (`audit anchor`), kept off the machine.
    #[arg(long, value_name = "FILE")]
    pub anchor: Option<PathBuf>,
}

impl GalleryOpts {
    fn key(&self) -> anyhow::Result<MasterKey> {
        Ok(match &self.key_file {
            Some(p) => MasterKey::from_file(p)?,
            None => match std::env::var_os(KEY_ENV) {
                None => bail!("no key: pass --key-file or set {KEY_ENV} (64 hex digits)"),
                Some(_) => MasterKey::from_env().with_context(|| format!("{KEY_ENV} is set but is not a key"))?,
            },
        })
    }
    fn operator(&self) -> anyhow::Result<Operator> {
        // Who acts is part of every audit record: never a made-up default.
        let name = self
            .operator
            .clone()
            .or_else(|| std::env::var("FACEMATCH_OPERATOR").ok())
            .or_else(|| std::env::var("USER").ok())
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("no operator: pass --operator or set FACEMATCH_OPERATOR"))?;
        Ok(Operator::new(name)?)
    }
    fn read_anchor(&self, key: &MasterKey) -> anyhow::Result<Option<facematch::engine::Anchor>> {
        match &self.anchor {
            None => Ok(None),
            Some(p) => Ok(Some(facematch::engine::Anchor::from_json(&read_text(p, 64 * 1024)?, key)?)),
        }
    }
    fn open(&self) -> anyhow::Result<Engine> {
        let key = self.key()?;
        let mut b = EngineBuilder::new(&self.gallery);
        if let Some(a) = self.read_anchor(&key)? {
            b = b.anchor(a);
        }
        let e = b.key(key).open().with_context(|| format!("opening gallery {}", self.gallery.display()))?;
        let r = e.open_report();
        match r.key_rotation_recovered {
            Some(true) => eprintln!("note: a key rotation interrupted after its commit was finished: the gallery is under the new key"),
            Some(false) => {
                eprintln!("note: a key rotation interrupted before its commit was rolled back: the gallery stays under the previous key")
            }
            None => {}
        }
        if let Some(v) = r.upgraded_from {
            eprintln!("note: the gallery was upgraded from format {v} to format 2 (authenticated manifest bound to the template and audit logs); recorded in the audit log");
        }
        for d in &r.reconciled {
            eprintln!("warning: reconciled on open (recorded in the audit log): {d}");
        }
        if let Some(t) = &r.torn_log_tail {
            eprintln!(
                "warning: {} bytes at the end of the template log (from byte {}) are the remains of a write a crash cut short; ignored, cut at the next write",
                t.bytes_dropped, t.at
            );
        }
        for l in &r.left_alone {
            eprintln!("warning: {l}");
        }
        for p in &r.modes_tightened {
            eprintln!("note: permissions of {} were looser than 0700/0600 and were tightened", p.display());
        }
        print_notices(&e);
        Ok(e)
    }
}

fn print_notices(e: &Engine) {
    for n in e.notices() {
        match n {
            facematch::engine::Notice::FilingRequired { people, threshold, at_ms } => eprintln!(
                "NOTICE: {people} people stored (threshold {threshold}, reached at unix ms {at_ms}): file with the provincial cyberspace office within 30 working days"
            ),
        }
    }
}

fn json_line(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Gallery subcommands.
#[derive(Subcommand, Debug)]
pub enum GalleryCommand {
    /// Write a new random master key to a file (mode 0600).
    Keygen {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a gallery.
    Init(InitArgs),
    /// Record a person's consent (required before enrolment).
    Consent(ConsentArgs),
    /// Enrol the main face of images (other faces are never embedded; images are not stored).
    Enrol(EnrolArgs),
    /// Import precomputed embeddings (.npy float32 N x D) with a manifest of subject ids, one per row.
    Import(ImportArgs),
    /// Search precomputed embeddings: one JSON line per query.
    Search(SearchArgs),
    /// 1:1: verify the main face of an image against a subject.
    Verify(VerifyArgs),
    /// 1:N: identify the faces of images (faces that match nobody are discarded).
    Identify(IdentifyArgs),
    /// Delete templates by id.
    Delete(DeleteArgs),
    /// Withdrawal of consent: erase every template of a subject.
    Withdraw(WithdrawArgs),
    /// Erase templates whose retention has expired.
    Purge(GalleryOnly),
    /// Remove deleted templates' bytes from disk and repair the index.
    Compact(GalleryOnly),
    /// Build the search graph over the templates a bulk import left out of it (searches scan until then).
    BuildGraph(GalleryOnly),
    /// Gallery statistics (people count against the filing threshold).
    Stats(GalleryOnly),
    /// Export templates to local files (explicit, audited).
    Export(ExportArgs),
    /// Change a purpose's threshold (versioned, audited).
    Threshold(ThresholdArgs),
    /// Choose a purpose's threshold from labelled probes for a target false-match rate.
    Calibrate(CalibrateArgs),
    /// Re-encrypt the gallery under a new key.
    RotateKey(RotateArgs),
    /// Audit log: verify, show, export.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Repair a gallery that open refuses: cut a damaged template log at its last good frame, set aside what
    /// does not belong; keeps a copy of everything removed, audited, re-applies recorded erasures. Dry run without --yes.
    Repair(RepairArgs),
}

/// `init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    g: GalleryOpts,
    /// A purpose as NAME:RETENTION_DAYS[:assist] (repeatable), e.g. door-access:365.
    #[arg(long = "purpose", required_unless_present = "config")]
    purposes: Vec<String>,
    /// Full gallery configuration (JSON `GalleryConfig`) instead of the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Embedding model id.
    #[arg(long, default_value = "sface-2021dec")]
    model_id: String,
    /// Site recorded in audit records.
    #[arg(long, default_value = "site-1")]
    site: String,
    /// Device recorded in audit records.
    #[arg(long, default_value = "device-1")]
    device: String,
}

/// `consent`.
#[derive(Args, Debug)]
pub struct ConsentArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long, required_unless_present = "from_csv", conflicts_with = "from_csv", default_value = "")]
    subject: String,
    /// Consent id (e.g. the signed form's number).
    #[arg(long, required_unless_present = "from_csv", default_value = "")]
    consent_id: String,
    /// Purposes consented to (repeatable).
    #[arg(long = "purpose", required_unless_present = "from_csv")]
    purposes: Vec<String>,
    /// One consent per CSV row (header: subject,consent_id,purposes[,basis,age,guardian,relationship,collected_by];
    /// purposes separated by `;`). A bad row is reported by line number and nothing of it is recorded.
    #[arg(long, value_name = "FILE")]
    from_csv: Option<PathBuf>,
    /// separate | written | legal:<named basis>
    #[arg(long, default_value = "separate")]
    basis: String,
    /// adult | 14-17 | under-14
    #[arg(long, default_value = "adult")]
    age: String,
    /// Guardian (required under 14).
    #[arg(long)]
    guardian: Option<String>,
    /// Guardian's relationship to the child.
    #[arg(long, default_value = "guardian")]
    relationship: String,
    /// Who collected the consent (default: the operator).
    #[arg(long)]
    collected_by: Option<String>,
}

/// `enrol`.
#[derive(Args, Debug)]
pub struct EnrolArgs {
    #[command(flatten)]
    g: GalleryOpts,
    /// Whose images (or use --from-dir).
    #[arg(long, required_unless_present = "from_dir", conflicts_with = "from_dir")]
    subject: Option<String>,
    /// The consent to enrol on (default: the subject's recorded consent covering the purposes).
    #[arg(long)]
    consent_id: Option<String>,
    /// Purposes (default with --from-dir: those of each subject's consent).
    #[arg(long = "purpose", required_unless_present = "from_dir")]
    purposes: Vec<String>,
    /// A folder with one subfolder of images per subject (`people/<subject>/*.jpg`).
    #[arg(long, value_name = "DIR")]
    from_dir: Option<PathBuf>,
    #[command(flatten)]
    inputs: batch::ImageInputs,
    #[command(flatten)]
    out: batch::BatchOut,
}

/// `import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    g: GalleryOpts,
    /// float32 N x D .npy
    #[arg(long)]
    embeddings: PathBuf,
    /// Text file, one subject id per row of the .npy.
    #[arg(long)]
    manifest: PathBuf,
    #[arg(long = "purpose", required = true)]
    purposes: Vec<String>,
    /// Basis of the consents the rows rest on, stated by the operator (never invented):
    /// separate | written | legal:<named basis>.
    #[arg(long = "consent-basis", alias = "basis")]
    basis: String,
    /// Rows per durable batch.
    #[arg(long, default_value_t = 50_000)]
    batch: usize,
    /// Build the search graph at the end (else `build-graph` does it later; searches scan until then).
    #[arg(long)]
    build_graph: bool,
}

/// `search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    purpose: String,
    /// float32 Q x D .npy of probes.
    #[arg(long)]
    embeddings: PathBuf,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// auto | exact | graph
    #[arg(long, default_value = "auto")]
    strategy: String,
    /// Graph search breadth.
    #[arg(long)]
    ef: Option<usize>,
    #[command(flatten)]
    out: batch::BatchOut,
}

/// `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    purpose: String,
    /// The subject every image is compared with (or use --pairs).
    #[arg(long, conflicts_with = "pairs")]
    subject: Option<String>,
    /// CSV of `image,subject` rows: one 1:1 verification per row.
    #[arg(long, value_name = "FILE.csv")]
    pairs: Option<PathBuf>,
    #[command(flatten)]
    inputs: batch::ImageInputs,
    #[command(flatten)]
    out: batch::BatchOut,
}

/// `identify`.
#[derive(Args, Debug)]
pub struct IdentifyArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    purpose: String,
    #[arg(long, default_value_t = 5)]
    k: usize,
    #[command(flatten)]
    inputs: batch::ImageInputs,
    #[command(flatten)]
    out: batch::BatchOut,
}

/// `delete`.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long = "template", required = true)]
    templates: Vec<u64>,
    #[arg(long, default_value = "operator request")]
    reason: String,
    /// Compact right away so the bytes leave the disk now.
    #[arg(long)]
    compact: bool,
}

/// `withdraw`.
#[derive(Args, Debug)]
pub struct WithdrawArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    subject: String,
    /// Compact right away so the bytes leave the disk now.
    #[arg(long)]
    compact: bool,
}

/// Commands that only need the gallery.
#[derive(Args, Debug)]
pub struct GalleryOnly {
    #[command(flatten)]
    g: GalleryOpts,
}

/// `repair`.
#[derive(Args, Debug)]
pub struct RepairArgs {
    #[command(flatten)]
    g: GalleryOpts,
    /// Carry the repair out (without it, only print what would be done).
    #[arg(long)]
    yes: bool,
}

/// `export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    purpose: Option<String>,
    /// Output directory (templates.npy + templates.json).
    #[arg(long)]
    out: PathBuf,
}

/// `threshold`.
#[derive(Args, Debug)]
pub struct ThresholdArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    purpose: String,
    /// verify | identify
    #[arg(long)]
    mode: String,
    /// The new threshold (negative values allowed: `--value -0.1`).
    #[arg(long, allow_negative_numbers = true)]
    value: f32,
}

/// `calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    g: GalleryOpts,
    #[arg(long)]
    purpose: String,
    /// verify | identify
    #[arg(long)]
    mode: String,
    /// float32 Q x D .npy of calibration probes.
    #[arg(long)]
    embeddings: PathBuf,
    /// Text file, one line per probe: its subject id, or empty for a person not enrolled.
    #[arg(long)]
    labels: PathBuf,
    /// The false-match rate to meet (FPIR for identify, FMR for verify), e.g. 0.001.
    #[arg(long)]
    target: f64,
    /// Also set the threshold (versioned and audited like `threshold`).
    #[arg(long)]
    apply: bool,
}

/// `rotate-key`.
#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    g: GalleryOpts,
    /// The new key file.
    #[arg(long)]
    new_key_file: PathBuf,
}

/// Audit subcommands.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the whole chain and that it holds what the gallery's manifest (and --anchor) prove; names the first bad record.
    Verify(GalleryOnly),
    /// Write a signed checkpoint of the gallery (id, generation, audit head) to keep off the machine; use it with --anchor.
    Anchor(AnchorArgs),
    /// Print records (JSONL) matching the filters.
    Show(AuditQuery),
    /// Same as show (for piping into files).
    Export(AuditQuery),
}

/// `audit anchor`.
#[derive(Args, Debug)]
pub struct AnchorArgs {
    #[command(flatten)]
    g: GalleryOpts,
    /// Write it to this file (mode 0600) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Audit filters.
#[derive(Args, Debug)]
pub struct AuditQuery {
    #[command(flatten)]
    g: GalleryOpts,
    /// From this time (unix ms).
    #[arg(long)]
    from_ms: Option<i64>,
    /// Until this time (unix ms).
    #[arg(long)]
    until_ms: Option<i64>,
    /// Only records by this operator.
    #[arg(long = "by")]
    by: Option<String>,
    #[arg(long)]
    purpose: Option<String>,
    #[arg(long)]
    subject: Option<String>,
}

fn parse_basis(s: &str) -> anyhow::Result<ConsentBasis> {
    Ok(match s {
        "separate" => ConsentBasis::SeparateConsent,
        "written" => ConsentBasis::WrittenConsent,
        _ => match s.strip_prefix("legal:") {
            Some(b) if !b.trim().is_empty() => ConsentBasis::LegalBasis(b.to_string()),
            _ => bail!("--basis must be separate, written or legal:<named basis>"),
        },
    })
}

fn parse_age(s: &str) -> anyhow::Result<AgeBracket> {
    Ok(match s {
        "adult" => AgeBracket::Adult,
        "14-17" => AgeBracket::Minor14To17,
        "under-14" | "under14" => AgeBracket::Under14,
        _ => bail!("--age must be adult, 14-17 or under-14"),
    })
}

fn purposes(v: &[String]) -> anyhow::Result<Vec<Purpose>> {
    v.iter().map(|p| Ok(Purpose::new(p.as_str())?)).collect()
}

fn pipeline(cfg: &PipelineConfig) -> anyhow::Result<FacePipeline> {
    FacePipeline::new(cfg.clone()).context("loading the face pipeline")
}

/// Largest list file (manifests, labels) read: 1 GiB of ids.
const MAX_LIST_BYTES: u64 = 1 << 30;
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Read a UTF-8 text file the user named: regular files only, at most `max` bytes.
pub(crate) fn read_text(p: &Path, max: u64) -> anyhow::Result<String> {
    let bytes = facematch::fs::read_bounded(p, max)?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", p.display()))
}

/// Run a gallery command; `Ok(false)` means some inputs failed.
fn parse_mode(m: &str) -> anyhow::Result<Mode> {
    match m {
        "verify" => Ok(Mode::Verify),
        "identify" => Ok(Mode::Identify),
        m => bail!("--mode must be verify or identify, got {m}"),
    }
}

pub fn run(cmd: &GalleryCommand, pcfg: &PipelineConfig) -> anyhow::Result<bool> {
    match cmd {
        GalleryCommand::Keygen { out } => {
            use std::os::unix::fs::OpenOptionsExt;
            let k = MasterKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(out)
                .with_context(|| format!("creating {}", out.display()))?;
            writeln!(f, "{}", k.to_hex())?;
            eprintln!("wrote key {} (fingerprint {}); keep it outside the gallery", out.display(), k.fingerprint());
            Ok(true)
        }
        GalleryCommand::Init(a) => {
            let mut cfg: GalleryConfig = match &a.config {
                Some(p) => serde_json::from_str(&read_text(p, MAX_CONFIG_BYTES)?).with_context(|| format!("parsing {}", p.display()))?,
                None => GalleryConfig { dim: a.dim, model_id: a.model_id.clone(), ..Default::default() },
            };
            for spec in &a.purposes {
                let parts: Vec<&str> = spec.split(':').collect();
                let (name, days, assist) = match parts.as_slice() {
                    [n, d] => (*n, *d, false),
                    [n, d, "assist"] => (*n, *d, true),
                    _ => bail!("--purpose must be NAME:RETENTION_DAYS[:assist], got {spec}"),
                };
                let mut p = PurposePolicy::new(Purpose::new(name)?, days.parse().with_context(|| format!("retention days in {spec}"))?);
                p.assist_only = assist;
                cfg.purposes.push(p);
            }
            cfg.audit.site = a.site.clone();
            cfg.audit.device = a.device.clone();
            let e = EngineBuilder::new(&a.g.gallery).key(a.g.key()?).create(cfg)?;
            e.record_admin(&a.g.operator()?, "init", &format!("gallery {}", a.g.gallery.display()))?;
            json_line(&e.stats())?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Consent(a) if a.from_csv.is_some() => batch::run_consent_csv(a),
        GalleryCommand::Consent(a) => {
            let e = a.g.open()?;
            let op = a.g.operator()?;
            let mut c = ConsentRecord::new(
                a.consent_id.clone(),
                &a.subject,
                parse_basis(&a.basis)?,
                purposes(&a.purposes)?,
                a.collected_by.clone().unwrap_or_else(|| op.as_str().to_string()),
                parse_age(&a.age)?,
            );
            c.guardian = a.guardian.clone().map(|g| GuardianConsent { guardian: g, relationship: a.relationship.clone() });
            e.record_consent(&op, c)?;
            json_line(&serde_json::json!({"consent": a.consent_id, "subject": a.subject, "recorded": true}))?;
            Ok(true)
        }
        GalleryCommand::Enrol(a) => batch::run_enrol(a, pcfg),
        GalleryCommand::Import(a) => run_import(a),
        GalleryCommand::Search(a) => batch::run_search(a),
        GalleryCommand::Verify(a) => batch::run_verify(a, pcfg),
        GalleryCommand::Identify(a) => batch::run_identify(a, pcfg),
        GalleryCommand::Delete(a) => {
            let e = a.g.open()?;
            let op = a.g.operator()?;
            let r = e.delete(&op, &a.templates, &a.reason)?;
            finish_erasure(e, &op, r, a.compact)
        }
        GalleryCommand::Withdraw(a) => {
            let e = a.g.open()?;
            let op = a.g.operator()?;
            let subject = SubjectId::new(a.subject.as_str())?;
            let r = match e.withdraw(&op, &subject) {
                // Withdrawn already (e.g. a rerun after a crash): say so and finish the compaction asked for.
                Err(facematch::Error::UnknownSubject(_)) if !e.consents_of(&subject).is_empty() => {
                    eprintln!("{subject} has withdrawn already: nothing left to erase");
                    facematch::engine::ErasureReport { subjects: vec![subject.to_string()], ..Default::default() }
                }
                r => r?,
            };
            finish_erasure(e, &op, r, a.compact)
        }
        GalleryCommand::Purge(a) => {
            let e = a.g.open()?;
            let r = e.purge_expired(&a.g.operator()?)?;
            json_line(&serde_json::json!({"purged_on_open": e.open_report().purged_on_open, "purged_now": r}))?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::BuildGraph(a) => {
            let e = a.g.open()?;
            let t = std::time::Instant::now();
            let n = e.build_graph()?;
            json_line(&serde_json::json!({"added_to_graph": n, "seconds": t.elapsed().as_secs_f64()}))?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Compact(a) => {
            let e = a.g.open()?;
            let r = e.compact(&a.g.operator()?)?;
            json_line(&r)?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Repair(a) => {
            let op = a.g.operator()?;
            let r = EngineBuilder::new(&a.g.gallery).key(a.g.key()?).repair(&op, a.yes)?;
            json_line(&r)?;
            if !a.yes && !r.plan.is_empty() {
                eprintln!("nothing was changed: run again with --yes to carry this out (everything removed is kept in the gallery's repair-<time>/ directory)");
                return Ok(false);
            }
            Ok(true)
        }
        GalleryCommand::Stats(a) => {
            let e = a.g.open()?;
            json_line(&e.stats())?;
            e.close()?;
            Ok(true)
        }
        GalleryCommand::Export(a) => {
            let e = a.g.open()?;
            let p = a.purpose.as_deref().map(Purpose::new).transpose()?;
            let n = e.export(&a.g.operator()?, p.as_ref(), &a.out)?;
            json_line(&serde_json::json!({"exported": n, "to": a.out}))?;
            Ok(true)
        }
        GalleryCommand::Calibrate(a) => {
            let e = a.g.open()?;
            let mode = parse_mode(&a.mode)?;
            let purpose = Purpose::new(a.purpose.as_str())?;
            let q = facematch::npy::read_f32_matrix(&a.embeddings)?;
            let labels: Vec<Option<SubjectId>> = read_text(&a.labels, MAX_LIST_BYTES)?
                .lines()
                .map(|l| match l.trim() {
                    "" => Ok(None),
                    s => SubjectId::new(s).map(Some),
                })
                .collect::<facematch::Result<_>>()?;
            if labels.len() != q.rows {
                bail!("{} has {} labels, {} has {} rows", a.labels.display(), labels.len(), a.embeddings.display(), q.rows);
            }
            let op = a.g.operator()?;
            let c = e.calibrate_threshold(&op, &purpose, mode, &q.data, &labels, a.target)?;
            let applied = if a.apply { Some(e.set_threshold(&op, &purpose, mode, c.threshold)?.version()) } else { None };
            json_line(&serde_json::json!({"purpose": a.purpose, "calibration": c, "applied_version": applied}))?;
            Ok(true)
        }
        GalleryCommand::Threshold(a) => {
            let e = a.g.open()?;
            let mode = parse_mode(&a.mode)?;
            let t = e.set_threshold(&a.g.operator()?, &Purpose::new(a.purpose.as_str())?, mode, a.value)?;
            json_line(&serde_json::json!({"purpose": a.purpose, "mode": a.mode, "threshold": t.value(), "version": t.version()}))?;
            Ok(true)
        }
        GalleryCommand::RotateKey(a) => {
            let e = a.g.open()?;
            let new = MasterKey::from_file(&a.new_key_file)?;
            let fp = new.fingerprint();
            e.rotate_key(&a.g.operator()?, new)?;
            json_line(&serde_json::json!({"rotated": true, "new_key_fingerprint": fp}))?;
            Ok(true)
        }
        GalleryCommand::Audit(c) => run_audit(c),
    }
}

/// Compact now if asked (and not already done), report, close.
/// Report an erasure that is committed, then what became of the compaction
/// and the close: the exit code is non-zero only with a report that says
/// exactly what is done (the erasure holds either way).
fn finish_erasure(e: Engine, op: &Operator, mut r: facematch::engine::ErasureReport, compact: bool) -> anyhow::Result<bool> {
    let mut failed = None;
    if compact && !r.bytes_removed {
        match e.compact(op) {
            Ok(_) => r.bytes_removed = true,
            Err(err) => failed = Some(format!("compaction failed (the erasure is committed; run `compact` again): {err}")),
        }
    }
    if let Err(err) = e.close() {
        failed.get_or_insert(format!("closing failed after the erasure was committed: {err}"));
    }
    let mut v = serde_json::to_value(&r)?;
    if let Some(f) = &failed {
        v["error"] = serde_json::Value::String(f.clone());
        eprintln!("facematch: {f}");
    }
    json_line(&v)?;
    Ok(failed.is_none())
}

fn run_import(a: &ImportArgs) -> anyhow::Result<bool> {
    // Everything is checked before anything is written: a bad row names its line.
    let m = facematch::npy::read_f32_matrix(&a.embeddings)?;
    let text = read_text(&a.manifest, MAX_LIST_BYTES)?;
    let mut subjects: Vec<SubjectId> = Vec::with_capacity(m.rows);
    for (i, raw) in text.lines().enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        if line.trim() != line {
            bail!(
                "{} line {}: subject id {line:?} has leading or trailing whitespace (ids are taken exactly as written)",
                a.manifest.display(),
                i + 1
            );
        }
        let s = SubjectId::new(line).with_context(|| format!("{} line {}", a.manifest.display(), i + 1))?;
        subjects.push(s);
    }
    if subjects.len() != m.rows {
        bail!("manifest has {} subject ids, the .npy has {} rows", subjects.len(), m.rows);
    }
    for i in 0..m.rows {
        facematch::engine::normalise(m.cols, m.row(i)).with_context(|| format!("{} row {i}", a.embeddings.display()))?;
    }
    let ps = purposes(&a.purposes)?;
    let basis = parse_basis(&a.basis)?;
    let e = a.g.open()?;
    let op = a.g.operator()?;
    let bar = indicatif::ProgressBar::new(m.rows as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("import");
    let mut seen = std::collections::HashSet::new();
    let (mut imported, mut skipped) = (0u64, 0u64);
    let batch = a.batch.max(1);
    for start in (0..m.rows).step_by(batch) {
        let end = (start + batch).min(m.rows);
        let mut reqs = Vec::with_capacity(end - start);
        let mut consents = Vec::new();
        for (i, subject) in subjects.iter().enumerate().take(end).skip(start) {
            // Rows an earlier, interrupted run stored already are recognised and skipped.
            if e.enrolled_copy(subject, m.row(i))?.is_some() {
                skipped += 1;
                continue;
            }
            let cid = import_consent_id(subject);
            if seen.insert(subject.clone()) && !e.has_consent(&cid) {
                consents.push(ConsentRecord::new(cid.clone(), subject.as_str(), basis.clone(), ps.clone(), op.as_str(), AgeBracket::Adult));
            }
            reqs.push(Enrolment::new(subject.clone(), cid, ps.clone(), m.row(i).to_vec()));
        }
        let done = (|| -> anyhow::Result<u64> {
            e.record_consents(&op, consents)?;
            Ok(e.import_batch(&op, reqs)?.len() as u64)
        })();
        match done {
            Ok(n) => imported += n,
            Err(err) => {
                bar.finish_and_clear();
                // Say exactly what is in: rows before this batch are committed, and a rerun skips them.
                json_line(
                    &serde_json::json!({"imported": imported, "skipped_already_imported": skipped, "failed_at_row": start, "error": format!("{err:#}")}),
                )?;
                return Err(err.context(format!("import stopped at row {start}: rows 0..{start} are imported (a rerun skips them)")));
            }
        }
        bar.set_position(end as u64);
    }
    bar.finish_and_clear();
    if a.build_graph {
        e.build_graph()?;
    } else {
        e.checkpoint()?;
    }
    let stats = e.stats();
    if stats.graph_pending >= 10_000 {
        eprintln!(
            "import: {} templates are not in the search graph yet (searches scan them exactly); `facematch build-graph` builds it (minutes per million)",
            stats.graph_pending
        );
    }
    json_line(&serde_json::json!({"imported": imported, "skipped_already_imported": skipped, "stats": stats}))?;
    print_notices(&e);
    e.close()?;
    Ok(true)
}

/// The consent id of an imported subject: readable when it fits, hashed when the id is long.
fn import_consent_id(subject: &SubjectId) -> String {
    let id = format!("import-{subject}");
    if id.len() <= 128 {
        return id;
    }
    use sha2::Digest;
    format!("import-h{}", hex::encode(&sha2::Sha256::digest(subject.as_str().as_bytes())[..16]))
}

fn run_audit(c: &AuditCommand) -> anyhow::Result<bool> {
    match c {
        AuditCommand::Verify(a) => {
            let key = a.g.key()?;
            let anchor = a.g.read_anchor(&key)?;
            let r = facematch::engine::verify_audit(&a.g.gallery, &key, anchor.as_ref())?;
            json_line(&r)?;
            for p in &r.problems {
                eprintln!("audit: {p}");
            }
            Ok(r.ok())
        }
        AuditCommand::Anchor(a) => {
            let e = a.g.open()?;
            let anchor = e.anchor(&a.g.operator()?)?;
            e.close()?;
            match &a.out {
                Some(p) => {
                    let mut f = facematch::fs::create_output(p)?;
                    writeln!(f, "{}", anchor.to_json())?;
                    f.sync_all()?;
                    eprintln!("wrote the anchor to {}: keep it off this machine; check with --anchor", p.display());
                }
                None => println!("{}", anchor.to_json()),
            }
            Ok(true)
        }
        AuditCommand::Show(q) | AuditCommand::Export(q) => {
            let f = AuditFilter {
                from_ms: q.from_ms,
                until_ms: q.until_ms,
                operator: q.by.clone(),
                purpose: q.purpose.clone(),
                subject: q.subject.clone(),
                ..Default::default()
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            AuditLog::export_jsonl(&q.g.gallery.join("audit"), &f, &mut out)?;
            out.flush()?;
            Ok(true)
        }
    }
}

//! The command-line arguments of the gallery, compliance and audit
//! subcommands (clap derives); `mod.rs` runs them.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use facematch::compliance::Operator;
use facematch::engine::{Engine, EngineBuilder};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::store::{MasterKey, KEY_ENV};

use super::{batch, print_notices, read_text};

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
    pub(super) fn key(&self) -> anyhow::Result<MasterKey> {
        Ok(match &self.key_file {
            Some(p) => MasterKey::from_file(p)?,
            None => match std::env::var_os(KEY_ENV) {
                None => bail!("no key: pass --key-file or set {KEY_ENV} (64 hex digits)"),
                Some(_) => MasterKey::from_env().with_context(|| format!("{KEY_ENV} is set but is not a key"))?,
            },
        })
    }
    pub(super) fn operator(&self) -> anyhow::Result<Operator> {
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
    pub(super) fn read_anchor(&self, key: &MasterKey) -> anyhow::Result<Option<facematch::engine::Anchor>> {
        match &self.anchor {
            None => Ok(None),
            Some(p) => Ok(Some(facematch::engine::Anchor::from_json(&read_text(p, 64 * 1024)?, key)?)),
        }
    }
    pub(super) fn open(&self) -> anyhow::Result<Engine> {
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
    /// Open the gallery and load the face pipeline at the same time (both are
    /// start-up a short command waits for).
    pub(super) fn open_with_pipeline(&self, cfg: &PipelineConfig) -> anyhow::Result<(Engine, FacePipeline)> {
        let (e, p) = std::thread::scope(|s| {
            let p = s.spawn(|| super::pipeline(cfg));
            let e = self.open();
            (e, p.join().unwrap_or_else(|_| Err(anyhow::anyhow!("loading the face pipeline panicked"))))
        });
        Ok((e?, p?))
    }
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
    pub(super) g: GalleryOpts,
    /// A purpose as NAME:RETENTION_DAYS[:assist] (repeatable), e.g. door-access:365.
    #[arg(long = "purpose", required_unless_present = "config")]
    pub(super) purposes: Vec<String>,
    /// Full gallery configuration (JSON `GalleryConfig`) instead of the flags.
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    pub(super) dim: usize,
    /// Embedding model id.
    #[arg(long, default_value = "sface-2021dec")]
    pub(super) model_id: String,
    /// Site recorded in audit records.
    #[arg(long, default_value = "site-1")]
    pub(super) site: String,
    /// Device recorded in audit records.
    #[arg(long, default_value = "device-1")]
    pub(super) device: String,
}

/// `consent`.
#[derive(Args, Debug)]
pub struct ConsentArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long, required_unless_present = "from_csv", conflicts_with = "from_csv", default_value = "")]
    pub(super) subject: String,
    /// Consent id (e.g. the signed form's number).
    #[arg(long, required_unless_present = "from_csv", default_value = "")]
    pub(super) consent_id: String,
    /// Purposes consented to (repeatable).
    #[arg(long = "purpose", required_unless_present = "from_csv")]
    pub(super) purposes: Vec<String>,
    /// One consent per CSV row (header: subject,consent_id,purposes[,basis,age,guardian,relationship,collected_by];
    /// purposes separated by `;`). A bad row is reported by line number and nothing of it is recorded.
    #[arg(long, value_name = "FILE")]
    pub(super) from_csv: Option<PathBuf>,
    /// separate | written | legal:<named basis>
    #[arg(long, default_value = "separate")]
    pub(super) basis: String,
    /// adult | 14-17 | under-14
    #[arg(long, default_value = "adult")]
    pub(super) age: String,
    /// Guardian (required under 14).
    #[arg(long)]
    pub(super) guardian: Option<String>,
    /// Guardian's relationship to the child.
    #[arg(long, default_value = "guardian")]
    pub(super) relationship: String,
    /// Who collected the consent (default: the operator).
    #[arg(long)]
    pub(super) collected_by: Option<String>,
}

/// `enrol`.
#[derive(Args, Debug)]
pub struct EnrolArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    /// Whose images (or use --from-dir).
    #[arg(long, required_unless_present = "from_dir", conflicts_with = "from_dir")]
    pub(super) subject: Option<String>,
    /// The consent to enrol on (default: the subject's recorded consent covering the purposes).
    #[arg(long)]
    pub(super) consent_id: Option<String>,
    /// Purposes (default with --from-dir: those of each subject's consent).
    #[arg(long = "purpose", required_unless_present = "from_dir")]
    pub(super) purposes: Vec<String>,
    /// A folder with one subfolder of images per subject (`people/<subject>/*.jpg`).
    #[arg(long, value_name = "DIR")]
    pub(super) from_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(super) inputs: batch::ImageInputs,
    #[command(flatten)]
    pub(super) out: batch::BatchOut,
}

/// `import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    /// float32 N x D .npy
    #[arg(long)]
    pub(super) embeddings: PathBuf,
    /// Text file, one subject id per row of the .npy.
    #[arg(long)]
    pub(super) manifest: PathBuf,
    #[arg(long = "purpose", required = true)]
    pub(super) purposes: Vec<String>,
    /// Basis of the consents the rows rest on, stated by the operator (never invented):
    /// separate | written | legal:<named basis>.
    #[arg(long = "consent-basis", alias = "basis")]
    pub(super) basis: String,
    /// Rows per durable batch.
    #[arg(long, default_value_t = 50_000)]
    pub(super) batch: usize,
    /// Build the search graph at the end (else `build-graph` does it later; searches scan until then).
    #[arg(long)]
    pub(super) build_graph: bool,
}

/// `search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) purpose: String,
    /// float32 Q x D .npy of probes.
    #[arg(long)]
    pub(super) embeddings: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub(super) k: usize,
    /// auto | exact | graph
    #[arg(long, default_value = "auto")]
    pub(super) strategy: String,
    /// Graph search breadth.
    #[arg(long)]
    pub(super) ef: Option<usize>,
    #[command(flatten)]
    pub(super) out: batch::BatchOut,
}

/// `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) purpose: String,
    /// The subject every image is compared with (or use --pairs).
    #[arg(long, conflicts_with = "pairs")]
    pub(super) subject: Option<String>,
    /// CSV of `image,subject` rows: one 1:1 verification per row.
    #[arg(long, value_name = "FILE.csv")]
    pub(super) pairs: Option<PathBuf>,
    #[command(flatten)]
    pub(super) inputs: batch::ImageInputs,
    #[command(flatten)]
    pub(super) out: batch::BatchOut,
}

/// `identify`.
#[derive(Args, Debug)]
pub struct IdentifyArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) purpose: String,
    #[arg(long, default_value_t = 5)]
    pub(super) k: usize,
    #[command(flatten)]
    pub(super) inputs: batch::ImageInputs,
    #[command(flatten)]
    pub(super) out: batch::BatchOut,
}

/// `delete`.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long = "template", required = true)]
    pub(super) templates: Vec<u64>,
    #[arg(long, default_value = "operator request")]
    pub(super) reason: String,
    /// Compact right away so the bytes leave the disk now.
    #[arg(long)]
    pub(super) compact: bool,
}

/// `withdraw`.
#[derive(Args, Debug)]
pub struct WithdrawArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) subject: String,
    /// Compact right away so the bytes leave the disk now.
    #[arg(long)]
    pub(super) compact: bool,
}

/// Commands that only need the gallery.
#[derive(Args, Debug)]
pub struct GalleryOnly {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
}

/// `repair`.
#[derive(Args, Debug)]
pub struct RepairArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    /// Carry the repair out (without it, only print what would be done).
    #[arg(long)]
    pub(super) yes: bool,
}

/// `export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) purpose: Option<String>,
    /// Output directory (templates.npy + templates.json).
    #[arg(long)]
    pub(super) out: PathBuf,
}

/// `threshold`.
#[derive(Args, Debug)]
pub struct ThresholdArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) purpose: String,
    /// verify | identify
    #[arg(long)]
    pub(super) mode: String,
    /// The new threshold (negative values allowed: `--value -0.1`).
    #[arg(long, allow_negative_numbers = true)]
    pub(super) value: f32,
}

/// `calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    #[arg(long)]
    pub(super) purpose: String,
    /// verify | identify
    #[arg(long)]
    pub(super) mode: String,
    /// float32 Q x D .npy of calibration probes.
    #[arg(long)]
    pub(super) embeddings: PathBuf,
    /// Text file, one line per probe: its subject id, or empty for a person not enrolled.
    #[arg(long)]
    pub(super) labels: PathBuf,
    /// The false-match rate to meet (FPIR for identify, FMR for verify), e.g. 0.001.
    #[arg(long)]
    pub(super) target: f64,
    /// Also set the threshold (versioned and audited like `threshold`).
    #[arg(long)]
    pub(super) apply: bool,
}

/// `rotate-key`.
#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    /// The new key file.
    #[arg(long)]
    pub(super) new_key_file: PathBuf,
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
    pub(super) g: GalleryOpts,
    /// Write it to this file (mode 0600) instead of stdout.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
}

/// Audit filters.
#[derive(Args, Debug)]
pub struct AuditQuery {
    #[command(flatten)]
    pub(super) g: GalleryOpts,
    /// From this time (unix ms).
    #[arg(long)]
    pub(super) from_ms: Option<i64>,
    /// Until this time (unix ms).
    #[arg(long)]
    pub(super) until_ms: Option<i64>,
    /// Only records by this operator.
    #[arg(long = "by")]
    pub(super) by: Option<String>,
    #[arg(long)]
    pub(super) purpose: Option<String>,
    #[arg(long)]
    pub(super) subject: Option<String>,
}

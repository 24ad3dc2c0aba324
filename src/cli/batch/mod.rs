//! Batch commands: `faces`, `identify`, `verify` and `search` over many
//! inputs through [`facematch::batch`], with CSV or JSONL output, resume,
//! progress bar and Ctrl-C handling.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use facematch::batch::{self, BatchInput, BatchItem, BatchJob, BatchOptions, BatchOutput, BatchProgress, EmbeddingItem, EmbeddingOptions};
use facematch::compliance::SubjectId;
use facematch::engine::SearchOptions;
use facematch::pipeline::{FacePipeline, PipelineConfig};

mod inputs;
mod output;
mod progress;
#[cfg(test)]
mod tests;

use self::inputs::*;
use self::output::*;
use self::progress::*;

/// Output format of batch commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per input and line.
    Jsonl,
    /// A header, one row per face result, one row per failed input.
    Csv,
}

/// Output, resume and run options shared by the batch commands.
#[derive(Args, Debug, Clone)]
pub struct BatchOut {
    /// jsonl (one object per input) or csv (one row per face result, one per failed input).
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// Write results to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// With --out: skip inputs already answered in FILE (a torn last line is dropped and redone), append the rest.
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// No progress bar and no summary line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Image inputs: files and directories, and/or a list of paths.
#[derive(Args, Debug, Clone)]
pub struct ImageInputs {
    /// Image files and directories (walked recursively, image extensions, sorted).
    #[arg(value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// A file with one path per line (`-`: stdin), after the positional inputs.
    #[arg(long, value_name = "FILE")]
    pub from_list: Option<PathBuf>,
}

// --- Ctrl-C -------------------------------------------------------------------

#[cfg(unix)]
extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

// --- inputs -------------------------------------------------------------------

type Inputs = Box<dyn Iterator<Item = BatchInput> + Send>;

// --- output -------------------------------------------------------------------

// --- progress -----------------------------------------------------------------

fn threads(o: &BatchOut) -> usize {
    o.threads.unwrap_or(0)
}

/// Exit status: `Ok(true)` all good, `Ok(false)` some input failed, `Err` interrupted or the run failed.
fn outcome(p: &BatchProgress) -> anyhow::Result<bool> {
    if p.cancelled {
        bail!("interrupted; the output holds every input answered so far (--resume carries on)");
    }
    Ok(p.failed == 0)
}

// --- image commands -----------------------------------------------------------

const FACES_HEADER: &[&str] = &["input", "rows", "status", "face", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "score", "embedding", "error"];
const IDENTIFY_HEADER: &[&str] = &[
    "input",
    "rows",
    "status",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "face_score",
    "decision",
    "subject",
    "template",
    "score",
    "threshold",
    "faces_found",
    "faces_discarded",
    "audit_seq",
    "error",
];
const VERIFY_HEADER: &[&str] = &[
    "input",
    "rows",
    "status",
    "subject",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "face_score",
    "decision",
    "score",
    "threshold",
    "faces_found",
    "faces_discarded",
    "audit_seq",
    "error",
];
const ENROL_HEADER: &[&str] = &[
    "input",
    "rows",
    "status",
    "subject",
    "template",
    "consent_id",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "face_score",
    "faces_discarded",
    "error",
];
const SEARCH_HEADER: &[&str] =
    &["input", "rows", "status", "rank", "subject", "template", "score", "decision", "threshold", "audit_seq", "error"];

fn run_image_job(
    kind: Kind,
    job: &BatchJob,
    pipeline: &FacePipeline,
    inputs: Inputs,
    total: Option<u64>,
    o: &BatchOut,
) -> anyhow::Result<bool> {
    let (header, what) = match kind {
        Kind::Faces => (FACES_HEADER, "faces"),
        Kind::Identify => (IDENTIFY_HEADER, "identify"),
        Kind::Verify => (VERIFY_HEADER, "verify"),
        Kind::Enrol => (ENROL_HEADER, "enrol"),
    };
    let (mut out, answered) = open_output(o, header, "image")?;
    let skipped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let inputs = skip_answered(inputs, answered, |i: &BatchInput| path_key(&i.path), &skipped);
    let cancel = install_interrupt();
    let rep = Reporter::new(o, what, total);
    let opts = BatchOptions { threads: threads(o), window: 0 };
    let mut write_err: Option<anyhow::Error> = None;
    let r = batch::run_images(pipeline, job, inputs, &opts, cancel, &mut |p| rep.update(p, skipped.load(Ordering::Relaxed)), &mut |item| {
        if let Err(e) = &item.result {
            tracing::debug!(image = %item.input.path.display(), error = %e, "input failed");
        }
        let r = write_item(&mut out, kind, &item).and_then(|_| Ok(out.flush_if_due()?));
        r.map_err(|e| {
            let msg = format!("writing the output: {e:#}");
            write_err = Some(e);
            facematch::Error::config("output", msg)
        })
    });
    let flushed = out.finish();
    let p = match r {
        Ok(p) => p,
        Err(e) => return Err(write_err.unwrap_or_else(|| e.into())),
    };
    flushed?;
    rep.finish(&p, skipped.load(Ordering::Relaxed), "images");
    outcome(&p)
}

/// `faces`.
pub fn run_faces(pipeline: &FacePipeline, embeddings: bool, inp: &ImageInputs, o: &BatchOut) -> anyhow::Result<bool> {
    let (paths, total) = image_paths(inp, o)?;
    run_image_job(Kind::Faces, &BatchJob::Faces { embeddings }, pipeline, Box::new(paths.map(BatchInput::new)), total, o)
}

/// `identify`.
pub fn run_identify(a: &super::IdentifyArgs, pcfg: &PipelineConfig) -> anyhow::Result<bool> {
    let (paths, total) = image_paths(&a.inputs, &a.out)?;
    let (e, p) = a.g.open_with_pipeline(pcfg)?;
    let ctx = facematch::engine::QueryContext::new(a.g.operator()?, facematch::compliance::Purpose::new(a.purpose.as_str())?);
    let r = run_image_job(
        Kind::Identify,
        &BatchJob::Identify { engine: &e, ctx, k: a.k },
        &p,
        Box::new(paths.map(BatchInput::new)),
        total,
        &a.out,
    );
    e.close()?;
    r
}

/// `verify`: `--subject S IMAGE...` or `--pairs FILE.csv`.
pub fn run_verify(a: &super::VerifyArgs, pcfg: &PipelineConfig) -> anyhow::Result<bool> {
    let (inputs, total): (Inputs, Option<u64>) = match (&a.pairs, &a.subject) {
        (Some(f), None) => {
            if !a.inputs.inputs.is_empty() || a.inputs.from_list.is_some() {
                bail!("--pairs names the images itself: no other inputs");
            }
            pairs(f)?
        }
        (None, Some(sub)) => {
            let sub = SubjectId::new(sub.as_str())?;
            let (paths, total) = image_paths(&a.inputs, &a.out)?;
            (Box::new(paths.map(move |p| BatchInput::with_subject(p, sub.clone()))), total)
        }
        _ => bail!("give either --subject S with images, or --pairs FILE.csv"),
    };
    let (e, p) = a.g.open_with_pipeline(pcfg)?;
    let ctx = facematch::engine::QueryContext::new(a.g.operator()?, facematch::compliance::Purpose::new(a.purpose.as_str())?);
    let r = run_image_job(Kind::Verify, &BatchJob::Verify { engine: &e, ctx }, &p, inputs, total, &a.out);
    e.close()?;
    r
}

/// `enrol`: `--subject S [--consent-id C] --purpose P IMAGE...` or `--from-dir DIR` (a subfolder per subject).
pub fn run_enrol(a: &super::EnrolArgs, pcfg: &PipelineConfig) -> anyhow::Result<bool> {
    let (inputs, total): (Inputs, Option<u64>) = match (&a.from_dir, &a.subject) {
        (Some(dir), None) => {
            if !a.inputs.inputs.is_empty() || a.inputs.from_list.is_some() {
                bail!("--from-dir names the images itself: no other inputs");
            }
            let mut people: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            people.sort();
            let total = people.iter().map(|p| batch::walk_images([p.clone()]).count() as u64).sum();
            let it = people.into_iter().flat_map(|person| {
                let name = person.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let subject = SubjectId::new(name.as_str()).ok();
                batch::walk_images([person]).map(move |p| BatchInput { path: p, subject: subject.clone() })
            });
            (Box::new(it), Some(total))
        }
        (None, Some(sub)) => {
            let sub = SubjectId::new(sub.as_str())?;
            let (paths, total) = image_paths(&a.inputs, &a.out)?;
            (Box::new(paths.map(move |p| BatchInput::with_subject(p, sub.clone()))), total)
        }
        _ => bail!("give either --subject S with images, or --from-dir DIR"),
    };
    let (e, p) = a.g.open_with_pipeline(pcfg)?;
    let job = BatchJob::Enrol {
        engine: &e,
        operator: a.g.operator()?,
        purposes: super::purposes(&a.purposes)?,
        consent_id: a.consent_id.clone(),
    };
    let r = run_image_job(Kind::Enrol, &job, &p, inputs, total, &a.out);
    super::print_notices(&e);
    e.close()?;
    r
}

/// `consent --from-csv FILE`: good rows are recorded (in durable batches), bad rows reported by line number.
pub fn run_consent_csv(a: &super::ConsentArgs) -> anyhow::Result<bool> {
    use facematch::compliance::{ConsentRecord, GuardianConsent};
    let file = a.from_csv.as_ref().context("--from-csv")?;
    let e = a.g.open()?;
    let op = a.g.operator()?;
    let mut rd = csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_reader(facematch::fs::open_input(file)?);
    let headers = rd.headers()?.clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(c_subject), Some(c_id), Some(c_purposes)) = (col("subject"), col("consent_id"), col("purposes")) else {
        bail!(
            "{}: the header must name subject, consent_id and purposes (optional: basis, age, guardian, relationship, collected_by)",
            file.display()
        );
    };
    let (c_basis, c_age, c_guardian, c_rel, c_by) = (col("basis"), col("age"), col("guardian"), col("relationship"), col("collected_by"));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut report = |v: serde_json::Value| -> anyhow::Result<()> {
        serde_json::to_writer(&mut out, &v)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    let parse = |r: &csv::StringRecord| -> anyhow::Result<ConsentRecord> {
        let get = |c: Option<usize>| c.and_then(|c| r.get(c)).filter(|v| !v.is_empty());
        let purposes: Vec<String> =
            get(Some(c_purposes)).unwrap_or("").split([';', '|', ' ']).filter(|p| !p.is_empty()).map(String::from).collect();
        if purposes.is_empty() {
            bail!("no purposes");
        }
        let subject = get(Some(c_subject)).context("no subject")?;
        let mut c = ConsentRecord::new(
            get(Some(c_id)).context("no consent_id")?.to_string(),
            SubjectId::new(subject)?.as_str(),
            super::parse_basis(get(c_basis).unwrap_or("separate"))?,
            super::purposes(&purposes)?,
            get(c_by).unwrap_or(op.as_str()).to_string(),
            super::parse_age(get(c_age).unwrap_or("adult"))?,
        );
        c.guardian = get(c_guardian)
            .map(|g| GuardianConsent { guardian: g.to_string(), relationship: get(c_rel).unwrap_or("guardian").to_string() });
        Ok(c)
    };
    let (mut good, mut bad) = (0u64, 0u64);
    // Rows in line order: parsed, or why not.
    type Row = (u64, std::result::Result<ConsentRecord, String>);
    let mut chunk: Vec<Row> = Vec::new();
    let flush = |chunk: &mut Vec<Row>,
                 report: &mut dyn FnMut(serde_json::Value) -> anyhow::Result<()>,
                 good: &mut u64,
                 bad: &mut u64|
     -> anyhow::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        // The parsed rows in one durable batch; if the engine refuses it, row by row to name the bad ones.
        let rows = std::mem::take(chunk);
        let all_ok = e.record_consents(&op, rows.iter().filter_map(|(_, c)| c.as_ref().ok().cloned()).collect()).is_ok();
        for (line, c) in rows {
            let outcome = match &c {
                Ok(c) if all_ok => Ok(c),
                Ok(c) => e.record_consent(&op, c.clone()).map(|_| c).map_err(|e| e.to_string()),
                Err(err) => Err(err.clone()),
            };
            match (outcome, &c) {
                (Ok(c), _) => {
                    *good += 1;
                    report(serde_json::json!({"line": line, "consent": c.consent_id, "subject": c.subject, "recorded": true}))?
                }
                (Err(err), Ok(c)) => {
                    *bad += 1;
                    report(serde_json::json!({"line": line, "consent": c.consent_id, "subject": c.subject, "error": err}))?
                }
                (Err(err), Err(_)) => {
                    *bad += 1;
                    report(serde_json::json!({"line": line, "error": err}))?
                }
            }
        }
        Ok(())
    };
    let mut rec = csv::StringRecord::new();
    loop {
        let line = rd.position().line();
        let row = match rd.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => parse(&rec).map_err(|e| format!("{e:#}")),
            Err(err) => Err(err.to_string()),
        };
        chunk.push((line, row));
        if chunk.len() >= 1000 {
            flush(&mut chunk, &mut report, &mut good, &mut bad)?;
        }
    }
    flush(&mut chunk, &mut report, &mut good, &mut bad)?;
    out.flush()?;
    eprintln!("consent: {good} recorded, {bad} refused ({})", file.display());
    e.close()?;
    Ok(bad == 0)
}

/// `search --embeddings Q.npy`: blocks of queries per pass, many in flight.
pub fn run_search(a: &super::SearchArgs) -> anyhow::Result<bool> {
    let e = a.g.open()?;
    let ctx = facematch::engine::QueryContext::new(a.g.operator()?, facematch::compliance::Purpose::new(a.purpose.as_str())?);
    let strategy = match a.strategy.as_str() {
        "auto" => facematch::index::SearchStrategy::Auto,
        "exact" => facematch::index::SearchStrategy::Exact,
        "graph" => facematch::index::SearchStrategy::Graph,
        s => bail!("--strategy must be auto, exact or graph, got {s}"),
    };
    let q = facematch::npy::read_f32_matrix(&a.embeddings)?;
    let (mut out, answered) = open_output(&a.out, SEARCH_HEADER, "query")?;
    let skipped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rows: Box<dyn Iterator<Item = u64> + Send> = Box::new(0..q.rows as u64);
    let rows = skip_answered(rows, answered, |i: &u64| i.to_string(), &skipped);
    let cancel = install_interrupt();
    let rep = Reporter::new(&a.out, "search", Some(q.rows as u64));
    let opts = EmbeddingOptions { k: a.k, search: SearchOptions { strategy, ef: a.ef }, block: 0, blocks_in_flight: 0 };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads(&a.out)).build()?;
    let mut write_err: Option<anyhow::Error> = None;
    let r = pool.install(|| {
        batch::run_embeddings(
            &e,
            &ctx,
            rows.map(|i| (i, q.row(i as usize).to_vec())),
            &opts,
            cancel,
            &mut |p| rep.update(p, skipped.load(Ordering::Relaxed)),
            &mut |item: EmbeddingItem| {
                let r = write_query(&mut out, &item).and_then(|_| Ok(out.flush_if_due()?));
                r.map_err(|err| {
                    let msg = format!("writing the output: {err:#}");
                    write_err = Some(err);
                    facematch::Error::config("output", msg)
                })
            },
        )
    });
    let flushed = out.finish();
    let p = match r {
        Ok(p) => p,
        Err(err) => return Err(write_err.unwrap_or_else(|| err.into())),
    };
    flushed?;
    rep.finish(&p, skipped.load(Ordering::Relaxed), "queries");
    e.close()?;
    outcome(&p)
}

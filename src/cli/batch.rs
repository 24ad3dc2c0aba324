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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// First Ctrl-C: stop intake (the run finishes what is in flight and
/// flushes); the handler resets itself, so a second one kills.
fn install_interrupt() -> &'static AtomicBool {
    #[cfg(unix)]
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
    &INTERRUPTED
}

// --- inputs -------------------------------------------------------------------

type Inputs = Box<dyn Iterator<Item = BatchInput> + Send>;

fn list_lines(list: &Path) -> anyhow::Result<Box<dyn Iterator<Item = String> + Send>> {
    let reader: Box<dyn BufRead + Send> = if list.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(File::open(list).with_context(|| format!("opening {}", list.display()))?))
    };
    Ok(Box::new(reader.lines().map_while(|l| l.ok()).map(|l| l.trim_end_matches('\r').to_string()).filter(|l| !l.trim().is_empty())))
}

/// Whether a progress bar will be drawn (stderr is a terminal, not `--quiet`).
fn shows_bar(o: &BatchOut) -> bool {
    !o.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The paths to process, lazily, and their number when a progress bar needs it
/// (counted by a first walk of the tree and the list, holding neither).
fn image_paths(inp: &ImageInputs, o: &BatchOut) -> anyhow::Result<(Box<dyn Iterator<Item = PathBuf> + Send>, Option<u64>)> {
    let walk = batch::walk_images(inp.inputs.clone());
    let mut total = shows_bar(o).then(|| batch::walk_images(inp.inputs.clone()).count() as u64);
    let it: Box<dyn Iterator<Item = PathBuf> + Send> = match &inp.from_list {
        None => Box::new(walk),
        Some(list) => {
            if list.as_os_str() == "-" {
                total = None;
            } else if let Some(t) = &mut total {
                *t += list_lines(list)?.count() as u64;
            }
            Box::new(walk.chain(list_lines(list)?.map(PathBuf::from)))
        }
    };
    if inp.inputs.is_empty() && inp.from_list.is_none() {
        bail!("no inputs: name image files or directories, or --from-list FILE");
    }
    Ok((it, total))
}

/// `verify --pairs FILE.csv`: rows `image,subject` (a header row `image,subject` is skipped).
fn pairs(file: &Path) -> anyhow::Result<(Inputs, Option<u64>)> {
    let count = || -> anyhow::Result<u64> {
        Ok(csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            // A regular file (read twice: counted, then read), never a FIFO that could block.
            .from_reader(facematch::fs::open_input(file)?)
            .records()
            .count() as u64)
    };
    let total = count()?;
    let rd = csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(facematch::fs::open_input(file)?);
    let mut first = true;
    let it = rd.into_records().filter_map(move |r| {
        let header = std::mem::take(&mut first);
        let r = r.ok()?;
        let image = r.get(0).unwrap_or("").to_string();
        let subject = r.get(1).unwrap_or("");
        if header && image.eq_ignore_ascii_case("image") && subject.eq_ignore_ascii_case("subject") {
            return None;
        }
        Some(match SubjectId::new(subject) {
            Ok(s) => BatchInput::with_subject(image, s),
            Err(_) => BatchInput::new(image), // reported as "no subject"
        })
    });
    Ok((Box::new(it), Some(total)))
}

// --- output -------------------------------------------------------------------

/// Where results go: complete records only are written (one input's lines
/// together), in chunks, so that a killed run leaves at most a torn last line.
struct Output {
    w: Box<dyn Write + Send>,
    file: Option<File>,
    buf: Vec<u8>,
    last_flush: Instant,
    format: Format,
    header: &'static [&'static str],
    need_header: bool,
}

impl Output {
    fn flush_if_due(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= 64 << 10 || self.last_flush.elapsed() >= Duration::from_millis(200) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf)?;
            self.w.flush()?;
            self.buf.clear();
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.flush()?;
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        Ok(())
    }

    fn jsonl(&mut self, v: &impl serde::Serialize) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.buf, v)?;
        self.buf.push(b'\n');
        Ok(())
    }

    /// Rows of one input: the `rows` column (second) gets their count.
    fn csv_rows(&mut self, key: &str, rows: Vec<Vec<String>>) -> anyhow::Result<()> {
        let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
        if self.need_header {
            w.write_record(self.header)?;
            self.need_header = false;
        }
        let n = rows.len().to_string();
        for r in rows {
            w.write_record(std::iter::once(key).chain(std::iter::once(n.as_str())).chain(r.iter().map(String::as_str)))?;
        }
        self.buf.extend_from_slice(&w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?);
        Ok(())
    }
}

/// Open the output; with `--resume`, also what FILE already answers (key -> times).
fn open_output(o: &BatchOut, header: &'static [&'static str], json_key: &str) -> anyhow::Result<(Output, HashMap<String, u32>)> {
    let mut answered: HashMap<String, u32> = HashMap::new();
    let (w, file, need_header): (Box<dyn Write + Send>, Option<File>, bool) = match &o.out {
        None => (Box::new(std::io::stdout()), None, true),
        Some(p) => {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(!o.resume)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?;
            let mut keep = 0u64;
            if o.resume {
                let mut text = Vec::new();
                f.read_to_end(&mut text)?;
                // A torn last line (the run was killed mid-write) is dropped.
                keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i as u64 + 1);
                let text = &text[..keep as usize];
                keep = match o.format {
                    Format::Jsonl => resume_jsonl(text, json_key, &mut answered),
                    Format::Csv => resume_csv(text, &mut answered)?,
                };
                f.set_len(keep)?;
                f.seek(SeekFrom::End(0))?;
            }
            let file = f.try_clone()?;
            (Box::new(f), Some(file), keep == 0)
        }
    };
    let out = Output {
        w,
        file,
        buf: Vec::with_capacity(128 << 10),
        last_flush: Instant::now(),
        format: o.format,
        header,
        need_header: need_header && o.format == Format::Csv,
    };
    Ok((out, answered))
}

/// Keys answered by complete JSON lines; returns how many bytes to keep (up to the first line that does not parse).
fn resume_jsonl(text: &[u8], key: &str, answered: &mut HashMap<String, u32>) -> u64 {
    let mut pos = 0usize;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { break };
        let k = match v.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => break,
        };
        *answered.entry(k).or_default() += 1;
        pos += line.len();
    }
    pos as u64
}

/// Keys answered by complete row groups (the `rows` column says how many
/// rows an input has; a group cut short is dropped and redone).
fn resume_csv(text: &[u8], answered: &mut HashMap<String, u32>) -> anyhow::Result<u64> {
    let mut rd = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(text);
    rd.headers()?;
    let mut keep = rd.position().byte();
    // The group being read: key, rows it announces, rows seen.
    let mut group: Option<(String, usize, usize)> = None;
    let mut rec = csv::StringRecord::new();
    while rd.read_record(&mut rec)? {
        let key = rec.get(0).unwrap_or("").to_string();
        let rows: usize = rec.get(1).and_then(|r| r.parse().ok()).unwrap_or(1).max(1);
        let (k, n, seen) = match group.take() {
            Some((k, n, seen)) if k == key && seen < n => (k, n, seen + 1),
            _ => (key, rows, 1),
        };
        if seen == n {
            *answered.entry(k).or_default() += 1;
            keep = rd.position().byte();
        } else {
            group = Some((k, n, seen));
        }
    }
    Ok(keep)
}

/// Drop inputs already answered (the n-th occurrence of a key is skipped while FILE answers it n times).
fn skip_answered<T, F>(
    it: Box<dyn Iterator<Item = T> + Send>,
    mut answered: HashMap<String, u32>,
    key: F,
    skipped: &std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Box<dyn Iterator<Item = T> + Send>
where
    T: 'static,
    F: Fn(&T) -> String + Send + 'static,
{
    if answered.is_empty() {
        return it;
    }
    let skipped = skipped.clone();
    Box::new(it.filter(move |x| match answered.get_mut(&key(x)) {
        Some(n) if *n > 0 => {
            *n -= 1;
            skipped.fetch_add(1, Ordering::Relaxed);
            false
        }
        _ => true,
    }))
}

fn path_key(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

// --- progress -----------------------------------------------------------------

struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    what: &'static str,
}

impl Reporter {
    fn new(o: &BatchOut, what: &'static str, total: Option<u64>) -> Self {
        let bar = shows_bar(o).then(|| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let tpl = if total.is_some() {
                "{prefix} {bar:30} {pos}/{len} {per_sec} {msg} [{elapsed_precise}<{eta_precise}]"
            } else {
                "{prefix} {spinner} {pos} {per_sec} {msg} [{elapsed_precise}]"
            };
            bar.set_style(indicatif::ProgressStyle::with_template(tpl).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            bar.set_prefix(what);
            bar
        });
        Reporter { bar, quiet: o.quiet, what }
    }

    fn update(&self, p: &BatchProgress, skipped: u64) {
        if let Some(b) = &self.bar {
            b.set_position(p.done + skipped);
            b.set_message(format!("faces {} matches {} errors {}", p.faces, p.matches, p.failed));
        }
    }

    fn finish(&self, p: &BatchProgress, skipped: u64, unit: &str) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if !self.quiet {
            let secs = p.elapsed.as_secs_f64().max(1e-9);
            eprintln!(
                "{}: {} {unit} in {:.2} s ({:.1}/s), {} failed, {} faces, {} matches{}{}",
                self.what,
                p.done,
                secs,
                p.done as f64 / secs,
                p.failed,
                p.faces,
                p.matches,
                if skipped > 0 { format!(", {skipped} skipped (already answered)") } else { String::new() },
                if p.cancelled { " [interrupted: run again with --resume to carry on]" } else { "" }
            );
        }
    }
}

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

/// Which image command, for the columns and JSON shape.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Faces,
    Identify,
    Verify,
    Enrol,
}

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

fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

fn bbox(b: &[f32; 4]) -> [String; 4] {
    [s(b[0]), s(b[1]), s(b[2]), s(b[3])]
}

fn decision_cols(d: &facematch::compliance::Decision) -> (String, String, String) {
    use facematch::compliance::Decision::*;
    match d {
        Match { subject, template, .. } | NeedsHumanReview { subject, template, .. } => (d.kind().to_string(), s(subject), s(template)),
        NoMatch { .. } => (d.kind().to_string(), String::new(), String::new()),
    }
}

/// One JSON line of an image command (field order = JSON order, `image` first).
#[derive(serde::Serialize)]
struct ImageLine<'a> {
    image: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a SubjectId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    faces: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    face: Option<facematch::probe::FaceBox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    faces_discarded: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn write_item(out: &mut Output, kind: Kind, item: &BatchItem) -> anyhow::Result<()> {
    let key = path_key(&item.input.path);
    match out.format {
        Format::Jsonl => {
            let mut line = ImageLine {
                image: &key,
                subject: None,
                faces: None,
                result: None,
                template: None,
                face: None,
                faces_discarded: None,
                error: None,
            };
            if matches!(kind, Kind::Verify | Kind::Enrol) {
                line.subject = item.input.subject.as_ref();
            }
            match &item.result {
                Ok(BatchOutput::Faces(f)) => line.faces = Some(serde_json::to_value(&f.faces)?),
                Ok(BatchOutput::Identified(r)) => line.result = Some(serde_json::to_value(r)?),
                Ok(BatchOutput::Verified(r)) => line.result = Some(serde_json::to_value(r)?),
                Ok(BatchOutput::Enrolled(r)) => {
                    line.template = Some(r.template);
                    line.face = Some(r.face);
                    line.faces_discarded = Some(r.faces_discarded);
                }
                Ok(_) => bail!("unexpected result kind"),
                Err(e) => line.error = Some(e.to_string()),
            }
            out.jsonl(&line)
        }
        Format::Csv => {
            let width = out.header.len() - 2;
            let err_row = |e: String| {
                let mut r = vec![String::new(); width];
                r[0] = "error".into();
                if matches!(kind, Kind::Verify | Kind::Enrol) {
                    r[1] = item.input.subject.as_ref().map(s).unwrap_or_default();
                }
                r[width - 1] = e;
                r
            };
            let rows: Vec<Vec<String>> = match &item.result {
                Err(e) => vec![err_row(e.to_string())],
                Ok(BatchOutput::Faces(f)) => {
                    if f.faces.is_empty() {
                        let mut r = vec![String::new(); width];
                        r[0] = "no_face".into();
                        vec![r]
                    } else {
                        f.faces
                            .iter()
                            .enumerate()
                            .map(|(i, face)| {
                                let [x, y, w, h] = bbox(&face.bbox);
                                let emb = face
                                    .embedding
                                    .as_ref()
                                    .map(|e| e.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" "))
                                    .unwrap_or_default();
                                vec!["ok".into(), s(i), x, y, w, h, s(face.score), emb, String::new()]
                            })
                            .collect()
                    }
                }
                Ok(BatchOutput::Identified(r)) => {
                    let tail = [s(r.faces_found), s(r.faces_discarded)];
                    if r.matches.is_empty() {
                        let mut row = vec![
                            "ok".to_string(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            "no_match".into(),
                        ];
                        row.extend([String::new(), String::new(), String::new(), String::new()]);
                        row.extend(tail.clone());
                        row.extend([String::new(), String::new()]);
                        vec![row]
                    } else {
                        r.matches
                            .iter()
                            .map(|m| {
                                let id = &m.identification;
                                let (d, sub, t) = decision_cols(&id.decision);
                                let score = id.candidates.first().map(|c| s(c.score)).unwrap_or_default();
                                let [x, y, w, h] = bbox(&m.face.bbox);
                                let mut row = vec!["ok".into(), x, y, w, h, s(m.face.score), d, sub, t, score, s(id.threshold.value())];
                                row.extend(tail.clone());
                                row.extend([s(id.audit_seq), String::new()]);
                                row
                            })
                            .collect()
                    }
                }
                Ok(BatchOutput::Verified(r)) => {
                    let v = &r.verification;
                    let [x, y, w, h] = bbox(&r.face.bbox);
                    vec![vec![
                        "ok".into(),
                        item.input.subject.as_ref().map(s).unwrap_or_default(),
                        x,
                        y,
                        w,
                        h,
                        s(r.face.score),
                        v.decision.kind().to_string(),
                        v.score.map(s).unwrap_or_default(),
                        s(v.threshold.value()),
                        s(r.faces_found),
                        s(r.faces_discarded),
                        s(v.audit_seq),
                        String::new(),
                    ]]
                }
                Ok(BatchOutput::Enrolled(r)) => {
                    let [x, y, w, h] = bbox(&r.face.bbox);
                    vec![vec![
                        "ok".into(),
                        s(&r.subject),
                        s(r.template),
                        r.consent_id.clone(),
                        x,
                        y,
                        w,
                        h,
                        s(r.face.score),
                        s(r.faces_discarded),
                        String::new(),
                    ]]
                }
                Ok(_) => bail!("unexpected result kind"),
            };
            out.csv_rows(&key, rows)
        }
    }
}

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
    let e = a.g.open()?;
    let p = super::pipeline(pcfg)?;
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
    let e = a.g.open()?;
    let p = super::pipeline(pcfg)?;
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
    let e = a.g.open()?;
    let p = super::pipeline(pcfg)?;
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

fn write_query(out: &mut Output, item: &EmbeddingItem) -> anyhow::Result<()> {
    match out.format {
        Format::Jsonl => {
            let v = match &item.result {
                Ok(r) => serde_json::json!({"query": item.query, "candidates": r.candidates, "decision": r.decision}),
                Err(e) => serde_json::json!({"query": item.query, "error": e.to_string()}),
            };
            out.jsonl(&v)
        }
        Format::Csv => {
            let rows = match &item.result {
                Err(e) => vec![vec![
                    "error".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    e.to_string(),
                ]],
                Ok(r) => {
                    let d = r.decision.kind().to_string();
                    let t = s(r.threshold.value());
                    if r.candidates.is_empty() {
                        vec![vec![
                            "ok".into(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            d,
                            t,
                            s(r.audit_seq),
                            String::new(),
                        ]]
                    } else {
                        r.candidates
                            .iter()
                            .enumerate()
                            .map(|(i, c)| {
                                vec![
                                    "ok".into(),
                                    s(i + 1),
                                    s(&c.subject),
                                    s(c.template),
                                    s(c.score),
                                    d.clone(),
                                    t.clone(),
                                    s(r.audit_seq),
                                    String::new(),
                                ]
                            })
                            .collect()
                    }
                }
            };
            out.csv_rows(&item.query.to_string(), rows)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_jsonl_counts_repeats_and_stops_at_a_bad_line() {
        let text = b"{\"image\":\"a.jpg\",\"faces\":[]}\n{\"image\":\"a.jpg\",\"error\":\"x\"}\n{\"image\":\"b.jpg\",\"fa\n";
        let mut seen = HashMap::new();
        let keep = resume_jsonl(text, "image", &mut seen);
        assert_eq!(keep as usize, text.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(1).unwrap().0 + 1);
        assert_eq!(seen, HashMap::from([("a.jpg".to_string(), 2)]));
        let mut seen = HashMap::new();
        resume_jsonl(b"{\"query\":7,\"candidates\":[]}\n", "query", &mut seen);
        assert_eq!(seen, HashMap::from([("7".to_string(), 1)]));
    }

    #[test]
    fn resume_csv_drops_a_row_group_cut_short() {
        let full = "input,rows,status\na.jpg,2,ok\na.jpg,2,ok\n\"b,1.jpg\",1,error\nc.jpg,3,ok\nc.jpg,3,ok\n";
        let mut seen = HashMap::new();
        let keep = resume_csv(full.as_bytes(), &mut seen).unwrap() as usize;
        assert_eq!(&full[..keep], "input,rows,status\na.jpg,2,ok\na.jpg,2,ok\n\"b,1.jpg\",1,error\n");
        assert_eq!(seen, HashMap::from([("a.jpg".to_string(), 1), ("b,1.jpg".to_string(), 1)]));
        // Only a header: keep it; nothing at all: keep nothing (the header is written again).
        assert_eq!(resume_csv(b"input,rows,status\n", &mut HashMap::new()).unwrap(), 18);
        assert_eq!(resume_csv(b"", &mut HashMap::new()).unwrap(), 0);
    }

    #[test]
    fn answered_inputs_are_skipped_as_often_as_they_were_answered() {
        let skipped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let it: Box<dyn Iterator<Item = String> + Send> = Box::new(["a", "b", "a", "a", "c"].into_iter().map(String::from));
        let left: Vec<String> =
            skip_answered(it, HashMap::from([("a".to_string(), 2), ("c".to_string(), 1)]), |s: &String| s.clone(), &skipped).collect();
        assert_eq!(left, ["b", "a"]);
        assert_eq!(skipped.load(Ordering::Relaxed), 3);
    }
}

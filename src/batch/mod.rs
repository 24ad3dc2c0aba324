//! Streaming batch jobs: many images (or embeddings) in, results out in input
//! order, at the engine's speed.
//!
//! [`run_images`] takes any iterator of inputs (a directory walk, a list of
//! millions of paths read line by line) and hands each result to a sink, in
//! input order, as soon as it and everything before it are done:
//!
//! - images are read, decoded, detected, aligned and embedded on `threads`
//!   worker threads at once (all faces of an image in one recogniser batch);
//! - the queries go to the engine deferred ([`Engine::identify_faces_deferred`],
//!   [`Engine::query_deferred`]): many are in flight and their
//!   audit records share fsyncs, and a result reaches the sink only once its
//!   records are durable, as with the one-at-a-time calls;
//! - at most `window` inputs are between intake and the sink at any time, so
//!   memory does not grow with the number of inputs;
//! - a progress callback sees counters after every result; setting the
//!   `cancel` flag stops intake, what is in flight is finished and delivered.
//!
//! [`run_embeddings`] does the same for precomputed embeddings: blocks of
//! probes are searched per pass ([`Engine::identify_batch_deferred`]) with
//! several blocks in flight.
//!
//! Results are those of the one-at-a-time calls ([`crate::probe`]): the same
//! faces, decisions, candidates and scores; the one difference is that an
//! image without any face is a failed input in every job but [`BatchJob::Faces`].
//! No probe embedding outlives its query (zeroed once submitted); only
//! [`BatchJob::Faces`] with `embeddings` returns embeddings, because it was asked to.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use facematch::batch::{run_images, walk_images, BatchInput, BatchJob, BatchOptions};
//! use facematch::pipeline::{FacePipeline, PipelineConfig};
//! let pipeline = FacePipeline::new(PipelineConfig::default())?;
//! let inputs = walk_images(["photos".into()]).map(BatchInput::new);
//! let job = BatchJob::Faces { embeddings: false };
//! let summary = run_images(&pipeline, &job, inputs, &BatchOptions::default(), &AtomicBool::new(false), &mut |_| {}, &mut |item| {
//!     println!("{}: {}", item.input.path.display(), item.result.is_ok());
//!     Ok(())
//! })?;
//! eprintln!("{} images, {} failed", summary.done, summary.failed);
//! # Ok::<(), facematch::Error>(())
//! ```

mod walk;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use zeroize::Zeroize;

pub use walk::{is_image_path, walk_images, WalkImages, IMAGE_EXTENSIONS};

use crate::compliance::{Decision, Operator, Purpose, SubjectId};
use crate::engine::{normalise, Engine, FaceCount, Identification, Identify, Pending, Query, QueryContext, SearchOptions, Verification};
use crate::pipeline::{FacePipeline, ImageFaces};
use crate::probe::{FaceBox, FaceIdentification, ImageIdentification, ImageVerification};
use crate::{Error, Result};

/// How a batch runs.
#[derive(Clone, Debug, Default)]
pub struct BatchOptions {
    /// Worker threads decoding and embedding images (0: one per core).
    pub threads: usize,
    /// Most inputs between intake and the sink at once (0: 32 per thread, at least 64).
    /// Bounds memory and how many queries share an audit commit.
    pub window: usize,
}

impl BatchOptions {
    /// The worker count in force.
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    /// The window in force.
    pub fn effective_window(&self) -> usize {
        if self.window > 0 {
            self.window
        } else {
            (self.effective_threads() * 32).max(64)
        }
    }
}

/// What to do with each image.
#[derive(Clone, Debug)]
pub enum BatchJob<'a> {
    /// Detect faces, and embed them when asked (no gallery).
    Faces {
        /// Also compute every face's embedding (and return it).
        embeddings: bool,
    },
    /// 1:N for every face ([`crate::probe::identify_image`]).
    Identify {
        /// The gallery.
        engine: &'a Engine,
        /// Operator and purpose.
        ctx: QueryContext,
        /// Candidates per face.
        k: usize,
    },
    /// 1:1 of the largest face against each input's subject ([`crate::probe::verify_image`]).
    Verify {
        /// The gallery.
        engine: &'a Engine,
        /// Operator and purpose.
        ctx: QueryContext,
    },
    /// Enrol the largest face of each image for the input's subject
    /// ([`crate::probe::enrol_image`]; other faces are never embedded), on the
    /// subject's recorded consent that covers `purposes`: a subject without
    /// one is refused by name.
    Enrol {
        /// The gallery.
        engine: &'a Engine,
        /// Who enrols.
        operator: Operator,
        /// Purposes to enrol for (empty: every purpose of the consent found).
        purposes: Vec<Purpose>,
        /// The consent to enrol on (`None`: the subject's recorded consent covering `purposes`).
        consent_id: Option<String>,
    },
}

/// One input: an image file, and for verification the subject to compare with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchInput {
    /// The image file.
    pub path: PathBuf,
    /// The claimed identity ([`BatchJob::Verify`] only).
    pub subject: Option<SubjectId>,
}

impl BatchInput {
    /// An image without a subject.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BatchInput { path: path.into(), subject: None }
    }

    /// An image and the subject it claims to be.
    pub fn with_subject(path: impl Into<PathBuf>, subject: SubjectId) -> Self {
        BatchInput { path: path.into(), subject: Some(subject) }
    }
}

/// The result of one input.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum BatchOutput {
    /// [`BatchJob::Faces`].
    Faces(ImageFaces),
    /// [`BatchJob::Identify`].
    Identified(ImageIdentification),
    /// [`BatchJob::Verify`].
    Verified(ImageVerification),
    /// [`BatchJob::Enrol`].
    Enrolled(ImageEnrolment),
}

/// An image enrolled by [`BatchJob::Enrol`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageEnrolment {
    /// Whose template.
    pub subject: SubjectId,
    /// The new template's id.
    pub template: u64,
    /// The consent it rests on.
    pub consent_id: String,
    /// The face enrolled (the largest).
    pub face: FaceBox,
    /// Other faces of the image (never embedded).
    pub faces_discarded: u32,
}

/// One input and its result, handed to the sink in input order.
#[derive(Debug)]
pub struct BatchItem {
    /// Position in the input sequence (from 0).
    pub index: u64,
    /// The input.
    pub input: BatchInput,
    /// What came of it; an error is this input's failure only, the run goes on.
    pub result: Result<BatchOutput>,
}

/// Counters, passed to the progress callback after every result and returned at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchProgress {
    /// Inputs delivered to the sink.
    pub done: u64,
    /// Of which failed.
    pub failed: u64,
    /// Faces found.
    pub faces: u64,
    /// Matches (and human-review hits) returned.
    pub matches: u64,
    /// Time since the start.
    pub elapsed: Duration,
    /// True when intake stopped on the cancel flag (set in the final summary).
    pub cancelled: bool,
}

impl BatchProgress {
    fn count(&mut self, faces: u64, matches: u64, failed: bool) {
        self.done += 1;
        self.faces += faces;
        self.matches += matches;
        self.failed += failed as u64;
    }

    fn count_output(&mut self, r: &Result<BatchOutput>) {
        match r {
            Ok(BatchOutput::Faces(f)) => self.count(f.faces.len() as u64, 0, false),
            Ok(BatchOutput::Identified(i)) => self.count(i.faces_found as u64, i.matches.len() as u64, false),
            Ok(BatchOutput::Verified(v)) => self.count(v.faces_found as u64, v.verification.decision.is_match() as u64, false),
            Ok(BatchOutput::Enrolled(e)) => self.count(1 + e.faces_discarded as u64, 0, false),
            Err(_) => self.count(0, 0, true),
        }
    }
}

/// A worker's result, before the audit records it waits on are durable.
enum Stage {
    Ready(Result<BatchOutput>),
    Identify {
        pending: Pending<Vec<Identification>>,
        boxes: Vec<FaceBox>,
    },
    Verify {
        pending: Pending<Verification>,
        face: FaceBox,
        found: u32,
        discarded: u32,
    },
    /// Enrolments are made in input order, so template ids do not depend on thread timing.
    Enrol {
        request: crate::engine::Enrolment,
        face: FaceBox,
        discarded: u32,
    },
}

impl Stage {
    /// Wait for durability (in input order) and make the output.
    fn finish(self, job: &BatchJob) -> Result<BatchOutput> {
        match self {
            Stage::Enrol { mut request, face, discarded } => {
                let BatchJob::Enrol { engine, operator, .. } = job else {
                    return Err(Error::config("job", "an enrolment outside an enrol job"));
                };
                let r = engine.enrol(operator, request.clone());
                request.embedding.zeroize();
                let (subject, consent_id) = (request.subject, request.consent_id);
                Ok(BatchOutput::Enrolled(ImageEnrolment { subject, template: r?, consent_id, face, faces_discarded: discarded }))
            }
            Stage::Ready(r) => r,
            Stage::Identify { pending, boxes } => {
                let found = boxes.len() as u32;
                let matches: Vec<FaceIdentification> = boxes
                    .into_iter()
                    .zip(pending.wait()?)
                    .filter(|(_, id)| !matches!(id.decision, Decision::NoMatch { .. }))
                    .map(|(face, identification)| FaceIdentification { face, identification })
                    .collect();
                let discarded = found - matches.len() as u32;
                Ok(BatchOutput::Identified(ImageIdentification { matches, faces_found: found, faces_discarded: discarded }))
            }
            Stage::Verify { pending, face, found, discarded } => Ok(BatchOutput::Verified(ImageVerification {
                face,
                verification: pending.wait()?,
                faces_found: found,
                faces_discarded: discarded,
            })),
        }
    }
}

fn name_path(e: Error, path: &std::path::Path) -> Error {
    match e {
        Error::BadImage { path: None, reason } => Error::BadImage { path: Some(path.to_path_buf()), reason },
        other => other,
    }
}

/// Decode, detect, embed and submit one input (on a worker thread).
fn work(pipeline: &FacePipeline, job: &BatchJob, input: &BatchInput) -> Stage {
    match work_inner(pipeline, job, input) {
        Ok(s) => s,
        Err(e) => Stage::Ready(Err(name_path(e, &input.path))),
    }
}

fn work_inner(pipeline: &FacePipeline, job: &BatchJob, input: &BatchInput) -> Result<Stage> {
    match job {
        BatchJob::Faces { embeddings } => Ok(Stage::Ready(pipeline.process_path(&input.path, *embeddings).map(BatchOutput::Faces))),
        BatchJob::Identify { engine, ctx, k } => {
            crate::probe::check_model(engine, pipeline)?;
            let img = pipeline.decode_path(&input.path)?;
            let mut faces = pipeline.detect(&img)?;
            if faces.is_empty() {
                return Err(Error::BadImage { path: Some(input.path.clone()), reason: "no face found".into() });
            }
            pipeline.embed_faces(&img, &mut faces)?;
            drop(img);
            let boxes: Vec<FaceBox> = faces.iter().map(|f| FaceBox { bbox: f.bbox, score: f.score }).collect();
            let mut probes: Vec<Vec<f32>> = faces.iter_mut().filter_map(|f| f.embedding.take()).collect();
            let r = engine.identify_faces_deferred(ctx, &probes, Identify::top(*k));
            for p in &mut probes {
                p.zeroize();
            }
            Ok(Stage::Identify { pending: r?, boxes })
        }
        BatchJob::Verify { engine, ctx } => {
            let subject = input
                .subject
                .as_ref()
                .ok_or_else(|| Error::config("subject", format!("no subject to verify {} against", input.path.display())))?;
            crate::probe::check_model(engine, pipeline)?;
            let img = pipeline.decode_path(&input.path)?;
            let (face, _others, found, discarded) = crate::probe::main_face(pipeline.detect(&img)?)?;
            let (fb, mut e) = crate::probe::embed_one(pipeline, &img, face)?;
            drop(img);
            let r = engine.query_deferred(ctx, Query::verify(&e, subject).faces(FaceCount { found, discarded }));
            e.zeroize();
            Ok(Stage::Verify { pending: r?, face: fb, found, discarded })
        }
        // The enrolment itself is made by the consumer, in input order (Stage::finish).
        BatchJob::Enrol { engine, purposes, consent_id, .. } => {
            let subject = input
                .subject
                .as_ref()
                .ok_or_else(|| Error::config("subject", format!("no subject to enrol {} for", input.path.display())))?;
            // Which recorded consent covers the purposes (checked before any face is embedded).
            let consent = engine
                .consents_of(subject)
                .into_iter()
                .filter(|c| consent_id.as_ref().is_none_or(|id| &c.consent_id == id))
                .filter(|c| c.withdrawn_at_ms.is_none() && purposes.iter().all(|p| c.purposes.contains(p)))
                .min_by(|a, b| a.consent_id.cmp(&b.consent_id))
                .ok_or_else(|| Error::PolicyViolation {
                    rule: "consent-required",
                    reason: format!(
                        "{subject} has no recorded consent{}",
                        if purposes.is_empty() { String::new() } else { " covering the purposes".into() }
                    ),
                })?;
            let ps = if purposes.is_empty() { consent.purposes.clone() } else { purposes.clone() };
            crate::probe::check_model(engine, pipeline)?;
            let img = pipeline.decode_path(&input.path)?;
            // Exactly one face: a group photo must not enrol a stranger under the subject's name.
            let dominance = engine.config().enrol_face_dominance;
            let (face, discarded) = crate::probe::pick_enrol_face(pipeline.detect(&img)?, None, dominance)?;
            let (fb, e) = crate::probe::embed_one(pipeline, &img, face)?;
            let mut request = crate::engine::Enrolment::new(subject.clone(), consent.consent_id, ps, e);
            request.model_id = Some(pipeline.model_id().to_string());
            Ok(Stage::Enrol { request, face: fb, discarded })
        }
    }
}

/// Inputs released to the sink, for the intake to stay within the window.
struct Window {
    released: Mutex<u64>,
    cv: Condvar,
}

/// Run `job` over `inputs` and hand every result to `sink` in input order
/// (see the module docs). `progress` is called after each result.
///
/// Returns the final counters (`cancelled` set when the flag stopped
/// intake). An `Err` means the run itself failed (the sink failed, or an
/// audit record could not be written: no answer is given after that);
/// a bad input is only a failed [`BatchItem`].
pub fn run_images<I>(
    pipeline: &FacePipeline,
    job: &BatchJob,
    inputs: I,
    opts: &BatchOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&BatchProgress),
    sink: &mut dyn FnMut(BatchItem) -> Result<()>,
) -> Result<BatchProgress>
where
    I: IntoIterator<Item = BatchInput>,
    I::IntoIter: Send,
{
    let started = Instant::now();
    let threads = opts.effective_threads();
    let window = opts.effective_window() as u64;
    let win = Window { released: Mutex::new(0), cv: Condvar::new() };
    // Set when the consumer gives up (sink or audit failure): intake stops.
    let stop = AtomicBool::new(false);
    let (work_tx, work_rx) = mpsc::sync_channel::<(u64, BatchInput)>(threads * 2);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(u64, BatchInput, Stage)>();
    let mut stats = BatchProgress::default();
    let inputs = inputs.into_iter();

    let outcome: Result<()> = std::thread::scope(|s| {
        let (win, stop, work_rx) = (&win, &stop, &work_rx);
        let feeder = s.spawn(move || {
            let mut cancelled = false;
            for (i, input) in (0u64..).zip(inputs) {
                if cancel.load(Ordering::Relaxed) {
                    cancelled = true;
                    break;
                }
                {
                    let mut released = win.released.lock();
                    while i >= *released + window && !stop.load(Ordering::Relaxed) {
                        win.cv.wait_for(&mut released, Duration::from_millis(50));
                        if cancel.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if cancel.load(Ordering::Relaxed) {
                    cancelled = true;
                    break;
                }
                if work_tx.send((i, input)).is_err() {
                    break;
                }
            }
            cancelled
        });
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            s.spawn(move || loop {
                let next = work_rx.lock().recv();
                let Ok((i, input)) = next else { break };
                let stage = if stop.load(Ordering::Relaxed) {
                    Stage::Ready(Err(Error::Audit("run stopped".into())))
                } else {
                    work(pipeline, job, &input)
                };
                if done_tx.send((i, input, stage)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);

        // In order: wait for durability, deliver, widen the window.
        let mut parked: BTreeMap<u64, (BatchInput, Stage)> = BTreeMap::new();
        let mut next = 0u64;
        let mut failure: Option<Error> = None;
        for (i, input, stage) in done_rx.iter() {
            parked.insert(i, (input, stage));
            while let Some((input, stage)) = parked.remove(&next) {
                if failure.is_none() {
                    let result = stage.finish(job);
                    // A record that could not be written: answer nothing more.
                    let fatal = matches!(&result, Err(Error::Audit(_)));
                    if fatal {
                        failure = result.err();
                        stop.store(true, Ordering::Relaxed);
                    } else {
                        stats.count_output(&result);
                        stats.elapsed = started.elapsed();
                        if let Err(e) = sink(BatchItem { index: next, input, result }) {
                            failure = Some(e);
                            stop.store(true, Ordering::Relaxed);
                        } else {
                            progress(&stats);
                        }
                    }
                }
                next += 1;
                *win.released.lock() = next;
                win.cv.notify_all();
            }
        }
        stats.cancelled = feeder.join().unwrap_or(false);
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    outcome?;
    stats.elapsed = started.elapsed();
    Ok(stats)
}

/// One query of [`run_embeddings`] and its result.
#[derive(Debug)]
pub struct EmbeddingItem {
    /// The query's row number in the input.
    pub query: u64,
    /// Candidates and decision; an error for this query only (e.g. a NaN probe).
    pub result: Result<Identification>,
}

/// Options of [`run_embeddings`].
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingOptions {
    /// Candidates per query.
    pub k: usize,
    /// Strategy and breadth of the search.
    pub search: SearchOptions,
    /// Queries searched together in one pass (0: 256).
    pub block: usize,
    /// Blocks in flight before the oldest is waited on (0: 8).
    pub blocks_in_flight: usize,
}

impl Default for EmbeddingOptions {
    fn default() -> Self {
        EmbeddingOptions { k: 10, search: SearchOptions::default(), block: 0, blocks_in_flight: 0 }
    }
}

/// 1:N for precomputed embeddings: `queries` yields `(row number, probe)`;
/// blocks of probes are searched per pass and several blocks are in flight,
/// so their audit records share commits. `sink` gets each result in order,
/// once its record is durable. Runs on the calling thread (the index's
/// batch search uses the current rayon pool: install one to bound it).
///
/// ```
/// # use facematch::compliance::*;
/// # use facematch::config::GalleryConfig;
/// # use facematch::engine::{EngineBuilder, Enrolment, QueryContext};
/// # use facematch::store::MasterKey;
/// # use facematch::batch::{run_embeddings, EmbeddingOptions};
/// # let dir = tempfile::tempdir().unwrap();
/// # let door = Purpose::new("door-access").unwrap();
/// # let mut cfg = GalleryConfig::default();
/// # cfg.dim = 4;
/// # cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
/// # let engine = EngineBuilder::new(dir.path().join("g")).key(MasterKey::generate()).create(cfg).unwrap();
/// # let op = Operator::new("clerk-1").unwrap();
/// # let consent = ConsentRecord::new("form-1", "alice", ConsentBasis::SeparateConsent, vec![door.clone()], "clerk-1", AgeBracket::Adult);
/// # engine.record_consent(&op, consent).unwrap();
/// # let alice = SubjectId::new("alice").unwrap();
/// # engine.enrol(&op, Enrolment::new(alice, "form-1", vec![door.clone()], vec![1.0, 0.0, 0.0, 0.0])).unwrap();
/// let ctx = QueryContext::new(op, door);
/// let probes = vec![vec![0.9, 0.1, 0.0, 0.0], vec![f32::NAN; 4]];
/// let mut out = Vec::new();
/// let stop = std::sync::atomic::AtomicBool::new(false);
/// run_embeddings(&engine, &ctx, probes.into_iter().enumerate().map(|(i, p)| (i as u64, p)), &EmbeddingOptions::default(), &stop, &mut |_| {}, &mut |item| {
///     out.push(item);
///     Ok(())
/// }).unwrap();
/// assert!(out[0].result.as_ref().unwrap().decision.is_match());
/// assert!(out[1].result.is_err());
/// ```
pub fn run_embeddings<I>(
    engine: &Engine,
    ctx: &QueryContext,
    queries: I,
    opts: &EmbeddingOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&BatchProgress),
    sink: &mut dyn FnMut(EmbeddingItem) -> Result<()>,
) -> Result<BatchProgress>
where
    I: IntoIterator<Item = (u64, Vec<f32>)>,
{
    let started = Instant::now();
    let dim = engine.config().dim;
    let block = if opts.block > 0 { opts.block } else { 256 };
    let depth = if opts.blocks_in_flight > 0 { opts.blocks_in_flight } else { 8 };
    let mut stats = BatchProgress::default();
    // A block in flight: its rows (query number, or the row's own error), and the pending answers of the valid ones.
    type Rows = Vec<(u64, Option<Error>)>;
    let mut in_flight: VecDeque<(Rows, Pending<Vec<Identification>>)> = VecDeque::new();
    let mut deliver = |rows: Rows, pending: Pending<Vec<Identification>>, stats: &mut BatchProgress| -> Result<()> {
        let mut answers = pending.wait()?.into_iter();
        for (query, err) in rows {
            let result = match err {
                Some(e) => Err(e),
                None => answers.next().ok_or_else(|| Error::Audit("batch answer missing".into())),
            };
            let matches = result.as_ref().map(|r| r.decision.is_match() as u64).unwrap_or(0);
            stats.count(result.is_ok() as u64, matches, result.is_err());
            stats.elapsed = started.elapsed();
            sink(EmbeddingItem { query, result })?;
        }
        progress(stats);
        Ok(())
    };
    let mut queries = queries.into_iter();
    let mut probes: Vec<f32> = Vec::with_capacity(block * dim);
    let mut rows: Rows = Vec::with_capacity(block);
    loop {
        let mut exhausted = false;
        while rows.len() < block {
            if cancel.load(Ordering::Relaxed) {
                stats.cancelled = true;
                exhausted = true;
                break;
            }
            let Some((query, mut p)) = queries.next() else {
                exhausted = true;
                break;
            };
            match normalise(dim, &p) {
                Ok(mut q) => {
                    probes.extend_from_slice(&q);
                    q.zeroize();
                    rows.push((query, None));
                }
                Err(e) => rows.push((query, Some(e))),
            }
            p.zeroize();
        }
        if !rows.is_empty() {
            let r = engine.identify_batch_deferred(ctx, &probes, Identify { k: opts.k, search: opts.search });
            probes.zeroize();
            probes.clear();
            in_flight.push_back((std::mem::take(&mut rows), r?));
        }
        while in_flight.len() > depth || (exhausted && !in_flight.is_empty()) {
            if let Some((rows, pending)) = in_flight.pop_front() {
                deliver(rows, pending, &mut stats)?;
            }
        }
        if exhausted {
            break;
        }
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

//! The vector index: an exact SIMD scan and an HNSW graph over one store.
//!
//! Templates are L2-normalised on the way in and scored by their exact f32
//! dot product (the cosine). Each template occupies one *slot* (dense, in
//! insertion order). The graph keeps one fixed-size, 64-byte aligned record
//! per slot in one array: the traversal copy of the vector (f32, or int8 codes
//! plus a scale) followed by the level-0 neighbour list, so one visit touches
//! one contiguous region. Upper levels (about 1 node in `m`) live apart.
//!
//! Searching takes `&self` only and allocates nothing in its loop: a
//! per-thread scratch holds the epoch-stamped visited array and the heaps.
//! With [`VectorStorage::Int8`] the graph is walked with int8 codes and the
//! short list is re-ranked with the exact f32 vectors, so the reported scores
//! (and decisions taken on them) are exact.
//!
//! Deletion is a tombstone: a removed slot is never returned, but it can still
//! be walked through; [`VectorIndex::compact`] drops tombstoned vectors for
//! good, repairs the neighbour lists around them and renumbers the slots.
//!
//! The graph is built in deterministic batches (prefix doubling): each batch
//! of new nodes searches the frozen graph in parallel, then links are written
//! and reverse links pruned per target in parallel. The same seed and input
//! give the same graph whatever the thread count.
//!
//! ```
//! use facematch::index::{IndexConfig, SearchParams, VectorIndex};
//! let mut idx = VectorIndex::new(3, IndexConfig::default()).unwrap();
//! let a = idx.add(&[1.0, 0.0, 0.0]).unwrap();
//! let _b = idx.add(&[0.0, 1.0, 0.0]).unwrap();
//! let hits = idx.search(&[0.9, 0.1, 0.0], &SearchParams::top(1)).unwrap();
//! assert_eq!(hits[0].slot, a);
//! idx.remove(a).unwrap();
//! assert_ne!(idx.search(&[0.9, 0.1, 0.0], &SearchParams::top(1)).unwrap()[0].slot, a);
//! ```

mod flat;
// SIMD dot products and int8 quantisation, runtime-dispatched: only the index uses them.
pub(crate) mod kernels;
mod graph;
mod io;

pub use io::FORMAT_VERSION;

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};


/// How the graph stores its traversal copy of each vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VectorStorage {
    /// Full f32 vectors in the graph records (exact traversal, 4 bytes/dim).
    F32,
    /// Int8 codes with a per-vector scale in the graph records (1 byte/dim),
    /// f32 vectors kept apart for the exact re-rank.
    Int8,
}

/// Which search path to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SearchStrategy {
    /// Exact scan for small galleries or selective filters, graph otherwise.
    #[default]
    Auto,
    /// Always the exact scan (recall 1 by construction).
    Exact,
    /// Always the HNSW graph.
    Graph,
}

/// Configuration of a [`VectorIndex`].
///
/// ```
/// use facematch::index::{IndexConfig, VectorStorage};
/// let cfg = IndexConfig { m: 24, storage: VectorStorage::F32, ..Default::default() };
/// assert!(cfg.validate().is_ok());
/// assert!(IndexConfig { ef_search: 0, ..Default::default() }.validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IndexConfig {
    /// Neighbours per node on upper levels (level 0 keeps `2 * m`).
    pub m: usize,
    /// Candidate list size while building.
    pub ef_construction: usize,
    /// Default candidate list size while searching (raised to `k` when smaller).
    pub ef_search: usize,
    /// Traversal copy of the vectors.
    pub storage: VectorStorage,
    /// With int8 storage, how many of the best approximate candidates get an
    /// exact f32 re-rank (at least `k` are always re-ranked).
    pub rerank: usize,
    /// `Auto` always uses the exact scan below this many live vectors (above
    /// it, whichever of exact scan and graph the cost model finds cheaper).
    pub exact_below: usize,
    /// Build the HNSW graph. `false` gives an exact-only index: no build
    /// cost, every search is the exact scan (recall 1), `Graph` included.
    pub graph: bool,
    /// Threads to build the graph with (0 = rayon's default pool).
    pub build_threads: usize,
    /// Seed of the level assignment (the build is deterministic).
    pub seed: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            m: 16,
            ef_construction: 200,
            ef_search: 128,
            storage: VectorStorage::Int8,
            rerank: 64,
            exact_below: 10_000,
            graph: true,
            build_threads: 0,
            seed: 0x5EED_FACE,
        }
    }
}

impl IndexConfig {
    /// Check every field; the index refuses an invalid configuration.
    pub fn validate(&self) -> Result<()> {
        if !(2..=256).contains(&self.m) {
            return Err(Error::config("index.m", format!("must be in 2..=256, got {}", self.m)));
        }
        if self.ef_construction < self.m || self.ef_construction > 100_000 {
            return Err(Error::config(
                "index.ef_construction",
                format!("must be in m..=100000, got {}", self.ef_construction),
            ));
        }
        if self.ef_search == 0 || self.ef_search > 1_000_000 {
            return Err(Error::config("index.ef_search", format!("must be in 1..=1000000, got {}", self.ef_search)));
        }
        if self.rerank == 0 || self.rerank > 1_000_000 {
            return Err(Error::config("index.rerank", format!("must be in 1..=1000000, got {}", self.rerank)));
        }
        if self.build_threads > 4096 {
            return Err(Error::config("index.build_threads", format!("must be <= 4096, got {}", self.build_threads)));
        }
        Ok(())
    }
}

/// Parameters of one search.
#[derive(Clone, Copy)]
pub struct SearchParams<'a> {
    /// How many hits to return at most.
    pub k: usize,
    /// Candidate list size for the graph (default: the config's `ef_search`).
    pub ef: Option<usize>,
    /// Which path to take.
    pub strategy: SearchStrategy,
    /// `filter(slot) == false` hides a slot. A filter that passes few slots
    /// makes `Auto` pick the exact scan.
    pub filter: Option<&'a (dyn Fn(u32) -> bool + Sync)>,
}

impl<'a> SearchParams<'a> {
    /// The `k` best hits, default ef, `Auto` strategy, no filter.
    pub fn top(k: usize) -> Self {
        SearchParams { k, ef: None, strategy: SearchStrategy::Auto, filter: None }
    }
    /// The same parameters with another strategy.
    pub fn with_strategy(mut self, s: SearchStrategy) -> Self {
        self.strategy = s;
        self
    }
    /// The same parameters with an explicit ef.
    pub fn with_ef(mut self, ef: usize) -> Self {
        self.ef = Some(ef);
        self
    }
}

impl std::fmt::Debug for SearchParams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchParams")
            .field("k", &self.k)
            .field("ef", &self.ef)
            .field("strategy", &self.strategy)
            .field("filter", &self.filter.is_some())
            .finish()
    }
}

/// One search result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// The slot of the template.
    pub slot: u32,
    /// Exact f32 dot product with the query (the cosine; both are unit vectors).
    pub score: f32,
}

/// One 64-byte line of the record array (alignment unit).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u32; 16]);

const LINE_WORDS: usize = 16;
/// Highest level a node can get.
pub(crate) const MAX_LEVEL: usize = 16;
/// Under this pass fraction of a filter, `Auto` takes the exact scan.
const FILTER_EXACT_FRACTION: f32 = 0.1;

// The `Auto` cost model, fitted on this project's reference machine (AMD EPYC
// Zen4, AVX-512 VNNI, 1 thread; `cargo bench --bench search`, 100k x 128 and
// 1M x 128: int8 exact 241 us single / 95 us per query in batches of 64 at
// 100k; graph ef 128 116 us int8, 250 us f32). Seconds per stored vector per dimension for the int8 exact scan,
// one query at a time and in batches of 64, and per unit of `ef` for the graph.
const EXACT_SINGLE_S_PER_DIM: f64 = 2.0e-11;
const EXACT_BATCH_S_PER_DIM: f64 = 7.7e-12;
const GRAPH_S_PER_EF: f64 = 0.97e-6;
const GRAPH_S_PER_EF_DIM: f64 = 0.0057e-6;
/// Int8 traversal (with its f32 re-rank) against f32 traversal, same ef.
const GRAPH_INT8_FACTOR: f64 = 0.5;

/// Exact scan and HNSW graph over L2-normalised vectors. `Send + Sync`.
pub struct VectorIndex {
    dim: usize,
    /// f32 dimension padded to a multiple of 16 (zeros).
    dpad: usize,
    /// int8 code bytes per vector (multiple of 64), 0 for f32 storage.
    cpad: usize,
    cfg: IndexConfig,
    m0: usize,
    /// Words of the vector part at the start of a record.
    vec_words: usize,
    /// Words per record (multiple of 16).
    rec_words: usize,
    /// slots * rec_words / 16 lines.
    lines: Vec<Line>,
    /// Int8 storage: the exact f32 vectors (slots * dpad); empty for F32.
    f32s: Vec<f32>,
    levels: Vec<u8>,
    /// Upper-level lists per slot: for level l >= 1 at `(l-1)*(1+m)`: count, then m ids.
    upper: Vec<Box<[u32]>>,
    entry: Option<u32>,
    max_level: usize,
    deleted: Vec<u64>,
    n_deleted: usize,
    slots: usize,
    /// Blocked int8 copy of every slot for the exact scan.
    flat: flat::FlatCodes,
    /// What the last [`VectorIndex::calibrate`] found (not serialised).
    calibration: Option<Calibration>,
}

/// What [`VectorIndex::calibrate`] measured: how wide a graph search must be
/// to find the exact scan's best match.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Smallest `ef` tried (32, 64, ... while the graph is cheaper than the
    /// exact scan) whose top-1 agreed with the exact scan on at least the
    /// target share of probes; `None` if none did: `Auto` then scans.
    pub ef: Option<usize>,
    /// Top-1 agreement at that `ef` (at the widest one tried if none reached the target).
    pub agreement: f32,
    /// Live vectors when measured; the result is ignored once the index has
    /// halved or doubled since.
    pub live: usize,
}

/// Ordered key of an f32: `a < b` iff `ord(a) < ord(b)` (finite values).
#[inline(always)]
pub(crate) fn ord(s: f32) -> u32 {
    let b = s.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Inverse of [`ord`].
#[inline(always)]
pub(crate) fn unord(u: u32) -> f32 {
    if u & 0x8000_0000 != 0 {
        f32::from_bits(u & 0x7fff_ffff)
    } else {
        f32::from_bits(!u)
    }
}

/// Key ordering hits best first: higher score, then lower slot.
#[inline(always)]
fn hit_key(score: f32, slot: u32) -> u64 {
    ((ord(score) as u64) << 32) | (!slot) as u64
}

/// The score a [`hit_key`] was made from.
fn score_of_key(key: u64) -> f32 {
    unord((key >> 32) as u32)
}

fn sort_hits(h: &mut [Hit]) {
    h.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.slot.cmp(&b.slot)));
}

/// Check a vector and return its L2 norm.
fn check_vector(v: &[f32], dim: usize) -> Result<f32> {
    if v.len() != dim {
        return Err(Error::WrongDimension { expected: dim, got: v.len() });
    }
    let mut n2 = 0.0f64;
    for &x in v {
        if !x.is_finite() {
            return Err(Error::InvalidEmbedding { reason: "contains NaN or infinity".into() });
        }
        n2 += x as f64 * x as f64;
    }
    let n = n2.sqrt();
    if n.is_nan() || n <= 1e-12 || n.is_infinite() {
        return Err(Error::InvalidEmbedding { reason: "zero norm".into() });
    }
    Ok(n as f32)
}

/// Splitmix64: the level of a slot is a pure function of (seed, slot).
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl VectorIndex {
    /// An empty index of dimension `dim` (1..=65536).
    pub fn new(dim: usize, cfg: IndexConfig) -> Result<Self> {
        cfg.validate()?;
        if dim == 0 || dim > 65_536 {
            return Err(Error::config("index.dim", format!("must be in 1..=65536, got {dim}")));
        }
        let dpad = dim.div_ceil(16) * 16;
        let cpad = match cfg.storage {
            VectorStorage::F32 => 0,
            VectorStorage::Int8 => dim.div_ceil(64) * 64,
        };
        // Records hold what the graph walks (and, for F32, the exact vector).
        // A graph-less index has no links, and with int8 storage no records
        // at all: the exact scan reads the blocked codes and the f32 copy.
        let vec_words = match (cfg.storage, cfg.graph) {
            (VectorStorage::F32, _) => dpad,
            (VectorStorage::Int8, true) => cpad / 4 + 1,
            (VectorStorage::Int8, false) => 0,
        };
        let m0 = 2 * cfg.m;
        let link_words = if cfg.graph { 1 + m0 } else { 0 };
        let rec_words = (vec_words + link_words).div_ceil(LINE_WORDS) * LINE_WORDS;
        Ok(VectorIndex {
            dim,
            dpad,
            cpad,
            cfg,
            m0,
            vec_words,
            rec_words,
            lines: Vec::new(),
            f32s: Vec::new(),
            levels: Vec::new(),
            upper: Vec::new(),
            entry: None,
            max_level: 0,
            deleted: Vec::new(),
            n_deleted: 0,
            slots: 0,
            flat: flat::FlatCodes::new(dim),
            calibration: None,
        })
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The configuration.
    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }
    /// Live (not deleted) vectors.
    pub fn len(&self) -> usize {
        self.slots - self.n_deleted
    }
    /// No live vector.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Slots in use: live plus tombstoned.
    pub fn slots(&self) -> usize {
        self.slots
    }
    /// Fraction of slots that are tombstones (0 when empty).
    pub fn deleted_fraction(&self) -> f32 {
        if self.slots == 0 {
            0.0
        } else {
            self.n_deleted as f32 / self.slots as f32
        }
    }

    /// Whether `slot` holds a live vector.
    pub fn is_live(&self, slot: u32) -> bool {
        (slot as usize) < self.slots && !self.is_deleted(slot)
    }

    #[inline(always)]
    pub(crate) fn is_deleted(&self, slot: u32) -> bool {
        let s = slot as usize;
        (self.deleted[s >> 6] >> (s & 63)) & 1 == 1
    }

    /// The stored (normalised) vector of a live slot.
    pub fn vector(&self, slot: u32) -> Option<&[f32]> {
        if !self.is_live(slot) {
            return None;
        }
        Some(&self.exact_vec(slot)[..self.dim])
    }

    /// Heap bytes held by the index.
    pub fn memory_bytes(&self) -> usize {
        self.lines.capacity() * 64
            + self.f32s.capacity() * 4
            + self.levels.capacity()
            + self.upper.capacity() * std::mem::size_of::<Box<[u32]>>()
            + self.upper.iter().map(|u| u.len() * 4).sum::<usize>()
            + self.deleted.capacity() * 8
            + self.flat.memory_bytes()
    }

    // --- record access ---------------------------------------------------------

    #[inline(always)]
    pub(crate) fn rec_ptr(&self, slot: u32) -> *const u32 {
        // SAFETY (callers): slot < self.slots, so the record lies inside `lines`.
        unsafe { (self.lines.as_ptr() as *const u32).add(slot as usize * self.rec_words) }
    }

    /// The padded f32 vector used for exact scores.
    #[inline(always)]
    pub(crate) fn exact_vec(&self, slot: u32) -> &[f32] {
        match self.cfg.storage {
            VectorStorage::Int8 => &self.f32s[slot as usize * self.dpad..(slot as usize + 1) * self.dpad],
            VectorStorage::F32 => {
                assert!((slot as usize) < self.slots);
                // SAFETY: in range (checked); the record starts with dpad f32 words.
                unsafe { std::slice::from_raw_parts(self.rec_ptr(slot) as *const f32, self.dpad) }
            }
        }
    }

    /// Level-0 neighbours of a slot.
    #[inline(always)]
    pub(crate) fn links0(&self, slot: u32) -> &[u32] {
        assert!((slot as usize) < self.slots);
        if !self.cfg.graph {
            return &[]; // graph-less records have no link words
        }
        // SAFETY: in range; count <= m0 is an invariant of every writer.
        unsafe {
            let p = self.rec_ptr(slot).add(self.vec_words);
            std::slice::from_raw_parts(p.add(1), (*p as usize).min(self.m0))
        }
    }

    /// Neighbours of a slot on `level` (empty above its level).
    #[inline(always)]
    pub(crate) fn links(&self, slot: u32, level: usize) -> &[u32] {
        if level == 0 {
            return self.links0(slot);
        }
        let u = &self.upper[slot as usize];
        let off = (level - 1) * (1 + self.cfg.m);
        if off >= u.len() {
            return &[];
        }
        let c = (u[off] as usize).min(self.cfg.m);
        &u[off + 1..off + 1 + c]
    }

    fn set_links(&mut self, slot: u32, level: usize, ids: &[u32]) {
        if level == 0 {
            if !self.cfg.graph {
                return;
            }
            let n = ids.len().min(self.m0);
            let base = slot as usize * self.rec_words + self.vec_words;
            let words = self.words_mut();
            words[base] = n as u32;
            words[base + 1..base + 1 + n].copy_from_slice(&ids[..n]);
        } else {
            let m = self.cfg.m;
            let off = (level - 1) * (1 + m);
            let u = &mut self.upper[slot as usize];
            if off + 1 + m > u.len() {
                return;
            }
            let n = ids.len().min(m);
            u[off] = n as u32;
            u[off + 1..off + 1 + n].copy_from_slice(&ids[..n]);
        }
    }

    fn words_mut(&mut self) -> &mut [u32] {
        let n = self.lines.len() * LINE_WORDS;
        // SAFETY: Line is repr(C) [u32; 16]; the lines are contiguous.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, n) }
    }

    /// The vectors as one f32 slice with a stride, for the exact scan.
    fn exact_view(&self) -> (&[f32], usize) {
        match self.cfg.storage {
            VectorStorage::Int8 => (&self.f32s, self.dpad),
            VectorStorage::F32 => {
                // SAFETY: Line holds only u32 words, any bit pattern is a valid f32.
                let all = unsafe {
                    std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.lines.len() * LINE_WORDS)
                };
                (all, self.rec_words)
            }
        }
    }

    fn level_of(&self, slot: u64) -> usize {
        let u = mix64(self.cfg.seed ^ mix64(slot));
        // uniform in (0, 1]
        let x = ((u >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let ml = 1.0 / (self.cfg.m as f64).ln();
        ((-x.ln() * ml) as usize).min(MAX_LEVEL)
    }

    /// Append one normalised vector's storage (no graph links yet).
    fn push_storage(&mut self, v: &[f32], norm: f32) {
        let slot = self.slots;
        let mut padded = vec![0.0f32; self.dpad];
        for (p, &x) in padded.iter_mut().zip(v) {
            *p = x / norm;
        }
        self.lines.resize((slot + 1) * self.rec_words / LINE_WORDS, Line([0; 16]));
        let base = slot * self.rec_words;
        let (vec_words, cpad) = (self.vec_words, self.cpad);
        match self.cfg.storage {
            VectorStorage::F32 => {
                let words = self.words_mut();
                for (w, x) in words[base..base + vec_words].iter_mut().zip(&padded) {
                    *w = x.to_bits();
                }
            }
            VectorStorage::Int8 => {
                if vec_words > 0 {
                    let mut codes = vec![0i8; cpad];
                    let scale = kernels::quantize_i8(&padded, &mut codes);
                    let words = self.words_mut();
                    for (i, w) in words[base..base + cpad / 4].iter_mut().enumerate() {
                        *w = u32::from_le_bytes([codes[4 * i] as u8, codes[4 * i + 1] as u8, codes[4 * i + 2] as u8, codes[4 * i + 3] as u8]);
                    }
                    words[base + cpad / 4] = scale.to_bits();
                }
                self.f32s.extend_from_slice(&padded);
            }
        }
        self.flat.push(&padded);
        let level = if self.cfg.graph { self.level_of(slot as u64) } else { 0 };
        self.levels.push(level as u8);
        self.upper.push(vec![0u32; level * (1 + self.cfg.m)].into_boxed_slice());
        if slot.is_multiple_of(64) {
            self.deleted.push(0);
        }
        self.slots += 1;
    }

    // --- writers ----------------------------------------------------------------

    /// Add one vector; returns its slot.
    ///
    /// Errors: [`Error::WrongDimension`], [`Error::InvalidEmbedding`] (NaN,
    /// infinity, zero norm). The stored vector is the L2-normalised input.
    pub fn add(&mut self, v: &[f32]) -> Result<u32> {
        let norm = check_vector(v, self.dim)?;
        if self.slots >= u32::MAX as usize - 1 {
            return Err(Error::config("index", "slot space exhausted"));
        }
        let slot = self.slots;
        self.push_storage(v, norm);
        self.insert_range(slot, slot + 1);
        Ok(slot as u32)
    }

    /// Add `vs.len() / dim` vectors, all validated before any is added; the
    /// graph is built in parallel (`build_threads`). Returns the new slots.
    pub fn add_batch(&mut self, vs: &[f32]) -> Result<std::ops::Range<u32>> {
        if !vs.len().is_multiple_of(self.dim) {
            // not a whole number of vectors: report the length received
            return Err(Error::WrongDimension { expected: self.dim, got: vs.len() });
        }
        let n = vs.len() / self.dim;
        if self.slots + n >= u32::MAX as usize - 1 {
            return Err(Error::config("index", "slot space exhausted"));
        }
        let norms: Vec<f32> = vs.chunks_exact(self.dim).map(|v| check_vector(v, self.dim)).collect::<Result<_>>()?;
        let start = self.slots;
        self.lines.reserve(n * self.rec_words / LINE_WORDS);
        if self.cfg.storage == VectorStorage::Int8 {
            self.f32s.reserve(n * self.dpad);
        }
        self.flat.reserve(n);
        for (v, &norm) in vs.chunks_exact(self.dim).zip(&norms) {
            self.push_storage(v, norm);
        }
        let threads = self.cfg.build_threads;
        let pool = if threads > 0 { rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok() } else { None };
        match pool {
            Some(p) => p.install(|| self.insert_range(start, start + n)),
            None => self.insert_range(start, start + n),
        }
        Ok(start as u32..(start + n) as u32)
    }

    /// Tombstone a slot: from now on no search returns it. `Ok(false)` if it
    /// was already deleted; [`Error::UnknownTemplate`] if out of range.
    pub fn remove(&mut self, slot: u32) -> Result<bool> {
        if slot as usize >= self.slots {
            return Err(Error::UnknownTemplate(slot as u64));
        }
        if self.is_deleted(slot) {
            return Ok(false);
        }
        let s = slot as usize;
        self.deleted[s >> 6] |= 1 << (s & 63);
        self.n_deleted += 1;
        Ok(true)
    }

    // --- readers ----------------------------------------------------------------

    /// Normalise and pad a validated query into `out` (len dpad).
    fn prepare_query(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let norm = check_vector(q, self.dim)?;
        out.iter_mut().for_each(|o| *o = 0.0);
        for (o, &x) in out.iter_mut().zip(q) {
            *o = x / norm;
        }
        Ok(())
    }

    /// Estimated fraction of slots passing the filter (live and accepted).
    fn filter_fraction(&self, f: &(dyn Fn(u32) -> bool + Sync)) -> f32 {
        let n = self.slots;
        let samples = n.min(256);
        if samples == 0 {
            return 0.0;
        }
        let mut pass = 0;
        for i in 0..samples {
            let s = (i * n / samples) as u32;
            if !self.is_deleted(s) && f(s) {
                pass += 1;
            }
        }
        pass as f32 / samples as f32
    }

    fn resolve(&self, p: &SearchParams) -> (SearchStrategy, f32) {
        let frac = p.filter.map(|f| self.filter_fraction(f)).unwrap_or(1.0);
        let s = match p.strategy {
            SearchStrategy::Auto => {
                if self.len() < self.cfg.exact_below
                    || self.entry.is_none()
                    || frac < FILTER_EXACT_FRACTION
                    || self.calibration_in_force().is_some_and(|c| c.ef.is_none())
                    || self.exact_single_cost() <= self.graph_cost(p)
                {
                    SearchStrategy::Exact
                } else {
                    SearchStrategy::Graph
                }
            }
            s => s,
        };
        (s, frac)
    }

    /// The `k` best live (and filter-passing) slots for a query, best first.
    ///
    /// `k = 0` or an empty index give no hits; the query is validated like
    /// [`VectorIndex::add`]. Scores are exact f32 dot products.
    pub fn search(&self, q: &[f32], p: &SearchParams) -> Result<Vec<Hit>> {
        let mut qp = vec![0.0f32; self.dpad];
        self.prepare_query(q, &mut qp)?;
        if p.k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let (strategy, frac) = self.resolve(p);
        match strategy {
            SearchStrategy::Graph if self.entry.is_some() => {
                let hits = self.graph_search(&qp, p, frac);
                if p.strategy == SearchStrategy::Auto && hits.len() < p.k.min(self.len()) {
                    return Ok(self.exact_many(&qp, 1, p).pop().unwrap_or_default());
                }
                Ok(hits)
            }
            _ => Ok(self.exact_many(&qp, 1, p).pop().unwrap_or_default()),
        }
    }

    /// [`VectorIndex::search`] for `qs.len() / dim` queries. The exact path
    /// scores blocks of queries per pass over the gallery; the graph path runs
    /// the queries in parallel. With `Auto`, a large batch takes the exact
    /// path when its measured cost model says it is cheaper than the graph.
    pub fn search_batch(&self, qs: &[f32], p: &SearchParams) -> Result<Vec<Vec<Hit>>> {
        if !qs.len().is_multiple_of(self.dim) {
            return Err(Error::WrongDimension { expected: self.dim, got: qs.len() });
        }
        let nq = qs.len() / self.dim;
        let mut qp = vec![0.0f32; nq * self.dpad];
        for (q, o) in qs.chunks_exact(self.dim).zip(qp.chunks_exact_mut(self.dpad)) {
            self.prepare_query(q, o)?;
        }
        if p.k == 0 || self.is_empty() {
            return Ok(vec![Vec::new(); nq]);
        }
        let (mut strategy, frac) = self.resolve(p);
        if p.strategy == SearchStrategy::Auto && strategy == SearchStrategy::Graph && self.batch_prefers_exact(nq, p) {
            strategy = SearchStrategy::Exact;
        }
        match strategy {
            SearchStrategy::Graph if self.entry.is_some() => Ok(qp
                .par_chunks_exact(self.dpad)
                .map(|q| {
                    let hits = self.graph_search(q, p, frac);
                    if p.strategy == SearchStrategy::Auto && hits.len() < p.k.min(self.len()) {
                        self.exact_many(q, 1, p).pop().unwrap_or_default()
                    } else {
                        hits
                    }
                })
                .collect()),
            _ => {
                let threads = rayon::current_num_threads().max(1);
                let chunk = nq.div_ceil(threads).clamp(4, 64);
                let parts: Vec<Vec<Vec<Hit>>> = qp
                    .par_chunks(chunk * self.dpad)
                    .map(|c| self.exact_many(c, c.len() / self.dpad, p))
                    .collect();
                Ok(parts.into_iter().flatten().collect())
            }
        }
    }

    /// Whether a batch of `nq` queries is cheaper through the batched exact
    /// scan than through the graph. At a tie the exact scan wins (its recall is 1).
    fn batch_prefers_exact(&self, nq: usize, p: &SearchParams) -> bool {
        nq >= 16 && self.slots as f64 * self.dim as f64 * EXACT_BATCH_S_PER_DIM <= self.graph_cost(p)
    }

    /// The calibration, if it was measured at about the current size.
    fn calibration_in_force(&self) -> Option<Calibration> {
        self.calibration.filter(|c| self.len() <= 2 * c.live && 2 * self.len() >= c.live)
    }

    /// `ef` of a search that does not set one: the configured `ef_search`,
    /// raised to the calibrated one.
    fn default_ef(&self) -> usize {
        let cal = self.calibration_in_force().and_then(|c| c.ef).unwrap_or(0);
        self.cfg.ef_search.max(cal)
    }

    /// The calibration in force, if any.
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration_in_force()
    }

    /// Measure how wide the graph search must be to agree with the exact
    /// scan, and let `Auto` act on it: searches without an explicit `ef` use
    /// at least the calibrated one, and when no `ef` the graph can afford
    /// (cheaper than the exact scan) reaches `target`, `Auto` takes the
    /// exact scan. Probes are `probes` stored vectors (seeded choice) moved
    /// to cosine 0.7 by random noise, like another photo of the same person.
    /// Costs `probes` exact scans plus the graph searches (about a second at
    /// 1M x 128 for 200 probes).
    ///
    /// ```
    /// use facematch::index::{IndexConfig, VectorIndex};
    /// use facematch::synth::{generate, SynthConfig};
    /// let set = generate(&SynthConfig { identities: 3_000, queries: 10, ..Default::default() }).unwrap();
    /// let mut ix = VectorIndex::new(128, IndexConfig { exact_below: 0, ..Default::default() }).unwrap();
    /// ix.add_batch(&set.gallery).unwrap();
    /// let c = ix.calibrate(0.99, 100, 7);
    /// assert!(c.agreement > 0.0);
    /// assert_eq!(ix.calibration(), Some(c));
    /// ```
    pub fn calibrate(&mut self, target: f32, probes: usize, seed: u64) -> Calibration {
        let c = self.measure_calibration(target, probes, seed);
        self.calibration = Some(c);
        c
    }

    /// [`VectorIndex::calibrate`] without acting on it (`&self`: can run
    /// beside searches); hand the result to [`VectorIndex::set_calibration`].
    pub fn measure_calibration(&self, target: f32, probes: usize, seed: u64) -> Calibration {
        use rand::{Rng, SeedableRng};
        let live: Vec<u32> = (0..self.slots as u32).filter(|&s| !self.is_deleted(s)).collect();
        let mut c = Calibration { ef: None, agreement: 0.0, live: live.len() };
        if self.entry.is_none() || live.is_empty() || probes == 0 {
            return c;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = probes.min(live.len());
        let mut qp = vec![0.0f32; n * self.dpad];
        for q in qp.chunks_exact_mut(self.dpad) {
            let v = self.exact_vec(live[rng.gen_range(0..live.len())]);
            let noise: Vec<f32> = (0..self.dim).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
            let nn = noise.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
            for d in 0..self.dim {
                q[d] = 0.7 * v[d] + 0.714 * noise[d] / nn;
            }
            let norm = q.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
            q.iter_mut().for_each(|x| *x /= norm);
        }
        let p1 = SearchParams { k: 1, ef: None, strategy: SearchStrategy::Exact, filter: None };
        let truth: Vec<Option<u32>> = self.exact_many(&qp, n, &p1).into_iter().map(|h| h.first().map(|h| h.slot)).collect();
        let mut ef = 32usize;
        loop {
            let pe = SearchParams { k: 1, ef: Some(ef), strategy: SearchStrategy::Graph, filter: None };
            if self.graph_cost(&pe) >= self.exact_single_cost() && ef > 32 {
                break;
            }
            let agree = qp
                .par_chunks_exact(self.dpad)
                .zip(&truth)
                .filter(|(q, t)| self.graph_search(q, &pe, 1.0).first().map(|h| h.slot) == **t)
                .count();
            c.agreement = agree as f32 / n as f32;
            if c.agreement >= target {
                c.ef = Some(ef);
                break;
            }
            if ef >= self.slots {
                break;
            }
            ef *= 2;
        }
        c
    }

    /// Act on a calibration measured by [`VectorIndex::measure_calibration`]
    /// (it stays in force while the index is within 2x of its size then).
    pub fn set_calibration(&mut self, c: Calibration) {
        self.calibration = Some(c);
    }

    /// True when the graph would serve `Auto` searches but no calibration
    /// measured at about the current size is in force (never measured, or
    /// the index has since grown or shrunk more than 2x).
    pub fn needs_calibration(&self) -> bool {
        self.cfg.graph && self.len() >= self.cfg.exact_below && self.calibration_in_force().is_none()
    }

    /// Modelled seconds of one exact scan of a single query.
    fn exact_single_cost(&self) -> f64 {
        self.slots as f64 * self.dim as f64 * EXACT_SINGLE_S_PER_DIM
    }

    /// Modelled seconds of one graph search.
    fn graph_cost(&self, p: &SearchParams) -> f64 {
        let ef = p.ef.unwrap_or_else(|| self.default_ef()).max(p.k) as f64;
        let storage = match self.cfg.storage {
            VectorStorage::F32 => 1.0,
            VectorStorage::Int8 => GRAPH_INT8_FACTOR,
        };
        ef * (GRAPH_S_PER_EF + GRAPH_S_PER_EF_DIM * self.dim as f64) * storage
    }

    /// Exact top-k for `nq` prepared queries (padded, back to back).
    ///
    /// The int8 scan ([`flat`]) has a proven error bound `e` per query. Every
    /// vector whose approximate score is within `2e` of the k-th best
    /// approximate score so far is kept as a candidate and re-scored in f32.
    /// A vector left out scored below `kth - 2e`, so its exact score is below
    /// `kth - e`, which each of the k best approximate vectors exceeds: it
    /// cannot be in the top k. The result is the exact top k, no fallback.
    fn exact_many(&self, qp: &[f32], nq: usize, p: &SearchParams) -> Vec<Vec<Hit>> {
        let k = p.k.min(self.len());
        if k == 0 {
            return vec![Vec::new(); nq];
        }
        let qc = self.flat.quantize_queries(qp, self.dpad, nq);
        let slack: Vec<f32> = (0..nq).map(|i| 2.0 * self.flat.bound(&qc, i)).collect();
        let mut top: Vec<BinaryHeap<Reverse<u64>>> = (0..nq).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
        let mut cands: Vec<Vec<(f32, u32)>> = vec![Vec::new(); nq];
        let mut thr = vec![f32::NEG_INFINITY; nq];
        let filter = p.filter;
        let prune_at = 4 * k + 256;
        // Lowest approximate score that may still be in the top k.
        let floor = |h: &BinaryHeap<Reverse<u64>>, slack: f32| match h.peek() {
            Some(Reverse(min)) if h.len() >= k => score_of_key(*min) - slack,
            _ => f32::NEG_INFINITY,
        };
        self.flat.scan(&qc, kernels::simd_level(), &mut thr, |i, j, s| {
            let (h, c) = (&mut top[i], &mut cands[i]);
            if self.is_deleted(j) || filter.is_some_and(|f| !f(j)) {
                return floor(h, slack[i]);
            }
            c.push((s, j));
            h.push(Reverse(hit_key(s, j)));
            if h.len() > k {
                h.pop();
            }
            let t = floor(h, slack[i]);
            if c.len() >= prune_at {
                c.retain(|&(a, _)| a >= t);
            }
            t
        });
        cands
            .into_iter()
            .zip(top)
            .enumerate()
            .map(|(i, (c, h))| {
                let q = &qp[i * self.dpad..(i + 1) * self.dpad];
                let t = floor(&h, slack[i]);
                let mut hits: Vec<Hit> = c
                    .into_iter()
                    .filter(|&(a, _)| a >= t)
                    .map(|(_, slot)| Hit { slot, score: kernels::dot_f32(q, self.exact_vec(slot)) })
                    .collect();
                sort_hits(&mut hits);
                hits.truncate(k);
                hits
            })
            .collect()
    }

    /// The f32 exact scan (the reference the int8 scan is tested against).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn exact_f32(&self, qp: &[f32], nq: usize, p: &SearchParams) -> Vec<Vec<Hit>> {
        let k = p.k.min(self.len());
        let mut heaps: Vec<BinaryHeap<Reverse<u64>>> = (0..nq).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
        if k > 0 {
            let (vs, stride) = self.exact_view();
            let filter = p.filter;
            dot_many_dispatch(qp, nq, vs, stride, self.slots, self.dpad, |i, j, s| {
                let key = hit_key(s, j as u32);
                let h = &mut heaps[i];
                if h.len() >= k {
                    match h.peek() {
                        Some(Reverse(min)) if key > *min => {}
                        _ => return,
                    }
                }
                if self.is_deleted(j as u32) || filter.is_some_and(|f| !f(j as u32)) {
                    return;
                }
                h.push(Reverse(key));
                if h.len() > k {
                    h.pop();
                }
            });
        }
        heaps
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let q = &qp[i * self.dpad..(i + 1) * self.dpad];
                let mut hits: Vec<Hit> = h
                    .into_iter()
                    .map(|Reverse(key)| {
                        let slot = !(key as u32);
                        Hit { slot, score: kernels::dot_f32(q, self.exact_vec(slot)) }
                    })
                    .collect();
                sort_hits(&mut hits);
                hits
            })
            .collect()
    }

    /// Graph search for one prepared query.
    fn graph_search(&self, qp: &[f32], p: &SearchParams, frac: f32) -> Vec<Hit> {
        let k = p.k.min(self.len());
        let mut ef = p.ef.unwrap_or_else(|| self.default_ef()).max(k);
        if p.filter.is_some() {
            ef = ((ef as f32 / frac.max(0.05)) as usize).max(ef);
        }
        ef = ef.min(self.slots.max(1));
        let filter = p.filter;
        graph::with_scratch(|sc| {
            let accept = |s: u32| !self.is_deleted(s) && filter.is_none_or(|f| f(s));
            let cands = self.graph_candidates(sc, qp, ef, &accept);
            let mut hits: Vec<Hit> = match self.cfg.storage {
                VectorStorage::F32 => cands.iter().map(|&(score, slot)| Hit { slot, score }).collect(),
                VectorStorage::Int8 => {
                    let r = self.cfg.rerank.max(k).min(cands.len());
                    cands[..r]
                        .iter()
                        .map(|&(_, slot)| Hit { slot, score: kernels::dot_f32(qp, self.exact_vec(slot)) })
                        .collect()
                }
            };
            sort_hits(&mut hits);
            hits.truncate(k);
            hits
        })
    }

    /// Old slot -> new slot map of a compaction that drops the tombstones.
    fn compaction_map(&self) -> Vec<Option<u32>> {
        let mut next = 0u32;
        (0..self.slots as u32)
            .map(|s| {
                if self.is_deleted(s) {
                    None
                } else {
                    next += 1;
                    Some(next - 1)
                }
            })
            .collect()
    }

    /// Physically drop the tombstoned vectors (their bytes are overwritten),
    /// repair the neighbour lists that pointed at them, renumber the slots
    /// densely in order. Returns the old slot -> new slot map.
    pub fn compact(&mut self) -> Vec<Option<u32>> {
        let map = self.compaction_map();
        if self.n_deleted == 0 {
            return map;
        }
        let parts = self.repaired_parts(&map);
        match Self::from_parts(self.dim, self.cfg.clone(), parts) {
            Ok(ix) => {
                // Overwrite the old bytes before they are freed.
                self.lines.iter_mut().for_each(|l| *l = Line([0; 16]));
                self.f32s.iter_mut().for_each(|x| *x = 0.0);
                self.flat.zeroize();
                *self = ix;
                map
            }
            Err(_) => {
                // from_parts only fails on inconsistent input, which repaired_parts never produces.
                debug_assert!(false, "compaction produced inconsistent parts");
                (0..self.slots as u32).map(Some).collect()
            }
        }
    }
}

/// [`kernels::dot_many`] (kept as a seam for the exact path).
#[inline]
fn dot_many_dispatch(qs: &[f32], nq: usize, vs: &[f32], stride: usize, nv: usize, dim: usize, sink: impl FnMut(usize, usize, f32)) {
    kernels::dot_many(qs, nq, vs, stride, nv, dim, sink)
}

/// Decomposed index content: what the file format stores and what a
/// compaction rebuilds from.
pub(crate) struct Parts {
    /// slots * dim normalised vectors.
    pub vectors: Vec<f32>,
    pub deleted: Vec<u64>,
    pub levels: Vec<u8>,
    /// Level-0 lists per slot.
    pub l0: Vec<Vec<u32>>,
    /// Upper lists per slot, layout as in `VectorIndex::upper`.
    pub upper: Vec<Box<[u32]>>,
    pub entry: Option<u32>,
}

impl VectorIndex {
    /// Assemble an index from parts, checking every invariant the search relies on.
    pub(crate) fn from_parts(dim: usize, cfg: IndexConfig, p: Parts) -> Result<Self> {
        let bad = |r: String| Error::DataCorruption { path: "<index>".into(), reason: r };
        let mut ix = VectorIndex::new(dim, cfg)?;
        let n = p.levels.len();
        if p.vectors.len() != n * dim || p.l0.len() != n || p.upper.len() != n || p.deleted.len() != n.div_ceil(64) {
            return Err(bad("section sizes disagree".into()));
        }
        let m = ix.cfg.m;
        ix.lines = vec![Line([0; 16]); n * ix.rec_words / LINE_WORDS];
        if ix.cfg.storage == VectorStorage::Int8 {
            ix.f32s.reserve_exact(n * ix.dpad);
        }
        ix.flat.reserve(n);
        ix.levels = p.levels;
        ix.deleted = p.deleted;
        ix.slots = n;
        // storage
        let mut padded = vec![0.0f32; ix.dpad];
        let mut codes = vec![0i8; ix.cpad];
        for s in 0..n {
            let v = &p.vectors[s * dim..(s + 1) * dim];
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("vector {s} is not finite")));
            }
            padded[..dim].copy_from_slice(v);
            let base = s * ix.rec_words;
            let (vec_words, cpad) = (ix.vec_words, ix.cpad);
            match ix.cfg.storage {
                VectorStorage::F32 => {
                    let words = ix.words_mut();
                    for (w, x) in words[base..base + vec_words].iter_mut().zip(&padded) {
                        *w = x.to_bits();
                    }
                }
                VectorStorage::Int8 => {
                    if vec_words > 0 {
                        let scale = kernels::quantize_i8(&padded, &mut codes);
                        let words = ix.words_mut();
                        for (i, w) in words[base..base + cpad / 4].iter_mut().enumerate() {
                            *w = u32::from_le_bytes([codes[4 * i] as u8, codes[4 * i + 1] as u8, codes[4 * i + 2] as u8, codes[4 * i + 3] as u8]);
                        }
                        words[base + cpad / 4] = scale.to_bits();
                    }
                    ix.f32s.extend_from_slice(&padded);
                }
            }
            ix.flat.push(&padded);
        }
        // tombstones beyond n must be clear
        if !n.is_multiple_of(64) {
            if let Some(last) = ix.deleted.last() {
                if last >> (n % 64) != 0 {
                    return Err(bad("tombstone bits beyond the last slot".into()));
                }
            }
        }
        ix.n_deleted = ix.deleted.iter().map(|w| w.count_ones() as usize).sum();
        // links
        for (s, l) in p.l0.iter().enumerate() {
            if l.len() > ix.m0 || l.iter().any(|&x| x as usize >= n) || (!ix.cfg.graph && !l.is_empty()) {
                return Err(bad(format!("level-0 list of slot {s} is invalid")));
            }
            ix.set_links(s as u32, 0, l);
        }
        for (s, u) in p.upper.iter().enumerate() {
            let lv = ix.levels[s] as usize;
            if lv > MAX_LEVEL || u.len() != lv * (1 + m) {
                return Err(bad(format!("upper lists of slot {s} are invalid")));
            }
            for l in 0..lv {
                let c = u[l * (1 + m)] as usize;
                if c > m || u[l * (1 + m) + 1..l * (1 + m) + 1 + c].iter().any(|&x| x as usize >= n) {
                    return Err(bad(format!("upper list {} of slot {s} is invalid", l + 1)));
                }
            }
        }
        ix.upper = p.upper;
        match p.entry {
            Some(e) if (e as usize) < n => {
                ix.entry = Some(e);
                ix.max_level = ix.levels[e as usize] as usize;
                if ix.levels.iter().any(|&l| l as usize > ix.max_level) {
                    return Err(bad("entry point is not on the top level".into()));
                }
            }
            None if n == 0 || !ix.cfg.graph => {}
            _ => return Err(bad("invalid entry point".into())),
        }
        Ok(ix)
    }

    /// The index decomposed, with tombstoned slots dropped and lists repaired (per `map`).
    fn repaired_parts(&self, map: &[Option<u32>]) -> Parts {
        let live: Vec<u32> = (0..self.slots as u32).filter(|&s| !self.is_deleted(s)).collect();
        let m = self.cfg.m;
        let repaired: Vec<(Vec<u32>, Box<[u32]>)> = live
            .par_iter()
            .map(|&s| {
                let l0 = self.repair_list(s, 0, self.m0);
                let lv = self.levels[s as usize] as usize;
                let mut up = vec![0u32; lv * (1 + m)];
                for l in 1..=lv {
                    let list = self.repair_list(s, l, m);
                    let off = (l - 1) * (1 + m);
                    up[off] = list.len() as u32;
                    for (i, &x) in list.iter().enumerate() {
                        up[off + 1 + i] = x;
                    }
                }
                (l0, up.into_boxed_slice())
            })
            .collect();
        let remap = |x: u32| map[x as usize].unwrap_or(0);
        let mut vectors = Vec::with_capacity(live.len() * self.dim);
        let mut levels = Vec::with_capacity(live.len());
        let mut l0 = Vec::with_capacity(live.len());
        let mut upper = Vec::with_capacity(live.len());
        for (&s, (list, up)) in live.iter().zip(repaired) {
            vectors.extend_from_slice(&self.exact_vec(s)[..self.dim]);
            levels.push(self.levels[s as usize]);
            l0.push(list.into_iter().map(remap).collect());
            let lv = self.levels[s as usize] as usize;
            let mut up = up;
            for l in 0..lv {
                let off = l * (1 + m);
                let c = up[off] as usize;
                for x in &mut up[off + 1..off + 1 + c] {
                    *x = remap(*x);
                }
            }
            upper.push(up);
        }
        // entry: the live node with the highest level (the old entry if live)
        let entry = match self.entry {
            Some(e) if !self.is_deleted(e) => map[e as usize],
            _ => {
                let mut best: Option<(u8, u32)> = None;
                for (i, &l) in levels.iter().enumerate() {
                    if best.is_none_or(|(bl, _)| l > bl) {
                        best = Some((l, i as u32));
                    }
                }
                best.map(|b| b.1)
            }
        };
        // nodes above the entry's level lose those levels (cannot happen when the entry is kept)
        if let Some(e) = entry {
            let top = levels[e as usize];
            for (i, l) in levels.iter_mut().enumerate() {
                if *l > top {
                    *l = top;
                    upper[i] = upper[i][..top as usize * (1 + m)].to_vec().into_boxed_slice();
                }
            }
        }
        let n = live.len();
        Parts { vectors, deleted: vec![0; n.div_ceil(64)], levels, l0, upper, entry }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphless_index_is_exact_and_round_trips() {
        use crate::synth::{generate, SynthConfig};
        let set = generate(&SynthConfig { identities: 2_000, queries: 20, dim: 64, ..Default::default() }).unwrap();
        for storage in [VectorStorage::Int8, VectorStorage::F32] {
            let mut ix = VectorIndex::new(64, IndexConfig { graph: false, exact_below: 0, storage, ..Default::default() }).unwrap();
            ix.add_batch(&set.gallery).unwrap();
            ix.remove(5).unwrap();
            // No link space: the graph-less index holds the vectors (f32 + the scan's int8 codes) and little else.
            let mut with_graph = VectorIndex::new(64, IndexConfig { storage, ..Default::default() }).unwrap();
            with_graph.add_batch(&set.gallery).unwrap();
            assert!(ix.memory_bytes() < with_graph.memory_bytes(), "{storage:?}: {} vs {}", ix.memory_bytes(), with_graph.memory_bytes());
            assert!(ix.memory_bytes() <= 2 * 2_000 * (64 * 4 + 64 + 32), "{storage:?}: {} bytes", ix.memory_bytes());
            let mut bytes = Vec::new();
            ix.write_to(&mut bytes).unwrap();
            let back = VectorIndex::read_from(&mut bytes.as_slice()).unwrap();
            for strategy in [SearchStrategy::Auto, SearchStrategy::Graph, SearchStrategy::Exact] {
                let p = SearchParams::top(5).with_strategy(strategy);
                let want = ix.search_batch(&set.queries, &SearchParams::top(5).with_strategy(SearchStrategy::Exact)).unwrap();
                assert_eq!(ix.search_batch(&set.queries, &p).unwrap(), want);
                assert_eq!(back.search_batch(&set.queries, &p).unwrap(), want);
                assert_eq!(ix.search(&set.queries[..64], &p).unwrap(), want[0]);
            }
            assert_eq!(ix.vector(7).unwrap(), back.vector(7).unwrap());
            let map = ix.compact();
            assert_eq!(map[5], None);
            assert_eq!(ix.len(), 1_999);
            let v = set.gallery[..64].to_vec();
            let slot = ix.add(&v).unwrap();
            let hits = ix.search(&v, &SearchParams::top(2)).unwrap();
            assert!(hits.iter().any(|h| h.slot == slot), "{hits:?}");
        }
    }

    #[test]
    fn calibration_goes_stale_when_the_index_doubles() {
        use crate::synth::{generate, SynthConfig};
        let set = generate(&SynthConfig { identities: 1_500, queries: 1, dim: 32, ..Default::default() }).unwrap();
        let mut ix = VectorIndex::new(32, IndexConfig { exact_below: 0, ..Default::default() }).unwrap();
        ix.add_batch(&set.gallery[..500 * 32]).unwrap();
        assert!(ix.needs_calibration(), "never calibrated");
        let c = ix.measure_calibration(0.99, 50, 1);
        assert!(ix.needs_calibration(), "measuring alone does not install");
        ix.set_calibration(c);
        assert!(!ix.needs_calibration());
        ix.add_batch(&set.gallery[500 * 32..]).unwrap();
        assert!(ix.needs_calibration(), "3x the calibrated size");
        assert_eq!(ix.calibration(), None);
        let c2 = ix.calibrate(0.99, 50, 1);
        assert_eq!(c2.live, 1_500);
        assert!(!ix.needs_calibration());
        let graphless = VectorIndex::new(32, IndexConfig { exact_below: 0, graph: false, ..Default::default() }).unwrap();
        assert!(!graphless.needs_calibration(), "nothing to calibrate without a graph");
    }

    /// The int8 scan with its proven candidate window and the f32 reference agree
    /// exactly (slots and scores), with tombstones, filters and crowds of ties.
    #[test]
    fn int8_exact_scan_equals_the_f32_scan() {
        use crate::synth::{generate, SynthConfig};
        let set = generate(&SynthConfig { identities: 3_000, queries: 64, dim: 64, ..Default::default() }).unwrap();
        for storage in [VectorStorage::Int8, VectorStorage::F32] {
            let cfg = IndexConfig { storage, exact_below: usize::MAX, ..Default::default() };
            let mut ix = VectorIndex::new(64, cfg).unwrap();
            ix.add_batch(&set.gallery).unwrap();
            // a crowd of duplicates: the proof must fail and the fallback answer
            let dup = set.gallery[..64].to_vec();
            for _ in 0..80 {
                ix.add(&dup).unwrap();
            }
            for s in (0..ix.slots() as u32).step_by(7) {
                ix.remove(s).unwrap();
            }
            let odd = |s: u32| s % 2 == 1;
            let mut qs = set.queries.clone();
            qs.extend_from_slice(&dup);
            let nq = qs.len() / 64;
            let mut qp = vec![0.0f32; nq * ix.dpad];
            for (q, o) in qs.chunks_exact(64).zip(qp.chunks_exact_mut(ix.dpad)) {
                ix.prepare_query(q, o).unwrap();
            }
            for k in [1usize, 10, 50] {
                for filter in [None, Some(&odd as &(dyn Fn(u32) -> bool + Sync))] {
                    let p = SearchParams { k, ef: None, strategy: SearchStrategy::Exact, filter };
                    let fast = ix.exact_many(&qp, nq, &p);
                    let reference = ix.exact_f32(&qp, nq, &p);
                    assert_eq!(fast, reference, "k {k}");
                    let one: Vec<Vec<Hit>> = (0..nq).map(|i| ix.exact_many(&qp[i * ix.dpad..(i + 1) * ix.dpad], 1, &p).pop().unwrap()).collect();
                    assert_eq!(one, reference);
                }
            }
        }
    }

    #[test]
    fn ord_is_monotone() {
        let xs = [-3.0f32, -1.0, -0.5, -0.0, 0.0, 1e-30, 0.25, 1.0, 7.0];
        for w in xs.windows(2) {
            assert!(ord(w[0]) <= ord(w[1]));
            assert_eq!(unord(ord(w[1])), w[1]);
        }
    }

    #[test]
    fn config_validation() {
        assert!(IndexConfig::default().validate().is_ok());
        assert!(IndexConfig { m: 1, ..Default::default() }.validate().is_err());
        assert!(IndexConfig { ef_search: 0, ..Default::default() }.validate().is_err());
        assert!(VectorIndex::new(0, IndexConfig::default()).is_err());
    }

    #[test]
    fn rejects_bad_vectors() {
        let mut ix = VectorIndex::new(4, IndexConfig::default()).unwrap();
        assert!(matches!(ix.add(&[1.0, 2.0]), Err(Error::WrongDimension { expected: 4, got: 2 })));
        assert!(matches!(ix.add(&[0.0; 4]), Err(Error::InvalidEmbedding { .. })));
        assert!(matches!(ix.add(&[f32::NAN, 0.0, 0.0, 1.0]), Err(Error::InvalidEmbedding { .. })));
        assert!(ix.add_batch(&[1.0, 0.0, 0.0, 0.0, f32::INFINITY, 0.0, 0.0, 0.0]).is_err());
        assert_eq!(ix.slots(), 0);
        assert!(ix.search(&[f32::NAN; 4], &SearchParams::top(1)).is_err());
        assert!(ix.search(&[1.0, 0.0, 0.0, 0.0], &SearchParams::top(3)).unwrap().is_empty());
        assert!(matches!(ix.remove(0), Err(Error::UnknownTemplate(0))));
    }
}

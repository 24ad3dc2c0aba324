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

// Files: `types` (config, params, hits), `storage` (adding, removing,
// reading vectors and node records), `search` (cost model, single and
// batched queries), `calibrate`, `compact` (and assembly from parts),
// `graph` (HNSW build and traversal), `flat` (the exact int8 scan), `io`
// (versioned serialisation), `kernels` (SIMD, crate-private), `tests`.
mod calibrate;
mod compact;
mod flat;
mod graph;
mod io;
// SIMD dot products and int8 quantisation, runtime-dispatched: only the index uses them.
pub(crate) mod kernels;
mod search;
mod storage;
#[cfg(test)]
mod tests;
mod types;

pub(crate) use self::compact::Parts;
pub use self::types::*;
pub use io::{IndexStructure, FORMAT_VERSION, STRUCTURE_VERSION};

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One 64-byte line of the record array (alignment unit).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u32; 16]);

const LINE_WORDS: usize = 16;
/// Highest level a node can get.
pub(crate) const MAX_LEVEL: usize = 16;

// The `Auto` cost model, fitted on this project's reference machine (AMD EPYC
// Zen4, AVX-512 VNNI, 1 thread; `cargo bench --bench search`, 100k x 128 and
// 1M x 128: int8 exact 241 us single / 95 us per query in batches of 64 at
// 100k; graph ef 128 116 us int8, 250 us f32). Seconds per stored vector per dimension for the int8 exact scan,
// one query at a time and in batches of 64, and per unit of `ef` for the graph.

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
    /// Slots `0..graph_len` are in the graph; later ones wait for
    /// [`VectorIndex::build_graph`] (a bulk load defers the build), and
    /// until then every search is the exact scan.
    graph_len: usize,
    /// Blocked int8 copy of every slot for the exact scan.
    flat: flat::FlatCodes,
    /// What the last [`VectorIndex::calibrate`] found (not serialised).
    calibration: Option<Calibration>,
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

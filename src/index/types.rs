//! The index's configuration, query parameters, hits and calibration results.

use super::*;

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
            return Err(Error::config("index.ef_construction", format!("must be in m..=100000, got {}", self.ef_construction)));
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

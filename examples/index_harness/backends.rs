//! Pluggable index backends for the harness.
//!
//! A backend is built once from the gallery and then searched one query at a
//! time (the harness spreads queries over a rayon pool). Scores are cosine
//! similarities (higher is better), ids are gallery row numbers.
//!
//! Plugging facematch's own index in is a ~20-line adapter (see
//! docs/BENCHMARK_DATA.md, "Adding a backend"): wrap `VectorIndex`, map
//! `Hit { slot, score }` to `(slot, score)`, and add a name to [`make`].

use anyhow::bail;

/// One query's result: `(row, cosine)`, best first.
pub type Hits = Vec<(u32, f32)>;

/// An index under test.
pub trait AnnBackend: Send + Sync {
    /// Name shown in the tables and JSON (unique per configuration).
    fn name(&self) -> String;
    /// Build from `data.len() / dim` row-major, L2-normalised rows; row `i` gets id `i`.
    fn build(&mut self, data: &[f32], dim: usize) -> anyhow::Result<()>;
    /// The `k` best rows for one query, best first, as `(row, cosine)`.
    fn search(&self, q: &[f32], k: usize, ef: usize) -> anyhow::Result<Vec<(u32, f32)>>;
    /// Bytes the backend says it holds (vectors + structure), if it knows.
    fn memory_bytes(&self) -> Option<usize>;
    /// False for exact backends: they are measured once, not once per `ef`.
    fn uses_ef(&self) -> bool {
        true
    }
    /// A native batched search of all `qs` (row-major), if the backend has one.
    fn search_batch(&self, _qs: &[f32], _k: usize) -> Option<anyhow::Result<Vec<Hits>>> {
        None
    }
}

/// Create a backend by name (`exact`, `hnsw_rs`); `None` for an unknown name.
pub fn make(name: &str, m: usize, ef_construction: usize) -> Option<Box<dyn AnnBackend>> {
    match name {
        "exact" => Some(Box::new(Exact::default())),
        #[cfg(feature = "hnsw-rs-baseline")]
        "hnsw_rs" => Some(Box::new(hnsw::HnswRs::new(m, ef_construction))),
        "facematch" => Some(Box::new(Facematch::new(m, ef_construction, SearchStrategy::Graph, VectorStorage::F32))),
        "facematch-int8" => Some(Box::new(Facematch::new(m, ef_construction, SearchStrategy::Graph, VectorStorage::Int8))),
        "facematch-exact" => Some(Box::new(Facematch::new(m, ef_construction, SearchStrategy::Exact, VectorStorage::F32))),
        _ => {
            let _ = (m, ef_construction);
            None
        }
    }
}

use anyhow::Context as _;
use facematch::index::{IndexConfig, SearchParams, SearchStrategy, VectorIndex, VectorStorage};

/// facematch's own index (graph, int8 graph, or its exact scan).
pub struct Facematch {
    cfg: IndexConfig,
    strategy: SearchStrategy,
    index: Option<VectorIndex>,
}

impl Facematch {
    fn new(m: usize, ef_construction: usize, strategy: SearchStrategy, storage: VectorStorage) -> Self {
        // The exact backend is an exact-only index: no graph to build.
        let graph = strategy != SearchStrategy::Exact;
        let cfg = IndexConfig { m, ef_construction, storage, graph, ..Default::default() };
        Facematch { cfg, strategy, index: None }
    }
}

impl AnnBackend for Facematch {
    fn name(&self) -> String {
        match (self.strategy, self.cfg.storage) {
            (SearchStrategy::Exact, _) => "facematch-exact".into(),
            (_, VectorStorage::Int8) => "facematch-int8".into(),
            _ => "facematch".into(),
        }
    }
    fn build(&mut self, data: &[f32], dim: usize) -> anyhow::Result<()> {
        let mut index = VectorIndex::new(dim, self.cfg.clone())?;
        index.add_batch(data)?; // slots 0..n in row order
        self.index = Some(index);
        Ok(())
    }
    fn search(&self, q: &[f32], k: usize, ef: usize) -> anyhow::Result<Vec<(u32, f32)>> {
        let index = self.index.as_ref().context("search before build")?;
        let params = SearchParams { k, ef: Some(ef), strategy: self.strategy, filter: None };
        Ok(index.search(q, &params)?.into_iter().map(|h| (h.slot, h.score)).collect())
    }
    fn memory_bytes(&self) -> Option<usize> {
        self.index.as_ref().map(|i| i.memory_bytes())
    }
    fn uses_ef(&self) -> bool {
        self.strategy != SearchStrategy::Exact
    }
    fn search_batch(&self, qs: &[f32], k: usize) -> Option<anyhow::Result<Vec<Hits>>> {
        if self.strategy != SearchStrategy::Exact {
            return None;
        }
        let index = self.index.as_ref()?;
        let params = SearchParams { k, ef: None, strategy: SearchStrategy::Exact, filter: None };
        Some(
            index
                .search_batch(qs, &params)
                .map(|r| r.into_iter().map(|hits| hits.into_iter().map(|h| (h.slot, h.score)).collect()).collect())
                .map_err(Into::into),
        )
    }
}

/// 16-lane f32 dot product; the compiler keeps the lanes in SIMD registers.
#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    let mut lanes = [0.0f32; 8];
    for i in 0..8 {
        lanes[i] = acc[i] + acc[i + 8];
    }
    s + lanes.iter().sum::<f32>()
}

/// Dot products of `q` with consecutive rows of `rows` into `out` (one per row).
#[inline(always)]
fn dots_generic(q: &[f32], rows: &[f32], out: &mut [f32]) {
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
        *o = dot_generic(q, r);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
    dots_generic(q, rows, out)
}

/// Dot products of `q` with each row of `rows`, AVX2+FMA when the CPU has them.
pub fn dots(q: &[f32], rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dots_avx2(q, rows, out) };
        }
    }
    dots_generic(q, rows, out)
}

/// Scan `data` (row-major, `dim` columns) for the best `k` rows of `q`, in blocks of rows.
pub fn scan(q: &[f32], data: &[f32], dim: usize, top: &mut TopK) {
    const BLOCK: usize = 256;
    let mut scores = [0.0f32; BLOCK];
    for (b, rows) in data.chunks(BLOCK * dim).enumerate() {
        let n = rows.len() / dim;
        dots(q, rows, &mut scores[..n]);
        for (i, &s) in scores[..n].iter().enumerate() {
            if s > top.floor {
                top.push(s, (b * BLOCK + i) as u32);
            }
        }
    }
}

/// The `k` largest scores seen so far, kept sorted (best first).
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    items: Vec<(f32, u32)>,
    floor: f32,
}

impl TopK {
    /// An empty top-`k` list.
    pub fn new(k: usize) -> TopK {
        TopK { k, items: Vec::with_capacity(k + 1), floor: f32::NEG_INFINITY }
    }
    /// Offer one candidate.
    #[inline]
    pub fn push(&mut self, score: f32, id: u32) {
        if self.k == 0 || (self.items.len() == self.k && score <= self.floor) {
            return;
        }
        let pos = self.items.partition_point(|&(s, _)| s >= score);
        self.items.insert(pos, (score, id));
        if self.items.len() > self.k {
            self.items.pop();
        }
        if self.items.len() == self.k {
            self.floor = self.items[self.k - 1].0;
        }
    }
    /// The result as `(id, score)`, best first.
    pub fn into_vec(self) -> Vec<(u32, f32)> {
        self.items.into_iter().map(|(s, i)| (i, s)).collect()
    }
}

/// Exact top-k of every query (the harness's ground truth and the exact
/// backend's batch mode): queries in parallel, each gallery block scanned for
/// a group of queries while it is in cache.
pub fn exact_batch(data: &[f32], dim: usize, qs: &[f32], k: usize) -> Vec<Vec<(u32, f32)>> {
    use rayon::prelude::*;
    const QB: usize = 8;
    const RB: usize = 2048;
    qs.par_chunks(QB * dim)
        .flat_map_iter(|block| {
            let queries: Vec<&[f32]> = block.chunks_exact(dim).collect();
            let mut tops: Vec<TopK> = queries.iter().map(|_| TopK::new(k)).collect();
            let mut scores = vec![0.0f32; RB];
            for (b, rows) in data.chunks(RB * dim).enumerate() {
                let n = rows.len() / dim;
                for (q, top) in queries.iter().zip(tops.iter_mut()) {
                    dots(q, rows, &mut scores[..n]);
                    for (i, &s) in scores[..n].iter().enumerate() {
                        if s > top.floor {
                            top.push(s, (b * RB + i) as u32);
                        }
                    }
                }
            }
            tops.into_iter().map(TopK::into_vec)
        })
        .collect()
}

/// Exact scan baseline: one pass over a contiguous copy of the gallery per query.
#[derive(Default)]
pub struct Exact {
    data: Vec<f32>,
    dim: usize,
}

impl AnnBackend for Exact {
    fn name(&self) -> String {
        "exact".into()
    }
    fn build(&mut self, data: &[f32], dim: usize) -> anyhow::Result<()> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            bail!("data length {} is not a multiple of dim {dim}", data.len());
        }
        self.data = data.to_vec();
        self.dim = dim;
        Ok(())
    }
    fn search(&self, q: &[f32], k: usize, _ef: usize) -> anyhow::Result<Vec<(u32, f32)>> {
        if q.len() != self.dim {
            bail!("query has dim {}, index {}", q.len(), self.dim);
        }
        let mut top = TopK::new(k);
        scan(q, &self.data, self.dim, &mut top);
        Ok(top.into_vec())
    }
    fn memory_bytes(&self) -> Option<usize> {
        Some(self.data.len() * 4)
    }
    fn uses_ef(&self) -> bool {
        false
    }
    fn search_batch(&self, qs: &[f32], k: usize) -> Option<anyhow::Result<Vec<Hits>>> {
        Some(Ok(exact_batch(&self.data, self.dim, qs, k)))
    }
}

#[cfg(feature = "hnsw-rs-baseline")]
mod hnsw {
    use super::*;
    use anyhow::Context;
    use hnsw_rs::prelude::{DistDot, Hnsw};

    /// `DistDot` asserts `dot <= 1.000002`: store vectors renormalised in f64
    /// and shrunk by this factor so no f32 rounding can cross the limit.
    const SHRINK: f64 = 1.0 - 1e-5;

    fn safe_unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let s = if n > 0.0 { SHRINK / n } else { 0.0 };
        v.iter().map(|&x| (x as f64 * s) as f32).collect()
    }

    /// hnsw_rs 0.3.5 with `DistDot` (feature `simdeez_f`), built with `parallel_insert_slice`.
    pub struct HnswRs {
        m: usize,
        ef_construction: usize,
        dim: usize,
        index: Option<Hnsw<'static, f32, DistDot>>,
    }

    impl HnswRs {
        pub fn new(m: usize, ef_construction: usize) -> Self {
            HnswRs { m, ef_construction, dim: 0, index: None }
        }
    }

    impl AnnBackend for HnswRs {
        fn name(&self) -> String {
            "hnsw_rs".into()
        }
        fn build(&mut self, data: &[f32], dim: usize) -> anyhow::Result<()> {
            if dim == 0 || data.len() % dim != 0 {
                bail!("data length {} is not a multiple of dim {dim}", data.len());
            }
            let n = data.len() / dim;
            let index = Hnsw::<f32, DistDot>::new(self.m, n.max(1), 16, self.ef_construction, DistDot);
            // One contiguous scaled copy (hnsw_rs copies each row again on insert; this
            // buffer is freed after the build, so the RSS delta is the index itself).
            let scaled: Vec<f32> = data.chunks_exact(dim).flat_map(safe_unit).collect();
            let items: Vec<(&[f32], usize)> = scaled.chunks_exact(dim).enumerate().map(|(i, r)| (r, i)).collect();
            index.parallel_insert_slice(&items);
            let mut index = index;
            index.set_searching_mode(true);
            self.index = Some(index);
            self.dim = dim;
            Ok(())
        }
        fn search(&self, q: &[f32], k: usize, ef: usize) -> anyhow::Result<Vec<(u32, f32)>> {
            let index = self.index.as_ref().context("hnsw_rs: search before build")?;
            if q.len() != self.dim {
                bail!("query has dim {}, index {}", q.len(), self.dim);
            }
            let q = safe_unit(q);
            let scale = (1.0 / (SHRINK * SHRINK)) as f32;
            Ok(index.search(&q, k, ef.max(k)).into_iter().map(|n| (n.d_id as u32, (1.0 - n.distance) * scale)).collect())
        }
        fn memory_bytes(&self) -> Option<usize> {
            None // hnsw_rs does not report its size; the harness's RSS delta measures it
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_matches_naive() {
        let dim = 37;
        let data: Vec<f32> = (0..600 * dim).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let q: Vec<f32> = (0..dim).map(|i| (i as f32).cos()).collect();
        let mut top = TopK::new(5);
        scan(&q, &data, dim, &mut top);
        let mut naive: Vec<(u32, f32)> = data.chunks(dim).enumerate().map(|(i, r)| (i as u32, dot_generic(&q, r))).collect();
        naive.sort_by(|a, b| b.1.total_cmp(&a.1));
        let got: Vec<u32> = top.into_vec().iter().map(|x| x.0).collect();
        assert_eq!(got, naive[..5].iter().map(|x| x.0).collect::<Vec<_>>());
        let batch = exact_batch(&data, dim, &q, 5);
        assert_eq!(batch[0].iter().map(|x| x.0).collect::<Vec<_>>(), got);
    }

    #[test]
    fn topk_keeps_best() {
        let mut t = TopK::new(3);
        for (i, s) in [0.1f32, 0.9, 0.5, 0.7, 0.2, 0.95].iter().enumerate() {
            t.push(*s, i as u32);
        }
        assert_eq!(t.into_vec(), vec![(5, 0.95), (1, 0.9), (3, 0.7)]);
    }
}

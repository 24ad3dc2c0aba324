//! Searching: choosing exact scan or graph by cost, single and batched queries.

use super::*;

/// Under this pass fraction of a filter, `Auto` takes the exact scan.
pub(super) const FILTER_EXACT_FRACTION: f32 = 0.1;

pub(super) const EXACT_SINGLE_S_PER_DIM: f64 = 2.0e-11;

pub(super) const EXACT_BATCH_S_PER_DIM: f64 = 7.7e-12;

pub(super) const GRAPH_S_PER_EF: f64 = 0.97e-6;

pub(super) const GRAPH_S_PER_EF_DIM: f64 = 0.0057e-6;

/// Int8 traversal (with its f32 re-rank) against f32 traversal, same ef.
pub(super) const GRAPH_INT8_FACTOR: f64 = 0.5;

/// [`kernels::dot_many`] (kept as a seam for the exact path).
#[inline]
pub(super) fn dot_many_dispatch(
    qs: &[f32],
    nq: usize,
    vs: &[f32],
    stride: usize,
    nv: usize,
    dim: usize,
    sink: impl FnMut(usize, usize, f32),
) {
    kernels::dot_many(qs, nq, vs, stride, nv, dim, sink)
}

impl VectorIndex {
    /// Normalise and pad a validated query into `out` (len dpad).
    pub(super) fn prepare_query(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let norm = check_vector(q, self.dim)?;
        out.iter_mut().for_each(|o| *o = 0.0);
        for (o, &x) in out.iter_mut().zip(q) {
            *o = x / norm;
        }
        Ok(())
    }

    /// Estimated fraction of slots passing the filter (live and accepted).
    pub(super) fn filter_fraction(&self, f: &(dyn Fn(u32) -> bool + Sync)) -> f32 {
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

    pub(super) fn resolve(&self, p: &SearchParams) -> (SearchStrategy, f32) {
        let frac = p.filter.map(|f| self.filter_fraction(f)).unwrap_or(1.0);
        let s = match p.strategy {
            SearchStrategy::Auto => {
                if self.len() < self.cfg.exact_below
                    || !self.graph_ready()
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
            SearchStrategy::Graph if self.graph_ready() => {
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
            SearchStrategy::Graph if self.graph_ready() => Ok(qp
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
                let parts: Vec<Vec<Vec<Hit>>> =
                    qp.par_chunks(chunk * self.dpad).map(|c| self.exact_many(c, c.len() / self.dpad, p)).collect();
                Ok(parts.into_iter().flatten().collect())
            }
        }
    }

    /// Whether a batch of `nq` queries is cheaper through the batched exact
    /// scan than through the graph. At a tie the exact scan wins (its recall is 1).
    pub(super) fn batch_prefers_exact(&self, nq: usize, p: &SearchParams) -> bool {
        nq >= 16 && self.slots as f64 * self.dim as f64 * EXACT_BATCH_S_PER_DIM <= self.graph_cost(p)
    }

    /// `ef` of a search that does not set one: the configured `ef_search`,
    /// raised to the calibrated one.
    pub(super) fn default_ef(&self) -> usize {
        let cal = self.calibration_in_force().and_then(|c| c.ef).unwrap_or(0);
        self.cfg.ef_search.max(cal)
    }

    /// Modelled seconds of one exact scan of a single query.
    pub(super) fn exact_single_cost(&self) -> f64 {
        self.slots as f64 * self.dim as f64 * EXACT_SINGLE_S_PER_DIM
    }

    /// Modelled seconds of one graph search.
    pub(super) fn graph_cost(&self, p: &SearchParams) -> f64 {
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
    pub(super) fn exact_many(&self, qp: &[f32], nq: usize, p: &SearchParams) -> Vec<Vec<Hit>> {
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
    pub(super) fn graph_search(&self, qp: &[f32], p: &SearchParams, frac: f32) -> Vec<Hit> {
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
                    cands[..r].iter().map(|&(_, slot)| Hit { slot, score: kernels::dot_f32(qp, self.exact_vec(slot)) }).collect()
                }
            };
            sort_hits(&mut hits);
            hits.truncate(k);
            hits
        })
    }
}

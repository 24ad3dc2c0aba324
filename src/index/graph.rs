//! HNSW graph: search layers, deterministic batched build, repair.

use std::cell::RefCell;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use super::kernels;
use super::{ord, unord, VectorIndex, VectorStorage};

/// New nodes per build batch, as a fraction of the nodes already in the graph.
const BATCH_FRAC: f64 = 0.05;
/// Upper bound of a build batch.
const MAX_BATCH: usize = 4096;
/// Batch peers on one level are linked brute force when at most this many.
const PEER_MAX: usize = 256;

/// Per-thread search state, reused across searches: no allocation in the loop.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Epoch-stamped visited marks, one per slot.
    visited: Vec<u16>,
    epoch: u16,
    /// Candidates, best first (key = ord(score) << 32 | slot).
    cand: BinaryHeap<u64>,
    /// Results, worst first (key = !ord(score) << 32 | slot).
    res: BinaryHeap<u64>,
    /// Unvisited neighbours of the node being expanded.
    buf: Vec<u32>,
    /// The query as i16 (int8 storage).
    q16: Vec<i16>,
    /// Output of the last `search_layer`, best first.
    out: Vec<(f32, u32)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Run `f` with this thread's scratch (a fresh one if it is already in use).
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|c| match c.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

impl Scratch {
    fn begin(&mut self, n: usize) -> u16 {
        if self.visited.len() < n {
            self.visited.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.iter_mut().for_each(|v| *v = 0);
            self.epoch = 1;
        }
        self.epoch
    }
}

/// A query in both traversal forms.
pub(crate) struct Query<'a> {
    f: &'a [f32],
    q16: &'a [i16],
}

#[inline(always)]
fn ckey(s: f32, id: u32) -> u64 {
    ((ord(s) as u64) << 32) | id as u64
}
#[inline(always)]
fn rkey(s: f32, id: u32) -> u64 {
    (((!ord(s)) as u64) << 32) | id as u64
}
#[inline(always)]
fn from_ckey(k: u64) -> (f32, u32) {
    (unord((k >> 32) as u32), k as u32)
}
#[inline(always)]
fn from_rkey(k: u64) -> (f32, u32) {
    (unord(!((k >> 32) as u32)), k as u32)
}

fn sort_desc(c: &mut [(f32, u32)]) {
    c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
}

impl VectorIndex {
    /// Fill `q16` with the int8 form of `f` (widened to i16; same rounding as
    /// [`kernels::quantize_i8`]), when storage is int8. No allocation once warm.
    fn prep_q16(&self, f: &[f32], q16: &mut Vec<i16>) {
        if self.cfg.storage != VectorStorage::Int8 {
            return;
        }
        q16.clear();
        q16.resize(self.cpad, 0);
        let amax = f.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if amax > 0.0 && amax.is_finite() {
            let inv = 127.0 / amax;
            for (o, &x) in q16.iter_mut().zip(f) {
                *o = (x * inv).round().clamp(-127.0, 127.0) as i16;
            }
        }
    }

    /// Traversal similarity (exact for f32 storage, scaled int8 otherwise).
    #[inline(always)]
    fn trav(&self, q: &Query, s: u32) -> f32 {
        debug_assert!((s as usize) < self.rec_slots());
        let p = self.rec_ptr(s);
        match self.cfg.storage {
            // SAFETY: s < slots (all ids in lists are validated), record layout per `new`.
            VectorStorage::F32 => kernels::dot_f32(q.f, unsafe { std::slice::from_raw_parts(p as *const f32, self.dpad) }),
            VectorStorage::Int8 => unsafe {
                let codes = std::slice::from_raw_parts(p as *const i8, self.cpad);
                let scale = f32::from_bits(*p.add(self.cpad / 4));
                scale * kernels::dot_i8_i16(codes, q.q16) as f32
            },
        }
    }

    /// Int8 codes and scale of a slot (int8 storage only).
    #[inline(always)]
    fn codes(&self, s: u32) -> (&[i8], f32) {
        assert!((s as usize) < self.rec_slots());
        let p = self.rec_ptr(s);
        // SAFETY: in range; the record starts with cpad code bytes then the scale.
        unsafe { (std::slice::from_raw_parts(p as *const i8, self.cpad), f32::from_bits(*p.add(self.cpad / 4))) }
    }

    /// Similarity of two stored vectors in the build metric: exact f32 with
    /// f32 storage, int8 x int8 (scaled) with int8 storage.
    #[inline]
    fn pair_sim(&self, a: u32, b: u32) -> f32 {
        match self.cfg.storage {
            VectorStorage::F32 => kernels::dot_f32(self.exact_vec(a), self.exact_vec(b)),
            VectorStorage::Int8 => {
                let (ca, sa) = self.codes(a);
                let (cb, sb) = self.codes(b);
                sa * sb * kernels::dot_i8(ca, cb) as f32
            }
        }
    }

    fn greedy(&self, q: &Query, level: usize, mut cur: (f32, u32)) -> (f32, u32) {
        loop {
            let mut changed = false;
            for &n in self.links(cur.1, level) {
                let s = self.trav(q, n);
                if s > cur.0 {
                    cur = (s, n);
                    changed = true;
                }
            }
            if !changed {
                return cur;
            }
        }
    }

    /// Beam search of one level from `eps`; the `ef` best accepted nodes end
    /// in `sc.out`, best first. Rejected nodes are walked, never returned.
    fn search_layer<F: Fn(u32) -> bool>(&self, sc: &mut Scratch, q: &Query, level: usize, eps: &[(f32, u32)], ef: usize, accept: &F) {
        let ep = sc.begin(self.slots);
        let Scratch { visited, cand, res, buf, out, .. } = sc;
        cand.clear();
        res.clear();
        out.clear();
        // whole record when small (vector + neighbour list), else the vector part
        let pf_bytes = self.vec_words * 4;
        for &(s, id) in eps {
            if visited[id as usize] == ep {
                continue;
            }
            visited[id as usize] = ep;
            cand.push(ckey(s, id));
            if accept(id) {
                res.push(rkey(s, id));
                if res.len() > ef {
                    res.pop();
                }
            }
        }
        let mut lower = res.peek().map(|&k| from_rkey(k).0).unwrap_or(f32::NEG_INFINITY);
        while let Some(top) = cand.pop() {
            let (s, c) = from_ckey(top);
            if s < lower && res.len() >= ef {
                break;
            }
            if level == 0 {
                // the next candidate's neighbour list, while this one is expanded
                if let Some(&nk) = cand.peek() {
                    let nc = nk as u32;
                    kernels::prefetch(self.rec_ptr(nc).wrapping_add(self.vec_words) as *const u8, (1 + self.m0) * 4);
                }
            }
            buf.clear();
            for &n in self.links(c, level) {
                let v = &mut visited[n as usize];
                if *v != ep {
                    *v = ep;
                    buf.push(n);
                    kernels::prefetch(self.rec_ptr(n) as *const u8, pf_bytes);
                }
            }
            for &n in buf.iter() {
                let s = self.trav(q, n);
                if res.len() < ef || s > lower {
                    cand.push(ckey(s, n));
                    if accept(n) {
                        res.push(rkey(s, n));
                        if res.len() > ef {
                            res.pop();
                        }
                        if let Some(&k) = res.peek() {
                            lower = from_rkey(k).0;
                        }
                    }
                }
            }
        }
        while let Some(k) = res.pop() {
            out.push(from_rkey(k));
        }
        out.reverse();
    }

    /// Graph candidates (traversal scores, best first) for a prepared query.
    pub(crate) fn graph_candidates<F: Fn(u32) -> bool>(&self, sc: &mut Scratch, qf: &[f32], ef: usize, accept: &F) -> Vec<(f32, u32)> {
        let Some(entry) = self.entry else { return Vec::new() };
        let mut q16 = std::mem::take(&mut sc.q16);
        self.prep_q16(qf, &mut q16);
        let q = Query { f: qf, q16: &q16 };
        let mut cur = (self.trav(&q, entry), entry);
        for l in (1..=self.max_level).rev() {
            cur = self.greedy(&q, l, cur);
        }
        self.search_layer(sc, &q, 0, &[cur], ef, accept);
        sc.q16 = q16;
        sc.out.clone()
    }

    /// Heuristic neighbour selection (HNSW paper, algorithm 4): keep a
    /// candidate only if it is closer to the base than to every kept one.
    /// `cands` are (similarity to the base in the build metric, slot), best first.
    fn select(&self, cands: &[(f32, u32)], m: usize) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::with_capacity(m);
        for &(s, c) in cands {
            if out.len() >= m {
                break;
            }
            if out.iter().all(|&r| self.pair_sim(c, r) <= s) {
                out.push(c);
            }
        }
        out
    }

    /// Insert the stored slots `start..end` into the graph, in batches.
    pub(crate) fn insert_range(&mut self, start: usize, end: usize) {
        if !self.cfg.graph {
            return;
        }
        self.ensure_records(end);
        let mut cur = start;
        while cur < end {
            if self.entry.is_none() {
                self.entry = Some(cur as u32);
                self.max_level = self.levels[cur] as usize;
                cur += 1;
                self.graph_len = cur;
                continue;
            }
            let b = ((cur as f64 * BATCH_FRAC) as usize).clamp(1, MAX_BATCH).min(end - cur);
            self.insert_batch(cur, cur + b);
            cur += b;
        }
        self.graph_len = end;
    }

    /// Link the nodes `s..e` against the frozen graph, then add reverse links.
    fn insert_batch(&mut self, s: usize, e: usize) {
        let Some(entry) = self.entry else { return };
        let old_max = self.max_level;
        let batch: Vec<u32> = (s as u32..e as u32).collect();
        let top = batch.iter().map(|&x| self.levels[x as usize] as usize).max().unwrap_or(0);
        let peers: Vec<Vec<u32>> =
            (0..=top).map(|l| batch.iter().copied().filter(|&x| self.levels[x as usize] as usize >= l).collect()).collect();
        let this = &*self;
        let plans: Vec<Vec<Vec<u32>>> = if batch.len() > 1 {
            batch.par_iter().map(|&x| with_scratch(|sc| this.plan_node(sc, x, entry, old_max, &peers))).collect()
        } else {
            batch.iter().map(|&x| with_scratch(|sc| this.plan_node(sc, x, entry, old_max, &peers))).collect()
        };
        for (&x, plan) in batch.iter().zip(&plans) {
            for (l, list) in plan.iter().enumerate() {
                self.set_links(x, l, list);
            }
        }
        for &x in &batch {
            let l = self.levels[x as usize] as usize;
            if l > self.max_level {
                self.max_level = l;
                self.entry = Some(x);
            }
        }
        // reverse links, grouped by (level, target)
        let mut pairs: Vec<(u32, u32, u32)> = Vec::new();
        for (&x, plan) in batch.iter().zip(&plans) {
            for (l, list) in plan.iter().enumerate() {
                pairs.extend(list.iter().map(|&t| (l as u32, t, x)));
            }
        }
        drop(plans);
        pairs.sort_unstable();
        let mut groups: Vec<(u32, u32, std::ops::Range<usize>)> = Vec::new();
        let mut i = 0;
        while i < pairs.len() {
            let mut j = i;
            while j < pairs.len() && pairs[j].0 == pairs[i].0 && pairs[j].1 == pairs[i].1 {
                j += 1;
            }
            groups.push((pairs[i].0, pairs[i].1, i..j));
            i = j;
        }
        let this = &*self;
        let merge = |(l, t, r): &(u32, u32, std::ops::Range<usize>)| {
            let sources: Vec<u32> = pairs[r.clone()].iter().map(|p| p.2).collect();
            (*l as usize, *t, this.merge_links(*t, *l as usize, &sources))
        };
        let updates: Vec<(usize, u32, Vec<u32>)> =
            if groups.len() > 64 { groups.par_iter().map(merge).collect() } else { groups.iter().map(merge).collect() };
        for (l, t, list) in updates {
            self.set_links(t, l, &list);
        }
    }

    /// Neighbour lists (per level 0..=level(x)) for a new node `x`.
    fn plan_node(&self, sc: &mut Scratch, x: u32, entry: u32, old_max: usize, peers: &[Vec<u32>]) -> Vec<Vec<u32>> {
        let lx = self.levels[x as usize] as usize;
        let qf = self.exact_vec(x);
        let mut q16 = std::mem::take(&mut sc.q16);
        self.prep_q16(qf, &mut q16);
        let q = Query { f: qf, q16: &q16 };
        let mut ep = (self.trav(&q, entry), entry);
        for l in (lx + 1..=old_max).rev() {
            ep = self.greedy(&q, l, ep);
        }
        let mut eps = vec![ep];
        let mut plan = vec![Vec::new(); lx + 1];
        let accept = |s: u32| !self.is_deleted(s);
        for l in (0..=lx).rev() {
            let mut cands: Vec<(f32, u32)> = Vec::new();
            if l <= old_max {
                self.search_layer(sc, &q, l, &eps, self.cfg.ef_construction, &accept);
                if !sc.out.is_empty() {
                    eps.clear();
                    eps.extend_from_slice(&sc.out);
                }
                // int8: the query is x's own code, so scaling by x's scale gives pair_sim
                let sx = match self.cfg.storage {
                    VectorStorage::F32 => 1.0,
                    VectorStorage::Int8 => self.codes(x).1,
                };
                cands.extend(sc.out.iter().map(|&(s, c)| (s * sx, c)));
            }
            if let Some(pl) = peers.get(l) {
                if pl.len() <= PEER_MAX {
                    cands.extend(pl.iter().filter(|&&p| p != x).map(|&p| (self.pair_sim(x, p), p)));
                }
            }
            sort_desc(&mut cands);
            let cap = if l == 0 { self.m0 } else { self.cfg.m };
            plan[l] = self.select(&cands, cap);
        }
        sc.q16 = q16;
        plan
    }

    /// The list of `t` on `level` after adding `sources` (pruned when too long).
    fn merge_links(&self, t: u32, level: usize, sources: &[u32]) -> Vec<u32> {
        let cap = if level == 0 { self.m0 } else { self.cfg.m };
        let mut all: Vec<u32> = self.links(t, level).to_vec();
        for &s in sources {
            if s != t && !all.contains(&s) {
                all.push(s);
            }
        }
        if all.len() <= cap {
            return all;
        }
        all.retain(|&x| !self.is_deleted(x));
        self.prune(t, all, cap)
    }

    fn prune(&self, t: u32, all: Vec<u32>, cap: usize) -> Vec<u32> {
        if all.len() <= cap {
            return all;
        }
        let mut c: Vec<(f32, u32)> = all.into_iter().map(|x| (self.pair_sim(t, x), x)).collect();
        sort_desc(&mut c);
        self.select(&c, cap)
    }

    /// The list of live slot `s` on `level` with tombstoned neighbours replaced
    /// by their live neighbours (then pruned to the cap). Old slot ids.
    pub(crate) fn repair_list(&self, s: u32, level: usize, cap: usize) -> Vec<u32> {
        let cur = self.links(s, level);
        if !cur.iter().any(|&x| self.is_deleted(x)) {
            return cur.to_vec();
        }
        let mut all: Vec<u32> = Vec::with_capacity(cap * 2);
        for &x in cur {
            if !self.is_deleted(x) {
                all.push(x);
            } else {
                all.extend(self.links(x, level).iter().copied().filter(|&y| y != s && !self.is_deleted(y)));
            }
        }
        all.sort_unstable();
        all.dedup();
        self.prune(s, all, cap)
    }
}

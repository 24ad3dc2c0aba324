//! Compaction (dropping deleted slots, repairing the graph) and assembly from parts (snapshots).

use super::*;

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
    /// Slots `0..graph_len` are in the graph.
    pub graph_len: usize,
    /// The vectors are known finite (normalised on the way in): not scanned again.
    pub finite: bool,
}

impl VectorIndex {
    /// Old slot -> new slot map of a compaction that drops the tombstones.
    pub(super) fn compaction_map(&self) -> Vec<Option<u32>> {
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

    /// Assemble an index from parts, checking every invariant the search relies on.
    pub(crate) fn from_parts(dim: usize, cfg: IndexConfig, p: Parts) -> Result<Self> {
        let bad = |r: String| Error::DataCorruption { path: "<index>".into(), reason: r };
        let mut ix = VectorIndex::new(dim, cfg)?;
        let n = p.levels.len();
        if p.vectors.len() != n * dim || p.l0.len() != n || p.upper.len() != n || p.deleted.len() != n.div_ceil(64) {
            return Err(bad("section sizes disagree".into()));
        }
        let m = ix.cfg.m;
        if p.graph_len > n {
            return Err(bad(format!("graph covers {} of {n} slots", p.graph_len)));
        }
        // Int8 storage: records only for the slots in the graph (see `rec_slots`).
        let records = if ix.cfg.storage == VectorStorage::F32 { n } else { p.graph_len };
        ix.levels = p.levels;
        ix.deleted = p.deleted;
        ix.slots = n;
        let infinite = if p.finite { None } else { p.vectors.par_chunks(dim).position_first(|v| v.iter().any(|x| !x.is_finite())) };
        if let Some(s) = infinite {
            return Err(bad(format!("vector {s} is not finite")));
        }
        // The scan's codes, built in parallel straight into their blocks.
        ix.flat = flat::FlatCodes::build(dim, &p.vectors, dim);
        let (vec_words, rec_words, dpad) = (ix.vec_words, ix.rec_words, ix.dpad);
        match ix.cfg.storage {
            VectorStorage::F32 => {
                ix.lines = vec![Line([0; 16]); records * rec_words / LINE_WORDS];
                ix.words_mut().par_chunks_mut(rec_words).zip(p.vectors.par_chunks(dim)).for_each(|(w, v)| {
                    for (w, x) in w[..vec_words].iter_mut().zip(v) {
                        *w = x.to_bits();
                    }
                });
            }
            VectorStorage::Int8 => {
                if dpad == dim {
                    // The exact copy is the vectors as they are: moved, not copied.
                    ix.f32s = p.vectors;
                } else {
                    ix.f32s.reserve_exact(n * dpad);
                    for v in p.vectors.chunks_exact(dim) {
                        ix.f32s.extend_from_slice(v);
                        ix.f32s.extend(std::iter::repeat_n(0.0, dpad - dim));
                    }
                }
                // Records (graph codes, links) for the slots in the graph.
                ix.ensure_records(records);
            }
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
            if l.len() > ix.m0 || l.iter().any(|&x| x as usize >= p.graph_len) || ((!ix.cfg.graph || s >= p.graph_len) && !l.is_empty()) {
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
        if p.graph_len > n || (!ix.cfg.graph && p.graph_len > 0) || (p.graph_len > 0) != p.entry.is_some() {
            return Err(bad(format!("graph covers {} of {n} slots with entry {:?}", p.graph_len, p.entry)));
        }
        ix.graph_len = p.graph_len;
        match p.entry {
            Some(e) if (e as usize) < p.graph_len => {
                ix.entry = Some(e);
                ix.max_level = ix.levels[e as usize] as usize;
                if ix.levels[..p.graph_len].iter().any(|&l| l as usize > ix.max_level) {
                    return Err(bad("entry point is not on the top level".into()));
                }
            }
            None if p.graph_len == 0 => {}
            _ => return Err(bad("invalid entry point".into())),
        }
        Ok(ix)
    }

    /// The index decomposed, with tombstoned slots dropped and lists repaired (per `map`).
    pub(super) fn repaired_parts(&self, map: &[Option<u32>]) -> Parts {
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
        // Live slots in the graph keep their order, so they stay a prefix.
        let graph_len = live.iter().take_while(|&&s| (s as usize) < self.graph_len).count();
        // entry: the live graph node with the highest level (the old entry if live)
        let entry = match self.entry {
            Some(e) if !self.is_deleted(e) => map[e as usize],
            _ => {
                let mut best: Option<(u8, u32)> = None;
                for (i, &l) in levels.iter().enumerate().take(graph_len) {
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
        Parts { vectors, deleted: vec![0; n.div_ceil(64)], levels, l0, upper, entry, graph_len, finite: true }
    }
}

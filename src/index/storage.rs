//! Adding, removing and reading vectors: the node records, the f32 copies, the int8 codes.

use super::*;

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
            graph_len: 0,
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
        if !self.cfg.graph || slot as usize >= self.rec_slots() {
            return &[]; // graph-less records have no link words; slots waiting for the graph no record
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

    pub(super) fn set_links(&mut self, slot: u32, level: usize, ids: &[u32]) {
        if level == 0 {
            if !self.cfg.graph || slot as usize >= self.rec_slots() {
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

    /// Slots that have a record: with f32 storage all (the record holds the
    /// vector), with int8 storage those in the graph (records are made when
    /// slots enter it: a bulk load waiting for its graph holds none).
    #[inline(always)]
    pub(crate) fn rec_slots(&self) -> usize {
        (self.lines.len() * LINE_WORDS).checked_div(self.rec_words).unwrap_or(0)
    }

    /// Make the records of slots `..end` (int8 storage: codes and scale from
    /// the exact copy, links empty).
    pub(super) fn ensure_records(&mut self, end: usize) {
        let have = self.rec_slots();
        if self.rec_words == 0 || end <= have || self.cfg.storage != VectorStorage::Int8 {
            return;
        }
        let (rec_words, cpad, dpad, dim) = (self.rec_words, self.cpad, self.dpad, self.dim);
        self.lines.resize(end * rec_words / LINE_WORDS, Line([0; 16]));
        let mut lines = std::mem::take(&mut self.lines);
        {
            // SAFETY: Line is repr(C) [u32; 16]; the lines are contiguous.
            let words = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u32, lines.len() * LINE_WORDS) };
            let f32s = &self.f32s[have * dpad..end * dpad];
            words[have * rec_words..].par_chunks_mut(rec_words).zip(f32s.par_chunks(dpad)).for_each(|(w, v)| {
                let mut codes = vec![0i8; cpad];
                let scale = kernels::quantize_i8(&v[..dim], &mut codes[..dim]);
                for (i, w) in w[..cpad / 4].iter_mut().enumerate() {
                    *w = u32::from_le_bytes([codes[4 * i] as u8, codes[4 * i + 1] as u8, codes[4 * i + 2] as u8, codes[4 * i + 3] as u8]);
                }
                w[cpad / 4] = scale.to_bits();
            });
        }
        self.lines = lines;
    }

    pub(super) fn words_mut(&mut self) -> &mut [u32] {
        let n = self.lines.len() * LINE_WORDS;
        // SAFETY: Line is repr(C) [u32; 16]; the lines are contiguous.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, n) }
    }

    /// The vectors as one f32 slice with a stride, for the exact scan.
    pub(super) fn exact_view(&self) -> (&[f32], usize) {
        match self.cfg.storage {
            VectorStorage::Int8 => (&self.f32s, self.dpad),
            VectorStorage::F32 => {
                // SAFETY: Line holds only u32 words, any bit pattern is a valid f32.
                let all = unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.lines.len() * LINE_WORDS) };
                (all, self.rec_words)
            }
        }
    }

    pub(super) fn level_of(&self, slot: u64) -> usize {
        let u = mix64(self.cfg.seed ^ mix64(slot));
        // uniform in (0, 1]
        let x = ((u >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let ml = 1.0 / (self.cfg.m as f64).ln();
        ((-x.ln() * ml) as usize).min(MAX_LEVEL)
    }

    /// Append one normalised vector's storage (no graph links yet).
    pub(super) fn push_storage(&mut self, v: &[f32], norm: f32) {
        let slot = self.slots;
        let mut padded = vec![0.0f32; self.dpad];
        for (p, &x) in padded.iter_mut().zip(v) {
            *p = x / norm;
        }
        match self.cfg.storage {
            VectorStorage::F32 => {
                self.lines.resize((slot + 1) * self.rec_words / LINE_WORDS, Line([0; 16]));
                let (base, vec_words) = (slot * self.rec_words, self.vec_words);
                let words = self.words_mut();
                for (w, x) in words[base..base + vec_words].iter_mut().zip(&padded) {
                    *w = x.to_bits();
                }
            }
            // The record (codes for graph walks, links) is made when the slot enters the graph.
            VectorStorage::Int8 => self.f32s.extend_from_slice(&padded),
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
        if self.graph_pending() == 1 {
            self.insert_range(slot, slot + 1);
        }
        Ok(slot as u32)
    }

    /// Add `vs.len() / dim` vectors, all validated before any is added; the
    /// graph is built in parallel (`build_threads`), unless its build is
    /// deferred (see [`VectorIndex::add_batch_deferred`]). Returns the new slots.
    pub fn add_batch(&mut self, vs: &[f32]) -> Result<std::ops::Range<u32>> {
        let pending = self.graph_pending();
        let r = self.add_batch_deferred(vs)?;
        if pending == 0 {
            self.build_graph();
        }
        Ok(r)
    }

    /// Add vectors like [`VectorIndex::add_batch`] but leave them out of the
    /// graph until [`VectorIndex::build_graph`]: a bulk load stores millions
    /// of vectors at memory speed and builds the graph once, later. Searches
    /// are exact scans while the graph is behind (never a partial graph).
    pub fn add_batch_deferred(&mut self, vs: &[f32]) -> Result<std::ops::Range<u32>> {
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
        match self.cfg.storage {
            VectorStorage::F32 => self.lines.reserve(n * self.rec_words / LINE_WORDS),
            VectorStorage::Int8 => self.f32s.reserve(n * self.dpad),
        }
        self.flat.reserve(n);
        for (v, &norm) in vs.chunks_exact(self.dim).zip(&norms) {
            self.push_storage(v, norm);
        }
        Ok(start as u32..(start + n) as u32)
    }

    /// Slots stored but not yet in the graph (0 when the graph is complete
    /// or the index has no graph).
    pub fn graph_pending(&self) -> usize {
        if self.cfg.graph {
            self.slots - self.graph_len
        } else {
            0
        }
    }

    /// Whether graph searches can run: the graph exists and holds every slot.
    pub(crate) fn graph_ready(&self) -> bool {
        self.entry.is_some() && self.graph_pending() == 0
    }

    /// Insert every pending slot into the graph, in parallel (`build_threads`).
    pub fn build_graph(&mut self) {
        let (start, end) = (self.graph_len, self.slots);
        if !self.cfg.graph || start == end {
            return;
        }
        // A calibration measured while searches scanned says nothing about the graph.
        self.calibration = None;
        let threads = self.cfg.build_threads;
        let pool = if threads > 0 { rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok() } else { None };
        match pool {
            Some(p) => p.install(|| self.insert_range(start, end)),
            None => self.insert_range(start, end),
        }
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
}

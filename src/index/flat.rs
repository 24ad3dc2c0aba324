//! The exact scan's own copy of every vector: int8 codes in a blocked,
//! transposed layout, scored with one `vpdpbusd` per 4 dimensions x 16
//! vectors, and a proven error bound so that the scan stays exact.
//!
//! # Layout
//!
//! Slots are grouped in blocks of [`LANES`] = 16. Inside a block, for each
//! group of 4 dimensions, the 16 slots' 4 codes are contiguous (64 bytes, one
//! AVX-512 register): byte `(block * groups + g) * 64 + lane * 4 + b` is
//! dimension `4g + b` of slot `16 * block + lane`. A vector `v` (unit norm) is
//! stored as `c = round(v / s_v)` with `s_v = max|v| / 127`; the query `q` the
//! same way (`q8`, `s_q`), shifted to unsigned (`u = q8 + 128`) because
//! `vpdpbusd` multiplies unsigned by signed bytes:
//! `q8 · c = dpbusd(u, c) - 128 * Σc`, with `128 * Σc` stored per slot.
//!
//! # Why the scan stays exact
//!
//! With `e_v = v - s_v c` and `e_q = q - s_q q8`, for unit `v` and `q`:
//! `|v·q - s_v s_q (q8·c)| <= |e_q| + |e_v| + |e_q||e_v|` (Cauchy-Schwarz).
//! `|e_v|` is measured for every vector when it is added and the maximum kept;
//! `|e_q|` is measured per query ([`FlatCodes::bound`]). The caller keeps
//! every vector whose approximate score is within twice the bound of the
//! k-th best approximate score and re-scores those in f32: anything left out
//! provably scores below each of the k best, so the result is the exact top k.
//!
//! Speed: 1 byte per dimension streamed instead of 4, and on AVX-512 VNNI
//! 64 multiply-adds per instruction with no horizontal reduction. AVX2-only
//! CPUs get the same integers from `maddubs(|q8|, sign(c, q8))` + `madd`
//! (about 2.6x slower batched than VNNI, 15x faster than scalar).

use super::kernels::{self, SimdLevel};

/// Vectors per block (one 32-bit lane each in a 512-bit register).
pub(crate) const LANES: usize = 16;
/// Added to every error bound for the float arithmetic of the approximate
/// score and of the f32 re-score (both far below 1e-5 for dim <= 65536).
const FLOAT_SLACK: f32 = 1e-4;

/// Blocked int8 codes of every slot (tombstoned slots included: the caller filters).
#[derive(Clone, Debug, Default)]
pub(crate) struct FlatCodes {
    dim: usize,
    /// `dim.div_ceil(4)`.
    groups: usize,
    /// `blocks * groups * 64` bytes.
    codes: Vec<i8>,
    /// Per slot (padded to whole blocks with 0): the code scale `s_v`.
    scale: Vec<f32>,
    /// Per slot: `128 * Σc`.
    bias: Vec<i32>,
    /// Largest `|e_v|` of any slot ever added (only grows until a rebuild).
    max_err: f32,
    len: usize,
}

/// Queries quantised for [`FlatCodes::scan`].
#[derive(Clone, Debug, Default)]
pub(crate) struct QueryCodes {
    groups: usize,
    /// `nq * groups` words of 4 unsigned bytes (`q8 + 128`).
    words: Vec<u32>,
    scale: Vec<f32>,
    err: Vec<f32>,
}

impl QueryCodes {
    pub(crate) fn len(&self) -> usize {
        self.scale.len()
    }
}

impl FlatCodes {
    pub(crate) fn new(dim: usize) -> Self {
        FlatCodes { dim, groups: dim.div_ceil(4), ..Default::default() }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.codes.capacity() + self.scale.capacity() * 4 + self.bias.capacity() * 4
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        let blocks = (self.len + n).div_ceil(LANES) - self.len.div_ceil(LANES);
        self.codes.reserve(blocks * self.groups * 64);
        self.scale.reserve(blocks * LANES);
        self.bias.reserve(blocks * LANES);
    }

    /// Overwrite every code byte (before the memory is dropped).
    pub(crate) fn zeroize(&mut self) {
        self.codes.iter_mut().for_each(|c| *c = 0);
        self.scale.iter_mut().for_each(|s| *s = 0.0);
        self.bias.iter_mut().for_each(|b| *b = 0);
    }

    /// The codes of `n` unit vectors (vector `i` at `vs[i * stride..][..dim]`),
    /// built a block at a time in parallel, straight into their layout: what
    /// `n` calls of [`FlatCodes::push`] give, without a copy of the codes.
    pub(crate) fn build(dim: usize, vs: &[f32], stride: usize) -> FlatCodes {
        use rayon::prelude::*;
        let mut f = FlatCodes::new(dim);
        let n = vs.len().checked_div(stride).unwrap_or(0);
        let blocks = n.div_ceil(LANES);
        let bytes = f.groups * 64;
        f.codes = vec![0i8; blocks * bytes];
        f.scale = vec![0.0; blocks * LANES];
        f.bias = vec![0; blocks * LANES];
        let errs: Vec<f32> = f
            .codes
            .par_chunks_mut(bytes)
            .zip(f.scale.par_chunks_mut(LANES))
            .zip(f.bias.par_chunks_mut(LANES))
            .enumerate()
            .map(|(b, ((codes, scale), bias))| {
                let mut c = vec![0i8; dim];
                let mut worst = 0.0f32;
                for lane in 0..LANES.min(n - b * LANES) {
                    let v = &vs[(b * LANES + lane) * stride..][..dim];
                    let s = kernels::quantize_i8(v, &mut c);
                    let (sum, err) = place(codes, lane, v, &c, s);
                    scale[lane] = s;
                    bias[lane] = 128 * sum;
                    worst = worst.max(err);
                }
                worst
            })
            .collect();
        f.max_err = errs.into_iter().fold(0.0, f32::max);
        f.len = n;
        f
    }

    /// Append the codes of a unit vector (`v.len() >= dim`; extra entries ignored).
    pub(crate) fn push(&mut self, v: &[f32]) {
        let v = &v[..self.dim];
        let mut c = vec![0i8; self.dim];
        let s = kernels::quantize_i8(v, &mut c);
        self.push_coded(v, &c, s);
    }

    /// Append a unit vector whose codes `c` (`dim` of them) and scale `s`
    /// [`kernels::quantize_i8`] already computed.
    pub(crate) fn push_coded(&mut self, v: &[f32], c: &[i8], s: f32) {
        let v = &v[..self.dim];
        let (block, lane) = (self.len / LANES, self.len % LANES);
        if lane == 0 {
            self.codes.resize((block + 1) * self.groups * 64, 0);
            self.scale.resize((block + 1) * LANES, 0.0);
            self.bias.resize((block + 1) * LANES, 0);
        }
        let bytes = self.groups * 64;
        let (sum, err) = place(&mut self.codes[block * bytes..(block + 1) * bytes], lane, v, c, s);
        self.scale[self.len] = s;
        self.bias[self.len] = 128 * sum;
        self.max_err = self.max_err.max(err);
        self.len += 1;
    }

    /// Quantise `nq` unit queries (query `i` at `qs[i * stride..i * stride + dim]`).
    pub(crate) fn quantize_queries(&self, qs: &[f32], stride: usize, nq: usize) -> QueryCodes {
        let mut out =
            QueryCodes { groups: self.groups, words: vec![0x8080_8080; nq * self.groups], scale: vec![0.0; nq], err: vec![0.0; nq] };
        let mut c = vec![0i8; self.dim];
        for i in 0..nq {
            let q = &qs[i * stride..i * stride + self.dim];
            let s = kernels::quantize_i8(q, &mut c);
            let mut err = 0.0f64;
            let words = &mut out.words[i * self.groups..(i + 1) * self.groups];
            for (d, (&x, &ci)) in q.iter().zip(&c).enumerate() {
                let shift = 8 * (d % 4);
                let w = &mut words[d / 4];
                *w = (*w & !(0xFF << shift)) | (((ci as i32 + 128) as u32) << shift);
                let e = x as f64 - s as f64 * ci as f64;
                err += e * e;
            }
            out.scale[i] = s;
            out.err[i] = round_up(err.sqrt());
        }
        out
    }

    /// How far an approximate score of query `i` can be from its exact
    /// score, for any slot: an approximate score `a` proves the exact one is
    /// at most `a + bound`.
    pub(crate) fn bound(&self, q: &QueryCodes, i: usize) -> f32 {
        let (eq, ev) = (q.err[i], self.max_err);
        eq + ev + eq * ev + FLOAT_SLACK
    }

    /// Score every slot against every query. `thr[i]` is query `i`'s current
    /// admission threshold: `sink(i, slot, approx)` is called (in slot order
    /// per query) only for approximate scores `>= thr[i]` and returns the new
    /// threshold. Thresholds may only grow.
    pub(crate) fn scan(&self, q: &QueryCodes, level: SimdLevel, thr: &mut [f32], mut sink: impl FnMut(usize, u32, f32) -> f32) {
        debug_assert_eq!(q.groups, self.groups);
        let nq = q.len().min(thr.len());
        if nq == 0 || self.len == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let cpu = kernels::simd_level();
            if level == SimdLevel::Avx512Vnni && cpu == SimdLevel::Avx512Vnni {
                // SAFETY: the CPU supports avx512f/bw/vnni (checked just above).
                unsafe { x86::scan_vnni(self, q, nq, thr, &mut sink) };
                return;
            }
            if level != SimdLevel::Scalar && cpu != SimdLevel::Scalar {
                // SAFETY: every level above Scalar implies AVX2 (kernels::detect).
                unsafe { x86::scan_avx2(self, q, nq, thr, &mut sink) };
                return;
            }
        }
        let _ = level;
        self.scan_scalar(q, nq, thr, &mut sink);
    }

    fn scan_scalar(&self, q: &QueryCodes, nq: usize, thr: &mut [f32], sink: &mut impl FnMut(usize, u32, f32) -> f32) {
        let g = self.groups;
        for b in 0..self.len.div_ceil(LANES) {
            let codes = &self.codes[b * g * 64..(b + 1) * g * 64];
            let lanes = (self.len - b * LANES).min(LANES);
            for (i, t) in thr.iter_mut().enumerate().take(nq) {
                let words = &q.words[i * g..(i + 1) * g];
                let mut acc = [0i32; LANES];
                for (gi, w) in words.iter().enumerate() {
                    let u = w.to_le_bytes();
                    let c = &codes[gi * 64..gi * 64 + 64];
                    for (lane, a) in acc.iter_mut().enumerate() {
                        let c = &c[lane * 4..lane * 4 + 4];
                        *a += u[0] as i32 * c[0] as i32 + u[1] as i32 * c[1] as i32 + u[2] as i32 * c[2] as i32 + u[3] as i32 * c[3] as i32;
                    }
                }
                for (lane, &a) in acc.iter().enumerate().take(lanes) {
                    let slot = b * LANES + lane;
                    let s = (a - self.bias[slot]) as f32 * self.scale[slot] * q.scale[i];
                    if s >= *t {
                        *t = sink(i, slot as u32, s);
                    }
                }
            }
        }
    }
}

/// Write the codes `c` of unit vector `v` (scale `s`) into `lane` of one
/// block's interleaved groups; returns their sum and the bound of `|v - s c|`.
fn place(block: &mut [i8], lane: usize, v: &[f32], c: &[i8], s: f32) -> (i32, f32) {
    let (mut sum, mut err) = (0i32, 0.0f64);
    for (d, (&x, &ci)) in v.iter().zip(c).enumerate() {
        block[(d / 4) * 64 + lane * 4 + d % 4] = ci;
        sum += ci as i32;
        let e = x as f64 - s as f64 * ci as f64;
        err += e * e;
    }
    (sum, round_up(err.sqrt()))
}

/// `x` rounded up a little, so that the f64 -> f32 step never shrinks a bound.
fn round_up(x: f64) -> f32 {
    (x * (1.0 + 1e-6) + 1e-9) as f32
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{FlatCodes, QueryCodes, LANES};
    use std::arch::x86_64::*;

    /// Blocks outer, queries inner (4 at a time): each 64-byte code group is
    /// loaded once per 4 queries, the block (2 KiB at 128-d) stays in L1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn scan_vnni(
        f: &FlatCodes,
        q: &QueryCodes,
        nq: usize,
        thr: &mut [f32],
        sink: &mut impl FnMut(usize, u32, f32) -> f32,
    ) {
        let g = f.groups;
        let blocks = f.len.div_ceil(LANES);
        let words = q.words.as_ptr();
        for b in 0..blocks {
            let base = f.codes.as_ptr().add(b * g * 64);
            let scale = _mm512_loadu_ps(f.scale.as_ptr().add(b * LANES));
            let bias = _mm512_loadu_si512(f.bias.as_ptr().add(b * LANES) as *const _);
            let lanes = (f.len - b * LANES).min(LANES);
            let valid: __mmask16 = if lanes == LANES { 0xFFFF } else { (1u16 << lanes) - 1 };
            let mut i = 0;
            while i + 4 <= nq {
                let w = [words.add(i * g), words.add((i + 1) * g), words.add((i + 2) * g), words.add((i + 3) * g)];
                let mut a0 = [_mm512_setzero_si512(); 4];
                let mut a1 = [_mm512_setzero_si512(); 4];
                let mut gi = 0;
                while gi + 2 <= g {
                    let c0 = _mm512_loadu_si512(base.add(gi * 64) as *const _);
                    let c1 = _mm512_loadu_si512(base.add(gi * 64 + 64) as *const _);
                    for j in 0..4 {
                        a0[j] = _mm512_dpbusd_epi32(a0[j], _mm512_set1_epi32(*w[j].add(gi) as i32), c0);
                        a1[j] = _mm512_dpbusd_epi32(a1[j], _mm512_set1_epi32(*w[j].add(gi + 1) as i32), c1);
                    }
                    gi += 2;
                }
                if gi < g {
                    let c0 = _mm512_loadu_si512(base.add(gi * 64) as *const _);
                    for j in 0..4 {
                        a0[j] = _mm512_dpbusd_epi32(a0[j], _mm512_set1_epi32(*w[j].add(gi) as i32), c0);
                    }
                }
                for j in 0..4 {
                    let acc = _mm512_sub_epi32(_mm512_add_epi32(a0[j], a1[j]), bias);
                    emit(f, q, b, i + j, acc, scale, valid, thr, sink);
                }
                i += 4;
            }
            while i < nq {
                let w = words.add(i * g);
                let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                let mut gi = 0;
                while gi + 2 <= g {
                    let c0 = _mm512_loadu_si512(base.add(gi * 64) as *const _);
                    let c1 = _mm512_loadu_si512(base.add(gi * 64 + 64) as *const _);
                    a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(*w.add(gi) as i32), c0);
                    a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(*w.add(gi + 1) as i32), c1);
                    gi += 2;
                }
                if gi < g {
                    let c0 = _mm512_loadu_si512(base.add(gi * 64) as *const _);
                    a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(*w.add(gi) as i32), c0);
                }
                let acc = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), bias);
                emit(f, q, b, i, acc, scale, valid, thr, sink);
                i += 1;
            }
        }
    }

    /// AVX2 (no VNNI): per 4-dimension group, `maddubs(|q8|, sign(c, q8))`
    /// gives pairs of products without saturation (each at most 2 * 127 *
    /// 127), `madd` with ones sums them to `q8 · c` in 32 bits: the same
    /// integers as the VNNI path (which subtracts the bias instead), so the
    /// same scores bit for bit. 16 lanes as two 8-lane halves.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scan_avx2(
        f: &FlatCodes,
        q: &QueryCodes,
        nq: usize,
        thr: &mut [f32],
        sink: &mut impl FnMut(usize, u32, f32) -> f32,
    ) {
        let g = f.groups;
        let blocks = f.len.div_ceil(LANES);
        let words = q.words.as_ptr();
        let ones = _mm256_set1_epi16(1);
        for b in 0..blocks {
            let base = f.codes.as_ptr().add(b * g * 64);
            let lanes = (f.len - b * LANES).min(LANES);
            let mut i = 0;
            while i + 2 <= nq {
                let (w0, w1) = (words.add(i * g), words.add((i + 1) * g));
                let (mut lo0, mut hi0, mut lo1, mut hi1) =
                    (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
                for gi in 0..g {
                    let c_lo = _mm256_loadu_si256(base.add(gi * 64) as *const __m256i);
                    let c_hi = _mm256_loadu_si256(base.add(gi * 64 + 32) as *const __m256i);
                    let q0 = _mm256_set1_epi32((*w0.add(gi) ^ 0x8080_8080) as i32);
                    let q1 = _mm256_set1_epi32((*w1.add(gi) ^ 0x8080_8080) as i32);
                    lo0 = dot_step(lo0, q0, c_lo, ones);
                    hi0 = dot_step(hi0, q0, c_hi, ones);
                    lo1 = dot_step(lo1, q1, c_lo, ones);
                    hi1 = dot_step(hi1, q1, c_hi, ones);
                }
                emit8(f, q, b, 0, i, lo0, lanes, thr, sink);
                emit8(f, q, b, 8, i, hi0, lanes, thr, sink);
                emit8(f, q, b, 0, i + 1, lo1, lanes, thr, sink);
                emit8(f, q, b, 8, i + 1, hi1, lanes, thr, sink);
                i += 2;
            }
            if i < nq {
                let w = words.add(i * g);
                let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for gi in 0..g {
                    let c_lo = _mm256_loadu_si256(base.add(gi * 64) as *const __m256i);
                    let c_hi = _mm256_loadu_si256(base.add(gi * 64 + 32) as *const __m256i);
                    let qb = _mm256_set1_epi32((*w.add(gi) ^ 0x8080_8080) as i32);
                    lo = dot_step(lo, qb, c_lo, ones);
                    hi = dot_step(hi, qb, c_hi, ones);
                }
                emit8(f, q, b, 0, i, lo, lanes, thr, sink);
                emit8(f, q, b, 8, i, hi, lanes, thr, sink);
            }
        }
    }

    /// `acc + q8 · c` for 8 lanes of 4 signed bytes each (`q` broadcast):
    /// `maddubs(|q|, sign(c, q))` then `madd` with ones (no saturation).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_step(acc: __m256i, q: __m256i, c: __m256i, ones: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(c, q)), ones))
    }

    /// [`emit`] for 8 lanes starting at lane `off` of block `b`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn emit8(
        f: &FlatCodes,
        q: &QueryCodes,
        b: usize,
        off: usize,
        i: usize,
        acc: __m256i,
        lanes: usize,
        thr: &mut [f32],
        sink: &mut impl FnMut(usize, u32, f32) -> f32,
    ) {
        if lanes <= off {
            return;
        }
        let scale = _mm256_loadu_ps(f.scale.as_ptr().add(b * LANES + off));
        let s = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale), _mm256_set1_ps(*q.scale.get_unchecked(i)));
        let t = thr.get_unchecked_mut(i);
        let valid = if lanes - off >= 8 { 0xFF } else { (1u32 << (lanes - off)) - 1 };
        let mut mask = (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(s, _mm256_set1_ps(*t))) as u32) & valid;
        if mask == 0 {
            return;
        }
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        while mask != 0 {
            let lane = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if out[lane] >= *t {
                *t = sink(i, (b * LANES + off + lane) as u32, out[lane]);
            }
        }
    }

    /// Turn one query's 16 integer dots into scores and hand those at or
    /// above the threshold to the sink.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn emit(
        _f: &FlatCodes,
        q: &QueryCodes,
        b: usize,
        i: usize,
        acc: __m512i,
        scale: __m512,
        valid: __mmask16,
        thr: &mut [f32],
        sink: &mut impl FnMut(usize, u32, f32) -> f32,
    ) {
        let s = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale), _mm512_set1_ps(*q.scale.get_unchecked(i)));
        let t = thr.get_unchecked_mut(i);
        let mut mask = _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(valid, s, _mm512_set1_ps(*t));
        if mask == 0 {
            return;
        }
        let mut out = [0.0f32; LANES];
        _mm512_storeu_ps(out.as_mut_ptr(), s);
        while mask != 0 {
            let lane = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if out[lane] >= *t {
                *t = sink(i, (b * LANES + lane) as u32, out[lane]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn unit(rng: &mut rand_chacha::ChaCha8Rng, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    /// Every SIMD path this CPU can run: the AVX2 one and the best one.
    fn simd_levels() -> Vec<SimdLevel> {
        let best = kernels::simd_level();
        let mut v = vec![best];
        if best != SimdLevel::Scalar && best != SimdLevel::Avx2 {
            v.push(SimdLevel::Avx2);
        }
        v
    }

    #[test]
    fn built_in_parallel_equals_pushed_one_by_one() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (dim, n) in [(128, 1_000), (100, 37), (7, 16), (64, 0)] {
            let vs: Vec<f32> = (0..n).flat_map(|_| unit(&mut rng, dim)).collect();
            let mut pushed = FlatCodes::new(dim);
            vs.chunks_exact(dim.max(1)).for_each(|v| pushed.push(v));
            let built = FlatCodes::build(dim, &vs, dim);
            assert_eq!((built.len, built.max_err), (pushed.len, pushed.max_err), "dim {dim}");
            assert_eq!(built.codes, pushed.codes);
            assert_eq!(built.scale, pushed.scale);
            assert_eq!(built.bias, pushed.bias);
        }
    }

    fn all_scores(f: &FlatCodes, q: &QueryCodes, level: SimdLevel) -> Vec<Vec<f32>> {
        let mut out = vec![vec![f32::NAN; f.len()]; q.len()];
        let mut thr = vec![f32::NEG_INFINITY; q.len()];
        f.scan(q, level, &mut thr, |i, s, a| {
            out[i][s as usize] = a;
            f32::NEG_INFINITY
        });
        out
    }

    #[test]
    fn approximate_scores_are_within_the_bound_on_every_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for dim in [1usize, 3, 4, 7, 128, 130, 512] {
            for n in [1usize, 15, 16, 17, 40] {
                let mut f = FlatCodes::new(dim);
                let vs: Vec<Vec<f32>> = (0..n).map(|_| unit(&mut rng, dim)).collect();
                vs.iter().for_each(|v| f.push(v));
                let qs: Vec<f32> = (0..7).flat_map(|_| unit(&mut rng, dim)).collect();
                let qc = f.quantize_queries(&qs, dim, 7);
                let scalar = all_scores(&f, &qc, SimdLevel::Scalar);
                let paths: Vec<Vec<Vec<f32>>> = simd_levels().into_iter().map(|l| all_scores(&f, &qc, l)).collect();
                for i in 0..7 {
                    let q = &qs[i * dim..(i + 1) * dim];
                    for (s, v) in vs.iter().enumerate() {
                        let exact = kernels::dot_f32(q, v);
                        let a = scalar[i][s];
                        assert!((exact - a).abs() <= f.bound(&qc, i), "dim {dim} n {n}: {exact} vs {a}");
                        for simd in &paths {
                            assert_eq!(a.to_bits(), simd[i][s].to_bits(), "simd and scalar paths agree bit for bit");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn thresholds_filter_what_reaches_the_sink() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let dim = 64;
        let mut f = FlatCodes::new(dim);
        for _ in 0..100 {
            f.push(&unit(&mut rng, dim));
        }
        let q = unit(&mut rng, dim);
        let qc = f.quantize_queries(&q, dim, 1);
        let all = all_scores(&f, &qc, SimdLevel::Scalar);
        for level in std::iter::once(SimdLevel::Scalar).chain(simd_levels()) {
            let mut thr = vec![0.1f32];
            let mut seen = Vec::new();
            f.scan(&qc, level, &mut thr, |_, s, a| {
                seen.push(s);
                a.max(0.1) // keep raising to the best so far
            });
            // Exactly the running maxima at or above 0.1 reach the sink.
            let mut best = 0.1f32;
            let want: Vec<u32> = (0..100u32)
                .filter(|&s| {
                    let a = all[0][s as usize];
                    let pass = a >= best;
                    if pass {
                        best = a;
                    }
                    pass
                })
                .collect();
            assert_eq!(seen, want);
        }
    }
}

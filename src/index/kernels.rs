//! SIMD kernels for the matching hot paths.
//!
//! Every kernel has an AVX-512, an AVX2+FMA and a scalar version; the best one
//! the CPU supports is picked at run time (`is_x86_feature_detected!`, cached
//! once), never by compile flags, so one binary runs everywhere.
//!
//! - [`dot_f32`]: the f32 dot product (cosine of unit vectors). All scores the
//!   index returns come from this one kernel, so the exact and graph paths
//!   report bit-identical scores for the same (query, template) pair.
//! - [`dot_i8_i16`]: int8 codes against a query pre-widened to i16 (exact
//!   integer arithmetic), the traversal metric of int8 graph storage.
//! - [`dot_i8`]: int8 x int8 (exact i32), the build's pairwise metric with int8 storage.
//! - [`dot_many`]: a register- and cache-blocked "small GEMM" that scores a
//!   batch of queries against many vectors while reading each vector once per
//!   block of queries.
//!
//! Crate-private: only the index uses them (a table of kernels, one job; the
//! unit tests below check every level against the scalar one).

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction set level the kernels dispatch to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F + BW.
    Avx512,
    /// AVX-512 F + BW + VNNI.
    Avx512Vnni,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The kernel level picked for this CPU (detected once, then cached).
#[inline]
pub fn simd_level() -> SimdLevel {
    match LEVEL.load(Ordering::Relaxed) {
        1 => SimdLevel::Scalar,
        2 => SimdLevel::Avx2,
        3 => SimdLevel::Avx512,
        4 => SimdLevel::Avx512Vnni,
        _ => detect(),
    }
}

#[cold]
fn detect() -> SimdLevel {
    let l = detect_inner();
    let code = match l {
        SimdLevel::Scalar => 1,
        SimdLevel::Avx2 => 2,
        SimdLevel::Avx512 => 3,
        SimdLevel::Avx512Vnni => 4,
    };
    LEVEL.store(code, Ordering::Relaxed);
    l
}

#[cfg(target_arch = "x86_64")]
fn detect_inner() -> SimdLevel {
    if std::env::var_os("FACEMATCH_FORCE_SCALAR").is_some() {
        return SimdLevel::Scalar;
    }
    let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    let found = if avx512 && is_x86_feature_detected!("avx512vnni") {
        SimdLevel::Avx512Vnni
    } else if avx512 {
        SimdLevel::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    };
    // FACEMATCH_SIMD caps the level (to measure the fallback paths on a newer CPU).
    let cap = match std::env::var("FACEMATCH_SIMD").as_deref() {
        Ok("scalar") => SimdLevel::Scalar,
        Ok("avx2") => SimdLevel::Avx2,
        Ok("avx512") => SimdLevel::Avx512,
        _ => SimdLevel::Avx512Vnni,
    };
    found.min(cap)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_inner() -> SimdLevel {
    SimdLevel::Scalar
}

/// Dot product of two f32 slices (over the shorter length).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            // SAFETY: the level was detected at run time.
            SimdLevel::Avx512 | SimdLevel::Avx512Vnni => return unsafe { x86::dot_f32_avx512(a, b) },
            SimdLevel::Avx2 => return unsafe { x86::dot_f32_avx2(a, b) },
            SimdLevel::Scalar => {}
        }
    }
    dot_f32_scalar(a, b)
}

/// Portable f32 dot product (4 partial sums).
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut s = [0.0f32; 4];
    let chunks = n / 4;
    for i in 0..chunks {
        for j in 0..4 {
            s[j] += a[4 * i + j] * b[4 * i + j];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for i in chunks * 4..n {
        t += a[i] * b[i];
    }
    t
}

/// Dot product of int8 codes with an i16 query (over the shorter length), exact.
#[inline]
pub fn dot_i8_i16(code: &[i8], q: &[i16]) -> i32 {
    let n = code.len().min(q.len());
    let (c, q) = (&code[..n], &q[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            // SAFETY: the level was detected at run time.
            SimdLevel::Avx512Vnni => return unsafe { x86::dot_i8_avx512vnni(c, q) },
            SimdLevel::Avx512 => return unsafe { x86::dot_i8_avx512(c, q) },
            SimdLevel::Avx2 => return unsafe { x86::dot_i8_avx2(c, q) },
            SimdLevel::Scalar => {}
        }
    }
    dot_i8_scalar(c, q)
}

/// Portable int8 x i16 dot product.
pub fn dot_i8_scalar(code: &[i8], q: &[i16]) -> i32 {
    code.iter().zip(q).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Dot product of two int8 code vectors (over the shorter length), exact i32.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            // SAFETY: the level was detected at run time.
            SimdLevel::Avx512Vnni => return unsafe { x86::dot_i8i8_avx512vnni(a, b) },
            SimdLevel::Avx512 => return unsafe { x86::dot_i8i8_avx512(a, b) },
            SimdLevel::Avx2 => return unsafe { x86::dot_i8i8_avx2(a, b) },
            SimdLevel::Scalar => {}
        }
    }
    dot_i8i8_scalar(a, b)
}

/// Portable int8 x int8 dot product.
pub fn dot_i8i8_scalar(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// Quantise `v` to symmetric int8 with one scale: `v[i] ~= scale * out[i]`.
///
/// Returns the scale (0 for an all-zero vector). `out` must be at least as
/// long as `v`; extra entries are zeroed.
pub fn quantize_i8(v: &[f32], out: &mut [i8]) -> f32 {
    let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    out.iter_mut().for_each(|o| *o = 0);
    if amax.is_nan() || amax <= 0.0 || amax.is_infinite() {
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (o, &x) in out.iter_mut().zip(v) {
        *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Number of vectors of one cache block in [`dot_many`] (sized for L2).
fn block_vectors(dim: usize) -> usize {
    // ~192 KiB of vectors per block.
    ((192 * 1024) / (dim.max(1) * 4)).clamp(8, 4096)
}

/// Scores `nq` queries against `nv` vectors and hands every score to `sink`.
///
/// `qs` holds the queries back to back (`qs[i*dim..(i+1)*dim]`); vector `j`
/// is `vs[j*stride..j*stride+dim]`. `sink(i, j, score)` is called exactly once
/// per (query, vector) pair. The vectors are processed in L2-sized blocks and
/// each block is read once per group of 4 queries, with 4x4 register blocking
/// on AVX-512. Scores can differ from [`dot_f32`] in the last bits (another
/// summation order); rescore the few winners with [`dot_f32`] when bit
/// equality matters. Out-of-range counts are clamped to what the slices hold.
pub fn dot_many(qs: &[f32], nq: usize, vs: &[f32], stride: usize, nv: usize, dim: usize, mut sink: impl FnMut(usize, usize, f32)) {
    if dim == 0 || stride < dim {
        return;
    }
    let nq = nq.min(qs.len() / dim);
    let nv = if vs.len() < dim { 0 } else { nv.min((vs.len() - dim) / stride + 1) };
    if nq == 0 || nv == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(simd_level(), SimdLevel::Avx512 | SimdLevel::Avx512Vnni) && dim.is_multiple_of(16) {
            // SAFETY: avx512f detected; bounds clamped above.
            unsafe { x86::dot_many_avx512(qs, nq, vs, stride, nv, dim, &mut sink) };
            return;
        }
    }
    let bv = block_vectors(dim);
    let mut v0 = 0;
    while v0 < nv {
        let v1 = (v0 + bv).min(nv);
        for i in 0..nq {
            let q = &qs[i * dim..(i + 1) * dim];
            for j in v0..v1 {
                sink(i, j, dot_f32(q, &vs[j * stride..j * stride + dim]));
            }
        }
        v0 = v1;
    }
}

/// Prefetch the cache lines of `ptr[..bytes]` (up to 8 lines) into L1; no-op elsewhere.
#[inline(always)]
pub fn prefetch(ptr: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let lines = bytes.div_ceil(64).min(8);
        for l in 0..lines {
            // SAFETY: prefetch never faults, whatever the address.
            unsafe { std::arch::x86_64::_mm_prefetch(ptr.wrapping_add(l * 64) as *const i8, std::arch::x86_64::_MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ptr, bytes);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), acc1);
            i += 32;
        }
        while i < n {
            let rem = (n - i).min(16);
            let m: __mmask16 = if rem == 16 { 0xffff } else { (1u16 << rem) - 1 };
            acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), acc0);
            i += rem;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, ac) in acc.iter_mut().enumerate() {
                *ac = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * k)), _mm256_loadu_ps(pb.add(i + 8 * k)), *ac);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut t = _mm_cvtss_f32(h);
        while i < n {
            t += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        t
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_i8_avx512(c: &[i8], q: &[i16]) -> i32 {
        let n = c.len();
        let mut acc = _mm512_setzero_si512();
        let mut i = 0;
        while i + 32 <= n {
            let c16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.as_ptr().add(i) as *const __m256i));
            let q16 = _mm512_loadu_si512(q.as_ptr().add(i) as *const _);
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(c16, q16));
            i += 32;
        }
        let mut t = _mm512_reduce_add_epi32(acc);
        while i < n {
            t += *c.get_unchecked(i) as i32 * *q.get_unchecked(i) as i32;
            i += 1;
        }
        t
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_i8_avx512vnni(c: &[i8], q: &[i16]) -> i32 {
        let n = c.len();
        let mut acc0 = _mm512_setzero_si512();
        let mut acc1 = _mm512_setzero_si512();
        let mut i = 0;
        while i + 64 <= n {
            let c0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.as_ptr().add(i) as *const __m256i));
            let c1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.as_ptr().add(i + 32) as *const __m256i));
            acc0 = _mm512_dpwssd_epi32(acc0, c0, _mm512_loadu_si512(q.as_ptr().add(i) as *const _));
            acc1 = _mm512_dpwssd_epi32(acc1, c1, _mm512_loadu_si512(q.as_ptr().add(i + 32) as *const _));
            i += 64;
        }
        while i + 32 <= n {
            let c0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.as_ptr().add(i) as *const __m256i));
            acc0 = _mm512_dpwssd_epi32(acc0, c0, _mm512_loadu_si512(q.as_ptr().add(i) as *const _));
            i += 32;
        }
        let mut t = _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
        while i < n {
            t += *c.get_unchecked(i) as i32 * *q.get_unchecked(i) as i32;
            i += 1;
        }
        t
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i8_avx2(c: &[i8], q: &[i16]) -> i32 {
        let n = c.len();
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 16 <= n {
            let c16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(c.as_ptr().add(i) as *const __m128i));
            let q16 = _mm256_loadu_si256(q.as_ptr().add(i) as *const __m256i);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(c16, q16));
            i += 16;
        }
        let h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b10_11_00_01));
        let mut t = _mm_cvtsi128_si32(h);
        while i < n {
            t += *c.get_unchecked(i) as i32 * *q.get_unchecked(i) as i32;
            i += 1;
        }
        t
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_i8i8_avx512(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let mut acc = _mm512_setzero_si512();
        let mut i = 0;
        while i + 32 <= n {
            let x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(a.as_ptr().add(i) as *const __m256i));
            let y = _mm512_cvtepi8_epi16(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(x, y));
            i += 32;
        }
        let mut t = _mm512_reduce_add_epi32(acc);
        while i < n {
            t += *a.get_unchecked(i) as i32 * *b.get_unchecked(i) as i32;
            i += 1;
        }
        t
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_i8i8_avx512vnni(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let mut acc = _mm512_setzero_si512();
        let mut i = 0;
        while i + 32 <= n {
            let x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(a.as_ptr().add(i) as *const __m256i));
            let y = _mm512_cvtepi8_epi16(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
            acc = _mm512_dpwssd_epi32(acc, x, y);
            i += 32;
        }
        let mut t = _mm512_reduce_add_epi32(acc);
        while i < n {
            t += *a.get_unchecked(i) as i32 * *b.get_unchecked(i) as i32;
            i += 1;
        }
        t
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i8i8_avx2(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 16 <= n {
            let x = _mm256_cvtepi8_epi16(_mm_loadu_si128(a.as_ptr().add(i) as *const __m128i));
            let y = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
            i += 16;
        }
        let h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b10_11_00_01));
        let mut t = _mm_cvtsi128_si32(h);
        while i < n {
            t += *a.get_unchecked(i) as i32 * *b.get_unchecked(i) as i32;
            i += 1;
        }
        t
    }

    /// Horizontal sums of four vectors: lane i of the result = sum of `a[i]`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn hsum4(a0: __m512, a1: __m512, a2: __m512, a3: __m512) -> __m128 {
        let r = |a: __m512| _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
        let (x0, x1, x2, x3) = (r(a0), r(a1), r(a2), r(a3));
        let h01 = _mm256_hadd_ps(x0, x1);
        let h23 = _mm256_hadd_ps(x2, x3);
        let y = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1))
    }

    /// 4 queries x 4 vectors micro-kernel; `dim % 16 == 0`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel4x4(q: [*const f32; 4], v: [*const f32; 4], dim: usize, out: &mut [[f32; 4]; 4]) {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut d = 0;
        while d < dim {
            let qv =
                [_mm512_loadu_ps(q[0].add(d)), _mm512_loadu_ps(q[1].add(d)), _mm512_loadu_ps(q[2].add(d)), _mm512_loadu_ps(q[3].add(d))];
            for j in 0..4 {
                let x = _mm512_loadu_ps(v[j].add(d));
                for i in 0..4 {
                    acc[i][j] = _mm512_fmadd_ps(qv[i], x, acc[i][j]);
                }
            }
            d += 16;
        }
        for i in 0..4 {
            let s = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            _mm_storeu_ps(out[i].as_mut_ptr(), s);
        }
    }

    /// 1 query x 4 vectors micro-kernel; `dim % 16 == 0`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel1x4(q: *const f32, v: [*const f32; 4], dim: usize, out: &mut [f32; 4]) {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut d = 0;
        while d < dim {
            let qv = _mm512_loadu_ps(q.add(d));
            for j in 0..4 {
                acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(v[j].add(d)), acc[j]);
            }
            d += 16;
        }
        _mm_storeu_ps(out.as_mut_ptr(), hsum4(acc[0], acc[1], acc[2], acc[3]));
    }

    /// Vectors ahead of the single-query scan to prefetch.
    const PF_AHEAD: usize = 16;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_many_avx512(
        qs: &[f32],
        nq: usize,
        vs: &[f32],
        stride: usize,
        nv: usize,
        dim: usize,
        sink: &mut impl FnMut(usize, usize, f32),
    ) {
        let bv = super::block_vectors(dim);
        let qp = qs.as_ptr();
        let vp = vs.as_ptr();
        let mut v0 = 0;
        while v0 < nv {
            let v1 = (v0 + bv).min(nv);
            let mut i = 0;
            while i + 4 <= nq {
                let q = [qp.add(i * dim), qp.add((i + 1) * dim), qp.add((i + 2) * dim), qp.add((i + 3) * dim)];
                let mut j = v0;
                let mut out = [[0.0f32; 4]; 4];
                while j + 4 <= v1 {
                    let v = [vp.add(j * stride), vp.add((j + 1) * stride), vp.add((j + 2) * stride), vp.add((j + 3) * stride)];
                    kernel4x4(q, v, dim, &mut out);
                    for (a, row) in out.iter().enumerate() {
                        for (b, &s) in row.iter().enumerate() {
                            sink(i + a, j + b, s);
                        }
                    }
                    j += 4;
                }
                while j < v1 {
                    let vv = std::slice::from_raw_parts(vp.add(j * stride), dim);
                    for (a, &qa) in q.iter().enumerate() {
                        sink(i + a, j, dot_f32_avx512(std::slice::from_raw_parts(qa, dim), vv));
                    }
                    j += 1;
                }
                i += 4;
            }
            while i < nq {
                let q = qp.add(i * dim);
                let mut j = v0;
                let mut out = [0.0f32; 4];
                while j + 4 <= v1 {
                    let v = [vp.add(j * stride), vp.add((j + 1) * stride), vp.add((j + 2) * stride), vp.add((j + 3) * stride)];
                    // one query streams the vectors from memory: software prefetch ahead
                    if j + PF_AHEAD + 4 <= nv {
                        let base = vp.add((j + PF_AHEAD) * stride) as *const i8;
                        let mut off = 0;
                        while off < 4 * stride * 4 {
                            _mm_prefetch(base.add(off), _MM_HINT_T0);
                            off += 64;
                        }
                    }
                    kernel1x4(q, v, dim, &mut out);
                    for (b, &s) in out.iter().enumerate() {
                        sink(i, j + b, s);
                    }
                    j += 4;
                }
                while j < v1 {
                    let vv = std::slice::from_raw_parts(vp.add(j * stride), dim);
                    sink(i, j, dot_f32_avx512(std::slice::from_raw_parts(q, dim), vv));
                    j += 1;
                }
                i += 1;
            }
            v0 = v1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rv(n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn dot_matches_scalar_all_lengths() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for n in 0..200 {
            let a = rv(n, &mut rng);
            let b = rv(n, &mut rng);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot_f32(&a, &b) as f64 - want).abs() < 1e-4, "n={n}");
            assert!((dot_f32_scalar(&a, &b) as f64 - want).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn int8_dot_exact() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for n in [0usize, 1, 15, 16, 31, 32, 33, 63, 64, 100, 128, 512, 515] {
            let c: Vec<i8> = (0..n).map(|_| rng.gen_range(-127i8..=127)).collect();
            let q: Vec<i16> = (0..n).map(|_| rng.gen_range(-127i16..=127)).collect();
            assert_eq!(dot_i8_i16(&c, &q), dot_i8_scalar(&c, &q), "n={n}");
            let d: Vec<i8> = (0..n).map(|_| rng.gen_range(-128i8..=127)).collect();
            assert_eq!(dot_i8(&c, &d), dot_i8i8_scalar(&c, &d), "n={n}");
        }
    }

    #[test]
    fn quantize_roundtrip_is_close() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let v = rv(128, &mut rng);
        let mut c = vec![0i8; 130];
        let s = quantize_i8(&v, &mut c);
        for (x, &q) in v.iter().zip(&c) {
            assert!((x - s * q as f32).abs() <= s * 0.5 + 1e-6);
        }
        assert_eq!(&c[128..], &[0, 0]);
        assert_eq!(quantize_i8(&[0.0; 4], &mut c), 0.0);
    }

    #[test]
    fn dot_many_matches_dot() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for (dim, stride, nq, nv) in [(16, 16, 7, 13), (128, 144, 5, 1030), (48, 48, 1, 3), (20, 24, 3, 9)] {
            let qs = rv(dim * nq, &mut rng);
            let vs = rv(stride * nv, &mut rng);
            let mut seen = vec![0u8; nq * nv];
            dot_many(&qs, nq, &vs, stride, nv, dim, |i, j, s| {
                seen[i * nv + j] += 1;
                let want = dot_f32_scalar(&qs[i * dim..(i + 1) * dim], &vs[j * stride..j * stride + dim]);
                assert!((s - want).abs() < 1e-4);
            });
            assert!(seen.iter().all(|&c| c == 1));
        }
    }
}

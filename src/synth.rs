//! Seeded synthetic face embeddings for scale, accuracy and index benchmarks.
//!
//! Real face galleries cannot be shipped, and a handful of photos gives too
//! few pairs to measure error rates, so recall, open-set error and speed are
//! measured on synthetic embeddings that imitate the statistics of a real
//! face model (SFace-like: same-person cosine median ~0.7, different-person
//! cosine mean ~0.05 with std ~0.1).
//!
//! # The generative model ([`SynthKind::Structured`])
//!
//! All random directions are Gaussian vectors whose per-coordinate variance
//! follows a power-law spectrum `λ_j ∝ (j+1)^-p` (coordinates shuffled by the
//! seed), normalised so that their expected squared norm is 1. `p` is solved
//! so that the spectrum's *effective dimension* `(Σλ)² / Σλ²` equals
//! [`SynthConfig::effective_dim`] (capped at `dim`): real embeddings use only
//! part of their space, which is what makes impostor cosines wider than the
//! `1/sqrt(dim)` of random vectors.
//!
//! ```text
//! mean direction   m        one unit vector shared by everybody
//! group centre     g_k      k = 0..groups        ("people who look alike")
//! identity centre  v_i = μ·m + a·g_group(i) + b·z_i
//! sample           s   = normalise(v_i + σ·e^(j·ξ)·n)   ξ ~ N(0,1) per sample
//! ```
//!
//! with `μ = mean_offset`, `a = group_spread`, `b = identity_spread`,
//! `σ = sample_noise`, `j = noise_jitter`. Writing `V = μ² + a² + b²`,
//! `T = a² + b² + σ²`, and `d_eff` for the effective dimension:
//!
//! * mate (same identity) cosine, median ≈ `V / (V + σ²)`;
//! * impostor cosine, mean ≈ `μ² / (V + σ²)`, std ≈ `sqrt(T²/d_eff + 2μ²T/dim) / (V + σ²)`;
//! * same-group impostor cosine, mean ≈ `(μ² + a²) / (V + σ²)`.
//!
//! The defaults (`μ² = 0.05, a² = 0.20, b² = 0.45, σ² = 0.30, d_eff = 96`)
//! give a mate median of 0.70, impostor mean 0.05 and impostor std 0.10 at
//! both 128 and 512 dimensions; the per-sample noise jitter (0.25) spreads
//! the mate distribution over roughly 0.55-0.85 with a tail of hard samples.
//! [`measure`] checks these numbers on a generated set.
//!
//! # [`SynthKind::Isotropic`]
//!
//! The worst case for a graph index: identity centres are uniform random unit
//! vectors (no mean, no groups, full-rank), samples are
//! `normalise(c + σ'·e^(j·ξ)·n)` with isotropic noise and
//! `σ' = σ / sqrt(V)` so that the mate median stays the same. Impostor
//! cosines then have mean 0 and std `1/sqrt(dim)`.
//!
//! # Determinism
//!
//! Every identity, group, gallery sample and query draws from its own
//! ChaCha8 stream derived from the seed, so the output is bit-identical
//! whatever the number of rayon threads.
//!
//! ```
//! use facematch::synth::{generate, measure, SynthConfig};
//! let cfg = SynthConfig { identities: 500, queries: 100, ..SynthConfig::default() };
//! let set = generate(&cfg).unwrap();
//! assert_eq!(set.gallery.len(), 500 * cfg.dim);
//! let stats = measure(&set, 2_000, 7);
//! assert!(stats.mate_cos_median > stats.impostor_cos_mean);
//! ```

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which family of synthetic embeddings to draw.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SynthKind {
    /// Face-like: a shared mean, groups of look-alikes, a low effective dimension.
    #[default]
    Structured,
    /// Identity centres uniform on the sphere: the hard case for graph indexes.
    Isotropic,
}

/// Parameters of a synthetic gallery and its queries (see the [module docs](self)).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct SynthConfig {
    /// Embedding dimension.
    pub dim: usize,
    /// Enrolled identities.
    pub identities: usize,
    /// Gallery templates (samples) per enrolled identity.
    pub templates_per_identity: usize,
    /// Number of probe queries.
    pub queries: usize,
    /// Fraction of the queries that are people not enrolled (open-set impostors).
    pub unenrolled_fraction: f64,
    /// Number of look-alike groups; 0 means `ceil(identities / 50)`.
    pub groups: usize,
    /// Amplitude `a` of the group component of an identity centre.
    pub group_spread: f64,
    /// Amplitude `b` of the identity-specific component.
    pub identity_spread: f64,
    /// Amplitude `σ` of the per-sample noise (pose, light, age).
    pub sample_noise: f64,
    /// Log-normal spread `j` of the per-sample noise amplitude (0 = every sample equally hard).
    pub noise_jitter: f64,
    /// Amplitude `μ` of the direction shared by every face (sets the impostor mean).
    pub mean_offset: f64,
    /// Target effective dimension of the spectrum (sets the impostor std); capped at `dim`.
    pub effective_dim: f64,
    /// Structured (face-like) or isotropic (worst case).
    pub kind: SynthKind,
    /// Master seed.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            dim: 128,
            identities: 10_000,
            templates_per_identity: 1,
            queries: 1_000,
            unenrolled_fraction: 0.1,
            groups: 0,
            group_spread: 0.20f64.sqrt(),
            identity_spread: 0.45f64.sqrt(),
            sample_noise: 0.30f64.sqrt(),
            noise_jitter: 0.25,
            mean_offset: 0.05f64.sqrt(),
            effective_dim: 96.0,
            kind: SynthKind::Structured,
            seed: 42,
        }
    }
}

/// Rows above this count are refused (the gallery must fit a `u32` row id).
const MAX_ROWS: usize = u32::MAX as usize;

impl SynthConfig {
    /// Check ranges; called by [`generate`].
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.dim > 65_536 {
            return Err(Error::config("synth.dim", format!("must be in 1..=65536, got {}", self.dim)));
        }
        if self.identities == 0 {
            return Err(Error::config("synth.identities", "must be at least 1"));
        }
        if self.templates_per_identity == 0 {
            return Err(Error::config("synth.templates_per_identity", "must be at least 1"));
        }
        let rows = self.identities.checked_mul(self.templates_per_identity);
        let too_big = match rows.and_then(|r| r.checked_mul(self.dim)) {
            None => true,
            Some(_) => rows.is_none_or(|r| r > MAX_ROWS),
        };
        if too_big || self.identities.saturating_add(self.queries) > MAX_ROWS {
            return Err(Error::config("synth.identities", "gallery too large for u32 row ids"));
        }
        if !(0.0..=1.0).contains(&self.unenrolled_fraction) {
            return Err(Error::config("synth.unenrolled_fraction", format!("must be in [0, 1], got {}", self.unenrolled_fraction)));
        }
        if self.groups > self.identities {
            return Err(Error::config("synth.groups", "cannot exceed the number of identities"));
        }
        for (name, v) in [
            ("synth.group_spread", self.group_spread),
            ("synth.identity_spread", self.identity_spread),
            ("synth.sample_noise", self.sample_noise),
            ("synth.noise_jitter", self.noise_jitter),
            ("synth.mean_offset", self.mean_offset),
        ] {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                return Err(Error::config(name, format!("must be finite and in [0, 100], got {v}")));
            }
        }
        if self.group_spread + self.identity_spread == 0.0 {
            return Err(Error::config(
                "synth.identity_spread",
                "group_spread and identity_spread cannot both be 0 (all identities would coincide)",
            ));
        }
        if !self.effective_dim.is_finite() || self.effective_dim < 1.0 {
            return Err(Error::config("synth.effective_dim", format!("must be >= 1, got {}", self.effective_dim)));
        }
        Ok(())
    }

    /// The number of look-alike groups actually used (resolves `groups == 0`).
    pub fn resolved_groups(&self) -> usize {
        if self.groups == 0 {
            self.identities.div_ceil(50).max(1)
        } else {
            self.groups
        }
    }

    /// The number of queries drawn from people not in the gallery.
    pub fn unenrolled_queries(&self) -> usize {
        ((self.queries as f64) * self.unenrolled_fraction).round() as usize
    }
}

/// A generated gallery with its queries and ground-truth identities.
#[derive(Clone, Debug)]
pub struct SynthSet {
    /// Embedding dimension.
    pub dim: usize,
    /// Gallery rows, row-major `rows x dim`, each L2-normalised; rows of one identity are adjacent.
    pub gallery: Vec<f32>,
    /// Identity of each gallery row.
    pub gallery_identity: Vec<u32>,
    /// Query rows, row-major `queries x dim`, each L2-normalised.
    pub queries: Vec<f32>,
    /// The enrolled identity of each query, `None` for people not enrolled.
    pub query_identity: Vec<Option<u32>>,
}

impl SynthSet {
    /// Number of gallery rows.
    pub fn gallery_rows(&self) -> usize {
        self.gallery_identity.len()
    }
    /// Number of queries.
    pub fn query_rows(&self) -> usize {
        self.query_identity.len()
    }
    /// Gallery row `i`.
    pub fn gallery_row(&self, i: usize) -> &[f32] {
        &self.gallery[i * self.dim..(i + 1) * self.dim]
    }
    /// Query row `i`.
    pub fn query_row(&self, i: usize) -> &[f32] {
        &self.queries[i * self.dim..(i + 1) * self.dim]
    }
}

// Stream domains: each kind of draw gets its own ChaCha8 stream family.
const DOMAIN_GLOBAL: u64 = 1;
const DOMAIN_GROUP: u64 = 2;
const DOMAIN_IDENTITY: u64 = 3;
const DOMAIN_SAMPLES: u64 = 4;
const DOMAIN_QUERY: u64 = 5;

fn stream_rng(seed: u64, domain: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((domain << 56) | (index & ((1 << 56) - 1)));
    rng
}

/// Effective dimension `(Σλ)²/Σλ²` of the spectrum `λ_j = (j+1)^-p`.
fn effective_dim_of(dim: usize, p: f64) -> f64 {
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for j in 0..dim {
        let l = ((j + 1) as f64).powf(-p);
        s1 += l;
        s2 += l * l;
    }
    s1 * s1 / s2
}

/// Per-coordinate standard deviations of a random direction (expected squared norm 1).
fn spectrum(cfg: &SynthConfig, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let d = cfg.dim;
    let target = cfg.effective_dim.min(d as f64);
    let p = if target >= d as f64 - 1e-9 {
        0.0
    } else {
        // effective_dim_of is decreasing in p: bisection.
        let (mut lo, mut hi) = (0.0f64, 16.0f64);
        for _ in 0..80 {
            let mid = 0.5 * (lo + hi);
            if effective_dim_of(d, mid) > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let lambdas: Vec<f64> = (0..d).map(|j| ((j + 1) as f64).powf(-p)).collect();
    let total: f64 = lambdas.iter().sum();
    let mut scales: Vec<f64> = lambdas.iter().map(|l| (l / total).sqrt()).collect();
    scales.shuffle(rng);
    scales
}

/// Shared state of one generation run.
struct Model {
    dim: usize,
    kind: SynthKind,
    scales: Vec<f64>,
    mean: Vec<f64>,
    groups: Vec<f64>, // groups x dim, already multiplied by group_spread
    n_groups: usize,
    identity_spread: f64,
    noise: f64,
    jitter: f64,
    seed: u64,
}

impl Model {
    fn new(cfg: &SynthConfig) -> Model {
        let dim = cfg.dim;
        let mut grng = stream_rng(cfg.seed, DOMAIN_GLOBAL, 0);
        let iso_scale = 1.0 / (dim as f64).sqrt();
        match cfg.kind {
            SynthKind::Structured => {
                let scales = spectrum(cfg, &mut grng);
                let mut mean: Vec<f64> = (0..dim).map(|_| grng.sample::<f64, _>(StandardNormal)).collect();
                let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
                mean.iter_mut().for_each(|x| *x *= cfg.mean_offset / norm);
                let n_groups = cfg.resolved_groups();
                let mut groups = vec![0.0f64; n_groups * dim];
                groups.par_chunks_mut(dim).enumerate().for_each(|(k, row)| {
                    let mut rng = stream_rng(cfg.seed, DOMAIN_GROUP, k as u64);
                    for (x, s) in row.iter_mut().zip(&scales) {
                        *x = cfg.group_spread * s * rng.sample::<f64, _>(StandardNormal);
                    }
                });
                Model {
                    dim,
                    kind: cfg.kind,
                    scales,
                    mean,
                    groups,
                    n_groups,
                    identity_spread: cfg.identity_spread,
                    noise: cfg.sample_noise,
                    jitter: cfg.noise_jitter,
                    seed: cfg.seed,
                }
            }
            SynthKind::Isotropic => {
                let v = cfg.mean_offset.powi(2) + cfg.group_spread.powi(2) + cfg.identity_spread.powi(2);
                Model {
                    dim,
                    kind: cfg.kind,
                    scales: vec![iso_scale; dim],
                    mean: vec![0.0; dim],
                    groups: Vec::new(),
                    n_groups: 0,
                    identity_spread: 1.0,
                    noise: cfg.sample_noise / v.sqrt(),
                    jitter: cfg.noise_jitter,
                    seed: cfg.seed,
                }
            }
        }
    }

    /// Identity centre `v_i` (unnormalised for Structured, unit for Isotropic).
    fn centre(&self, identity: u64, out: &mut [f64]) {
        let mut rng = stream_rng(self.seed, DOMAIN_IDENTITY, identity);
        match self.kind {
            SynthKind::Structured => {
                let k = rng.gen_range(0..self.n_groups);
                let g = &self.groups[k * self.dim..(k + 1) * self.dim];
                for j in 0..self.dim {
                    let z: f64 = rng.sample(StandardNormal);
                    out[j] = self.mean[j] + g[j] + self.identity_spread * self.scales[j] * z;
                }
            }
            SynthKind::Isotropic => {
                for x in out.iter_mut() {
                    *x = rng.sample(StandardNormal);
                }
                let norm = out.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
                out.iter_mut().for_each(|x| *x /= norm);
            }
        }
    }

    /// One L2-normalised sample around `centre`, written to `out`.
    fn sample(&self, centre: &[f64], rng: &mut ChaCha8Rng, out: &mut [f32]) {
        let xi: f64 = rng.sample(StandardNormal);
        let sigma = self.noise * (self.jitter * xi).exp();
        for (j, o) in out.iter_mut().enumerate() {
            let n: f64 = rng.sample(StandardNormal);
            *o = (centre[j] + sigma * self.scales[j] * n) as f32;
        }
        // Normalise from the stored f32 values (in f64) so each row has norm 1 to f32 precision.
        let n2: f64 = out.iter().map(|&x| (x as f64) * (x as f64)).sum();
        if n2 > 0.0 {
            let inv = 1.0 / n2.sqrt();
            out.iter_mut().for_each(|o| *o = ((*o as f64) * inv) as f32);
        }
    }
}

/// Generate a gallery and queries from `cfg` (parallel, deterministic for any thread count).
///
/// Gallery rows are identity-major: identity `i` owns rows
/// `i*templates_per_identity .. (i+1)*templates_per_identity`.
/// Enrolled queries are fresh samples of a uniformly drawn enrolled identity;
/// unenrolled queries come from distinct extra identities drawn from the same
/// model (same groups), so they are realistic impostors.
pub fn generate(cfg: &SynthConfig) -> Result<SynthSet> {
    cfg.validate()?;
    let model = Model::new(cfg);
    let dim = cfg.dim;
    let tpi = cfg.templates_per_identity;
    let rows = cfg.identities * tpi;

    let mut gallery = vec![0.0f32; rows * dim];
    gallery.par_chunks_mut(tpi * dim).enumerate().for_each_init(
        || vec![0.0f64; dim],
        |centre, (i, block)| {
            model.centre(i as u64, centre);
            let mut rng = stream_rng(cfg.seed, DOMAIN_SAMPLES, i as u64);
            for row in block.chunks_mut(dim) {
                model.sample(centre, &mut rng, row);
            }
        },
    );
    let gallery_identity: Vec<u32> = (0..rows).map(|r| (r / tpi) as u32).collect();

    // Which queries are unenrolled: a seeded shuffle of the query positions.
    let n_unenrolled = cfg.unenrolled_queries();
    let mut order: Vec<usize> = (0..cfg.queries).collect();
    order.shuffle(&mut stream_rng(cfg.seed, DOMAIN_GLOBAL, 1));
    // rank among unenrolled queries, or None for enrolled ones
    let mut unenrolled_rank: Vec<Option<usize>> = vec![None; cfg.queries];
    for (rank, &q) in order.iter().take(n_unenrolled).enumerate() {
        unenrolled_rank[q] = Some(rank);
    }

    let mut queries = vec![0.0f32; cfg.queries * dim];
    let query_identity: Vec<Option<u32>> = queries
        .par_chunks_mut(dim)
        .enumerate()
        .map_init(
            || vec![0.0f64; dim],
            |centre, (q, row)| {
                let mut rng = stream_rng(cfg.seed, DOMAIN_QUERY, q as u64);
                let (id, enrolled) = match unenrolled_rank[q] {
                    Some(rank) => ((cfg.identities + rank) as u64, false),
                    None => (rng.gen_range(0..cfg.identities) as u64, true),
                };
                model.centre(id, centre);
                model.sample(centre, &mut rng, row);
                if enrolled {
                    Some(id as u32)
                } else {
                    None
                }
            },
        )
        .collect();

    Ok(SynthSet { dim, gallery, gallery_identity, queries, query_identity })
}

/// Cosine statistics of a set, to check it against the calibration targets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SynthStats {
    /// Mate pairs (enrolled query x gallery row of its identity) measured.
    pub mate_pairs: usize,
    /// Median mate cosine (target ~0.7).
    pub mate_cos_median: f64,
    /// Mean mate cosine.
    pub mate_cos_mean: f64,
    /// 5th percentile of mate cosines (the hard samples).
    pub mate_cos_p05: f64,
    /// Impostor pairs (query x gallery row of another identity) measured.
    pub impostor_pairs: usize,
    /// Mean impostor cosine (target ~0.05).
    pub impostor_cos_mean: f64,
    /// Standard deviation of impostor cosines (target ~0.1).
    pub impostor_cos_std: f64,
    /// 99.9th percentile of impostor cosines.
    pub impostor_cos_p999: f64,
    /// Largest impostor cosine seen.
    pub impostor_cos_max: f64,
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[pos.min(sorted.len() - 1)]
}

/// Measure mate and impostor cosine statistics on up to `sample_pairs` pairs of each kind.
///
/// Mate pairs are enrolled queries against the gallery rows of their identity;
/// impostor pairs are random (query, gallery row) pairs of different identities.
/// Statistics of an empty population are NaN.
pub fn measure(set: &SynthSet, sample_pairs: usize, seed: u64) -> SynthStats {
    let mut rows_of: HashMap<u32, Vec<usize>> = HashMap::new();
    for (r, &id) in set.gallery_identity.iter().enumerate() {
        rows_of.entry(id).or_default().push(r);
    }
    let mut mates = Vec::new();
    'outer: for (q, id) in set.query_identity.iter().enumerate() {
        if let Some(rows) = id.and_then(|id| rows_of.get(&id)) {
            for &r in rows {
                mates.push(dot64(set.query_row(q), set.gallery_row(r)));
                if mates.len() >= sample_pairs {
                    break 'outer;
                }
            }
        }
    }
    let mut impostors = Vec::new();
    let (nq, ng) = (set.query_rows(), set.gallery_rows());
    if nq > 0 && ng > 0 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut attempts = 0usize;
        while impostors.len() < sample_pairs && attempts < sample_pairs.saturating_mul(4) {
            attempts += 1;
            let q = rng.gen_range(0..nq);
            let r = rng.gen_range(0..ng);
            if set.query_identity[q] == Some(set.gallery_identity[r]) {
                continue;
            }
            impostors.push(dot64(set.query_row(q), set.gallery_row(r)));
        }
    }
    mates.sort_by(f64::total_cmp);
    impostors.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let imp_mean = mean(&impostors);
    let imp_std = if impostors.is_empty() {
        f64::NAN
    } else {
        (impostors.iter().map(|x| (x - imp_mean).powi(2)).sum::<f64>() / impostors.len() as f64).sqrt()
    };
    SynthStats {
        mate_pairs: mates.len(),
        mate_cos_median: quantile(&mates, 0.5),
        mate_cos_mean: mean(&mates),
        mate_cos_p05: quantile(&mates, 0.05),
        impostor_pairs: impostors.len(),
        impostor_cos_mean: imp_mean,
        impostor_cos_std: imp_std,
        impostor_cos_p999: quantile(&impostors, 0.999),
        impostor_cos_max: impostors.last().copied().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectrum_hits_effective_dim() {
        let cfg = SynthConfig { dim: 512, effective_dim: 96.0, ..SynthConfig::default() };
        let s = spectrum(&cfg, &mut stream_rng(1, DOMAIN_GLOBAL, 0));
        let l: Vec<f64> = s.iter().map(|x| x * x).collect();
        let s1: f64 = l.iter().sum();
        let s2: f64 = l.iter().map(|x| x * x).sum();
        assert!((s1 - 1.0).abs() < 1e-9);
        assert!((s1 * s1 / s2 - 96.0).abs() < 0.01, "{}", s1 * s1 / s2);
    }

    #[test]
    fn spectrum_flat_when_target_exceeds_dim() {
        let cfg = SynthConfig { dim: 64, effective_dim: 96.0, ..SynthConfig::default() };
        let s = spectrum(&cfg, &mut stream_rng(1, DOMAIN_GLOBAL, 0));
        assert!(s.iter().all(|&x| (x - 0.125).abs() < 1e-12));
    }

    #[test]
    fn validate_rejects_bad_values() {
        let bad = [
            SynthConfig { dim: 0, ..SynthConfig::default() },
            SynthConfig { identities: 0, ..SynthConfig::default() },
            SynthConfig { unenrolled_fraction: 1.5, ..SynthConfig::default() },
            SynthConfig { sample_noise: f64::NAN, ..SynthConfig::default() },
            SynthConfig { groups: 20_000, ..SynthConfig::default() },
            SynthConfig { effective_dim: 0.0, ..SynthConfig::default() },
            SynthConfig { group_spread: 0.0, identity_spread: 0.0, ..SynthConfig::default() },
        ];
        for cfg in bad {
            assert!(matches!(cfg.validate(), Err(Error::InvalidConfig { .. })), "{cfg:?}");
            assert!(generate(&cfg).is_err());
        }
        SynthConfig::default().validate().unwrap();
    }

    #[test]
    fn rows_are_unit_norm() {
        for kind in [SynthKind::Structured, SynthKind::Isotropic] {
            let cfg = SynthConfig { identities: 200, queries: 50, kind, ..SynthConfig::default() };
            let set = generate(&cfg).unwrap();
            for r in 0..set.gallery_rows() {
                let n = dot64(set.gallery_row(r), set.gallery_row(r));
                assert!((n - 1.0).abs() < 1e-5, "{n}");
            }
            for q in 0..set.query_rows() {
                let n = dot64(set.query_row(q), set.query_row(q));
                assert!((n - 1.0).abs() < 1e-5, "{n}");
            }
        }
    }
}

//! Choosing a purpose's threshold from data instead of by hand.
//!
//! A threshold trades false matches for false non-matches. The operator
//! states the false-match rate a purpose can bear (door access: 1 in 1,000
//! wrongly let in; payment: far fewer) and hands over a calibration set of
//! labelled probes; [`crate::engine::Engine::calibrate_threshold`] measures
//! the non-mated score distribution against the gallery and picks the lowest
//! threshold whose false-match rate on that set is within the target:
//!
//! - **identify** (1:N): the false-positive identification rate, FPIR: the
//!   share of non-mated searches (probes of people not enrolled) whose best
//!   candidate scores at or above the threshold; FNIR: the share of mated
//!   searches whose best candidate is not the right person at or above it;
//! - **verify** (1:1): the false-match rate, FMR: the share of comparisons of
//!   a probe with an enrolled person other than its own (every such pair in
//!   the set) at or above the threshold; FNMR: the share of mated probes
//!   whose own templates score below it.
//!
//! A rate measured on `n` non-mated trials cannot resolve targets much below
//! `1 / n`: calibration refuses a target below `1 / n` (supply more probes).

use serde::{Deserialize, Serialize};

use crate::compliance::Mode;
use crate::{Error, Result};

/// What a threshold calibration measured (no scores, no embeddings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdCalibration {
    /// The mode calibrated.
    pub mode: Mode,
    /// The false-match rate asked for (FPIR for identify, FMR for verify).
    pub target: f64,
    /// The lowest threshold meeting it on the calibration set.
    pub threshold: f32,
    /// The false-match rate measured at that threshold (at most `target`).
    pub false_match_rate: f64,
    /// The false-non-match rate measured at that threshold (FNIR / FNMR);
    /// `None` without mated probes.
    pub false_non_match_rate: Option<f64>,
    /// Mated probes (their subject is enrolled for the purpose).
    pub mated: usize,
    /// Non-mated trials: searches for identify, comparisons for verify.
    pub non_mated_trials: u64,
}

/// The lowest threshold `t` (a score `>= t` is a match) such that at most
/// `target` of the highest non-mated scores are accepted, given the
/// `allowed + 1` highest non-mated scores in any order, where `allowed =
/// floor(target * trials)`. With fewer scores than that (most trials scored
/// nothing), every score may be accepted: the threshold is the lowest cosine.
///
/// ```
/// use facematch::calibration::threshold_above;
/// // 10 trials, target 0.2: 2 may be accepted, so the threshold sits just above the 3rd highest.
/// let t = threshold_above(&mut [0.9, 0.1, 0.5, 0.7, 0.3], 10, 0.2).unwrap();
/// assert!(t > 0.5 && t < 0.5001);
/// assert!(threshold_above(&mut [0.9], 10, 0.01).is_err(), "1/10 trials cannot resolve 1%");
/// ```
pub fn threshold_above(top: &mut [f32], trials: u64, target: f64) -> Result<f32> {
    if !(target > 0.0 && target < 1.0) {
        return Err(Error::config("calibration.target", format!("must be in (0, 1), got {target}")));
    }
    if trials == 0 || (trials as f64) * target < 1.0 {
        return Err(Error::config(
            "calibration.target",
            format!("{trials} non-mated trials cannot resolve a rate of {target}: supply at least {} (1 / target)", (1.0 / target).ceil()),
        ));
    }
    if top.iter().any(|s| !s.is_finite()) {
        return Err(Error::InvalidEmbedding { reason: "a calibration score is not finite".into() });
    }
    let allowed = (target * trials as f64).floor() as usize;
    top.sort_unstable_by(|a, b| b.total_cmp(a));
    Ok(match top.get(allowed) {
        Some(&s) => s.next_up().min(1.0),
        None => -1.0,
    })
}

/// Share of `scores` at or above `t` out of `trials`.
pub(crate) fn rate_at(scores: &[f32], trials: u64, t: f32) -> f64 {
    if trials == 0 {
        return 0.0;
    }
    scores.iter().filter(|&&s| s >= t).count() as f64 / trials as f64
}

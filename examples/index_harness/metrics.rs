//! Accuracy metrics of one result list against the synthetic ground truth.

use serde::Serialize;

/// What a result list is worth, for identification (1:N, open set).
#[derive(Serialize, Clone, Debug, Default)]
pub struct Accuracy {
    /// Enrolled queries whose top-1 row belongs to their identity.
    pub mate_at_1: f64,
    /// Mean overlap of the top-k with the exact top-k (classic ANN recall).
    pub recall_at_k: f64,
    /// Unenrolled queries accepted: top-1 score >= threshold (false positive identification rate).
    pub fpir: f64,
    /// Enrolled queries not correctly accepted: top-1 not a mate, or score < threshold.
    pub fnir: f64,
    /// Counts behind the rates: (impostors accepted, unenrolled queries).
    pub impostors_accepted: (usize, usize),
    /// (mates rejected, enrolled queries).
    pub mates_rejected: (usize, usize),
}

/// Score `results` (one list per query, `(row, cosine)`, best first).
pub fn accuracy(
    results: &[Vec<(u32, f32)>],
    exact: &[Vec<(u32, f32)>],
    gallery_identity: &[u32],
    query_identity: &[Option<u32>],
    k: usize,
    threshold: f32,
) -> Accuracy {
    let (mut mates1, mut enrolled, mut unenrolled, mut accepted, mut rejected) = (0, 0, 0, 0, 0);
    let mut overlap = 0usize;
    for ((res, ex), qid) in results.iter().zip(exact).zip(query_identity) {
        let top = res.first();
        let top_identity = top.and_then(|&(r, _)| gallery_identity.get(r as usize).copied());
        let top_score = top.map_or(f32::NEG_INFINITY, |&(_, s)| s);
        match qid {
            Some(id) => {
                enrolled += 1;
                let hit = top_identity == Some(*id);
                if hit {
                    mates1 += 1;
                }
                if !hit || top_score < threshold {
                    rejected += 1;
                }
            }
            None => {
                unenrolled += 1;
                if top_score >= threshold {
                    accepted += 1;
                }
            }
        }
        let truth: Vec<u32> = ex.iter().take(k).map(|&(r, _)| r).collect();
        overlap += res.iter().take(k).filter(|(r, _)| truth.contains(r)).count();
    }
    let rate = |a: usize, b: usize| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    let total_truth: usize = exact.iter().map(|e| e.len().min(k)).sum();
    Accuracy {
        mate_at_1: rate(mates1, enrolled),
        recall_at_k: rate(overlap, total_truth),
        fpir: rate(accepted, unenrolled),
        fnir: rate(rejected, enrolled),
        impostors_accepted: (accepted, unenrolled),
        mates_rejected: (rejected, enrolled),
    }
}

/// The lowest threshold at which at most `fpir` of the unenrolled queries are
/// accepted by `results` (None without unenrolled queries).
pub fn threshold_for_fpir(results: &[Vec<(u32, f32)>], query_identity: &[Option<u32>], fpir: f64) -> Option<f32> {
    let mut tops: Vec<f32> = results
        .iter()
        .zip(query_identity)
        .filter(|(_, q)| q.is_none())
        .map(|(r, _)| r.first().map_or(f32::NEG_INFINITY, |&(_, s)| s))
        .collect();
    if tops.is_empty() {
        return None;
    }
    tops.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpir * tops.len() as f64).floor() as usize;
    Some(tops.get(allowed).map_or(f32::NEG_INFINITY, |&s| s + 1e-6))
}

/// Resident set size of this process in bytes (Linux `/proc/self/status`), 0 if unknown.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_set_counts() {
        let gallery_identity = vec![0, 1, 2];
        let queries = vec![Some(0), Some(1), None, None];
        let exact = vec![vec![(0, 0.8)], vec![(1, 0.4)], vec![(2, 0.6)], vec![(1, 0.3)]];
        // query 1: wrong top-1; query 2: impostor above threshold
        let res = vec![vec![(0, 0.8)], vec![(2, 0.45)], vec![(2, 0.6)], vec![(1, 0.3)]];
        let a = accuracy(&res, &exact, &gallery_identity, &queries, 1, 0.5);
        assert_eq!(a.mate_at_1, 0.5);
        assert_eq!(a.impostors_accepted, (1, 2));
        assert_eq!(a.mates_rejected, (1, 2));
        assert_eq!(a.recall_at_k, 0.75);
        let t = threshold_for_fpir(&res, &queries, 0.0).unwrap();
        assert!(t > 0.6 && t < 0.61);
        let a = accuracy(&res, &exact, &gallery_identity, &queries, 1, t);
        assert_eq!(a.impostors_accepted, (0, 2));
    }
}

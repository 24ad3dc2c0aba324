//! Calibration: the graph `ef` that reaches the exact scan's answers on sampled queries.

use super::*;

impl VectorIndex {
    /// The calibration, if it was measured at about the current size.
    pub(super) fn calibration_in_force(&self) -> Option<Calibration> {
        self.calibration.filter(|c| self.len() <= 2 * c.live && 2 * self.len() >= c.live)
    }

    /// The calibration in force, if any.
    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration_in_force()
    }

    /// Measure how wide the graph search must be to agree with the exact
    /// scan, and let `Auto` act on it: searches without an explicit `ef` use
    /// at least the calibrated one, and when no `ef` the graph can afford
    /// (cheaper than the exact scan) reaches `target`, `Auto` takes the
    /// exact scan. Probes are `probes` stored vectors (seeded choice) moved
    /// to cosine 0.7 by random noise, like another photo of the same person.
    /// Costs `probes` exact scans plus the graph searches (about a second at
    /// 1M x 128 for 200 probes).
    ///
    /// ```
    /// use facematch::index::{IndexConfig, VectorIndex};
    /// use facematch::synth::{generate, SynthConfig};
    /// let set = generate(&SynthConfig { identities: 3_000, queries: 10, ..Default::default() }).unwrap();
    /// let mut ix = VectorIndex::new(128, IndexConfig { exact_below: 0, ..Default::default() }).unwrap();
    /// ix.add_batch(&set.gallery).unwrap();
    /// let c = ix.calibrate(0.99, 100, 7);
    /// assert!(c.agreement > 0.0);
    /// assert_eq!(ix.calibration(), Some(c));
    /// ```
    pub fn calibrate(&mut self, target: f32, probes: usize, seed: u64) -> Calibration {
        let c = self.measure_calibration(target, probes, seed);
        self.calibration = Some(c);
        c
    }

    /// [`VectorIndex::calibrate`] without acting on it (`&self`: can run
    /// beside searches); hand the result to [`VectorIndex::set_calibration`].
    pub fn measure_calibration(&self, target: f32, probes: usize, seed: u64) -> Calibration {
        use rand::{Rng, SeedableRng};
        let live: Vec<u32> = (0..self.slots as u32).filter(|&s| !self.is_deleted(s)).collect();
        let mut c = Calibration { ef: None, agreement: 0.0, live: live.len() };
        if !self.graph_ready() || live.is_empty() || probes == 0 {
            return c;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = probes.min(live.len());
        let mut qp = vec![0.0f32; n * self.dpad];
        for q in qp.chunks_exact_mut(self.dpad) {
            let v = self.exact_vec(live[rng.gen_range(0..live.len())]);
            let noise: Vec<f32> = (0..self.dim).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
            let nn = noise.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
            for d in 0..self.dim {
                q[d] = 0.7 * v[d] + 0.714 * noise[d] / nn;
            }
            let norm = q.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
            q.iter_mut().for_each(|x| *x /= norm);
        }
        let p1 = SearchParams { k: 1, ef: None, strategy: SearchStrategy::Exact, filter: None };
        let truth: Vec<Option<u32>> = self.exact_many(&qp, n, &p1).into_iter().map(|h| h.first().map(|h| h.slot)).collect();
        let mut ef = 32usize;
        loop {
            let pe = SearchParams { k: 1, ef: Some(ef), strategy: SearchStrategy::Graph, filter: None };
            if self.graph_cost(&pe) >= self.exact_single_cost() && ef > 32 {
                break;
            }
            let agree = qp
                .par_chunks_exact(self.dpad)
                .zip(&truth)
                .filter(|(q, t)| self.graph_search(q, &pe, 1.0).first().map(|h| h.slot) == **t)
                .count();
            c.agreement = agree as f32 / n as f32;
            if c.agreement >= target {
                c.ef = Some(ef);
                break;
            }
            if ef >= self.slots {
                break;
            }
            ef *= 2;
        }
        c
    }

    /// Act on a calibration measured by [`VectorIndex::measure_calibration`]
    /// (it stays in force while the index is within 2x of its size then).
    pub fn set_calibration(&mut self, c: Calibration) {
        self.calibration = Some(c);
    }

    /// True when the graph would serve `Auto` searches but no calibration
    /// measured at about the current size is in force (never measured, or
    /// the index has since grown or shrunk more than 2x).
    pub fn needs_calibration(&self) -> bool {
        self.graph_ready() && self.len() >= self.cfg.exact_below && self.calibration_in_force().is_none()
    }
}

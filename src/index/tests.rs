//! Index unit tests (graph-less round trip, calibration staleness, int8 scan = f32 scan, config).

use super::*;

#[test]
fn graphless_index_is_exact_and_round_trips() {
    use crate::synth::{generate, SynthConfig};
    let set = generate(&SynthConfig { identities: 2_000, queries: 20, dim: 64, ..Default::default() }).unwrap();
    for storage in [VectorStorage::Int8, VectorStorage::F32] {
        let mut ix = VectorIndex::new(64, IndexConfig { graph: false, exact_below: 0, storage, ..Default::default() }).unwrap();
        ix.add_batch(&set.gallery).unwrap();
        ix.remove(5).unwrap();
        // No link space: the graph-less index holds the vectors (f32 + the scan's int8 codes) and little else.
        let mut with_graph = VectorIndex::new(64, IndexConfig { storage, ..Default::default() }).unwrap();
        with_graph.add_batch(&set.gallery).unwrap();
        assert!(ix.memory_bytes() < with_graph.memory_bytes(), "{storage:?}: {} vs {}", ix.memory_bytes(), with_graph.memory_bytes());
        assert!(ix.memory_bytes() <= 2 * 2_000 * (64 * 4 + 64 + 32), "{storage:?}: {} bytes", ix.memory_bytes());
        let mut bytes = Vec::new();
        ix.write_to(&mut bytes).unwrap();
        let back = VectorIndex::read_from(&mut bytes.as_slice()).unwrap();
        for strategy in [SearchStrategy::Auto, SearchStrategy::Graph, SearchStrategy::Exact] {
            let p = SearchParams::top(5).with_strategy(strategy);
            let want = ix.search_batch(&set.queries, &SearchParams::top(5).with_strategy(SearchStrategy::Exact)).unwrap();
            assert_eq!(ix.search_batch(&set.queries, &p).unwrap(), want);
            assert_eq!(back.search_batch(&set.queries, &p).unwrap(), want);
            assert_eq!(ix.search(&set.queries[..64], &p).unwrap(), want[0]);
        }
        assert_eq!(ix.vector(7).unwrap(), back.vector(7).unwrap());
        let map = ix.compact();
        assert_eq!(map[5], None);
        assert_eq!(ix.len(), 1_999);
        let v = set.gallery[..64].to_vec();
        let slot = ix.add(&v).unwrap();
        let hits = ix.search(&v, &SearchParams::top(2)).unwrap();
        assert!(hits.iter().any(|h| h.slot == slot), "{hits:?}");
    }
}

#[test]
fn calibration_goes_stale_when_the_index_doubles() {
    use crate::synth::{generate, SynthConfig};
    let set = generate(&SynthConfig { identities: 1_500, queries: 1, dim: 32, ..Default::default() }).unwrap();
    let mut ix = VectorIndex::new(32, IndexConfig { exact_below: 0, ..Default::default() }).unwrap();
    ix.add_batch(&set.gallery[..500 * 32]).unwrap();
    assert!(ix.needs_calibration(), "never calibrated");
    let c = ix.measure_calibration(0.99, 50, 1);
    assert!(ix.needs_calibration(), "measuring alone does not install");
    ix.set_calibration(c);
    assert!(!ix.needs_calibration());
    ix.add_batch(&set.gallery[500 * 32..]).unwrap();
    assert!(ix.needs_calibration(), "3x the calibrated size");
    assert_eq!(ix.calibration(), None);
    let c2 = ix.calibrate(0.99, 50, 1);
    assert_eq!(c2.live, 1_500);
    assert!(!ix.needs_calibration());
    let graphless = VectorIndex::new(32, IndexConfig { exact_below: 0, graph: false, ..Default::default() }).unwrap();
    assert!(!graphless.needs_calibration(), "nothing to calibrate without a graph");
}

/// The int8 scan with its proven candidate window and the f32 reference agree
/// exactly (slots and scores), with tombstones, filters and crowds of ties.
#[test]
fn int8_exact_scan_equals_the_f32_scan() {
    use crate::synth::{generate, SynthConfig};
    let set = generate(&SynthConfig { identities: 3_000, queries: 64, dim: 64, ..Default::default() }).unwrap();
    for storage in [VectorStorage::Int8, VectorStorage::F32] {
        let cfg = IndexConfig { storage, exact_below: usize::MAX, ..Default::default() };
        let mut ix = VectorIndex::new(64, cfg).unwrap();
        ix.add_batch(&set.gallery).unwrap();
        // a crowd of duplicates: the proof must fail and the fallback answer
        let dup = set.gallery[..64].to_vec();
        for _ in 0..80 {
            ix.add(&dup).unwrap();
        }
        for s in (0..ix.slots() as u32).step_by(7) {
            ix.remove(s).unwrap();
        }
        let odd = |s: u32| s % 2 == 1;
        let mut qs = set.queries.clone();
        qs.extend_from_slice(&dup);
        let nq = qs.len() / 64;
        let mut qp = vec![0.0f32; nq * ix.dpad];
        for (q, o) in qs.chunks_exact(64).zip(qp.chunks_exact_mut(ix.dpad)) {
            ix.prepare_query(q, o).unwrap();
        }
        for k in [1usize, 10, 50] {
            for filter in [None, Some(&odd as &(dyn Fn(u32) -> bool + Sync))] {
                let p = SearchParams { k, ef: None, strategy: SearchStrategy::Exact, filter };
                let fast = ix.exact_many(&qp, nq, &p);
                let reference = ix.exact_f32(&qp, nq, &p);
                assert_eq!(fast, reference, "k {k}");
                let one: Vec<Vec<Hit>> =
                    (0..nq).map(|i| ix.exact_many(&qp[i * ix.dpad..(i + 1) * ix.dpad], 1, &p).pop().unwrap()).collect();
                assert_eq!(one, reference);
            }
        }
    }
}

#[test]
fn ord_is_monotone() {
    let xs = [-3.0f32, -1.0, -0.5, -0.0, 0.0, 1e-30, 0.25, 1.0, 7.0];
    for w in xs.windows(2) {
        assert!(ord(w[0]) <= ord(w[1]));
        assert_eq!(unord(ord(w[1])), w[1]);
    }
}

#[test]
fn config_validation() {
    assert!(IndexConfig::default().validate().is_ok());
    assert!(IndexConfig { m: 1, ..Default::default() }.validate().is_err());
    assert!(IndexConfig { ef_search: 0, ..Default::default() }.validate().is_err());
    assert!(VectorIndex::new(0, IndexConfig::default()).is_err());
}

#[test]
fn rejects_bad_vectors() {
    let mut ix = VectorIndex::new(4, IndexConfig::default()).unwrap();
    assert!(matches!(ix.add(&[1.0, 2.0]), Err(Error::WrongDimension { expected: 4, got: 2 })));
    assert!(matches!(ix.add(&[0.0; 4]), Err(Error::InvalidEmbedding { .. })));
    assert!(matches!(ix.add(&[f32::NAN, 0.0, 0.0, 1.0]), Err(Error::InvalidEmbedding { .. })));
    assert!(ix.add_batch(&[1.0, 0.0, 0.0, 0.0, f32::INFINITY, 0.0, 0.0, 0.0]).is_err());
    assert_eq!(ix.slots(), 0);
    assert!(ix.search(&[f32::NAN; 4], &SearchParams::top(1)).is_err());
    assert!(ix.search(&[1.0, 0.0, 0.0, 0.0], &SearchParams::top(3)).unwrap().is_empty());
    assert!(matches!(ix.remove(0), Err(Error::UnknownTemplate(0))));
}

#[test]
fn slots_waiting_for_the_graph_hold_no_record_until_it_is_built() {
    use crate::synth::{generate, SynthConfig};
    let set = generate(&SynthConfig { identities: 3_000, queries: 40, dim: 64, ..Default::default() }).unwrap();
    let mut ix = VectorIndex::new(64, IndexConfig { exact_below: 0, ..Default::default() }).unwrap();
    ix.add_batch(&set.gallery[..1_000 * 64]).unwrap();
    let built = ix.memory_bytes();
    assert_eq!(ix.rec_slots(), 1_000);
    ix.add_batch_deferred(&set.gallery[1_000 * 64..]).unwrap();
    // 2,000 more vectors, no records: the f32 copy and the scan's codes only.
    assert_eq!((ix.rec_slots(), ix.graph_pending()), (1_000, 2_000));
    assert!(ix.memory_bytes() - built <= 2_000 * (64 * 4 + 64 + 16) + (1 << 16), "{} -> {}", built, ix.memory_bytes());
    let exact = SearchParams::top(5).with_strategy(SearchStrategy::Exact);
    let want = ix.search_batch(&set.queries, &exact).unwrap();
    // Pending slots round-trip without records and without links.
    let mut bytes = Vec::new();
    ix.write_to(&mut bytes).unwrap();
    let mut back = VectorIndex::read_from(&mut bytes.as_slice()).unwrap();
    assert_eq!((back.rec_slots(), back.graph_pending()), (1_000, 2_000));
    assert_eq!(back.search_batch(&set.queries, &SearchParams::top(5)).unwrap(), want);
    back.build_graph();
    assert_eq!((back.rec_slots(), back.graph_pending()), (3_000, 0));
    let graph = back.search_batch(&set.queries, &SearchParams::top(5).with_strategy(SearchStrategy::Graph).with_ef(256)).unwrap();
    let agree = graph.iter().zip(&want).filter(|(g, w)| g.first().map(|h| h.slot) == w.first().map(|h| h.slot)).count();
    assert!(agree * 10 >= want.len() * 9, "graph top-1 agrees with exact on {agree} of {}", want.len());
}

#[test]
fn a_structure_without_vectors_completed_with_them_is_the_same_index() {
    use crate::synth::{generate, SynthConfig};
    let set = generate(&SynthConfig { identities: 1_500, queries: 30, dim: 48, ..Default::default() }).unwrap();
    let mut ix = VectorIndex::new(48, IndexConfig { exact_below: 0, ..Default::default() }).unwrap();
    ix.add_batch(&set.gallery[..1_000 * 48]).unwrap();
    ix.add_batch_deferred(&set.gallery[1_000 * 48..]).unwrap();
    ix.remove(17).unwrap();
    let (mut full, mut bare) = (Vec::new(), Vec::new());
    ix.write_to(&mut full).unwrap();
    ix.write_structure_to(&mut bare).unwrap();
    assert!(bare.len() + 1_500 * 48 * 4 <= full.len());
    // Without vectors the plain reader refuses it; completed with the vectors as added, it is the index.
    assert!(matches!(VectorIndex::read_from(&mut bare.as_slice()), Err(Error::IncompatibleStore { .. })));
    let s = VectorIndex::read_structure_from(&mut bare.as_slice()).unwrap();
    assert!(!s.has_vectors());
    assert!(matches!(s.into_index(None), Err(Error::DataCorruption { .. })));
    let short = VectorIndex::read_structure_from(&mut bare.as_slice()).unwrap();
    assert!(matches!(short.into_index(Some(set.gallery[..1_499 * 48].to_vec())), Err(Error::DataCorruption { .. })));
    let back = VectorIndex::read_structure_from(&mut bare.as_slice()).unwrap().into_index(Some(set.gallery.clone())).unwrap();
    let mut again = Vec::new();
    back.write_to(&mut again).unwrap();
    assert_eq!(again, full, "the completed index differs from the one written");
    for strategy in [SearchStrategy::Graph, SearchStrategy::Exact] {
        let p = SearchParams::top(5).with_strategy(strategy);
        assert_eq!(back.search_batch(&set.queries, &p).unwrap(), ix.search_batch(&set.queries, &p).unwrap());
    }
    // A structure read from a self-contained index keeps its own vectors.
    let s = VectorIndex::read_structure_from(&mut full.as_slice()).unwrap();
    assert!(s.has_vectors());
    let mut third = Vec::new();
    s.into_index(None).unwrap().write_to(&mut third).unwrap();
    assert_eq!(third, full);
}

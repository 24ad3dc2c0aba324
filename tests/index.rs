//! Integration and property tests of the vector index.

use facematch::index::{Hit, IndexConfig, SearchParams, SearchStrategy, VectorIndex, VectorStorage};
use facematch::Error;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// `n` clustered vectors of dimension `dim` (not normalised on purpose).
fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let centres: Vec<Vec<f32>> = (0..(n / 20).max(1)).map(|_| (0..dim).map(|_| r.sample(StandardNormal)).collect()).collect();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = &centres[r.gen_range(0..centres.len())];
        out.extend(c.iter().map(|&x| x * 0.7 + r.sample::<f32, _>(StandardNormal) * 0.7));
    }
    out
}

fn cfg(storage: VectorStorage) -> IndexConfig {
    IndexConfig { m: 8, ef_construction: 64, ef_search: 32, storage, exact_below: 0, ..Default::default() }
}

fn build(n: usize, dim: usize, seed: u64, storage: VectorStorage) -> (VectorIndex, Vec<f32>) {
    let data = clustered(n, dim, seed);
    let mut ix = VectorIndex::new(dim, cfg(storage)).unwrap();
    ix.add_batch(&data).unwrap();
    (ix, data)
}

fn slots(h: &[Hit]) -> Vec<u32> {
    h.iter().map(|h| h.slot).collect()
}

fn assert_sorted(h: &[Hit]) {
    for w in h.windows(2) {
        assert!(w[0].score > w[1].score || (w[0].score == w[1].score && w[0].slot < w[1].slot), "not sorted: {h:?}");
    }
}

fn recall_at(ix: &VectorIndex, queries: &[f32], k: usize, ef: usize) -> f64 {
    let dim = ix.dim();
    let mut found = 0;
    let mut total = 0;
    for q in queries.chunks_exact(dim) {
        let exact = ix.search(q, &SearchParams::top(k).with_strategy(SearchStrategy::Exact)).unwrap();
        let graph = ix.search(q, &SearchParams::top(k).with_strategy(SearchStrategy::Graph).with_ef(ef)).unwrap();
        assert_sorted(&graph);
        let e = slots(&exact);
        found += graph.iter().filter(|h| e.contains(&h.slot)).count();
        total += e.len();
    }
    found as f64 / total as f64
}

#[test]
fn index_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<VectorIndex>();
}

#[test]
fn recall_floor_both_storages() {
    for storage in [VectorStorage::F32, VectorStorage::Int8] {
        let (ix, _) = build(3000, 32, 7, storage);
        let queries = clustered(100, 32, 8);
        let r = recall_at(&ix, &queries, 10, 64);
        assert!(r >= 0.95, "{storage:?}: recall@10 {r}");
    }
}

#[test]
fn scores_are_exact_and_identical_across_paths() {
    let (ix, _) = build(1500, 24, 9, VectorStorage::Int8);
    let queries = clustered(20, 24, 10);
    for q in queries.chunks_exact(24) {
        let n: f32 = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        let exact = ix.search(q, &SearchParams::top(5).with_strategy(SearchStrategy::Exact)).unwrap();
        let graph = ix.search(q, &SearchParams::top(5).with_strategy(SearchStrategy::Graph).with_ef(200)).unwrap();
        assert_eq!(exact, graph);
        for h in &exact {
            let v = ix.vector(h.slot).unwrap();
            let want: f32 = v.iter().zip(q).map(|(a, b)| a * b / n).sum();
            assert!((h.score - want).abs() < 1e-5);
        }
    }
}

#[test]
fn batch_search_matches_single() {
    let (ix, _) = build(1200, 16, 11, VectorStorage::F32);
    let queries = clustered(37, 16, 12);
    for strategy in [SearchStrategy::Exact, SearchStrategy::Graph] {
        let p = SearchParams::top(7).with_strategy(strategy);
        let batch = ix.search_batch(&queries, &p).unwrap();
        assert_eq!(batch.len(), 37);
        for (q, b) in queries.chunks_exact(16).zip(&batch) {
            assert_eq!(&ix.search(q, &p).unwrap(), b);
        }
    }
}

#[test]
fn edge_cases_never_panic() {
    let mut ix = VectorIndex::new(4, IndexConfig::default()).unwrap();
    let q = [1.0, 0.0, 0.0, 0.0];
    assert!(ix.search(&q, &SearchParams::top(5)).unwrap().is_empty());
    assert!(ix.search_batch(&q, &SearchParams::top(5)).unwrap()[0].is_empty());
    ix.add(&[1.0, 1.0, 0.0, 0.0]).unwrap();
    ix.add(&[0.0, 1.0, 0.0, 0.0]).unwrap();
    for s in [SearchStrategy::Auto, SearchStrategy::Exact, SearchStrategy::Graph] {
        assert!(ix.search(&q, &SearchParams::top(0).with_strategy(s)).unwrap().is_empty());
        let all = ix.search(&q, &SearchParams::top(100).with_strategy(s).with_ef(1)).unwrap();
        assert_eq!(slots(&all), vec![0, 1]);
    }
    assert!(matches!(ix.search(&[f32::NAN, 0.0, 0.0, 0.0], &SearchParams::top(1)), Err(Error::InvalidEmbedding { .. })));
    assert!(matches!(ix.search(&[1.0], &SearchParams::top(1)), Err(Error::WrongDimension { .. })));
    assert!(ix.search_batch(&[1.0, 0.0, 0.0], &SearchParams::top(1)).is_err());
    assert!(ix.remove(0).unwrap());
    assert!(!ix.remove(0).unwrap());
    assert!(ix.vector(0).is_none());
    assert!(ix.remove(0).is_ok());
    assert!(ix.remove(1).unwrap());
    assert!(ix.is_empty());
    assert!(ix.search(&q, &SearchParams::top(1).with_strategy(SearchStrategy::Graph)).unwrap().is_empty());
    let map = ix.compact();
    assert_eq!(map, vec![None, None]);
    assert_eq!(ix.slots(), 0);
    assert_eq!(ix.add(&q).unwrap(), 0);
    assert_eq!(slots(&ix.search(&q, &SearchParams::top(3)).unwrap()), vec![0]);
}

#[test]
fn filter_hides_slots_and_selective_filter_is_exact() {
    let (ix, data) = build(2000, 16, 13, VectorStorage::Int8);
    let only_mod7 = |s: u32| s.is_multiple_of(7);
    let q = &data[16 * 5..16 * 6];
    for strategy in [SearchStrategy::Auto, SearchStrategy::Exact, SearchStrategy::Graph] {
        let p = SearchParams { k: 10, ef: None, strategy, filter: Some(&only_mod7) };
        let hits = ix.search(q, &p).unwrap();
        assert!(hits.iter().all(|h| h.slot % 7 == 0));
        assert!(!hits.is_empty());
    }
    let few = |s: u32| s % 100 == 3;
    let auto = ix.search(q, &SearchParams { k: 5, ef: None, strategy: SearchStrategy::Auto, filter: Some(&few) }).unwrap();
    let exact = ix.search(q, &SearchParams { k: 5, ef: None, strategy: SearchStrategy::Exact, filter: Some(&few) }).unwrap();
    assert_eq!(auto, exact);
}

#[test]
fn compaction_keeps_order_vectors_and_recall() {
    for storage in [VectorStorage::F32, VectorStorage::Int8] {
        let (mut ix, _) = build(3000, 32, 14, storage);
        let mut r = rng(15);
        let mut removed = Vec::new();
        for s in 0..3000u32 {
            if r.gen_bool(0.3) {
                assert!(ix.remove(s).unwrap());
                removed.push(s);
            }
        }
        let before: Vec<(u32, Vec<f32>)> = (0..3000u32).filter(|&s| ix.is_live(s)).map(|s| (s, ix.vector(s).unwrap().to_vec())).collect();
        let queries = clustered(60, 32, 16);
        let map = ix.compact();
        assert_eq!(map.len(), 3000);
        assert_eq!(ix.slots(), before.len());
        assert_eq!(ix.len(), before.len());
        assert_eq!(ix.deleted_fraction(), 0.0);
        for s in &removed {
            assert_eq!(map[*s as usize], None);
        }
        for (new, (old, v)) in before.iter().enumerate() {
            assert_eq!(map[*old as usize], Some(new as u32));
            assert_eq!(ix.vector(new as u32).unwrap(), &v[..]);
        }
        let rec = recall_at(&ix, &queries, 10, 64);
        assert!(rec >= 0.93, "{storage:?}: recall after compaction {rec}");
    }
}

#[test]
fn round_trip_gives_identical_results() {
    for storage in [VectorStorage::F32, VectorStorage::Int8] {
        let (mut ix, _) = build(1500, 20, 17, storage);
        for s in (0..1500).step_by(9) {
            ix.remove(s).unwrap();
        }
        let mut bytes = Vec::new();
        ix.write_to(&mut bytes).unwrap();
        let back = VectorIndex::read_from(&mut &bytes[..]).unwrap();
        assert_eq!(back.len(), ix.len());
        assert_eq!(back.slots(), ix.slots());
        let mut again = Vec::new();
        back.write_to(&mut again).unwrap();
        assert_eq!(bytes, again);
        let queries = clustered(30, 20, 18);
        for q in queries.chunks_exact(20) {
            for s in [SearchStrategy::Graph, SearchStrategy::Exact] {
                let p = SearchParams::top(8).with_strategy(s);
                assert_eq!(ix.search(q, &p).unwrap(), back.search(q, &p).unwrap());
            }
        }
    }
}

#[test]
fn build_is_deterministic_across_thread_counts() {
    let data = clustered(2500, 16, 19);
    let mut out = Vec::new();
    for threads in [1, 2] {
        let mut ix = VectorIndex::new(16, IndexConfig { build_threads: threads, ..cfg(VectorStorage::Int8) }).unwrap();
        ix.add_batch(&data[..16 * 1000]).unwrap();
        for v in data[16 * 1000..].chunks_exact(16).take(50) {
            ix.add(v).unwrap();
        }
        ix.add_batch(&data[16 * 1050..]).unwrap();
        let mut b = Vec::new();
        ix.write_to(&mut b).unwrap();
        // drop the header with the config (build_threads differs) and the checksum
        let cfg_len = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
        out.push(b[20 + cfg_len..b.len() - 4].to_vec());
    }
    assert!(out[0] == out[1], "graphs differ between 1 and 2 build threads");
}

#[test]
fn corrupted_input_is_rejected_without_panic() {
    let (mut ix, _) = build(200, 8, 20, VectorStorage::Int8);
    ix.remove(3).unwrap();
    let mut bytes = Vec::new();
    ix.write_to(&mut bytes).unwrap();
    // every truncation
    for cut in 0..bytes.len() {
        assert!(VectorIndex::read_from(&mut &bytes[..cut]).is_err(), "cut {cut}");
    }
    // foreign and newer input
    let mut foreign = bytes.clone();
    foreign[0] = b'X';
    assert!(matches!(VectorIndex::read_from(&mut &foreign[..]), Err(Error::IncompatibleStore { .. })));
    let mut newer = bytes.clone();
    newer[8] = 99;
    assert!(matches!(VectorIndex::read_from(&mut &newer[..]), Err(Error::IncompatibleStore { .. })));
    // flipped bytes anywhere
    let mut r = rng(21);
    for _ in 0..300 {
        let mut b = bytes.clone();
        let i = r.gen_range(0..b.len());
        b[i] ^= 1 << r.gen_range(0..8);
        assert!(VectorIndex::read_from(&mut &b[..]).is_err(), "flip at {i}");
    }
    // a huge claimed size ends at end of input, not in an allocation failure
    let mut huge = bytes[..24].to_vec();
    let cfg_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    huge.extend_from_slice(&bytes[24..20 + cfg_len]);
    huge.extend_from_slice(&(u32::MAX as u64 - 1).to_le_bytes());
    huge.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(VectorIndex::read_from(&mut &huge[..]), Err(Error::DataCorruption { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// A deleted slot is never returned, by any path, before or after compaction.
    #[test]
    fn deleted_never_returned(
        n in 1usize..300,
        seed in 0u64..1000,
        del in proptest::collection::vec(0u32..300, 0..150),
        k in 0usize..40,
        int8 in any::<bool>(),
    ) {
        let storage = if int8 { VectorStorage::Int8 } else { VectorStorage::F32 };
        let data = clustered(n, 8, seed);
        let mut ix = VectorIndex::new(8, cfg(storage)).unwrap();
        // half in a batch, half one by one
        ix.add_batch(&data[..8 * (n / 2)]).unwrap();
        for v in data[8 * (n / 2)..].chunks_exact(8) {
            ix.add(v).unwrap();
        }
        let mut gone = std::collections::HashSet::new();
        for &d in &del {
            if (d as usize) < n {
                ix.remove(d).unwrap();
                gone.insert(d);
            } else {
                prop_assert!(ix.remove(d).is_err());
            }
        }
        let queries = clustered(5, 8, seed + 1);
        for q in queries.chunks_exact(8) {
            for s in [SearchStrategy::Auto, SearchStrategy::Exact, SearchStrategy::Graph] {
                let hits = ix.search(q, &SearchParams::top(k).with_strategy(s)).unwrap();
                prop_assert!(hits.iter().all(|h| !gone.contains(&h.slot)));
                if s == SearchStrategy::Exact {
                    prop_assert_eq!(hits.len(), k.min(n - gone.len()));
                }
                assert_sorted(&hits);
            }
        }
        let map = ix.compact();
        let live = n - gone.len();
        prop_assert_eq!(ix.len(), live);
        prop_assert_eq!(map.iter().filter(|m| m.is_some()).count(), live);
        for q in queries.chunks_exact(8) {
            let hits = ix.search(q, &SearchParams::top(k).with_strategy(SearchStrategy::Exact)).unwrap();
            prop_assert_eq!(hits.len(), k.min(live));
            let g = ix.search(q, &SearchParams::top(k).with_strategy(SearchStrategy::Graph)).unwrap();
            prop_assert!(g.iter().all(|h| (h.slot as usize) < live));
        }
    }
}

//! Criterion benches of the vector index on seeded clustered unit vectors.
//!
//! Gallery size: env `FACEMATCH_BENCH_N` (default 100000), dimension 128.
//! - `search_exact`: one query, exact scan; `search_exact_batch64`: 64 queries per pass.
//! - `search_graph/{int8,f32}/ef{32,64,128}`: one query, HNSW graph.
//! - `enrol`: add_batch of 5,000 vectors into an empty index (insert throughput).
//! - `delete_compact`: tombstone 10% of a 20,000-vector index and compact it.
//! - with `--features hnsw-rs-baseline`: `hnsw_rs_search/ef*`, the hnsw_rs crate
//!   (DistDot, simdeez_f) on the same data.

use std::sync::OnceLock;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use facematch::index::{IndexConfig, SearchParams, SearchStrategy, VectorIndex, VectorStorage};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

const DIM: usize = 128;

fn n() -> usize {
    std::env::var("FACEMATCH_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

/// `n` clustered unit vectors (centre weight 0.6), seeded.
fn clustered(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let unit = |r: &mut rand_chacha::ChaCha8Rng| {
        let mut v: Vec<f32> = (0..DIM).map(|_| r.sample(StandardNormal)).collect();
        let s = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= s);
        v
    };
    let centres: Vec<Vec<f32>> = (0..(n / 100).max(1)).map(|_| unit(&mut r)).collect();
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let c = &centres[r.gen_range(0..centres.len())];
        let z = unit(&mut r);
        let mut v: Vec<f32> = c.iter().zip(&z).map(|(a, b)| 0.6 * a + 0.8 * b).collect();
        let s = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= s);
        out.extend(v);
    }
    out
}

fn gallery() -> &'static Vec<f32> {
    static G: OnceLock<Vec<f32>> = OnceLock::new();
    G.get_or_init(|| clustered(n(), 1))
}

fn queries() -> &'static Vec<f32> {
    static Q: OnceLock<Vec<f32>> = OnceLock::new();
    Q.get_or_init(|| clustered(256, 2))
}

fn index(storage: VectorStorage) -> &'static VectorIndex {
    static I8: OnceLock<VectorIndex> = OnceLock::new();
    static F32: OnceLock<VectorIndex> = OnceLock::new();
    let cell = if storage == VectorStorage::Int8 { &I8 } else { &F32 };
    cell.get_or_init(|| {
        let mut ix = VectorIndex::new(DIM, IndexConfig { storage, ..Default::default() }).expect("index");
        ix.add_batch(gallery()).expect("build");
        ix
    })
}

fn bench_exact(c: &mut Criterion) {
    let ix = index(VectorStorage::Int8);
    let qs = queries();
    let p = SearchParams::top(10).with_strategy(SearchStrategy::Exact);
    let mut g = c.benchmark_group("search_exact");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("single", |b| {
        b.iter(|| {
            i = (i + 1) % 256;
            ix.search(&qs[i * DIM..(i + 1) * DIM], &p).expect("search")
        })
    });
    g.finish();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
    let mut g = c.benchmark_group("search_exact_batch64");
    g.throughput(Throughput::Elements(64));
    g.bench_function("1thread", |b| b.iter(|| pool.install(|| ix.search_batch(&qs[..64 * DIM], &p).expect("search"))));
    g.finish();
}

fn bench_graph(c: &mut Criterion) {
    let qs = queries();
    let mut g = c.benchmark_group("search_graph");
    g.throughput(Throughput::Elements(1));
    for storage in [VectorStorage::Int8, VectorStorage::F32] {
        let ix = index(storage);
        for ef in [32usize, 64, 128] {
            let p = SearchParams::top(10).with_strategy(SearchStrategy::Graph).with_ef(ef);
            let mut i = 0;
            g.bench_with_input(BenchmarkId::new(format!("{storage:?}").to_lowercase(), format!("ef{ef}")), &ef, |b, _| {
                b.iter(|| {
                    i = (i + 1) % 256;
                    ix.search(&qs[i * DIM..(i + 1) * DIM], &p).expect("search")
                })
            });
        }
    }
    g.finish();
}

fn bench_enrol(c: &mut Criterion) {
    let data = clustered(5000, 3);
    let mut g = c.benchmark_group("enrol");
    g.sample_size(10);
    g.throughput(Throughput::Elements(5000));
    g.bench_function("add_batch_5000", |b| {
        b.iter(|| {
            let mut ix = VectorIndex::new(DIM, IndexConfig::default()).expect("index");
            ix.add_batch(&data).expect("add");
            ix
        })
    });
    g.finish();
}

fn bench_delete_compact(c: &mut Criterion) {
    let mut ix = VectorIndex::new(DIM, IndexConfig::default()).expect("index");
    ix.add_batch(&clustered(20_000, 4)).expect("add");
    let mut bytes = Vec::new();
    ix.write_to(&mut bytes).expect("write");
    let mut g = c.benchmark_group("delete_compact");
    g.sample_size(10);
    g.bench_function("remove10pct_compact_20000", |b| {
        b.iter_batched(
            || VectorIndex::read_from(&mut &bytes[..]).expect("read"),
            |mut ix| {
                for s in (0..20_000u32).step_by(10) {
                    ix.remove(s).expect("remove");
                }
                ix.compact()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

#[cfg(feature = "hnsw-rs-baseline")]
fn bench_hnsw_rs(c: &mut Criterion) {
    use hnsw_rs::anndists::dist::DistDot;
    use hnsw_rs::hnsw::Hnsw;
    let data = gallery();
    let n = data.len() / DIM;
    let h: Hnsw<f32, DistDot> = Hnsw::new(16, n, 16, 200, DistDot {});
    let rows: Vec<(&[f32], usize)> = data.chunks_exact(DIM).enumerate().map(|(i, v)| (v, i)).collect();
    h.parallel_insert_slice(&rows);
    let qs = queries();
    let mut g = c.benchmark_group("hnsw_rs_search");
    g.throughput(Throughput::Elements(1));
    for ef in [32usize, 64, 128] {
        let mut i = 0;
        g.bench_with_input(BenchmarkId::from_parameter(format!("ef{ef}")), &ef, |b, &ef| {
            b.iter(|| {
                i = (i + 1) % 256;
                h.search(&qs[i * DIM..(i + 1) * DIM], 10, ef)
            })
        });
    }
    g.finish();
}

#[cfg(not(feature = "hnsw-rs-baseline"))]
fn bench_hnsw_rs(_: &mut Criterion) {}

criterion_group!(benches, bench_exact, bench_graph, bench_enrol, bench_delete_compact, bench_hnsw_rs);
criterion_main!(benches);

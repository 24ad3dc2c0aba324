//! Recall / open-set error / QPS harness for vector indexes (issue #3).
//!
//! ```text
//! cargo run --release --features hnsw-rs-baseline --example index_harness -- \
//!     --data structured --n 20000 --dim 128 --queries 1000 \
//!     --ef 16,32,64,128 --threads 1,2 --backends exact,hnsw_rs,peers --out smoke.json
//! ```
//!
//! Generates (or reloads from `--dir`) a seeded synthetic gallery
//! (`facematch::synth`), writes it as .npy for the Python peers, computes the
//! exact ground truth, then builds every backend and measures build time,
//! memory, mate@1, recall@k against exact, open-set errors at `--threshold`
//! and QPS on each thread count (a rayon pool of n threads over the queries,
//! each query searched on its own). Prints a markdown table and writes JSON.
//! See docs/BENCHMARK_DATA.md.

#[path = "index_harness/backends.rs"]
mod backends;
#[path = "index_harness/metrics.rs"]
mod metrics;
#[path = "index_harness/peers.rs"]
mod peers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use facematch::npy;
use facematch::synth::{self, SynthConfig, SynthKind, SynthSet, SynthStats};
use rayon::prelude::*;
use serde::Serialize;

use backends::AnnBackend;
use metrics::{accuracy, rss_bytes, Accuracy};

fn parse_list(s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',').filter(|x| !x.trim().is_empty()).map(|x| x.trim().parse::<usize>().map_err(|e| format!("{x:?}: {e}"))).collect()
}

/// Command-line arguments.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Recall / open-set error / QPS harness for facematch's index and its peers")]
struct Args {
    /// Synthetic data family: structured (face-like) or isotropic (worst case).
    #[arg(long, default_value = "structured")]
    data: String,
    /// Enrolled identities (gallery rows = n x templates).
    #[arg(long, default_value_t = 20_000)]
    n: usize,
    /// Templates per identity.
    #[arg(long, default_value_t = 1)]
    templates: usize,
    /// Embedding dimension.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Number of queries.
    #[arg(long, default_value_t = 1_000)]
    queries: usize,
    /// Fraction of queries from people not enrolled.
    #[arg(long, default_value_t = 0.1)]
    unenrolled: f64,
    /// Look-alike groups (0 = n/50).
    #[arg(long, default_value_t = 0)]
    groups: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// HNSW M (max neighbours per node and layer).
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW ef_construction.
    #[arg(long, default_value_t = 200)]
    efc: usize,
    /// Search ef values (comma-separated).
    #[arg(long, default_value = "16,32,64,128,256,512", value_parser = parse_list)]
    ef: std::vec::Vec<usize>,
    /// Search thread counts (comma-separated).
    #[arg(long, default_value = "1,2", value_parser = parse_list)]
    threads: std::vec::Vec<usize>,
    /// Threads used to build the indexes.
    #[arg(long, default_value_t = 2)]
    build_threads: usize,
    /// Backends: exact, hnsw_rs (feature hnsw-rs-baseline), peers (Python hnswlib/faiss).
    #[arg(long, default_value = "exact,facematch-exact,facematch,facematch-int8,hnsw_rs,peers")]
    backends: String,
    /// Which Python peers to run.
    #[arg(long, default_value = "hnswlib,faiss_hnsw,faiss_flat")]
    peer_backends: String,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Open-set threshold on the top-1 cosine.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// mate@1 a setting must reach to count in the summary (lowered to exact's mate@1 - 0.005 if exact misses it).
    #[arg(long, default_value_t = 0.99)]
    target: f64,
    /// Minimum seconds per QPS measurement (passes over the queries are repeated).
    #[arg(long, default_value_t = 1.0)]
    min_secs: f64,
    /// Data directory (.npy files shared with the peers); default /tmp/facematch-harness/<config>.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Python interpreter with hnswlib and faiss.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Write the JSON results here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One measured (backend, mode, ef) setting.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    backend: String,
    /// "per-query" or "batch".
    mode: String,
    ef: Option<usize>,
    build_s: f64,
    /// RSS growth over the build, bytes.
    rss_delta_bytes: Option<i64>,
    /// Size the backend reports, bytes.
    index_bytes: Option<u64>,
    /// (threads, QPS) pairs.
    qps: Vec<(usize, f64)>,
    accuracy: Accuracy,
    /// Whether the backend is a peer (the reference for ratios).
    peer: bool,
}

#[derive(Serialize)]
struct Summary {
    backend: String,
    mode: String,
    /// Lowest ef reaching the target (None for exact backends or if never reached).
    ef: Option<usize>,
    reached: bool,
    mate_at_1: f64,
    qps: Vec<(usize, f64)>,
    /// (threads, QPS / QPS of the best peer of the same mode at the target, that peer).
    qps_vs_best_peer: Vec<(usize, Option<f64>, Option<String>)>,
    build_s: f64,
    rss_delta_bytes: Option<i64>,
}

#[derive(Serialize)]
struct Report<'a> {
    args: &'a Args,
    synth: &'a SynthConfig,
    stats: &'a SynthStats,
    data_dir: String,
    generate_s: f64,
    ground_truth_s: f64,
    exact_reference: Accuracy,
    /// Threshold giving FPIR <= 1% with exact search, and the FNIR there.
    exact_threshold_fpir_1pct: Option<(f32, f64)>,
    target_mate_at_1: f64,
    rows: &'a [Row],
    summary: Vec<Summary>,
    machine: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads.is_empty() || args.threads.contains(&0) || args.k == 0 || args.build_threads == 0 {
        bail!("--threads, --k and --build-threads must be positive");
    }
    rayon::ThreadPoolBuilder::new().num_threads(args.build_threads).build_global()?;

    let kind = match args.data.as_str() {
        "structured" => SynthKind::Structured,
        "isotropic" => SynthKind::Isotropic,
        other => bail!("--data must be structured or isotropic, got {other:?}"),
    };
    let cfg = SynthConfig {
        dim: args.dim,
        identities: args.n,
        templates_per_identity: args.templates,
        queries: args.queries,
        unenrolled_fraction: args.unenrolled,
        groups: args.groups,
        kind,
        seed: args.seed,
        ..SynthConfig::default()
    };
    cfg.validate()?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "/tmp/facematch-harness/{}_{}x{}_t{}_q{}_s{}",
            args.data, args.n, args.dim, args.templates, args.queries, args.seed
        ))
    });

    let t = Instant::now();
    let (set, stats) = load_or_generate(&cfg, &dir)?;
    let generate_s = t.elapsed().as_secs_f64();
    eprintln!(
        "[harness] data: {} gallery rows x {}, {} queries ({} unenrolled) in {:.1}s; mate median {:.3}, impostor mean {:.3} std {:.3}",
        set.gallery_rows(),
        set.dim,
        set.query_rows(),
        set.query_identity.iter().filter(|q| q.is_none()).count(),
        generate_s,
        stats.mate_cos_median,
        stats.impostor_cos_mean,
        stats.impostor_cos_std
    );

    let t = Instant::now();
    let exact = backends::exact_batch(&set.gallery, set.dim, &set.queries, args.k);
    let ground_truth_s = t.elapsed().as_secs_f64();
    let exact_ref = accuracy(&exact, &exact, &set.gallery_identity, &set.query_identity, args.k, args.threshold);
    eprintln!(
        "[harness] exact ground truth in {ground_truth_s:.1}s: mate@1 {:.4}, FPIR {:.3}, FNIR {:.3} at T={}",
        exact_ref.mate_at_1, exact_ref.fpir, exact_ref.fnir, args.threshold
    );

    // The threshold an operator would need on this gallery for FPIR <= 1%, and its cost.
    let t1 = metrics::threshold_for_fpir(&exact, &set.query_identity, 0.01);
    let fnir_at_t1 = t1.map(|t| accuracy(&exact, &exact, &set.gallery_identity, &set.query_identity, args.k, t).fnir);
    if let (Some(t), Some(f)) = (t1, fnir_at_t1) {
        eprintln!("[harness] exact: threshold for FPIR <= 1% is {t:.3} (FNIR there {f:.3})");
    }

    let mut rows = Vec::new();
    for name in args.backends.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "peers" {
            let python = args.python.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
            match peers::run(&python, &dir, &args) {
                Ok(peer_rows) => {
                    for pr in peer_rows {
                        rows.push(pr.into_row(&exact, &set, &args)?);
                    }
                }
                Err(e) => eprintln!("[harness] peers failed: {e:#}"),
            }
            continue;
        }
        let Some(mut backend) = backends::make(name, args.m, args.efc) else {
            eprintln!("[harness] unknown or disabled backend {name:?} (hnsw_rs needs --features hnsw-rs-baseline); skipped");
            continue;
        };
        rows.extend(run_backend(backend.as_mut(), &set, &exact, &args)?);
    }

    let target = if exact_ref.mate_at_1 >= args.target { args.target } else { exact_ref.mate_at_1 - 0.005 };
    let summary = summarise(&rows, target, &args.threads);
    print_tables(&rows, &summary, &args, target, &exact_ref, &set);

    if let Some(out) = &args.out {
        let report = Report {
            args: &args,
            synth: &cfg,
            stats: &stats,
            data_dir: dir.display().to_string(),
            generate_s,
            ground_truth_s,
            exact_reference: exact_ref,
            exact_threshold_fpir_1pct: t1.zip(fnir_at_t1),
            target_mate_at_1: target,
            rows: &rows,
            summary,
            machine: machine(),
        };
        std::fs::write(out, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("[harness] wrote {}", out.display());
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    format!("{cpu}; {} logical CPUs", std::thread::available_parallelism().map_or(0, |n| n.get()))
}

/// Reuse the .npy files in `dir` when they were written for the same configuration.
fn load_or_generate(cfg: &SynthConfig, dir: &Path) -> Result<(SynthSet, SynthStats)> {
    let meta_path = dir.join("synth.json");
    if let Ok(text) = std::fs::read_to_string(&meta_path) {
        if let Ok((old, stats)) = serde_json::from_str::<(SynthConfig, SynthStats)>(&text) {
            if &old == cfg {
                eprintln!("[harness] reusing data in {}", dir.display());
                let g = npy::read_f32_matrix(dir.join("gallery.npy"))?;
                let q = npy::read_f32_matrix(dir.join("queries.npy"))?;
                let gallery_identity = npy::read_u32_vec(dir.join("gallery_identity.npy"))?;
                let qi = npy::read_i64_vec(dir.join("query_identity.npy"))?;
                if g.cols != cfg.dim || q.cols != cfg.dim || gallery_identity.len() != g.rows || qi.len() != q.rows {
                    bail!("data in {} does not match its synth.json; delete the directory", dir.display());
                }
                let query_identity = qi.iter().map(|&x| u32::try_from(x).ok()).collect();
                let set = SynthSet { dim: cfg.dim, gallery: g.data, gallery_identity, queries: q.data, query_identity };
                return Ok((set, stats));
            }
        }
    }
    let t = Instant::now();
    let set = synth::generate(cfg)?;
    eprintln!("[harness] generated {} x {} in {:.2}s", set.gallery_rows(), set.dim, t.elapsed().as_secs_f64());
    let stats = synth::measure(&set, 100_000, cfg.seed ^ 0x5eed);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&meta_path);
    npy::write_f32_matrix(dir.join("gallery.npy"), &set.gallery, set.gallery_rows(), set.dim)?;
    npy::write_u32_vec(dir.join("gallery_identity.npy"), &set.gallery_identity)?;
    npy::write_f32_matrix(dir.join("queries.npy"), &set.queries, set.query_rows(), set.dim)?;
    let qi: Vec<i64> = set.query_identity.iter().map(|q| q.map_or(-1, i64::from)).collect();
    npy::write_i64_vec(dir.join("query_identity.npy"), &qi)?;
    std::fs::write(&meta_path, serde_json::to_string_pretty(&(cfg, &stats))?)?;
    Ok((set, stats))
}

/// Time one pass (or more, up to `min_secs`) of all queries on a pool of `threads`.
fn timed_search(
    backend: &dyn AnnBackend,
    set: &SynthSet,
    k: usize,
    ef: usize,
    threads: usize,
    min_secs: f64,
) -> Result<(Vec<backends::Hits>, f64)> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let nq = set.query_rows();
    let pass = || -> Result<Vec<Vec<(u32, f32)>>> {
        pool.install(|| (0..nq).into_par_iter().map(|q| backend.search(set.query_row(q), k, ef)).collect())
    };
    let t = Instant::now();
    let first = pass()?;
    let mut passes = 1usize;
    while t.elapsed().as_secs_f64() < min_secs && passes < 1000 {
        pass()?;
        passes += 1;
    }
    Ok((first, (passes * nq) as f64 / t.elapsed().as_secs_f64()))
}

fn run_backend(backend: &mut dyn AnnBackend, set: &SynthSet, exact: &[Vec<(u32, f32)>], args: &Args) -> Result<Vec<Row>> {
    let rss0 = rss_bytes() as i64;
    let t = Instant::now();
    backend.build(&set.gallery, set.dim).with_context(|| format!("building {}", backend.name()))?;
    let build_s = t.elapsed().as_secs_f64();
    let rss_delta = rss_bytes() as i64 - rss0;
    let name = backend.name();
    eprintln!("[harness] {name} built in {build_s:.1}s, rss +{:.0} MB", rss_delta as f64 / 1e6);
    let index_bytes = backend.memory_bytes().map(|b| b as u64);
    let acc = |res: &[Vec<(u32, f32)>]| accuracy(res, exact, &set.gallery_identity, &set.query_identity, args.k, args.threshold);

    let mut rows = Vec::new();
    let efs: Vec<Option<usize>> = if backend.uses_ef() { args.ef.iter().map(|&e| Some(e)).collect() } else { vec![None] };
    for ef in efs {
        let mut qps = Vec::new();
        let mut first = None;
        for &th in &args.threads {
            let (res, q) = timed_search(backend, set, args.k, ef.unwrap_or(0), th, args.min_secs)?;
            eprintln!("[harness] {name} ef={ef:?} threads={th}: {q:.0} QPS");
            qps.push((th, q));
            first.get_or_insert(res);
        }
        let accuracy = acc(first.as_deref().unwrap_or(&[]));
        rows.push(Row {
            backend: name.clone(),
            mode: "per-query".into(),
            ef,
            build_s,
            rss_delta_bytes: Some(rss_delta),
            index_bytes,
            qps,
            accuracy,
            peer: false,
        });
    }
    // Native batched mode (exact backends): same thread counts.
    let mut batch_qps = Vec::new();
    let mut batch_first = None;
    for &th in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(th).build()?;
        let t = Instant::now();
        let mut passes = 0usize;
        loop {
            let Some(res) = pool.install(|| backend.search_batch(&set.queries, args.k)) else {
                break;
            };
            let res = res?;
            passes += 1;
            batch_first.get_or_insert(res);
            if t.elapsed().as_secs_f64() >= args.min_secs || passes >= 1000 {
                break;
            }
        }
        if passes > 0 {
            let q = (passes * set.query_rows()) as f64 / t.elapsed().as_secs_f64();
            eprintln!("[harness] {name} batch threads={th}: {q:.0} QPS");
            batch_qps.push((th, q));
        }
    }
    if let Some(res) = batch_first {
        rows.push(Row {
            backend: name.clone(),
            mode: "batch".into(),
            ef: None,
            build_s,
            rss_delta_bytes: Some(rss_delta),
            index_bytes,
            qps: batch_qps,
            accuracy: acc(&res),
            peer: false,
        });
    }
    Ok(rows)
}

fn summarise(rows: &[Row], target: f64, threads: &[usize]) -> Vec<Summary> {
    // For each (backend, mode): the lowest-ef row reaching the target, else its best row.
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows {
        let key = (r.backend.clone(), r.mode.clone());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let pick = |b: &str, m: &str| -> Option<(&Row, bool)> {
        let mut cands: Vec<&Row> = rows.iter().filter(|r| r.backend == b && r.mode == m).collect();
        cands.sort_by_key(|r| r.ef.unwrap_or(0));
        match cands.iter().find(|r| r.accuracy.mate_at_1 >= target) {
            Some(r) => Some((*r, true)),
            None => cands.iter().max_by(|a, b| a.accuracy.mate_at_1.total_cmp(&b.accuracy.mate_at_1)).map(|r| (*r, false)),
        }
    };
    let picked: Vec<(&Row, bool)> = keys.iter().filter_map(|(b, m)| pick(b, m)).collect();
    // The best peer of the same mode (per-query vs per-query, batch vs batch) that reached the target.
    let best_peer = |mode: &str, th: usize| -> Option<(String, f64)> {
        picked
            .iter()
            .filter(|(r, ok)| r.peer && *ok && r.mode == mode)
            .filter_map(|(r, _)| r.qps.iter().find(|(t, _)| *t == th).map(|(_, q)| (r.backend.clone(), *q)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    picked
        .iter()
        .map(|(r, ok)| Summary {
            backend: r.backend.clone(),
            mode: r.mode.clone(),
            ef: r.ef,
            reached: *ok,
            mate_at_1: r.accuracy.mate_at_1,
            qps: r.qps.clone(),
            qps_vs_best_peer: threads
                .iter()
                .map(|&th| {
                    let mine = r.qps.iter().find(|(t, _)| *t == th).map(|(_, q)| *q);
                    match (mine, best_peer(&r.mode, th), ok) {
                        (Some(a), Some((name, b)), true) => (th, Some(a / b), Some(name)),
                        _ => (th, None, None),
                    }
                })
                .collect(),
            build_s: r.build_s,
            rss_delta_bytes: r.rss_delta_bytes,
        })
        .collect()
}

fn mb(b: Option<i64>) -> String {
    b.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
}

fn print_tables(rows: &[Row], summary: &[Summary], args: &Args, target: f64, exact: &Accuracy, set: &SynthSet) {
    let th_head: String = args.threads.iter().map(|t| format!(" QPS {t}t |")).collect();
    let th_sep: String = args.threads.iter().map(|_| "---|").collect();
    println!(
        "\n### {} {} x {}, {} queries ({} unenrolled), M={} efC={} k={} T={}\n",
        args.data,
        set.gallery_rows(),
        set.dim,
        set.query_rows(),
        exact.impostors_accepted.1,
        args.m,
        args.efc,
        args.k,
        args.threshold
    );
    println!("| backend | mode | ef | build s | RSS +MB | index MB | mate@1 | recall@{} | FPIR | FNIR |{th_head}", args.k);
    println!("|---|---|---|---|---|---|---|---|---|---|{th_sep}");
    for r in rows {
        let q: String =
            args.threads.iter().map(|t| r.qps.iter().find(|(x, _)| x == t).map_or(" - |".into(), |(_, q)| format!(" {q:.0} |"))).collect();
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.4} | {:.4} | {:.3} | {:.3} |{q}",
            r.backend,
            r.mode,
            r.ef.map_or("-".into(), |e| e.to_string()),
            r.build_s,
            mb(r.rss_delta_bytes),
            mb(r.index_bytes.map(|b| b as i64)),
            r.accuracy.mate_at_1,
            r.accuracy.recall_at_k,
            r.accuracy.fpir,
            r.accuracy.fnir,
        );
    }
    println!(
        "\nExact reference: mate@1 {:.4}, FPIR {:.3} ({}/{}), FNIR {:.3} ({}/{}). Summary at mate@1 >= {:.4}:\n",
        exact.mate_at_1,
        exact.fpir,
        exact.impostors_accepted.0,
        exact.impostors_accepted.1,
        exact.fnir,
        exact.mates_rejected.0,
        exact.mates_rejected.1,
        target
    );
    let ratio_head: String = args.threads.iter().map(|t| format!(" vs best peer {t}t |")).collect();
    println!("| backend | mode | ef | mate@1 | build s | RSS +MB |{th_head}{ratio_head}");
    println!("|---|---|---|---|---|---|{th_sep}{th_sep}");
    for s in summary {
        let q: String =
            args.threads.iter().map(|t| s.qps.iter().find(|(x, _)| x == t).map_or(" - |".into(), |(_, q)| format!(" {q:.0} |"))).collect();
        let ratios: String = s
            .qps_vs_best_peer
            .iter()
            .map(|(_, r, peer)| match (r, peer) {
                (Some(r), Some(p)) => format!(" {r:.2}x ({p}) |"),
                _ => " - |".into(),
            })
            .collect();
        let ef = match (s.reached, s.ef) {
            (true, Some(e)) => e.to_string(),
            (true, None) => "exact".into(),
            (false, _) => "not reached".into(),
        };
        println!("| {} | {} | {} | {:.4} | {:.1} | {} |{q}{ratios}", s.backend, s.mode, ef, s.mate_at_1, s.build_s, mb(s.rss_delta_bytes));
    }
}

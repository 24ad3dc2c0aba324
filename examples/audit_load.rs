//! Audited query load for profiling: a 20k x 128 synthetic gallery, `threads`
//! threads each keeping `window` identifications in flight for `secs` seconds,
//! with the audit log's group commit or `Durability::Off`. Prints one JSON line.
//!
//! `--paired SLICES` opens both (group commit and off) in one process and
//! alternates one-second slices of the same load between them, swapping the
//! order every pair; it prints the median throughput of each and the median
//! of the per-pair costs (1 - group commit / off). Drift in a shared machine
//! hits both sides of a pair alike, which separate runs do not give.
//! `--engines K` (default 3) builds K engines per side and takes pairs from
//! them in turn: an A/A run (`--control`: both sides durability off) with one
//! engine per side showed a steady "cost" of up to 8% between two identical
//! engines in one process (memory placement), which more engines average out.
//! With `AUDIT_LOAD_BUFFERED=1` in the environment the audited engines write
//! through the page cache (`AuditConfig::direct_io = false`).
//!
//! ```text
//! cargo run --release --example audit_load -- [--off] [--threads N] [--window W] [--secs S] [--blocking] [--linger US] [--n GALLERY] [--paired SLICES [--engines K] [--control]] [--prealloc BYTES]
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use facematch::audit::{AuditStats, Durability};
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment, Query, QueryContext};
use facematch::store::MasterKey;
use facematch::synth::{generate, SynthConfig};

/// One engine with the synthetic gallery enrolled, audited as `durability` says.
fn engine(
    set: &facematch::synth::SynthSet,
    n: usize,
    durability: Durability,
    linger: Option<u64>,
    prealloc: Option<u64>,
) -> Result<(tempfile::TempDir, Engine), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let door = Purpose::new("door-access")?;
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    cfg.audit.durability = durability;
    if std::env::var_os("AUDIT_LOAD_BUFFERED").is_some() {
        cfg.audit.direct_io = false;
    }
    if let Some(p) = prealloc {
        cfg.audit.preallocate_bytes = p;
    }
    if let (Some(l), Durability::GroupCommit { linger_us, .. }) = (linger, &mut cfg.audit.durability) {
        *linger_us = l;
    }
    let e = EngineBuilder::new(dir.path()).key(MasterKey::generate()).create(cfg)?;
    let op = Operator::new("load")?;
    let consents = (0..n)
        .map(|i| {
            ConsentRecord::new(
                format!("c{i}"),
                &format!("s{i}"),
                ConsentBasis::SeparateConsent,
                vec![door.clone()],
                "load",
                AgeBracket::Adult,
            )
        })
        .collect();
    e.record_consents(&op, consents)?;
    let enrol: Vec<Enrolment> = (0..n)
        .map(|i| {
            Enrolment::new(
                SubjectId::new(format!("s{i}")).unwrap(),
                format!("c{i}"),
                vec![door.clone()],
                set.gallery[i * 128..(i + 1) * 128].to_vec(),
            )
        })
        .collect();
    e.enrol_batch(&op, enrol)?;
    e.checkpoint()?;
    Ok((dir, e))
}

/// What one stretch of load did.
struct Run {
    qps: f64,
    stats: AuditStats,
}

/// `threads` threads each keep `window` identifications in flight for `dur`.
fn run(e: &Engine, queries: &[f32], threads: usize, window: usize, dur: Duration) -> Result<Run, Box<dyn std::error::Error>> {
    let ctx = QueryContext::new(Operator::new("load")?, Purpose::new("door-access")?);
    let nq = queries.len() / 128;
    let done = AtomicU64::new(0);
    let before = e.audit_stats()?;
    let t0 = Instant::now();
    let stop = t0 + dur;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (ctx, done) = (&ctx, &done);
            s.spawn(move || {
                let mut inflight = VecDeque::with_capacity(window);
                let mut i = t;
                let mut local = 0u64;
                while Instant::now() < stop {
                    for _ in 0..64 {
                        if inflight.len() == window {
                            let p: facematch::engine::Pending<_> = inflight.pop_front().unwrap();
                            p.wait().unwrap();
                            local += 1;
                        }
                        let j = i % nq;
                        inflight.push_back(e.query_deferred(ctx, Query::identify(&queries[j * 128..(j + 1) * 128], 10)).unwrap());
                        i += threads;
                    }
                }
                for p in inflight {
                    p.wait().unwrap();
                    local += 1;
                }
                done.fetch_add(local, Ordering::Relaxed);
            });
        }
    });
    let q = done.load(Ordering::Relaxed) as f64;
    let st = e.audit_stats()?;
    Ok(Run {
        qps: q / t0.elapsed().as_secs_f64(),
        stats: AuditStats {
            commits: st.commits - before.commits,
            records: st.records - before.records,
            awaited: st.awaited - before.awaited,
            sync_micros: st.sync_micros - before.sync_micros,
            linger_micros: st.linger_micros,
        },
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut off, mut threads, mut window, mut secs, mut n) = (false, 2usize, 32usize, 10u64, 20_000usize);
    let (mut linger, mut paired, mut prealloc): (Option<u64>, Option<usize>, Option<u64>) = (None, None, None);
    let (mut engines, mut control) = (3usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num =
            |name: &str| -> Result<u64, Box<dyn std::error::Error>> { Ok(args.next().ok_or(format!("{name} needs a value"))?.parse()?) };
        match a.as_str() {
            "--off" => off = true,
            "--blocking" => window = 1,
            "--threads" => threads = num("--threads")? as usize,
            "--window" => window = num("--window")? as usize,
            "--secs" => secs = num("--secs")?,
            "--n" => n = num("--n")? as usize,
            "--linger" => linger = Some(num("--linger")?),
            "--paired" => paired = Some(num("--paired")? as usize),
            "--engines" => engines = num("--engines")?.max(1) as usize,
            "--control" => control = true,
            "--prealloc" => prealloc = Some(num("--prealloc")?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let set = generate(&SynthConfig { identities: n, queries: 1000, ..Default::default() })?;
    let Some(slices) = paired else {
        let durability = if off { Durability::Off } else { Durability::default() };
        let (_dir, e) = engine(&set, n, durability, linger, prealloc)?;
        let r = run(&e, &set.queries, threads, window, Duration::from_secs(secs))?;
        let st = r.stats;
        println!(
            "{{\"off\":{off},\"threads\":{threads},\"window\":{window},\"n\":{n},\"qps\":{:.0},\"commits\":{},\"awaited\":{},\"sync_us_per_commit\":{:.0},\"linger_us\":{}}}",
            r.qps, st.commits, st.awaited, st.sync_micros as f64 / st.commits.max(1) as f64, st.linger_micros
        );
        return Ok(());
    };
    // Paired: both engines in one process, alternating one-second slices
    // (order swapped every pair), so drift in the machine hits both alike.
    // Several engines per side, used in turn: each engine's memory layout
    // (page placement of its gallery) biases its speed for the whole
    // process; averaging over a few keeps that bias out of the cost.
    let mut gcs = Vec::new();
    let mut offs = Vec::new();
    for _ in 0..engines {
        let side = if control { Durability::Off } else { Durability::default() };
        gcs.push(engine(&set, n, side, linger, prealloc)?);
        offs.push(engine(&set, n, Durability::Off, None, prealloc)?);
    }
    let slice = Duration::from_secs(1);
    for k in 0..engines {
        run(&gcs[k].1, &set.queries, threads, window, slice)?; // warm-up
        run(&offs[k].1, &set.queries, threads, window, slice)?;
    }
    let (mut a, mut b, mut cost) = (Vec::new(), Vec::new(), Vec::new());
    let (mut commits, mut records, mut sync) = (0u64, 0u64, 0u64);
    for i in 0..slices {
        let (gc, nosync) = (&gcs[(i / 2) % engines].1, &offs[(i / 2) % engines].1);
        let (x, y) = if i % 2 == 0 {
            let x = run(gc, &set.queries, threads, window, slice)?;
            (x, run(nosync, &set.queries, threads, window, slice)?)
        } else {
            let y = run(nosync, &set.queries, threads, window, slice)?;
            (run(gc, &set.queries, threads, window, slice)?, y)
        };
        commits += x.stats.commits;
        records += x.stats.records;
        sync += x.stats.sync_micros;
        cost.push(1.0 - x.qps / y.qps);
        a.push(x.qps);
        b.push(y.qps);
    }
    let (ma, mb, mc) = (median(&mut a), median(&mut b), median(&mut cost));
    println!(
        "{{\"paired\":{slices},\"engines\":{engines},\"control\":{control},\"threads\":{threads},\"window\":{window},\"n\":{n},\"group_commit_qps\":{ma:.0},\"off_qps\":{mb:.0},\"median_cost_pct\":{:.1},\"cost_pct_min\":{:.1},\"cost_pct_max\":{:.1},\"records_per_commit\":{:.1},\"sync_us_per_commit\":{:.0}}}",
        mc * 100.0,
        cost.iter().copied().fold(f64::INFINITY, f64::min) * 100.0,
        cost.iter().copied().fold(f64::NEG_INFINITY, f64::max) * 100.0,
        records as f64 / commits.max(1) as f64,
        sync as f64 / commits.max(1) as f64,
    );
    Ok(())
}

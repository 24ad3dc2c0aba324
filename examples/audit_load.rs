//! Audited query load for profiling: a 20k x 128 synthetic gallery, `threads`
//! threads each keeping `window` identifications in flight for `secs` seconds,
//! with the audit log's group commit or `Durability::Off`. Prints one JSON line.
//!
//! ```text
//! cargo run --release --example audit_load -- [--off] [--threads N] [--window W] [--secs S] [--blocking] [--linger US] [--n GALLERY]
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use facematch::audit::Durability;
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{EngineBuilder, Enrolment, QueryContext};
use facematch::store::MasterKey;
use facematch::synth::{generate, SynthConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut off, mut threads, mut window, mut secs, mut n) = (false, 2usize, 32usize, 10u64, 20_000usize);
    let mut linger: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u64, Box<dyn std::error::Error>> { Ok(args.next().ok_or(format!("{name} needs a value"))?.parse()?) };
        match a.as_str() {
            "--off" => off = true,
            "--blocking" => window = 1,
            "--threads" => threads = num("--threads")? as usize,
            "--window" => window = num("--window")? as usize,
            "--secs" => secs = num("--secs")?,
            "--n" => n = num("--n")? as usize,
            "--linger" => linger = Some(num("--linger")?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let dir = tempfile::tempdir()?;
    let set = generate(&SynthConfig { identities: n, queries: 1000, ..Default::default() })?;
    let door = Purpose::new("door-access")?;
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    if off {
        cfg.audit.durability = Durability::Off;
    } else if let (Some(l), Durability::GroupCommit { linger_us, .. }) = (linger, &mut cfg.audit.durability) {
        *linger_us = l;
    }
    let e = EngineBuilder::new(dir.path()).key(MasterKey::generate()).create(cfg)?;
    let op = Operator::new("load")?;
    let consents = (0..n)
        .map(|i| ConsentRecord::new(format!("c{i}"), &format!("s{i}"), ConsentBasis::SeparateConsent, vec![door.clone()], "load", AgeBracket::Adult))
        .collect();
    e.record_consents(&op, consents)?;
    let enrol: Vec<Enrolment> = (0..n)
        .map(|i| Enrolment::new(SubjectId::new(format!("s{i}")).unwrap(), format!("c{i}"), vec![door.clone()], set.gallery[i * 128..(i + 1) * 128].to_vec()))
        .collect();
    e.enrol_batch(&op, enrol)?;
    e.checkpoint()?;
    let ctx = QueryContext::new(op, door);
    let nq = set.queries.len() / 128;
    let done = AtomicU64::new(0);
    let stop = Instant::now() + Duration::from_secs(secs);
    let stats_before = e.audit_stats()?;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (e, ctx, q, done) = (&e, &ctx, &set.queries, &done);
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
                        inflight.push_back(e.identify_deferred(ctx, &q[j * 128..(j + 1) * 128], 10).unwrap());
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
    let el = t0.elapsed().as_secs_f64();
    let q = done.load(Ordering::Relaxed);
    let before = stats_before;
    let st = e.audit_stats()?;
    println!(
        "{{\"off\":{off},\"threads\":{threads},\"window\":{window},\"queries\":{q},\"secs\":{el:.2},\"qps\":{:.0},\"commits\":{},\"awaited\":{},\"sync_us_per_commit\":{:.0},\"linger_us\":{}}}",
        q as f64 / el,
        st.commits - before.commits,
        st.awaited - before.awaited,
        (st.sync_micros - before.sync_micros) as f64 / (st.commits - before.commits).max(1) as f64,
        st.linger_micros
    );
    Ok(())
}

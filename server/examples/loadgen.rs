//! HTTP load against the example server: a 20k x 128 synthetic gallery served
//! twice in one process, audited with group commit and with `Durability::Off`
//! (records batched alike, no fsync), `connections` keep-alive clients each
//! sending one identification at a time (JSON embedding, k = 10), alternating
//! one-second slices between the two servers (order swapped every pair).
//! Prints one JSON line: median throughput per side, the median per-pair cost
//! of durability, and latency percentiles of the durable side.
//!
//! With `--tls`, both sides are durable and the second speaks TLS (a
//! certificate made at start, rustls on both ends) instead of having
//! durability off: the line then gives the cost of TLS.
//!
//! ```text
//! cargo run --release -p facematch-server --example loadgen -- [--n 20000] [--connections 64] [--paired 8] [--workers 2] [--tls]
//! ```
//! Clients and servers share the machine's cores: the figures are for the
//! whole loop, HTTP parsing and JSON included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facematch::audit::Durability;
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment};
use facematch::store::MasterKey;
use facematch::synth::{generate, SynthConfig, SynthSet};
use facematch_server::client::Client;
use facematch_server::{Server, ServerConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A self-signed certificate for `localhost` as PEM files in `dir`, and a client configuration trusting it.
fn certificate(dir: &std::path::Path) -> Res<(std::path::PathBuf, std::path::PathBuf, Arc<tokio_rustls::rustls::ClientConfig>)> {
    use tokio_rustls::rustls;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.key_pair.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone())?;
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((cert, key, Arc::new(cfg)))
}

type Tls = Option<(std::path::PathBuf, std::path::PathBuf)>;

fn serve(set: &SynthSet, n: usize, durability: Durability, workers: usize, tls: Tls) -> Res<(tempfile::TempDir, Server)> {
    let dir = tempfile::tempdir()?;
    let door = Purpose::new("door-access")?;
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    cfg.audit.durability = durability;
    let e: Engine = EngineBuilder::new(dir.path()).key(MasterKey::generate()).create(cfg)?;
    let op = Operator::new("load")?;
    e.record_consents(
        &op,
        (0..n)
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
            .collect(),
    )?;
    e.enrol_batch(
        &op,
        (0..n)
            .map(|i| {
                Enrolment::new(
                    SubjectId::new(format!("s{i}")).unwrap(),
                    format!("c{i}"),
                    vec![door.clone()],
                    set.gallery[i * 128..(i + 1) * 128].to_vec(),
                )
            })
            .collect(),
    )?;
    e.checkpoint()?;
    let (tls_cert, tls_key) = tls.unzip();
    let server =
        Server::start(Arc::new(e), None, ServerConfig { listen: "127.0.0.1:0".into(), workers, tls_cert, tls_key, ..Default::default() })?;
    Ok((dir, server))
}

/// `connections` clients for `dur`; returns (queries per second, latencies in µs).
fn run(
    addr: SocketAddr,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
    bodies: &[Vec<u8>],
    connections: usize,
    dur: Duration,
) -> Res<(f64, Vec<u32>)> {
    let lat = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Res<()> {
        let hs: Vec<_> = (0..connections)
            .map(|t| {
                let (lat, stop) = (&lat, &stop);
                s.spawn(move || -> Result<(), String> {
                    let c = match tls {
                        None => Client::new(addr),
                        Some(cfg) => Client::tls(addr, Arc::clone(cfg), "localhost".try_into().map_err(|_| "server name")?),
                    };
                    let mut c = c.with_header("X-Facematch-Operator", "load").with_header("X-Facematch-Purpose", "door-access");
                    let mut mine = Vec::new();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let q0 = Instant::now();
                        let r = c
                            .request("POST", "/v1/identify?k=10", Some("application/json"), &bodies[i % bodies.len()])
                            .map_err(|e| e.to_string())?;
                        if r.status != 200 {
                            return Err(format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body)));
                        }
                        mine.push(q0.elapsed().as_micros() as u32);
                        i += connections;
                    }
                    lat.lock().unwrap().extend(mine);
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().map_err(|_| "client panicked")??;
        }
        Ok(())
    })?;
    let lat = lat.into_inner()?;
    Ok((lat.len() as f64 / t0.elapsed().as_secs_f64(), lat))
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

fn main() -> Res<()> {
    let (mut n, mut connections, mut slices, mut workers, mut tls) = (20_000usize, 64usize, 8usize, 2usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Res<usize> { Ok(args.next().ok_or(format!("{name} needs a value"))?.parse()?) };
        match a.as_str() {
            "--n" => n = num("--n")?,
            "--connections" => connections = num("--connections")?.max(1),
            "--paired" => slices = num("--paired")?.max(2),
            "--workers" => workers = num("--workers")?.max(1),
            "--tls" => tls = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let set = generate(&SynthConfig { identities: n, queries: 1000, ..Default::default() })?;
    let bodies: Vec<Vec<u8>> =
        set.queries.chunks(128).map(|q| serde_json::to_vec(&serde_json::json!({ "embedding": q })).unwrap()).collect();
    let certs = tempfile::tempdir()?;
    let (cert, key, client_tls) = certificate(certs.path())?;
    let (_d1, durable) = serve(&set, n, Durability::default(), workers, None)?;
    // The other side: durability off, or (with --tls) durable over TLS.
    let (_d2, off) = if tls {
        serve(&set, n, Durability::default(), workers, Some((cert, key)))?
    } else {
        serve(&set, n, Durability::Off, workers, None)?
    };
    let other = if tls { Some(&client_tls) } else { None };
    let slice = Duration::from_secs(1);
    run(durable.addr(), None, &bodies, connections, slice)?; // warm-up
    run(off.addr(), other, &bodies, connections, slice)?;
    let (mut a, mut b, mut cost, mut lat, mut lat_b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..slices {
        let ((x, l), (y, lb)) = if i % 2 == 0 {
            let x = run(durable.addr(), None, &bodies, connections, slice)?;
            (x, run(off.addr(), other, &bodies, connections, slice)?)
        } else {
            let y = run(off.addr(), other, &bodies, connections, slice)?;
            (run(durable.addr(), None, &bodies, connections, slice)?, y)
        };
        // The other side's cost: durability's (plain vs off) or TLS's (TLS vs plain).
        cost.push(if tls { 1.0 - y / x } else { 1.0 - x / y });
        a.push(x);
        b.push(y);
        lat.extend(l);
        lat_b.extend(lb);
    }
    lat.sort_unstable();
    lat_b.sort_unstable();
    let pct_of = |lat: &[u32], p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let pct = |p: f64| pct_of(&lat, p);
    if tls {
        println!(
            "{{\"tls\":true,\"connections\":{connections},\"workers\":{workers},\"n\":{n},\"slices\":{slices},\"plain_qps\":{:.0},\"tls_qps\":{:.0},\"median_tls_cost_pct\":{:.1},\"tls_cost_pct_min\":{:.1},\"tls_cost_pct_max\":{:.1},\"plain_p50_us\":{},\"plain_p99_us\":{},\"tls_p50_us\":{},\"tls_p99_us\":{}}}",
            median(&mut a),
            median(&mut b),
            median(&mut cost) * 100.0,
            cost.iter().copied().fold(f64::INFINITY, f64::min) * 100.0,
            cost.iter().copied().fold(f64::NEG_INFINITY, f64::max) * 100.0,
            pct(0.50),
            pct(0.99),
            pct_of(&lat_b, 0.50),
            pct_of(&lat_b, 0.99),
        );
        durable.shutdown()?;
        off.shutdown()?;
        return Ok(());
    }
    println!(
        "{{\"connections\":{connections},\"workers\":{workers},\"n\":{n},\"slices\":{slices},\"durable_qps\":{:.0},\"off_qps\":{:.0},\"median_cost_pct\":{:.1},\"cost_pct_min\":{:.1},\"cost_pct_max\":{:.1},\"durable_p50_us\":{},\"durable_p99_us\":{}}}",
        median(&mut a),
        median(&mut b),
        median(&mut cost) * 100.0,
        cost.iter().copied().fold(f64::INFINITY, f64::min) * 100.0,
        cost.iter().copied().fold(f64::NEG_INFINITY, f64::max) * 100.0,
        pct(0.50),
        pct(0.99),
    );
    durable.shutdown()?;
    off.shutdown()?;
    Ok(())
}

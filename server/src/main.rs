//! `facematch-server`: serve a gallery over HTTP (see the library docs for the routes).
//!
//! ```text
//! facematch-server --gallery DIR [--key-file FILE] [--config server.json] [--listen ADDR]
//!                  [--workers N] [--no-images] [--pipeline-config pipeline.json]
//!                  [--tls-cert cert.pem --tls-key key.pem] [--metrics-listen ADDR]
//!                  [--max-connections N] [--header-timeout SECS] [--body-timeout SECS]
//!                  [--idle-timeout SECS] [--per-operator-concurrency N]
//! ```
//! Prints `listening on ADDR` on stdout once it accepts requests; stops on
//! SIGINT or SIGTERM after answering what is in flight, then closes the gallery.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use facematch::engine::EngineBuilder;
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::store::{MasterKey, KEY_ENV};
use facematch_server::{Server, ServerConfig};

#[derive(Parser, Debug)]
#[command(name = "facematch-server", version, about = "HTTP server for a facematch gallery")]
struct Args {
    /// Gallery directory (made with `facematch init`).
    #[arg(long, short = 'g', value_name = "DIR")]
    gallery: PathBuf,
    /// Key file (64 hex digits or 32 raw bytes); otherwise the FACEMATCH_KEY environment variable (hex).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Server configuration (JSON, `ServerConfig`); defaults otherwise.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address (overrides the configuration).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// CPU slots for request work (overrides the configuration).
    #[arg(long)]
    workers: Option<usize>,
    /// Serve embeddings only: do not load the face models (image requests get 415).
    #[arg(long)]
    no_images: bool,
    /// Pipeline configuration (JSON, `PipelineConfig`) for image requests.
    #[arg(long, value_name = "FILE")]
    pipeline_config: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS only (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve GET /metrics on this separate address, without credentials.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// Open connections at most (default: half the fd limit, at most 4096).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Seconds a request header (or TLS handshake) may take (default 10).
    #[arg(long, value_name = "SECS")]
    header_timeout: Option<f64>,
    /// Seconds a request body may take after its header (default 30).
    #[arg(long, value_name = "SECS")]
    body_timeout: Option<f64>,
    /// Seconds an idle keep-alive connection is kept (default 60).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<f64>,
    /// Requests one operator may have in progress at once (default: no limit).
    #[arg(long, value_name = "N")]
    per_operator_concurrency: Option<usize>,
    /// Accept bearer tokens over plain HTTP on a non-loopback address (behind a TLS proxy only).
    #[arg(long)]
    allow_plaintext_tokens: bool,
}

fn secs(v: f64, flag: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v).map_err(|_| anyhow::anyhow!("{flag}: seconds, 0 or more"))
}

fn read_json<T: for<'de> serde::Deserialize<'de>>(path: &PathBuf) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Block SIGINT and SIGTERM in this thread (and every thread started after),
/// then wait for one of them here.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> anyhow::Result<Signals> {
        // SAFETY: plain libc calls on a local, zero-initialised sigset_t.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            anyhow::ensure!(rc == 0, "pthread_sigmask failed: {rc}");
            Ok(Signals(set))
        }
    }

    fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: the set is initialised; sig is a valid out-pointer.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let signals = Signals::block()?;
    let mut cfg: ServerConfig = match &args.config {
        Some(p) => read_json(p)?,
        None => ServerConfig::default(),
    };
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(w) = args.workers {
        cfg.workers = w;
    }
    if args.tls_cert.is_some() {
        cfg.tls_cert = args.tls_cert;
        cfg.tls_key = args.tls_key;
    }
    if let Some(m) = args.metrics_listen {
        cfg.metrics_listen = Some(m);
    }
    if let Some(n) = args.max_connections {
        cfg.max_connections = n;
    }
    if let Some(t) = args.header_timeout {
        cfg.header_read_timeout = secs(t, "--header-timeout")?;
    }
    if let Some(t) = args.body_timeout {
        cfg.body_timeout = secs(t, "--body-timeout")?;
    }
    if let Some(t) = args.idle_timeout {
        cfg.idle_timeout = secs(t, "--idle-timeout")?;
    }
    if let Some(n) = args.per_operator_concurrency {
        cfg.per_operator_concurrency = Some(n);
    }
    cfg.allow_plaintext_tokens |= args.allow_plaintext_tokens;
    cfg.validate()?;
    let key = match &args.key_file {
        Some(p) => MasterKey::from_file(p)?,
        None => MasterKey::from_env().with_context(|| format!("no --key-file and no {KEY_ENV}"))?,
    };
    let engine =
        EngineBuilder::new(&args.gallery).key(key).open().with_context(|| format!("opening gallery {}", args.gallery.display()))?;
    if let Some(t) = &engine.open_report().torn_log_tail {
        tracing::warn!(
            bytes = t.bytes_dropped,
            at = t.at,
            "a torn write at the end of the template log is ignored (cut at the next write)"
        );
    }
    for n in engine.notices() {
        tracing::warn!(notice = ?n, "operator notice");
    }
    let pipeline = if args.no_images {
        None
    } else {
        let pcfg: PipelineConfig = match &args.pipeline_config {
            Some(p) => read_json(p)?,
            None => PipelineConfig::default(),
        };
        Some(Arc::new(FacePipeline::new(pcfg).context("loading the face models (or pass --no-images)")?))
    };
    let engine = Arc::new(engine);
    let server = Server::start(Arc::clone(&engine), pipeline, cfg)?;
    println!("listening on {}", server.addr());
    if let Some(m) = server.metrics_addr() {
        println!("metrics on {m}");
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    let sig = signals.wait();
    tracing::info!(signal = sig, "stopping");
    server.shutdown()?;
    let engine = Arc::try_unwrap(engine).map_err(|_| anyhow::anyhow!("the engine is still shared after shutdown"))?;
    engine.close()?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

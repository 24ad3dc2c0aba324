//! An HTTP server linking the facematch library: the shape of a deployment.
//!
//! A [`Server`] serves one [`Engine`] (and, optionally, a [`FacePipeline`] for
//! image requests) over HTTP/1.1 with JSON bodies. Every answer to a query
//! leaves only once its audit record is durable, and no answer waits in a
//! thread of its own: request handlers compute the decision on a bounded set
//! of CPU slots ([`ServerConfig::workers`]), hand the engine's
//! [`facematch::engine::Pending`] answer to one durability thread and await it,
//! so thousands of requests in flight share the audit log's group commits.
//!
//! | route | does |
//! |---|---|
//! | `GET /v1/health` | liveness, no credentials needed |
//! | `GET /v1/ready` | readiness (gallery open, audit log taking records), no credentials needed |
//! | `GET /metrics` | Prometheus text: requests, latency, connections, audit commits, gallery size (or on [`ServerConfig::metrics_listen`]) |
//! | `GET /v1/stats` | gallery and audit counters, operator notices |
//! | `POST /v1/identify` | 1:N: JSON `{"embedding": [...], "k": 5}`, or an image body (`?k=`) |
//! | `POST /v1/verify` | 1:1: JSON `{"embedding": [...], "subject": "..."}`, or an image body (`?subject=`) |
//! | `POST /v1/anonymise` | image in, PNG out with every face painted over |
//! | `POST /v1/consents` | record a [`facematch::compliance::ConsentRecord`] (JSON) |
//! | `POST /v1/enrol` | JSON `{"subject", "consent_id", "purposes", "embedding"}`, or an image body (`?subject=&consent_id=&purposes=a,b`) |
//! | `POST /v1/subjects/{id}/withdraw` | consent withdrawn: the subject's templates are erased |
//!
//! Queries and enrolments name their purpose in `X-Facematch-Purpose`. The
//! operator recorded in the audit log comes from a bearer token
//! ([`ServerConfig::tokens`]) or, without tokens, from `X-Facematch-Operator`.
//! Errors are `{"error": kind, "message": ...}` with a matching status
//! ([`ApiError`]). Nothing a request carries (images, embeddings) is logged.
//!
//! Connections are bounded ([`ServerConfig::max_connections`]; past it new
//! ones are closed at once) and timed (header, body, idle); with
//! [`ServerConfig::tls_cert`] and [`ServerConfig::tls_key`] the server speaks
//! HTTPS (rustls) only.
//!
//! ```no_run
//! use std::sync::Arc;
//! use facematch::engine::EngineBuilder;
//! use facematch::store::MasterKey;
//! use facematch_server::{Server, ServerConfig};
//!
//! let engine = EngineBuilder::new("gallery").key(MasterKey::from_env()?).open()?;
//! let server = Server::start(Arc::new(engine), None, ServerConfig::default())?;
//! println!("listening on {}", server.addr());
//! // ... until told to stop:
//! server.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod api;
pub mod client;
mod config;
mod conn;
mod error;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use facematch::engine::Engine;
use facematch::pipeline::FacePipeline;

pub use config::ServerConfig;
pub use error::{ApiError, ServerError};

/// How long [`Server::shutdown`] lets open requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running server. Dropping it without [`Server::shutdown`] stops it too.
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    serving: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    durability: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Server {
    /// Listen on `config.listen` and serve `engine` (and image requests when
    /// `pipeline` is given; without it they get 415).
    pub fn start(engine: Arc<Engine>, pipeline: Option<Arc<FacePipeline>>, config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let bind = |listen: &str| -> Result<std::net::TcpListener, ServerError> {
            let l =
                std::net::TcpListener::bind(listen).map_err(|e| ServerError::Listen { addr: listen.to_owned(), reason: e.to_string() })?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(conn::tls_acceptor(cert, key)?),
            _ => None,
        };
        if !config.tokens.is_empty() && tls.is_none() && !config.allow_plaintext_tokens {
            use std::net::ToSocketAddrs;
            let addrs =
                config.listen.to_socket_addrs().map_err(|e| ServerError::Listen { addr: config.listen.clone(), reason: e.to_string() })?;
            if addrs.into_iter().any(|a| !a.ip().is_loopback()) {
                return Err(ServerError::Config(format!(
                    "bearer tokens would travel in clear text to {}: set tls_cert and tls_key, listen on loopback, or set allow_plaintext_tokens behind a TLS proxy",
                    config.listen
                )));
            }
        }
        let listener = bind(&config.listen)?;
        let addr = listener.local_addr()?;
        let metrics_listener = config.metrics_listen.as_deref().map(bind).transpose()?;
        let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let limits = conn::Limits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .thread_name("facematch-http")
            .enable_io()
            .enable_time()
            .build()?;
        let (jobs, durability) = api::durability_thread(config.max_in_flight)?;
        let counters = Arc::new(metrics::Metrics::default());
        let state = api::AppState::new(engine, pipeline, config, jobs, Arc::clone(&counters));
        let app = api::router(Arc::clone(&state));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut serving = Vec::new();
        {
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            serving.push(runtime.spawn(conn::serve(listener, tls, app, limits, Arc::clone(&counters), stopped.clone())));
            if let Some(ml) = metrics_listener {
                let ml = tokio::net::TcpListener::from_std(ml)?;
                let limits = conn::Limits { max_connections: 64, ..limits };
                serving.push(runtime.spawn(conn::serve(
                    ml,
                    None,
                    api::metrics_router(state),
                    limits,
                    Arc::new(metrics::Metrics::default()),
                    stopped,
                )));
            }
        }
        tracing::info!(%addr, "facematch server listening");
        Ok(Server { addr, metrics_addr, runtime: Some(runtime), stop: Some(stop), serving, durability: Some(durability) })
    }

    /// The address `GET /metrics` is served on without credentials, when
    /// [`ServerConfig::metrics_listen`] is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address it listens on (the real port when `listen` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, let open requests finish (up to 10 s), and return once
    /// every answer given has its audit record durable. The engine is the
    /// caller's to close.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<(), ServerError> {
        let Some(runtime) = self.runtime.take() else { return Ok(()) };
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let mut result = Ok(());
        let serving = std::mem::take(&mut self.serving);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for s in serving {
            match runtime.block_on(async { tokio::time::timeout_at(deadline, s).await }) {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => result = Err(ServerError::Io(e)),
                Ok(Err(e)) => result = Err(ServerError::Io(std::io::Error::other(e.to_string()))),
                Err(_) => tracing::warn!("requests still open after the shutdown grace period were cut"),
            }
        }
        // Dropping the runtime drops the router and with it the last sender
        // of durability jobs: the durability thread finishes what it holds and ends.
        runtime.shutdown_timeout(SHUTDOWN_GRACE);
        if let Some(d) = self.durability.take() {
            if d.join().is_err() {
                result = Err(ServerError::Io(std::io::Error::other("the durability thread panicked")));
            }
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop_now() {
            tracing::error!(error = %e, "stopping the server");
        }
    }
}

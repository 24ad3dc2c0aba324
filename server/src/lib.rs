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
mod error;

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
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
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
        let listener = std::net::TcpListener::bind(&config.listen).map_err(|e| ServerError::Listen { addr: config.listen.clone(), reason: e.to_string() })?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .thread_name("facematch-http")
            .enable_io()
            .enable_time()
            .build()?;
        let (jobs, durability) = api::durability_thread(config.max_in_flight)?;
        let app = api::router(api::AppState::new(engine, pipeline, config, jobs));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, "facematch server listening");
        Ok(Server { addr, runtime: Some(runtime), stop: Some(stop), serving: Some(serving), durability: Some(durability) })
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
            let _ = stop.send(());
        }
        let mut result = Ok(());
        if let Some(serving) = self.serving.take() {
            match runtime.block_on(async { tokio::time::timeout(SHUTDOWN_GRACE, serving).await }) {
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

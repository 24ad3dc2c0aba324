//! [`ServerConfig`]: what the server listens on and how much it accepts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use facematch::anonymise::AnonymiseConfig;
use serde::{Deserialize, Serialize};

use crate::ServerError;

/// Server settings, read from a JSON file (`--config`); every field has a default.
///
/// ```
/// let cfg: facematch_server::ServerConfig = serde_json::from_str(r#"{"listen": "127.0.0.1:0", "workers": 2}"#).unwrap();
/// cfg.validate().unwrap();
/// assert_eq!(cfg.max_body_bytes, 16 << 20);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (`host:port`; port 0 picks a free one).
    pub listen: String,
    /// Threads that parse requests and compute answers (default: the CPUs).
    pub workers: usize,
    /// Answers computed and waiting for their audit record to be durable, at
    /// most; workers wait for room beyond it (backpressure).
    pub max_in_flight: usize,
    /// Largest request body accepted (images included); larger gets 413 unread.
    pub max_body_bytes: u64,
    /// Candidates returned by identification when the request names no `k`.
    pub default_k: usize,
    /// Largest `k` a request may ask for.
    pub max_k: usize,
    /// Bearer tokens and the operator each one authenticates. When set, every
    /// request but `GET /v1/health` needs `Authorization: Bearer TOKEN` and the
    /// audit log records the token's operator. When empty, the operator is
    /// taken from the `X-Facematch-Operator` header: only behind a proxy that
    /// authenticates callers and sets it.
    pub tokens: BTreeMap<String, String>,
    /// How `POST /v1/anonymise` paints faces over.
    pub anonymise: AnonymiseConfig,
    /// A request's header (and a TLS handshake) must arrive within this many
    /// seconds of its first byte, or the connection is closed (default 10).
    #[serde(with = "secs")]
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this many seconds of its header,
    /// or the request gets 408 and the connection is closed (default 30).
    #[serde(with = "secs")]
    pub body_timeout: Duration,
    /// A connection with no request in progress and no bytes moving for this
    /// many seconds is closed (keep-alive idle; default 60).
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Open connections at most; past it new connections are closed at once
    /// while the open ones keep being served (default: half the process's
    /// file-descriptor limit, at most 4,096).
    pub max_connections: usize,
    /// Requests one operator may have in progress at once; more get 429
    /// (default: no limit).
    pub per_operator_concurrency: Option<usize>,
    /// PEM certificate chain: with `tls_key`, the server speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Accept bearer tokens over plain HTTP on a non-loopback address (only
    /// behind a proxy that terminates TLS on the same host or network).
    pub allow_plaintext_tokens: bool,
    /// Serve `GET /metrics` on this separate address, without credentials
    /// (e.g. an internal interface); when unset, `/metrics` is on the main
    /// listener and needs the same credentials as the other routes.
    pub metrics_listen: Option<String>,
}

/// Durations as seconds in JSON (fractions allowed: `0.5`).
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(|_| serde::de::Error::custom("a duration in seconds, 0 or more"))
    }
}

/// Half the file-descriptor soft limit, between 16 and 4,096.
fn default_max_connections() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid, initialised struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return 4096;
    }
    usize::try_from(lim.rlim_cur / 2).unwrap_or(4096).clamp(16, 4096)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            max_in_flight: 1024,
            max_body_bytes: 16 << 20,
            default_k: 5,
            max_k: 100,
            tokens: BTreeMap::new(),
            anonymise: AnonymiseConfig::default(),
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: default_max_connections(),
            per_operator_concurrency: None,
            tls_cert: None,
            tls_key: None,
            allow_plaintext_tokens: false,
            metrics_listen: None,
        }
    }
}

impl ServerConfig {
    /// Check ranges.
    ///
    /// ```
    /// let mut cfg = facematch_server::ServerConfig::default();
    /// cfg.workers = 0;
    /// assert!(cfg.validate().is_err());
    /// // Durations are seconds in JSON; TLS needs both files.
    /// let cfg: facematch_server::ServerConfig = serde_json::from_str(r#"{"header_read_timeout": 0.5, "tls_cert": "cert.pem"}"#).unwrap();
    /// assert_eq!(cfg.header_read_timeout, std::time::Duration::from_millis(500));
    /// assert!(cfg.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |field: &str, reason: &str| Err(ServerError::Config(format!("{field}: {reason}")));
        if self.listen.trim().is_empty() {
            return bad("listen", "empty");
        }
        if !(1..=1024).contains(&self.workers) {
            return bad("workers", "must be 1..=1024");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes", "must be at least 1024");
        }
        if self.max_k == 0 || self.default_k == 0 || self.default_k > self.max_k {
            return bad("default_k", "must be 1..=max_k");
        }
        if self.tokens.iter().any(|(t, op)| t.len() < 16 || op.trim().is_empty()) {
            return bad("tokens", "tokens need 16 characters or more and a non-empty operator");
        }
        let ms = Duration::from_millis;
        if self.header_read_timeout < ms(100) || self.body_timeout < ms(100) || self.idle_timeout < ms(100) {
            return bad("timeouts", "header_read_timeout, body_timeout and idle_timeout must be at least 0.1 s");
        }
        if self.header_read_timeout > Duration::from_secs(3600)
            || self.body_timeout > Duration::from_secs(3600)
            || self.idle_timeout > Duration::from_secs(86400)
        {
            return bad("timeouts", "header_read_timeout and body_timeout at most 3600 s, idle_timeout at most 86400 s");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.per_operator_concurrency == Some(0) {
            return bad("per_operator_concurrency", "must be at least 1 (or unset for no limit)");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key go together");
        }
        if self.metrics_listen.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return bad("metrics_listen", "empty");
        }
        self.anonymise.validate().map_err(|e| ServerError::Config(format!("anonymise: {e}")))
    }
}

//! [`ServerConfig`]: what the server listens on and how much it accepts.

use std::collections::BTreeMap;

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
        self.anonymise.validate().map_err(|e| ServerError::Config(format!("anonymise: {e}")))
    }
}

//! The tests' HTTP client for ordinary requests: `ureq` (a maintained
//! client crate, plain HTTP), wrapped in the few calls the tests make.
//! Requests that must put exact bytes on the wire (garbage, slow bodies, a
//! GET with a body, non-ASCII header bytes) use raw sockets or
//! `facematch_server::client` instead (hostile.rs, fuzz.rs).

use std::net::SocketAddr;
use std::time::Duration;

use ureq::http::{HeaderName, HeaderValue, Request};

/// One response: the same type the raw client returns.
pub use facematch_server::client::Reply;

/// A client for one server (connections kept alive and reused by the agent).
#[derive(Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    headers: Vec<(String, String)>,
}

impl Client {
    /// A client for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let agent = ureq::Agent::config_builder()
            // 4xx and 5xx are answers the tests look at, not errors.
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client { base: format!("http://{addr}"), agent, headers: Vec::new() }
    }

    /// Add a header sent with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Send one request and read its whole response.
    pub fn request(&mut self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> std::io::Result<Reply> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (n, v) in &self.headers {
            req = req.header(
                HeaderName::from_bytes(n.as_bytes()).map_err(std::io::Error::other)?,
                HeaderValue::from_bytes(v.as_bytes()).map_err(std::io::Error::other)?,
            );
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let res = if body.is_empty() && !matches!(method, "POST" | "PUT" | "PATCH") {
            self.agent.run(req.body(()).map_err(std::io::Error::other)?)
        } else {
            self.agent.run(req.body(body).map_err(std::io::Error::other)?)
        };
        let mut res = res.map_err(std::io::Error::other)?;
        let status = res.status().as_u16();
        let headers = res
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = res.body_mut().with_config().limit(1 << 30).read_to_vec().map_err(std::io::Error::other)?;
        Ok(Reply { status, headers, body })
    }

    /// POST a JSON value.
    pub fn post_json(&mut self, path: &str, v: &serde_json::Value) -> std::io::Result<Reply> {
        self.request("POST", path, Some("application/json"), &serde_json::to_vec(v).map_err(std::io::Error::other)?)
    }

    /// GET a path.
    pub fn get(&mut self, path: &str) -> std::io::Result<Reply> {
        self.request("GET", path, None, &[])
    }
}

//! A minimal blocking HTTP/1.1 client over one keep-alive connection, kept
//! raw on purpose: `examples/loadgen.rs` drives the server with it (one write
//! per request, no pooling or header maps in the way of the figures it
//! measures; TLS via [`Client::tls`]), and the tests that must put exact
//! bytes on the wire use it (`tests/fuzz.rs`: a GET with a body, non-ASCII
//! header bytes; [`Client::raw`]: garbage). Ordinary test requests go
//! through the `ureq` crate (`tests/common/http.rs`). Not a general client:
//! it reads `Content-Length` bodies only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

/// A connection, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "plain",
            Stream::Tls(_) => "tls",
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// One response.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body parsed as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection to one server.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<Stream>>,
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    /// Headers sent with every request (e.g. operator, purpose).
    pub headers: Vec<(String, String)>,
}

impl Client {
    /// A client for `addr` (connects on first use).
    pub fn new(addr: SocketAddr) -> Self {
        Client { addr, conn: None, tls: None, headers: Vec::new() }
    }

    /// A client speaking TLS to `addr`, checking the server's certificate
    /// for `server_name` against `config`'s roots.
    pub fn tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>, server_name: rustls::pki_types::ServerName<'static>) -> Self {
        Client { addr, conn: None, tls: Some((config, server_name)), headers: Vec::new() }
    }

    /// Add a header sent with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn connect(&mut self) -> std::io::Result<&mut BufReader<Stream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            let s = match &self.tls {
                None => Stream::Plain(s),
                Some((cfg, name)) => {
                    let c = rustls::ClientConnection::new(Arc::clone(cfg), name.clone()).map_err(std::io::Error::other)?;
                    Stream::Tls(Box::new(rustls::StreamOwned::new(c, s)))
                }
            };
            self.conn = Some(BufReader::new(s));
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Send one request and read its response. The connection is dropped on
    /// any error (the next request reconnects).
    pub fn request(&mut self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> std::io::Result<Reply> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n", self.addr, body.len());
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        for (n, v) in &self.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let r = self.exchange(head.as_bytes(), body);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    /// Send raw bytes, close the sending side and read one response (for
    /// malformed-request tests; gives up after two seconds).
    pub fn raw(&mut self, bytes: &[u8]) -> std::io::Result<Reply> {
        self.conn = None;
        let conn = self.connect()?.get_mut();
        conn.tcp().set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(bytes)?;
        conn.flush()?;
        conn.tcp().shutdown(std::net::Shutdown::Write)?;
        let r = self.exchange(&[], &[]);
        self.conn = None;
        r
    }

    fn exchange(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<Reply> {
        let conn = self.connect()?;
        let w = conn.get_mut();
        if body.len() <= 64 << 10 {
            // One write (one TLS record) for head and body.
            let mut all = Vec::with_capacity(head.len() + body.len());
            all.extend_from_slice(head);
            all.extend_from_slice(body);
            w.write_all(&all)?;
        } else {
            w.write_all(head)?;
            w.write_all(body)?;
        }
        w.flush()?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        let mut len = 0usize;
        let mut close = false;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                let (n, v) = (n.trim().to_ascii_lowercase(), v.trim().to_string());
                if n == "content-length" {
                    len = v.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad content-length"))?;
                }
                if n == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
                headers.push((n, v));
            }
        }
        let mut body = vec![0; len];
        conn.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
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

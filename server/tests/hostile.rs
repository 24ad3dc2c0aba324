//! Hostile and careless clients over real loopback sockets: half-open
//! connections, too many connections, slow bodies, idle keep-alives, one
//! operator taking every slot. Timeouts are short (a second or less) so each
//! test ends within a few seconds; nothing here times the server's speed.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use facematch_server::ServerConfig;

const HALF_HEADER: &[u8] = b"POST /v1/identify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Facematch-Oper";

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[test]
fn a_thousand_half_open_connections_are_closed_within_the_header_timeout_while_others_are_served() {
    const N: usize = 1000;
    let have = raise_fd_limit(4 * N as u64 + 256);
    // Both ends live in this process: two descriptors per connection.
    let n = if have >= 2 * N as u64 + 200 { N } else { ((have.saturating_sub(200)) / 2) as usize };
    assert!(n >= 100, "fd limit {have} too low for this test");
    if n < N {
        eprintln!("fd limit {have}: scaled down to {n} half-open connections");
    }
    let header = Duration::from_secs(1);
    let g = gallery(3);
    let cfg =
        ServerConfig { header_read_timeout: header, idle_timeout: Duration::from_secs(30), max_connections: n + 64, ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let mut good = client(&server);

    let opened = Instant::now();
    let mut slow: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = connect(server.addr());
            s.write_all(HALF_HEADER).unwrap();
            s
        })
        .collect();
    let all_sent = opened.elapsed();
    let mut open: Vec<usize> = (0..n).collect();
    let mut answered = 0;
    let deadline = Instant::now() + header + Duration::from_secs(4);
    while !open.is_empty() {
        let r = good.post_json("/v1/identify", &serde_json::json!({"embedding": vector(1)})).unwrap();
        assert_eq!(r.status, 200, "the well-behaved client was refused: {:?}", r.json());
        answered += 1;
        open.retain(|&i| !closed_now(&mut slow[i]));
        assert!(
            Instant::now() < deadline,
            "{} of {n} half-open connections still open {:?} after they were opened ({all_sent:?} to open them all)",
            open.len(),
            opened.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answered >= 2, "the good client was answered {answered} times");
    // And it is still answered once they are gone.
    assert_eq!(good.get("/v1/health").unwrap().status, 200);
    stop(server, g.engine);
}

#[test]
fn past_the_connection_cap_new_connections_are_closed_old_ones_served_and_accepted_again_once_slow_ones_go() {
    let g = gallery(3);
    let cfg = ServerConfig {
        max_connections: 4,
        header_read_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    // Two well-behaved keep-alive clients, two slow ones: the cap is reached.
    let mut good: Vec<_> = (0..2).map(|_| client(&server)).collect();
    for c in &mut good {
        assert_eq!(c.get("/v1/health").unwrap().status, 200);
    }
    let mut slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = connect(server.addr());
            s.write_all(HALF_HEADER).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));

    // A fifth connection is closed at once, unanswered.
    let mut extra = connect(server.addr());
    let _ = extra.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(closed_within(&mut extra, Duration::from_millis(500)), "a connection past the cap was kept open");

    // The open ones are still served.
    for c in &mut good {
        let r = c.post_json("/v1/identify", &serde_json::json!({"embedding": vector(2)})).unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    // The slow ones are cut by the header timeout; then new connections are accepted again.
    for s in &mut slow {
        assert!(closed_within(s, Duration::from_secs(3)), "a slow connection outlived the header timeout");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut fresh = client(&server);
        match fresh.get("/v1/health") {
            Ok(r) if r.status == 200 => break,
            _ => assert!(Instant::now() < deadline, "no new connection accepted after the slow ones were closed"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(server, g.engine);
}

#[test]
fn a_slow_body_is_cut_off_with_408_and_the_connection_closed() {
    let g = gallery(3);
    let cfg = ServerConfig { body_timeout: Duration::from_millis(500), ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let mut s = connect(server.addr());
    s.write_all(b"POST /v1/identify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Facematch-Operator: officer-7\r\nX-Facematch-Purpose: door-access\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{\"embedding\": [0.1,").unwrap();
    // Drip a byte now and then: the body timeout is for the whole body.
    let started = Instant::now();
    let mut dripping = true;
    while dripping && started.elapsed() < Duration::from_millis(400) {
        dripping = s.write_all(b"0").is_ok();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = Client::new(server.addr());
    drop(c.get("/v1/health")); // the server still answers others meanwhile
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => {
                assert!(
                    !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                    "the slow body was not cut off"
                );
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&head);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert_eq!(c.get("/v1/health").unwrap().status, 200);
    stop(server, g.engine);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let g = gallery(0);
    let cfg = ServerConfig { idle_timeout: Duration::from_millis(500), ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let mut s = connect(server.addr());
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(closed_within(&mut s, Duration::from_secs(3)), "an idle keep-alive connection was kept");
    stop(server, g.engine);
}

#[test]
fn one_operator_cannot_take_every_slot() {
    let g = gallery(3);
    let cfg = ServerConfig { per_operator_concurrency: Some(1), body_timeout: Duration::from_secs(1), ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    // officer-7 has one request in progress (its body still coming) ...
    let mut busy = connect(server.addr());
    busy.write_all(b"POST /v1/identify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Facematch-Operator: officer-7\r\nX-Facematch-Purpose: door-access\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    // ... so a second one is refused, while another operator is served.
    let mut same = client(&server);
    let r = same.post_json("/v1/identify", &serde_json::json!({"embedding": vector(1)})).unwrap();
    assert_eq!(r.status, 429, "{:?}", r.json());
    assert_eq!(r.json()["error"], "too_many_requests");
    let mut other = Client::new(server.addr()).with_header("X-Facematch-Operator", "officer-8").with_header("X-Facematch-Purpose", PURPOSE);
    assert_eq!(other.post_json("/v1/identify", &serde_json::json!({"embedding": vector(1)})).unwrap().status, 200);
    // Once the first is cut off (body timeout), officer-7 is served again.
    assert!(closed_within(&mut busy, Duration::from_secs(3)));
    let r = same.post_json("/v1/identify", &serde_json::json!({"embedding": vector(1)})).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    stop(server, g.engine);
}

#[test]
fn a_keep_alive_connection_idles_up_to_the_idle_timeout_not_the_header_timeout() {
    let g = gallery(0);
    let cfg = ServerConfig { header_read_timeout: Duration::from_millis(300), idle_timeout: Duration::from_secs(3), ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let mut s = connect(server.addr());
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        std::thread::sleep(Duration::from_millis(900));
    }
    stop(server, g.engine);
}

#[test]
fn a_header_dripped_a_byte_at_a_time_after_a_first_request_is_cut_at_the_header_timeout() {
    let g = gallery(0);
    let cfg = ServerConfig { header_read_timeout: Duration::from_millis(500), idle_timeout: Duration::from_secs(30), ..Default::default() };
    let server = serve(Arc::clone(&g.engine), None, cfg);
    let mut s = connect(server.addr());
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if s.write_all(&[*b]).is_err() || closed_now(&mut s) {
            cut = true;
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(4), "the dripped header was never cut");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cut || closed_within(&mut s, Duration::from_secs(2)), "the dripped header was never cut");
    stop(server, g.engine);
}

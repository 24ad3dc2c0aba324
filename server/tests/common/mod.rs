//! Shared helpers for the server's tests: a small gallery, seeded vectors, a server in-process.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder};
use facematch::store::MasterKey;
use facematch_server::{Server, ServerConfig};

mod http;
#[allow(unused_imports)]
pub use http::{Client, Reply};

pub const DIM: usize = 16;
pub const PURPOSE: &str = "door-access";

/// A gallery of `DIM`-d templates with one purpose.
pub fn gallery_config() -> GalleryConfig {
    let mut cfg = GalleryConfig { dim: DIM, model_id: "test-model".into(), ..Default::default() };
    cfg.purposes.push(PurposePolicy::new(Purpose::new(PURPOSE).unwrap(), 365));
    cfg
}

pub fn create(dir: &Path, key: &MasterKey) -> Engine {
    EngineBuilder::new(dir).key(key.clone()).allow_core_dumps(true).create(gallery_config()).unwrap()
}

/// A seeded unit vector (splitmix64 -> uniform in [-1, 1), normalised).
pub fn vector(seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<f32> = (0..DIM)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// `v` moved a little (same person, another photo).
pub fn near(v: &[f32], seed: u64) -> Vec<f32> {
    let noise = vector(seed ^ 0xABCD);
    let w: Vec<f32> = v.iter().zip(&noise).map(|(a, b)| a + 0.15 * b).collect();
    let n = w.iter().map(|x| x * x).sum::<f32>().sqrt();
    w.into_iter().map(|x| x / n).collect()
}

/// Record consent and enrol `n` people (`p0`, `p1`, ...) through the library.
pub fn enrol_people(e: &Engine, n: u64) {
    let op = Operator::new("registrar").unwrap();
    let door = Purpose::new(PURPOSE).unwrap();
    let consents = (0..n)
        .map(|i| {
            ConsentRecord::new(
                format!("c{i}"),
                &format!("p{i}"),
                ConsentBasis::SeparateConsent,
                vec![door.clone()],
                "registrar",
                AgeBracket::Adult,
            )
        })
        .collect();
    e.record_consents(&op, consents).unwrap();
    let batch = (0..n)
        .map(|i| {
            facematch::engine::Enrolment::new(SubjectId::new(format!("p{i}")).unwrap(), format!("c{i}"), vec![door.clone()], vector(i))
        })
        .collect();
    e.enrol_batch(&op, batch).unwrap();
}

/// A gallery in a temporary directory with `people` enrolled (`p0`, `p1`, ...).
pub struct Gallery {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub key: MasterKey,
    pub engine: Arc<Engine>,
}

pub fn gallery(people: u64) -> Gallery {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("g"), MasterKey::generate());
    let engine = create(&dir, &key);
    if people > 0 {
        enrol_people(&engine, people);
    }
    Gallery { _tmp: tmp, dir, key, engine: Arc::new(engine) }
}

/// Stop the server, then close the engine it served (every record durable).
pub fn stop(server: Server, engine: Arc<Engine>) {
    server.shutdown().unwrap();
    Arc::try_unwrap(engine).unwrap().close().unwrap();
}

/// A server on a free port over `engine`.
pub fn serve(engine: Arc<Engine>, pipeline: Option<Arc<facematch::pipeline::FacePipeline>>, cfg: ServerConfig) -> Server {
    let cfg = ServerConfig { listen: "127.0.0.1:0".into(), workers: 2, ..cfg };
    Server::start(engine, pipeline, cfg).unwrap()
}

/// A client sending the operator and purpose headers.
pub fn client(server: &Server) -> Client {
    Client::new(server.addr()).with_header("X-Facematch-Operator", "officer-7").with_header("X-Facematch-Purpose", PURPOSE)
}

pub fn embedding_json(v: &[f32]) -> serde_json::Value {
    serde_json::json!(v)
}

/// Raise this process's soft file-descriptor limit towards `want` (up to the
/// hard limit); returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            let raised = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Whether the server has closed `s` (EOF or reset), reading and dropping
/// anything it sent first; `false` if it is still open after `wait`.
pub fn closed_within(s: &mut std::net::TcpStream, wait: std::time::Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Whether `s` is already closed by the server, without waiting.
pub fn closed_now(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let r = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    r
}

//! Never destroy, never follow, never leak: how the gallery touches files.
//!
//! A one-byte fault, a planted link, a default umask, a FIFO: each case is
//! reproduced and must now be refused or handled without harm.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use facematch::engine::{EngineBuilder, Query};
use facematch::store::MasterKey;
use facematch::Error;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// A gallery of `n` people (templates 1..=n for subjects p0..), p3 withdrawn, snapshot current.
fn gallery(dir: &Path, key: &MasterKey, n: u64) {
    let e = create(dir, key, clock());
    for i in 0..n {
        enrol(&e, &format!("p{i}"), &["payment"], vector(i));
    }
    e.withdraw(&op(), &subject("p3")).unwrap();
    e.checkpoint().unwrap();
    e.close().unwrap();
}

/// Byte offsets of the frames of a template log (header 32 bytes, frames u32 len | u32 crc | body).
fn frame_offsets(log: &[u8]) -> Vec<usize> {
    let mut at = 32;
    let mut out = vec![];
    while at + 8 <= log.len() {
        out.push(at);
        at += 8 + u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
    }
    out
}

#[test]
fn a_flipped_length_byte_is_refused_with_its_offset_and_changes_nothing() {
    for keep_snapshot in [true, false] {
        let t = tempfile::tempdir().unwrap();
        let key = MasterKey::generate();
        gallery(t.path(), &key, 30);
        if !keep_snapshot {
            std::fs::remove_file(t.path().join("index.snap")).unwrap();
        }
        let logp = t.path().join("templates.log");
        let mut log = std::fs::read(&logp).unwrap();
        let frames = frame_offsets(&log);
        let at = frames[10];
        log[at + 2] ^= 0x01; // frame 10 now claims to run 128 KiB past the end
        std::fs::write(&logp, &log).unwrap();
        let before = snapshot(t.path());
        let r = open(t.path(), &key, clock());
        match r {
            Err(Error::DataCorruption { reason, .. }) => {
                assert!(reason.contains(&format!("byte {at}")), "snapshot {keep_snapshot}: {reason}");
            }
            other => panic!("snapshot {keep_snapshot}: expected DataCorruption, got {:?}", other.map(|e| e.stats().templates)),
        }
        assert_eq!(
            changed(&before, &snapshot(t.path())),
            Vec::<PathBuf>::new(),
            "snapshot {keep_snapshot}: the refused open changed files"
        );
    }
}

#[test]
fn a_torn_append_is_ignored_on_open_and_cut_by_the_next_write() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key, 5);
    let logp = t.path().join("templates.log");
    let good = std::fs::read(&logp).unwrap();
    // A crash in the middle of appending a frame: its head and part of its body.
    let mut torn = good.clone();
    torn.extend_from_slice(&[0xe0, 0x03, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    std::fs::write(&logp, &torn).unwrap();
    let e = open(t.path(), &key, clock()).unwrap();
    let tail = e.open_report().torn_log_tail.clone().unwrap();
    assert_eq!((tail.bytes_dropped, tail.at), (12, good.len() as u64));
    assert_eq!(std::fs::read(&logp).unwrap(), torn, "open changed the log");
    assert_eq!(e.stats().templates, 4);
    enrol(&e, "late", &["payment"], vector(99));
    e.close().unwrap();
    let e = open(t.path(), &key, clock()).unwrap();
    assert!(e.open_report().torn_log_tail.is_none());
    assert_eq!(e.stats().templates, 5);
}

/// Plant `link` (relative to the gallery) pointing at `target`.
fn plant(g: &Path, link: &str, target: &Path) {
    std::os::unix::fs::symlink(target, g.join(link)).unwrap();
}

#[test]
fn links_at_every_leftover_and_temporary_name_are_never_followed() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g = t.path().join("g");
    gallery(&g, &key, 6);
    let victims = t.path().join("victims");
    std::fs::create_dir(&victims).unwrap();
    // A directory that looks like a gallery's staging, outside.
    for name in ["templates.log", "index.snap", "gallery.json", "COMMIT"] {
        std::fs::write(victims.join(name), format!("victim {name}")).unwrap();
    }
    let victim = victims.join("file");
    std::fs::write(&victim, b"precious").unwrap();
    let before = snapshot(&victims);

    plant(&g, "templates.log.new", &victim);
    plant(&g, "index.snap.tmp", &victim);
    plant(&g, "gallery.json.tmp", &victim);
    plant(&g, "rotate.new", &victims);
    plant(&g, "audit/HEAD.tmp", &victim);
    plant(&g, "audit/RETIRED.tmp", &victim);

    // A read-only command: the links are reported, never followed.
    let e = open(&g, &key, clock()).unwrap();
    let left = e.open_report().left_alone.join("\n");
    for name in ["templates.log.new", "index.snap.tmp", "rotate.new"] {
        assert!(left.contains(name), "{name} not reported: {left}");
    }
    assert_eq!(e.stats().templates, 5);
    // Writes that reuse the names refuse clearly instead of following.
    let r = e.compact(&op());
    assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
    let r = e.rotate_key(&op(), MasterKey::generate());
    assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
    // HEAD and the manifest are rewritten through their temporary names: the links there are unlinked.
    e.set_threshold(&op(), &purpose("payment"), facematch::compliance::Mode::Identify, 0.5).unwrap();
    // A snapshot needs index.snap.tmp: refused; the one tried again at close
    // too, and the audit log is still closed cleanly.
    assert!(matches!(e.checkpoint(), Err(Error::UnsafePath { .. })));
    assert!(matches!(e.close(), Err(Error::UnsafePath { .. })));
    assert_eq!(changed(&before, &snapshot(&victims)), Vec::<PathBuf>::new(), "a file outside the gallery changed");

    // Hard links: a second name of the victim inside the gallery is never written or shredded.
    for name in ["templates.log.new", "index.snap.tmp", "rotate.new"] {
        std::fs::remove_file(g.join(name)).unwrap();
    }
    std::fs::hard_link(&victim, g.join("templates.log.new")).unwrap();
    std::fs::hard_link(&victim, g.join("index.snap.tmp")).unwrap();
    let e = open(&g, &key, clock()).unwrap();
    assert_eq!(e.open_report().left_alone.len(), 2, "{:?}", e.open_report().left_alone);
    assert!(matches!(e.compact(&op()), Err(Error::UnsafePath { .. })));
    assert!(matches!(e.checkpoint(), Err(Error::UnsafePath { .. })));
    assert!(matches!(e.close(), Err(Error::UnsafePath { .. })));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // The store's own files as links or hard links: refused, not followed.
    std::fs::remove_file(g.join("templates.log.new")).unwrap();
    std::fs::remove_file(g.join("index.snap.tmp")).unwrap();
    let real = g.join("templates.log");
    std::fs::hard_link(&real, t.path().join("second-name")).unwrap();
    assert!(matches!(open(&g, &key, clock()), Err(Error::UnsafePath { .. })));
    std::fs::remove_file(t.path().join("second-name")).unwrap();
    std::fs::rename(&real, t.path().join("moved.log")).unwrap();
    plant(&g, "templates.log", &t.path().join("moved.log"));
    assert!(matches!(open(&g, &key, clock()), Err(Error::UnsafePath { .. })));
    std::fs::remove_file(&real).unwrap();
    std::fs::rename(t.path().join("moved.log"), &real).unwrap();
    // Once the planted entries are gone, everything works again.
    let e = open(&g, &key, clock()).unwrap();
    assert!(e.open_report().left_alone.is_empty());
    e.compact(&op()).unwrap();
    e.close().unwrap();
    assert_eq!(changed(&before, &snapshot(&victims)), Vec::<PathBuf>::new());
}

fn fm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_facematch"));
    c.env("FACEMATCH_OPERATOR", "files-test").env_remove("FACEMATCH_KEY");
    c
}

/// Run the CLI under `sh` with umask 022 (the common default).
fn fm_umask(args: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("umask 022; exec \"{}\" {args}", env!("CARGO_BIN_EXE_facematch")))
        .env("FACEMATCH_OPERATOR", "files-test")
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn everything_is_private_under_umask_022() {
    let t = tempfile::tempdir().unwrap();
    let (k, g, x) = (t.path().join("key"), t.path().join("g"), t.path().join("export"));
    let (k, g, x) = (k.to_str().unwrap(), g.to_str().unwrap(), x.to_str().unwrap());
    assert!(fm_umask(&format!("keygen --out {k}")).status.success());
    let o = fm_umask(&format!("init -g {g} --key-file {k} --dim 8 --model-id m --purpose door-access:30"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let npy = t.path().join("e.npy");
    let v: Vec<f32> = (0..16).map(|i| ((i * 7 % 5) as f32) - 2.0 + 0.1).collect();
    facematch::npy::write_f32_matrix(&npy, &v, 2, 8).unwrap();
    let m = t.path().join("m.txt");
    std::fs::write(&m, "a\nb\n").unwrap();
    let o = fm_umask(&format!(
        "import -g {g} --key-file {k} --embeddings {} --manifest {} --purpose door-access --consent-basis written",
        npy.display(),
        m.display()
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fm_umask(&format!("export -g {g} --key-file {k} --out {x}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for root in [Path::new(g), Path::new(x)] {
        assert_eq!(mode(root), 0o700, "{}", root.display());
        for (p, _) in snapshot(root) {
            let want = if p.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&p), want, "{}", p.display());
        }
    }
    assert_eq!(mode(&Path::new(g).join("audit")), 0o700);
    // A gallery made loose by hand is tightened on the next open, and the CLI says so.
    std::fs::set_permissions(g, std::fs::Permissions::from_mode(0o755)).unwrap();
    let seg = Path::new(g).join("audit/seg-000000.log");
    std::fs::set_permissions(&seg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = fm_umask(&format!("stats -g {g} --key-file {k}"));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("tightened"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!((mode(Path::new(g)), mode(&seg)), (0o700, 0o600));
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// Run with a deadline; the process must finish well within it.
fn run_bounded(mut c: Command, limit: Duration) -> (bool, String, Duration) {
    let t0 = Instant::now();
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (st.success(), err, t0.elapsed());
        }
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("{c:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fifos_and_devices_as_inputs_are_clear_errors_that_do_not_block() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("key");
    let g = t.path().join("g");
    assert!(fm().args(["keygen", "--out"]).arg(&key).status().unwrap().success());
    let ok = fm()
        .args(["init", "-g"])
        .arg(&g)
        .arg("--key-file")
        .arg(&key)
        .args(["--dim", "8", "--model-id", "m", "--purpose", "door-access:30"])
        .status();
    assert!(ok.unwrap().success());
    let fifo = t.path().join("fifo");
    mkfifo(&fifo);
    let npy = t.path().join("e.npy");
    facematch::npy::write_f32_matrix(&npy, &[0.5f32; 8], 1, 8).unwrap();

    // FIFO as key file, as manifest, as embeddings; /dev/zero as key and manifest.
    let cases: Vec<(&str, Vec<std::ffi::OsString>)> = vec![
        ("fifo key", vec!["stats".into(), "-g".into(), g.clone().into(), "--key-file".into(), fifo.clone().into()]),
        ("zero key", vec!["stats".into(), "-g".into(), g.clone().into(), "--key-file".into(), "/dev/zero".into()]),
        (
            "fifo manifest",
            vec![
                "import".into(),
                "-g".into(),
                g.clone().into(),
                "--key-file".into(),
                key.clone().into(),
                "--embeddings".into(),
                npy.clone().into(),
                "--manifest".into(),
                fifo.clone().into(),
                "--purpose".into(),
                "door-access".into(),
                "--consent-basis".into(),
                "written".into(),
            ],
        ),
        (
            "zero manifest",
            vec![
                "import".into(),
                "-g".into(),
                g.clone().into(),
                "--key-file".into(),
                key.clone().into(),
                "--embeddings".into(),
                npy.clone().into(),
                "--manifest".into(),
                "/dev/zero".into(),
                "--purpose".into(),
                "door-access".into(),
                "--consent-basis".into(),
                "written".into(),
            ],
        ),
        (
            "fifo embeddings",
            vec![
                "search".into(),
                "-g".into(),
                g.clone().into(),
                "--key-file".into(),
                key.clone().into(),
                "--embeddings".into(),
                fifo.clone().into(),
                "--purpose".into(),
                "door-access".into(),
            ],
        ),
    ];
    for (what, args) in cases {
        let mut c = fm();
        c.args(&args);
        let (ok, err, took) = run_bounded(c, Duration::from_secs(20));
        assert!(!ok, "{what}: succeeded");
        assert!(err.contains("not a regular file") || err.contains("FIFO") || err.contains("device"), "{what}: unclear error: {err}");
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
    }
    // The gallery lock was released each time: a normal command runs.
    let (ok, err, _) = run_bounded(
        {
            let mut c = fm();
            c.args(["stats", "-g"]).arg(&g).arg("--key-file").arg(&key);
            c
        },
        Duration::from_secs(20),
    );
    assert!(ok, "{err}");
    // The library refuses a FIFO image before it can block.
    let r = facematch::image_io::decode_path(&fifo, &Default::default());
    assert!(matches!(r, Err(Error::UnsafePath { .. })), "{r:?}");
}

/// What must hold after any single fault: the gallery either refuses to
/// open, leaving every file exactly as it was, or opens with every
/// acknowledged template and erasure (and then the primary files unchanged).
#[test]
fn single_byte_flips_and_truncations_never_destroy_or_lose_anything() {
    let base = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g0 = base.path().join("g0");
    gallery(&g0, &key, 12);
    let files: Vec<PathBuf> = snapshot(&g0)
        .into_keys()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n == "templates.log" || n == "index.snap" || n == "gallery.json" || n.starts_with("seg-")
        })
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    let mut runner =
        TestRunner::new_with_rng(Config { cases: 120, ..Config::default() }, TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]));
    let strategy = (0..files.len(), any::<prop::sample::Index>(), 1u8..=255, any::<bool>());
    let outcomes = std::cell::RefCell::new(BTreeMap::<String, usize>::new());
    runner
        .run(&strategy, |(fi, at, flip, truncate)| {
            let t = tempfile::tempdir().unwrap();
            let g = t.path().join("g");
            copy_dir(&g0, &g);
            let target = g.join(files[fi].strip_prefix(&g0).unwrap());
            let mut bytes = std::fs::read(&target).unwrap();
            let at = at.index(bytes.len());
            if truncate {
                bytes.truncate(at);
            } else {
                bytes[at] ^= flip;
            }
            std::fs::write(&target, &bytes).unwrap();
            let before = snapshot(&g);
            let name = target.file_name().unwrap().to_string_lossy().into_owned();
            let kind = if truncate { "truncate" } else { "flip" };
            match EngineBuilder::new(&g).key(key.clone()).clock(clock()).open() {
                Err(e) => {
                    let diff = changed(&before, &snapshot(&g));
                    prop_assert!(diff.is_empty(), "{} {} at {} refused ({}) but changed {:?}", kind, name, at, e, diff);
                    *outcomes.borrow_mut().entry(format!("{kind} {} refused", short(&name))).or_default() += 1;
                }
                Ok(e) => {
                    let s = e.stats();
                    prop_assert_eq!(s.templates, 11, "{} {} at {}: opened with {} templates", kind, name, at, s.templates);
                    let v = e.query(&ctx("payment"), Query::verify(&vector(3), &subject("p3")));
                    prop_assert!(
                        matches!(v, Err(Error::UnknownSubject(_))) || v.as_ref().is_ok_and(|v| !v.decision.is_match()),
                        "{} {} at {}: the withdrawn subject is back",
                        kind,
                        name,
                        at
                    );
                    drop(e);
                    let after = snapshot(&g);
                    for f in ["templates.log", "gallery.json"] {
                        let p = g.join(f);
                        prop_assert!(after.get(&p) == before.get(&p), "{} {} at {}: open changed {}", kind, name, at, f);
                    }
                    *outcomes.borrow_mut().entry(format!("{kind} {} opened", short(&name))).or_default() += 1;
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("outcomes: {:?}", outcomes.borrow());
}

fn short(name: &str) -> &str {
    if name.starts_with("seg-") {
        "audit segment"
    } else {
        name
    }
}

#[test]
fn repair_cuts_a_damaged_log_keeps_what_it_removes_and_erasures_still_hold() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g = t.path().join("g");
    gallery(&g, &key, 12); // p3 withdrawn (its erasure is the log's last frame)
    let logp = g.join("templates.log");
    let mut log = std::fs::read(&logp).unwrap();
    let frames = frame_offsets(&log);
    // Damage frame 20 of 25: open refuses, and so would any later one.
    let at = frames[20];
    log[at + 1] ^= 0x40;
    std::fs::write(&logp, &log).unwrap();
    assert!(matches!(open(&g, &key, clock()), Err(Error::DataCorruption { .. })));

    // A dry run changes nothing.
    let before = snapshot(&g);
    let r = EngineBuilder::new(&g).key(key.clone()).clock(clock()).repair(&op(), false).unwrap();
    assert!(!r.applied && !r.plan.is_empty(), "{r:?}");
    assert_eq!(changed(&before, &snapshot(&g)), Vec::<PathBuf>::new());

    let r = EngineBuilder::new(&g).key(key.clone()).clock(clock()).repair(&op(), true).unwrap();
    assert!(r.applied);
    assert!(
        r.plan.actions.iter().any(|a| matches!(a, facematch::store::repair::RepairAction::CutLog { at: cut, .. } if *cut == at as u64)),
        "{r:?}"
    );
    // What was cut is kept, byte for byte.
    let kept = std::fs::read(r.repair_dir.as_ref().unwrap().join(format!("templates.log.from-byte-{at}"))).unwrap();
    assert!(kept == log[at..], "the copy of the cut bytes differs");
    // The log keeps its good prefix (then the re-applied erasure is appended).
    assert!(std::fs::read(&logp).unwrap().starts_with(&log[..at]));
    // The withdrawal's frame was cut, but the audit log records it: p3 stays erased.
    let e = open(&g, &key, clock()).unwrap();
    assert!(e.templates_of(&subject("p3")).is_empty());
    assert!(!e.query(&ctx("payment"), Query::verify(&vector(3), &subject("p3"))).map(|v| v.decision.is_match()).unwrap_or(false));
    let recs = facematch::audit::AuditLog::read(&e.audit_dir(), &Default::default()).unwrap();
    assert!(recs.iter().any(|r| matches!(&r.event, facematch::audit::AuditEvent::Admin { action, .. } if action == "repair")));
    e.close().unwrap();
    let v = facematch::audit::AuditLog::verify(&g.join("audit"), &facematch::audit::AuditKey::from_bytes(key.audit_key_bytes())).unwrap();
    assert!(v.ok(), "{v:?}");
}

#[test]
fn damage_to_the_last_audit_checkpoint_is_refused_not_cut_as_a_torn_tail() {
    let base = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g0 = base.path().join("g0");
    gallery(&g0, &key, 4);
    let seg = g0.join("audit/seg-000000.log");
    let good = std::fs::read(&seg).unwrap();
    let data_end = good.iter().rposition(|&b| b != 0).unwrap() + 1;
    let last_line = good[..data_end - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    assert!(good[last_line..].starts_with(b"{\"type\":\"checkpoint\""));
    for (what, at, to) in [
        ("final newline", data_end - 1, b'x'),
        ("NUL inside the checkpoint", last_line + 30, 0u8),
        ("newline inside the checkpoint", last_line + 30, b'\n'),
    ] {
        let t = tempfile::tempdir().unwrap();
        let g = t.path().join("g");
        copy_dir(&g0, &g);
        let mut bad = good.clone();
        bad[at] = to;
        std::fs::write(g.join("audit/seg-000000.log"), &bad).unwrap();
        let before = snapshot(&g);
        let r = open(&g, &key, clock());
        assert!(r.is_err(), "{what}: opened");
        assert_eq!(changed(&before, &snapshot(&g)), Vec::<PathBuf>::new(), "{what}: files changed");
    }
}

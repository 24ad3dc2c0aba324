//! The gallery as one tamper-evident whole: the authenticated manifest (format 2) binds the
//! configuration, the template log and the audit log together, so that edits, restores,
//! rollbacks and other galleries' files are refused, and erasure survives a restored log.

mod common;
use common::*;

use std::path::Path;

use facematch::audit::{AuditEvent, AuditKey, AuditLog};
use facematch::compliance::Mode;
use facematch::engine::{EngineBuilder, Query};
use facematch::store::MasterKey;
use facematch::Error;

/// Twenty people enrolled for payment, closed.
fn gallery(dir: &Path, key: &MasterKey) {
    let e = create(dir, key, clock());
    for i in 0..20 {
        enrol(&e, &format!("s{i}"), &["payment"], vector(i));
    }
    e.close().unwrap();
}

/// Open must fail and leave every file as it was.
fn refused(dir: &Path, key: &MasterKey) -> Error {
    let before = snapshot(dir);
    let r = open(dir, key, clock());
    assert_eq!(changed(&before, &snapshot(dir)), Vec::<std::path::PathBuf>::new(), "a refused open changed files");
    match r {
        Err(e) => e,
        Ok(e) => panic!("opened with {} templates", e.stats().templates),
    }
}

#[test]
fn a_hand_edited_threshold_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    let m = t.path().join("gallery.json");
    let orig = std::fs::read_to_string(&m).unwrap();
    // A plain value edit that still parses.
    let v: serde_json::Value = serde_json::from_str(&orig).unwrap();
    let mut v2 = v.clone();
    v2["config"]["purposes"][1]["identify_threshold"] = serde_json::json!(-1.0);
    std::fs::write(&m, serde_json::to_string_pretty(&v2).unwrap()).unwrap();
    let e = refused(t.path(), &key);
    assert!(e.to_string().contains("changed outside facematch"), "{e}");
    // Through the API it works, and is audited.
    std::fs::write(&m, &orig).unwrap();
    let e = open(t.path(), &key, clock()).unwrap();
    e.set_threshold(&op(), &purpose("payment"), Mode::Identify, 0.5).unwrap();
    e.close().unwrap();
    assert!(open(t.path(), &key, clock()).is_ok());
}

#[test]
fn a_deleted_or_rolled_back_audit_log_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g = t.path().join("g");
    gallery(&g, &key);
    // rm -rf audit: refused, nothing recreated.
    let aside = t.path().join("audit-copy");
    copy_dir(&g.join("audit"), &aside);
    std::fs::remove_dir_all(g.join("audit")).unwrap();
    let e = refused(&g, &key);
    assert!(matches!(e, Error::AuditTampered { .. }), "{e}");
    assert!(!g.join("audit").exists());
    copy_dir(&aside, &g.join("audit"));

    // Copy aside, work (searches and a withdrawal), put the old copy back: refused.
    let e = open(&g, &key, clock()).unwrap();
    for i in 0..30 {
        e.query(&ctx("payment"), Query::identify(&vector(i), 3)).unwrap();
    }
    e.withdraw(&op(), &subject("s7")).unwrap();
    e.close().unwrap();
    std::fs::remove_dir_all(g.join("audit")).unwrap();
    copy_dir(&aside, &g.join("audit"));
    let e = refused(&g, &key);
    assert!(matches!(e, Error::AuditTampered { .. }), "{e}");
}

#[test]
fn another_gallerys_files_with_the_same_key_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    gallery(&a, &key);
    gallery(&b, &key);
    for (name, is_dir) in [("templates.log", false), ("gallery.json", false), ("audit", true)] {
        let t2 = tempfile::tempdir().unwrap();
        let g = t2.path().join("g");
        copy_dir(&a, &g);
        if is_dir {
            std::fs::remove_dir_all(g.join(name)).unwrap();
            copy_dir(&b.join(name), &g.join(name));
        } else {
            std::fs::copy(b.join(name), g.join(name)).unwrap();
        }
        let e = refused(&g, &key);
        assert!(matches!(e, Error::DataCorruption { .. } | Error::AuditTampered { .. }), "{name}: {e}");
    }
}

#[test]
fn a_restored_pre_withdrawal_log_is_refused_and_repair_erases_again() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g = t.path().join("g");
    gallery(&g, &key);
    let backup = t.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    for f in ["templates.log", "index.snap"] {
        std::fs::copy(g.join(f), backup.join(f)).unwrap();
    }
    let e = open(&g, &key, clock()).unwrap();
    e.withdraw(&op(), &subject("s7")).unwrap();
    e.close().unwrap();
    for f in ["templates.log", "index.snap"] {
        std::fs::copy(backup.join(f), g.join(f)).unwrap();
    }
    let e = refused(&g, &key);
    assert!(e.to_string().contains("repair"), "{e}");

    let r = EngineBuilder::new(&g).key(key.clone()).clock(clock()).repair(&op(), true).unwrap();
    assert_eq!(r.erasures_reapplied.len(), 1, "{r:?}");
    let e = open(&g, &key, clock()).unwrap();
    assert!(e.templates_of(&subject("s7")).is_empty(), "the withdrawn person is back");
    assert_eq!(e.stats().templates, 19);
    let v = e.query(&ctx("payment"), Query::identify(&vector(7), 3)).unwrap();
    assert!(v.candidates.iter().all(|c| c.subject.as_str() != "s7"));
    e.close().unwrap();
    let v = AuditLog::verify(&g.join("audit"), &AuditKey::from_bytes(key.audit_key_bytes())).unwrap();
    assert!(v.ok(), "{v:?}");
}

#[test]
fn a_format_1_gallery_is_upgraded_on_open_and_audited() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    // What a format-1 manifest looked like: no id, no bindings, no MAC.
    let m = t.path().join("gallery.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    for k in ["gallery_id", "generation", "bound", "mac"] {
        o.remove(k);
    }
    o.insert("version".into(), serde_json::json!(1));
    std::fs::write(&m, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    let e = open(t.path(), &key, clock()).unwrap();
    assert_eq!(e.open_report().upgraded_from, Some(1));
    assert_eq!(e.stats().templates, 20);
    e.close().unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
    assert_eq!(v["version"], 2);
    assert!(v["mac"].is_string() && v["gallery_id"].is_string());
    let recs = AuditLog::read(&t.path().join("audit"), &Default::default()).unwrap();
    assert!(recs.iter().any(|r| matches!(&r.event, AuditEvent::Admin { action, .. } if action == "format-upgrade")));
    let e = open(t.path(), &key, clock()).unwrap();
    assert_eq!(e.open_report().upgraded_from, None);
}

#[test]
fn compaction_and_key_rotation_keep_the_bindings() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    let e = open(t.path(), &key, clock()).unwrap();
    e.withdraw(&op(), &subject("s1")).unwrap();
    e.compact(&op()).unwrap();
    let new = MasterKey::generate();
    e.rotate_key(&op(), new.clone()).unwrap();
    e.close().unwrap();
    let e = open(t.path(), &new, clock()).unwrap();
    assert_eq!(e.stats().templates, 19);
    e.close().unwrap();
    // A crash between a compaction's rename and its manifest update: the manifest accepts the new log.
    let e = open(t.path(), &new, clock()).unwrap();
    e.withdraw(&op(), &subject("s2")).unwrap();
    facematch::failpoints::enable("compact/renamed");
    assert!(e.compact(&op()).is_err());
    facematch::failpoints::disable_all();
    drop(e); // the crash
    let e = open(t.path(), &new, clock()).unwrap();
    assert_eq!(e.stats().templates, 18);
    assert!(e.templates_of(&subject("s2")).is_empty());
}

fn audit_ok(g: &Path, key: &MasterKey) {
    let v = AuditLog::verify(&g.join("audit"), &AuditKey::from_bytes(key.audit_key_bytes())).unwrap();
    assert!(v.ok(), "{v:?}");
}

fn admin_actions(g: &Path) -> Vec<String> {
    AuditLog::read(&g.join("audit"), &Default::default())
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Admin { action, .. } => Some(action),
            _ => None,
        })
        .collect()
}

#[test]
fn a_crash_between_a_withdrawal_record_and_the_erasure_is_completed_on_open() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    let e = open(t.path(), &key, clock()).unwrap();
    facematch::failpoints::enable("withdraw/recorded");
    assert!(e.withdraw(&op(), &subject("s5")).is_err());
    facematch::failpoints::disable_all();
    drop(e); // the crash: the record is durable, the erasure is not
    let e = open(t.path(), &key, clock()).unwrap();
    assert!(!e.open_report().reconciled.is_empty(), "{:?}", e.open_report());
    assert!(e.templates_of(&subject("s5")).is_empty(), "a recorded withdrawal was not applied");
    assert!(e.consents_of(&subject("s5")).iter().all(|c| c.withdrawn_at_ms.is_some()));
    e.close().unwrap();
    audit_ok(t.path(), &key);
    assert!(admin_actions(t.path()).contains(&"reconciled-on-open".to_string()));
    // Reconciled once: the next open has nothing to do.
    assert!(open(t.path(), &key, clock()).unwrap().open_report().reconciled.is_empty());
}

#[test]
fn enrolments_whose_write_failed_are_recorded_as_not_made() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    // A full disk at the template log: the call fails, the records say so, nothing is stored.
    let e = open(t.path(), &key, clock()).unwrap();
    consent(&e, "late", &["payment"], facematch::compliance::AgeBracket::Adult).unwrap();
    facematch::failpoints::enable("log/enospc");
    let r = e.enrol(&op(), facematch::engine::Enrolment::new(subject("late"), "consent-late", vec![purpose("payment")], vector(77)));
    facematch::failpoints::disable_all();
    assert!(r.is_err());
    assert!(e.templates_of(&subject("late")).is_empty());
    assert!(admin_actions(t.path()).contains(&"enrolment-failed".to_string()));
    // A crash between the records and the write.
    facematch::failpoints::enable("enrol/recorded");
    let r = e.enrol(&op(), facematch::engine::Enrolment::new(subject("late"), "consent-late", vec![purpose("payment")], vector(77)));
    facematch::failpoints::disable_all();
    assert!(r.is_err());
    drop(e);
    let e = open(t.path(), &key, clock()).unwrap();
    let rec = e.open_report().reconciled.join(" ");
    assert!(rec.contains("not stored"), "{rec}");
    assert!(e.templates_of(&subject("late")).is_empty());
    assert_eq!(e.stats().templates, 20);
    e.close().unwrap();
    audit_ok(t.path(), &key);
}

#[test]
fn refused_queries_are_audited_without_probe_data() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    let e = open(t.path(), &key, clock()).unwrap();
    assert!(e.query(&ctx("marketing"), Query::identify(&vector(1), 3)).is_err());
    assert!(e.query(&ctx("marketing"), Query::verify(&vector(1), &subject("s1"))).is_err());
    e.close().unwrap();
    let refused: Vec<String> = AuditLog::read(&t.path().join("audit"), &Default::default())
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Admin { action, detail, .. } if action == "query-refused" => Some(detail),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].contains("identify") && refused[0].contains("marketing"));
    assert!(refused[1].contains("verify"));
}

#[test]
fn an_anchor_kept_elsewhere_detects_a_whole_directory_rollback() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g = t.path().join("g");
    gallery(&g, &key);
    let backup = t.path().join("backup");
    copy_dir(&g, &backup);
    let e = open(&g, &key, clock()).unwrap();
    e.withdraw(&op(), &subject("s4")).unwrap();
    let anchor = e.anchor(&op()).unwrap().to_json();
    e.close().unwrap();
    let a = facematch::engine::Anchor::from_json(&anchor, &key).unwrap();
    assert!(facematch::engine::Anchor::from_json(&anchor, &MasterKey::generate()).is_err(), "another key verifies the anchor");
    let with_anchor = |dir: &Path| EngineBuilder::new(dir).key(key.clone()).clock(clock()).anchor(a.clone()).open();
    with_anchor(&g).unwrap().close().unwrap();
    // Every file restored together: consistent, so undetectable from inside...
    std::fs::remove_dir_all(&g).unwrap();
    copy_dir(&backup, &g);
    assert!(open(&g, &key, clock()).is_ok());
    // ...but not against the anchor.
    let r = with_anchor(&g);
    assert!(matches!(r, Err(Error::DataCorruption { .. })), "{:?}", r.map(|e| e.stats().templates));
    // Another gallery is refused too.
    let other = t.path().join("other");
    gallery(&other, &key);
    assert!(with_anchor(&other).is_err());
}

/// The command line: `audit verify` is not fooled by a deleted audit directory, `audit anchor`
/// and `--anchor` catch a whole-directory rollback, `--value -1` parses, messages are clear.
#[test]
fn the_command_line_checks_bindings_and_anchors() {
    use std::process::Command;
    let t = tempfile::tempdir().unwrap();
    let fm = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_facematch"))
            .args(args)
            .env("FACEMATCH_OPERATOR", "cli-test")
            .env_remove("FACEMATCH_KEY")
            .output()
            .unwrap();
        (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let key = t.path().join("key");
    let g = t.path().join("g");
    let (k, gs) = (key.to_str().unwrap(), g.to_str().unwrap());
    assert_eq!(fm(&["keygen", "--out", k]).0, 0);
    let (c, _, err) = fm(&["init", "-g", gs, "--key-file", k, "--dim", "8", "--model-id", "m", "--purpose", "door-access:30"]);
    assert_eq!(c, 0, "{err}");
    let (c, _, err) = fm(&["threshold", "-g", gs, "--key-file", k, "--purpose", "door-access", "--mode", "identify", "--value", "-0.5"]);
    assert_eq!(c, 0, "{err}");
    let (c, out, _) = fm(&["audit", "verify", "-g", gs, "--key-file", k]);
    assert_eq!(c, 0, "{out}");
    let anchor = t.path().join("anchor.json");
    let backup = t.path().join("backup");
    copy_dir(&g, &backup);
    let (c, _, err) = fm(&["audit", "anchor", "-g", gs, "--key-file", k, "--out", anchor.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    // Rolled back as a whole: opens without the anchor, refused with it.
    std::fs::remove_dir_all(&g).unwrap();
    copy_dir(&backup, &g);
    assert_eq!(fm(&["stats", "-g", gs, "--key-file", k]).0, 0);
    let (c, _, err) = fm(&["stats", "-g", gs, "--key-file", k, "--anchor", anchor.to_str().unwrap()]);
    assert_ne!(c, 0);
    assert!(err.contains("rolled back"), "{err}");
    let (c, _, err) = fm(&["audit", "verify", "-g", gs, "--key-file", k, "--anchor", anchor.to_str().unwrap()]);
    assert_ne!(c, 0, "{err}");
    // A deleted audit directory is a failure of `audit verify`, not a clean empty log.
    std::fs::remove_dir_all(g.join("audit")).unwrap();
    let (c, out, err) = fm(&["audit", "verify", "-g", gs, "--key-file", k]);
    assert_ne!(c, 0, "{out}");
    assert!(err.contains("deleted"), "{err}");
    // A malformed key in the environment is named as such.
    let o = Command::new(env!("CARGO_BIN_EXE_facematch"))
        .args(["stats", "-g", gs])
        .env("FACEMATCH_KEY", "garbage")
        .env("FACEMATCH_OPERATOR", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("FACEMATCH_KEY is set but is not a key"), "{err}");
    // An OS error is printed once.
    let (_, _, err) = fm(&["stats", "-g", "/nonexistent/gallery", "--key-file", k]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// Open, waiting out `Locked`: other tests of this binary spawn processes, and a child between
/// fork and exec briefly holds a copy of every descriptor, the gallery's lock included.
fn reopen(g: &Path, key: &MasterKey) -> facematch::Result<facematch::engine::Engine> {
    for _ in 0..100 {
        match open(g, key, clock()) {
            Err(Error::Locked(_)) => std::thread::sleep(std::time::Duration::from_millis(20)),
            r => return r,
        }
    }
    open(g, key, clock())
}

/// Import three new people for payment, their consents in the same frame.
fn import_three(e: &facematch::engine::Engine) -> facematch::Result<()> {
    use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord};
    let cs = (0..3)
        .map(|i| {
            ConsentRecord::new(
                format!("c-imp{i}"),
                &format!("imp{i}"),
                ConsentBasis::WrittenConsent,
                vec![purpose("payment")],
                "clerk",
                AgeBracket::Adult,
            )
        })
        .collect();
    let rows = (0..3)
        .map(|i| {
            facematch::engine::Enrolment::new(subject(&format!("imp{i}")), format!("c-imp{i}"), vec![purpose("payment")], vector(600 + i))
        })
        .collect();
    e.import_with_consents(&op(), cs, rows).map(|_| ())
}

/// The crash matrix: every gallery operation, with a failure injected at the template log's
/// append, at an atomic replace or at a rename (as a full disk or a crash there would), then the
/// process "crashes" (the engine is dropped) and the gallery is opened again. Whatever happened:
/// it opens, the audit log verifies against the manifest, every erasure the audit log records
/// holds, every live template has its enrolment record, and what an operation acknowledged is there.
#[test]
fn crash_matrix_every_operation_and_failure_point() {
    type Op = fn(&facematch::engine::Engine) -> facematch::Result<()>;
    let ops: Vec<(&str, Op)> = vec![
        ("enrol", |e| {
            consent(e, "new", &["payment"], facematch::compliance::AgeBracket::Adult)?;
            e.enrol(&op(), facematch::engine::Enrolment::new(subject("new"), "consent-new", vec![purpose("payment")], vector(500)))
                .map(|_| ())
        }),
        ("delete", |e| {
            let t = e.templates_of(&subject("s2"));
            e.delete(&op(), &t, "test").map(|_| ())
        }),
        ("withdraw", |e| e.withdraw(&op(), &subject("s3")).map(|_| ())),
        ("compact", |e| {
            e.withdraw(&op(), &subject("s4"))?;
            e.compact(&op()).map(|_| ())
        }),
        ("threshold", |e| e.set_threshold(&op(), &purpose("payment"), Mode::Identify, 0.55).map(|_| ())),
        ("rotate-key", |e| e.rotate_key(&op(), MasterKey::from_bytes([7; 32]))),
        ("checkpoint", |e| e.checkpoint()),
        ("import", import_three),
        // Run with the clock 400 days on: every template's retention has ended.
        ("purge", |e| e.purge_expired(&op()).map(|_| ())),
    ];
    let points = [
        "log/enospc",
        "log/crash-mid-append",
        "fs/write-atomic",
        "fs/rename",
        "audit/write",
        "audit/fsync",
        "enrol/recorded",
        "withdraw/recorded",
        "compact/recorded",
        "compact/renamed",
        "rotate-key/staged",
        "rotate-key/committed",
    ];
    let mut refused = Vec::new();
    let base = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g0 = base.path().join("g0");
    gallery(&g0, &key);
    for (name, f) in &ops {
        for point in points {
            let t = tempfile::tempdir().unwrap();
            let g = t.path().join("g");
            copy_dir(&g0, &g);
            let ck = clock();
            let e = open(&g, &key, ck.clone()).unwrap();
            if *name == "purge" {
                ck.advance(std::time::Duration::from_secs(400 * 86_400));
            }
            facematch::failpoints::enable(point);
            let result = f(&e);
            facematch::failpoints::disable_all();
            drop(e); // the crash
            let what = format!("{name} failing at {point} ({})", if result.is_ok() { "acknowledged" } else { "refused" });
            if result.is_err() {
                refused.push(format!("{name}@{point}"));
            }
            // Whichever key the gallery is under now (a rotation may have completed).
            let rotated = MasterKey::from_bytes([7; 32]);
            let (e, k) = match reopen(&g, &key) {
                Ok(e) => (e, key.clone()),
                Err(Error::Key(_)) => (reopen(&g, &rotated).unwrap_or_else(|err| panic!("{what}: {err}")), rotated.clone()),
                Err(err) => panic!("{what}: reopen refused: {err}"),
            };
            // The rotation's crash points return as a crash would: nothing acknowledged.
            let acknowledged = result.is_ok() && !point.starts_with("rotate-key/");
            if acknowledged {
                match *name {
                    "enrol" => assert_eq!(e.templates_of(&subject("new")).len(), 1, "{what}"),
                    "delete" => assert!(e.templates_of(&subject("s2")).is_empty(), "{what}"),
                    "withdraw" => assert!(e.templates_of(&subject("s3")).is_empty(), "{what}"),
                    "import" => assert!((0..3).all(|i| e.templates_of(&subject(&format!("imp{i}"))).len() == 1), "{what}"),
                    "purge" => assert_eq!(e.stats().templates, 0, "{what}"),
                    "rotate-key" => assert_eq!(k.fingerprint(), rotated.fingerprint(), "{what}"),
                    _ => {}
                }
            }
            let templates = e.stats().templates;
            e.close().unwrap_or_else(|err| panic!("{what}: close: {err}"));
            let v = facematch::engine::verify_audit(&g, &k, None).unwrap();
            assert!(v.ok(), "{what}: {v:?}");
            let recs = AuditLog::read(&g.join("audit"), &Default::default()).unwrap();
            // A rotation or compaction: its record is there, and if it did not complete or its
            // own record is missing, a later record says what became of it.
            let admin_after = |i: usize, words: &str| {
                recs[i..].iter().any(|r| matches!(&r.event, AuditEvent::Admin { action, detail, .. }
                    if ["key-rotation-failed", "key-rotation-recovery", "reconciled-on-open", "compaction-failed"].contains(&action.as_str()) && detail.contains(words)))
            };
            let rotation = recs.iter().rposition(|r| matches!(r.event, AuditEvent::KeyRotation { .. }));
            if k.fingerprint() == rotated.fingerprint() {
                assert!(rotation.is_some(), "{what}: the gallery is under the new key with no rotation record");
            } else if let Some(i) = rotation {
                assert!(admin_after(i, "previous key"), "{what}: a recorded rotation did not complete and nothing says so");
            }
            if let Some(i) =
                recs.iter().rposition(|r| matches!(&r.event, AuditEvent::Admin { action, .. } if action == "compaction-started"))
            {
                let outcome = recs[i..].iter().any(|r| matches!(r.event, AuditEvent::Compaction { .. })) || admin_after(i, "compact");
                assert!(outcome, "{what}: a compaction with no record of its outcome");
            }
            let e = reopen(&g, &k).unwrap_or_else(|err| panic!("{what}: second open: {err}"));
            let mut enrolled = std::collections::HashSet::new();
            for r in &recs {
                match &r.event {
                    AuditEvent::Enrolment { template, .. } => {
                        enrolled.insert(*template);
                    }
                    AuditEvent::Deletion { templates, .. } | AuditEvent::Purge { templates, .. } => {
                        for t in templates {
                            assert!(e.template(*t).is_err(), "{what}: recorded erasure of {t} does not hold");
                        }
                    }
                    AuditEvent::ConsentWithdrawn { templates_erased, .. } => {
                        for t in templates_erased {
                            assert!(e.template(*t).is_err(), "{what}: recorded withdrawal of {t} does not hold");
                        }
                    }
                    _ => {}
                }
            }
            for i in 0..21u64 {
                for tpl in e.templates_of(&subject(&format!("s{i}"))).into_iter().chain(e.templates_of(&subject("new"))) {
                    assert!(enrolled.contains(&tpl), "{what}: template {tpl} has no enrolment record");
                }
            }
            for i in 0..3 {
                let s = subject(&format!("imp{i}"));
                let tpls = e.templates_of(&s);
                assert_eq!(e.consents_of(&s).len(), tpls.len(), "{what}: imp{i}'s consent and template are not together");
                for tpl in tpls {
                    assert!(enrolled.contains(&tpl), "{what}: template {tpl} has no enrolment record");
                }
            }
            assert_eq!(e.stats().templates, templates, "{what}: the second open disagrees with the first");
        }
    }
    // The injected failures did hit: every operation fails at one point at least.
    eprintln!("refused: {refused:?}");
    for (name, _) in &ops {
        assert!(refused.iter().any(|r| r.starts_with(&format!("{name}@"))), "{name} never failed: {refused:?}");
    }
}

/// An import batch of 1,100 new people (two frames of the template log), each row with its
/// consent, failing at every write point of the batch: after the write-ahead records, at the
/// template log (a full disk), mid-append with the first frame durable and the second torn, at
/// the manifest's atomic replace and at a rename, then a crash. After reopen no consent of an
/// imported person is without its template, every template has its enrolment record, what was
/// acknowledged is all there, the records of rows not stored are reconciled as "not stored",
/// and `audit verify` is clean.
#[test]
fn import_consents_and_templates_commit_together_at_every_failure_point() {
    use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord};
    const N: usize = 1100;
    let base = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g0 = base.path().join("g0");
    gallery(&g0, &key);
    for point in
        [None, Some("enrol/recorded"), Some("log/enospc"), Some("log/crash-mid-append"), Some("fs/write-atomic"), Some("fs/rename")]
    {
        let t = tempfile::tempdir().unwrap();
        let g = t.path().join("g");
        copy_dir(&g0, &g);
        let e = open(&g, &key, clock()).unwrap();
        let who = |i: usize| format!("imp{i}");
        let consents: Vec<ConsentRecord> = (0..N)
            .map(|i| {
                ConsentRecord::new(
                    format!("import-{}", who(i)),
                    &who(i),
                    ConsentBasis::WrittenConsent,
                    vec![purpose("payment")],
                    "clerk",
                    AgeBracket::Adult,
                )
            })
            .collect();
        let rows: Vec<facematch::engine::Enrolment> = (0..N)
            .map(|i| {
                facematch::engine::Enrolment::new(
                    subject(&who(i)),
                    format!("import-{}", who(i)),
                    vec![purpose("payment")],
                    vector(1000 + i as u64),
                )
            })
            .collect();
        if let Some(p) = point {
            facematch::failpoints::enable(p);
        }
        let result = e.import_with_consents(&op(), consents, rows);
        facematch::failpoints::disable_all();
        drop(e); // the crash
        let what = format!("import failing at {point:?} ({})", if result.is_ok() { "acknowledged" } else { "refused" });
        let e = reopen(&g, &key).unwrap_or_else(|err| panic!("{what}: {err}"));
        let reconciled = e.open_report().reconciled.join(" ");
        let (mut with_template, mut consents_held) = (0, 0);
        for i in 0..N {
            let s = subject(&who(i));
            let has_consent = !e.consents_of(&s).is_empty();
            let templates = e.templates_of(&s).len();
            assert!(!has_consent || templates == 1, "{what}: {} has a consent and {templates} templates", who(i));
            assert!(has_consent || templates == 0, "{what}: {} has a template without its consent", who(i));
            consents_held += has_consent as usize;
            with_template += templates;
        }
        match (point, result.is_ok()) {
            (_, true) => assert_eq!(with_template, N, "{what}"),
            (Some("log/crash-mid-append"), false) => {
                // The first frame (1,024 rows with their consents) is durable, the torn second is not.
                assert_eq!(with_template, 1024, "{what}");
                assert!(reconciled.contains("not stored"), "{what}: {reconciled}");
            }
            (_, false) => {
                assert_eq!(with_template, 0, "{what}");
                assert!(point == Some("log/enospc") || reconciled.contains("not stored"), "{what}: {reconciled}");
            }
        }
        assert_eq!(consents_held, with_template, "{what}");
        e.close().unwrap();
        let v = facematch::engine::verify_audit(&g, &key, None).unwrap();
        assert!(v.ok(), "{what}: {v:?}");
        let enrolled: std::collections::HashSet<u64> = AuditLog::read(&g.join("audit"), &Default::default())
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.event {
                AuditEvent::Enrolment { template, .. } => Some(template),
                _ => None,
            })
            .collect();
        let e = reopen(&g, &key).unwrap();
        for i in 0..N {
            for t in e.templates_of(&subject(&who(i))) {
                assert!(enrolled.contains(&t), "{what}: template {t} has no enrolment record");
            }
        }
        assert!(e.open_report().reconciled.is_empty(), "{what}: reconciled twice");
    }
}

/// A batch's consents must each be used by one of its rows (else a consent could commit alone).
#[test]
fn an_import_consent_no_row_uses_is_refused() {
    use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord};
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    gallery(t.path(), &key);
    let e = open(t.path(), &key, clock()).unwrap();
    let c = |who: &str| {
        ConsentRecord::new(format!("c-{who}"), who, ConsentBasis::WrittenConsent, vec![purpose("payment")], "clerk", AgeBracket::Adult)
    };
    let row = facematch::engine::Enrolment::new(subject("a"), "c-a", vec![purpose("payment")], vector(900));
    let r = e.import_with_consents(&op(), vec![c("a"), c("b")], vec![row.clone()]);
    assert!(matches!(r, Err(Error::PolicyViolation { rule: "consent-record", .. })), "{r:?}");
    assert!(e.consents_of(&subject("a")).is_empty() && e.consents_of(&subject("b")).is_empty());
    assert_eq!(e.import_with_consents(&op(), vec![c("a")], vec![row]).unwrap().len(), 1);
    assert_eq!(e.consents_of(&subject("a")).len(), 1);
}

/// Failures inside the audit log's writer (its segment write, its fsync, the `HEAD` replace; injected
/// on the thread that commits, carried there by the records): an enrolment, a withdrawal, an import
/// batch and a threshold change either do not happen (the call fails and the reopened gallery lacks
/// the change) or happen with their audit record (a failed call's change then reported as reconciled
/// on open); a query whose record cannot be written is not answered; `audit verify` is clean.
#[test]
fn audit_writer_failures_never_leave_a_change_without_its_record() {
    use facematch::compliance::AgeBracket;
    type Op = fn(&facematch::engine::Engine) -> facematch::Result<()>;
    let ops: Vec<(&str, Op)> = vec![
        ("enrol", |e| {
            consent(e, "new", &["payment"], AgeBracket::Adult)?;
            e.enrol(&op(), facematch::engine::Enrolment::new(subject("new"), "consent-new", vec![purpose("payment")], vector(500)))
                .map(|_| ())
        }),
        ("withdraw", |e| e.withdraw(&op(), &subject("s3")).map(|_| ())),
        ("import", import_three),
        ("threshold", |e| e.set_threshold(&op(), &purpose("payment"), Mode::Identify, 0.55).map(|_| ())),
        ("query", |e| e.query(&ctx("payment"), Query::identify(&vector(1), 3)).map(|_| ())),
        ("query-deferred", |e| {
            let p = e.query_deferred(&ctx("payment"), Query::identify(&vector(1), 3))?;
            p.wait().map(|_| ())
        }),
        ("query-verify", |e| e.query(&ctx("payment"), Query::verify(&vector(1), &subject("s1"))).map(|_| ())),
    ];
    let base = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g0 = base.path().join("g0");
    gallery(&g0, &key);
    let mut refused = Vec::new();
    for (name, f) in &ops {
        for point in ["audit/write", "audit/fsync", "audit/head"] {
            let t = tempfile::tempdir().unwrap();
            let g = t.path().join("g");
            copy_dir(&g0, &g);
            let e = open(&g, &key, clock()).unwrap();
            let version_before = e.config().purpose(&purpose("payment")).unwrap().threshold_version;
            facematch::failpoints::enable(point);
            let result = f(&e);
            facematch::failpoints::disable_all();
            drop(e); // the crash
            let what = format!("{name} with {point} failing ({})", if result.is_ok() { "acknowledged" } else { "refused" });
            if result.is_err() {
                refused.push(format!("{name}@{point}"));
            }
            if point != "audit/head" {
                assert!(result.is_err(), "{what}: answered although its record was not written");
            }
            let e = reopen(&g, &key).unwrap_or_else(|err| panic!("{what}: reopen: {err}"));
            let reconciled = !e.open_report().reconciled.is_empty();
            let recs: Vec<AuditEvent> =
                AuditLog::read(&g.join("audit"), &Default::default()).unwrap().into_iter().map(|r| r.event).collect();
            let enrolled = |tpl: u64| recs.iter().any(|r| matches!(r, AuditEvent::Enrolment { template, .. } if *template == tpl));
            let consented = |id: &str| recs.iter().any(|r| matches!(r, AuditEvent::ConsentRecorded { consent_id, .. } if consent_id == id));
            let changed = match *name {
                "enrol" | "import" => {
                    let who: Vec<String> = if *name == "enrol" { vec!["new".into()] } else { (0..3).map(|i| format!("imp{i}")).collect() };
                    let mut n = 0;
                    for w in &who {
                        for tpl in e.templates_of(&subject(w)) {
                            assert!(enrolled(tpl), "{what}: template {tpl} of {w} has no enrolment record");
                            n += 1;
                        }
                        for c in e.consents_of(&subject(w)) {
                            assert!(consented(&c.consent_id), "{what}: consent {} has no record", c.consent_id);
                        }
                    }
                    if *name == "import" {
                        assert!(n == 0 || n == 3, "{what}: {n} of 3 rows");
                        for w in &who {
                            assert_eq!(e.consents_of(&subject(w)).len(), e.templates_of(&subject(w)).len(), "{what}: {w}");
                        }
                    }
                    n > 0
                }
                "withdraw" => {
                    let gone = e.templates_of(&subject("s3")).is_empty();
                    if gone {
                        assert!(
                            recs.iter().any(|r| matches!(r, AuditEvent::ConsentWithdrawn { subject, .. } if subject == "s3")),
                            "{what}"
                        );
                    }
                    gone
                }
                "threshold" => {
                    let p = e.config().purpose(&purpose("payment")).unwrap().clone();
                    let moved = p.threshold_version > version_before;
                    if moved {
                        assert_eq!(p.identify_threshold, 0.55, "{what}");
                        assert!(
                            recs.iter()
                                .any(|r| matches!(r, AuditEvent::ThresholdChange { version, .. } if *version == p.threshold_version)),
                            "{what}: no record of the threshold change"
                        );
                    }
                    moved
                }
                _ => {
                    if result.is_ok() {
                        assert!(recs.iter().any(|r| matches!(r, AuditEvent::Query(_))), "{what}: an answered query left no record");
                    }
                    result.is_ok()
                }
            };
            if result.is_ok() {
                assert!(changed, "{what}: acknowledged but not there after reopen");
            } else if changed {
                assert!(reconciled, "{what}: a failed call's change is there, unreported: {:?}", e.open_report());
            }
            e.close().unwrap_or_else(|err| panic!("{what}: close: {err}"));
            let v = facematch::engine::verify_audit(&g, &key, None).unwrap();
            assert!(v.ok(), "{what}: {v:?}");
        }
    }
    eprintln!("refused: {refused:?}");
}

/// A compaction or a key rotation a crash cut short leaves an audit record saying what became of
/// it: completed (its own record missing) or not, and which key the gallery is under.
#[test]
fn interrupted_compactions_and_rotations_are_recorded_on_open() {
    let base = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g0 = base.path().join("g0");
    gallery(&g0, &key);
    let cases: [(&str, &str); 4] = [
        ("compact/recorded", "did not complete: the previous template log stays"),
        ("compact/renamed", "had completed (the compacted template log is in place)"),
        ("rotate-key/staged", "stays under the previous key"),
        ("rotate-key/committed", "under the new key"),
    ];
    for (point, says) in cases {
        let t = tempfile::tempdir().unwrap();
        let g = t.path().join("g");
        copy_dir(&g0, &g);
        let e = open(&g, &key, clock()).unwrap();
        e.withdraw(&op(), &subject("s9")).unwrap();
        facematch::failpoints::enable(point);
        let _ =
            if point.starts_with("compact") { e.compact(&op()).map(|_| ()) } else { e.rotate_key(&op(), MasterKey::from_bytes([9; 32])) };
        facematch::failpoints::disable_all();
        drop(e); // the crash
        let k = if point == "rotate-key/committed" { MasterKey::from_bytes([9; 32]) } else { key.clone() };
        let e = reopen(&g, &k).unwrap_or_else(|err| panic!("{point}: {err}"));
        assert!(e.templates_of(&subject("s9")).is_empty(), "{point}");
        e.close().unwrap();
        let details: Vec<String> = AuditLog::read(&g.join("audit"), &Default::default())
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.event {
                AuditEvent::Admin { action, detail, .. } if action == "reconciled-on-open" || action == "key-rotation-recovery" => {
                    Some(detail)
                }
                _ => None,
            })
            .collect();
        assert!(details.iter().any(|d| d.contains(says)), "{point}: {details:?}");
        let v = facematch::engine::verify_audit(&g, &k, None).unwrap();
        assert!(v.ok(), "{point}: {v:?}");
        assert!(reopen(&g, &k).unwrap().open_report().reconciled.is_empty(), "{point}: reconciled twice");
    }
}

/// `gallery.json`, `templates.log` and `index.snap` restored together from before a withdrawal,
/// the audit log left current: the files agree with each other and with the older part of the
/// audit log, so open accepts them, and re-applies the withdrawal the audit log records past
/// the restored manifest (reconciled, audited): the person does not come back.
#[test]
fn a_restored_store_with_a_current_audit_log_gets_the_withdrawal_again() {
    let t = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let g = t.path().join("g");
    gallery(&g, &key);
    let backup = t.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    let files = ["gallery.json", "templates.log", "index.snap"];
    for f in files {
        std::fs::copy(g.join(f), backup.join(f)).unwrap();
    }
    let e = open(&g, &key, clock()).unwrap();
    e.withdraw(&op(), &subject("s7")).unwrap();
    for i in 0..5 {
        e.query(&ctx("payment"), Query::identify(&vector(i), 3)).unwrap();
    }
    e.close().unwrap();
    for f in files {
        std::fs::copy(backup.join(f), g.join(f)).unwrap();
    }
    let e = open(&g, &key, clock()).unwrap();
    let rec = e.open_report().reconciled.join(" ");
    assert!(rec.contains("withdrawal of s7"), "{rec}");
    assert!(e.templates_of(&subject("s7")).is_empty(), "the withdrawn person is back");
    assert!(e.consents_of(&subject("s7")).iter().all(|c| c.withdrawn_at_ms.is_some()));
    assert_eq!(e.stats().templates, 19);
    let v = e.query(&ctx("payment"), Query::identify(&vector(7), 3)).unwrap();
    assert!(v.candidates.iter().all(|c| c.subject.as_str() != "s7"), "s7 still matches");
    if let Ok(v) = e.query(&ctx("payment"), Query::verify(&vector(7), &subject("s7"))) {
        assert!(v.score.is_none() && !matches!(v.decision, facematch::compliance::Decision::Match { .. }), "{v:?}");
    }
    e.close().unwrap();
    audit_ok(&g, &key);
    assert!(admin_actions(&g).contains(&"reconciled-on-open".to_string()));
    let e = open(&g, &key, clock()).unwrap();
    assert!(e.open_report().reconciled.is_empty());
    assert!(e.templates_of(&subject("s7")).is_empty());
}

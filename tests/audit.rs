//! Integration tests of the audit log: tamper detection under 1,000 seeded
//! mutations, torn tails, privacy scan, filters/export, subscribe, retention,
//! rekey and concurrent appends.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use facematch::audit::*;
use facematch::clock::ManualClock;
use facematch::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

const T0_S: u64 = 1_700_000_000;
const DAY: Duration = Duration::from_secs(86_400);

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(T0_S)))
}

fn key() -> AuditKey {
    AuditKey::from_bytes(*b"0123456789abcdef0123456789abcdef")
}

fn cfg(seg: u64, ckpt: u64, durability: Durability) -> AuditConfig {
    AuditConfig {
        site: "site-A".into(),
        device: "dev-7".into(),
        segment_max_records: seg,
        checkpoint_every: ckpt,
        durability,
        ..Default::default()
    }
}

fn query(i: u64, operator: &str, purpose: &str, subject: Option<&str>) -> AuditEvent {
    AuditEvent::Query(QueryAudit {
        operator: operator.into(),
        purpose: purpose.into(),
        mode: if i.is_multiple_of(2) { QueryMode::Verify } else { QueryMode::Identify },
        model_id: "sface-2021dec".into(),
        threshold: 0.363,
        threshold_version: 3,
        k: 5,
        faces_found: 1 + (i % 3) as u32,
        faces_discarded: (i % 3) as u32,
        decision: match i % 3 {
            0 => DecisionKind::Match,
            1 => DecisionKind::NoMatch,
            _ => DecisionKind::NeedsHumanReview,
        },
        subject: subject.map(String::from),
        template: subject.map(|_| i),
        top_score: Some(0.25 + (i % 50) as f32 / 100.0),
        latency_us: 400 + i,
    })
}

/// A mix of every event kind.
fn event(i: u64) -> AuditEvent {
    let subj = format!("subject-{}", i % 7);
    match i % 9 {
        0..=2 => query(i, &format!("op{}", i % 3), "access", Some(&subj)),
        3 => AuditEvent::Enrolment {
            operator: "op0".into(),
            subject: subj,
            template: i,
            purposes: vec!["access".into(), "payment".into()],
            consent_id: format!("c-{i}"),
        },
        4 => AuditEvent::ConsentRecorded {
            operator: "op1".into(),
            subject: subj,
            consent_id: format!("c-{i}"),
            basis: "written".into(),
            purposes: vec!["access".into()],
            age_bracket: "adult".into(),
            guardian: false,
        },
        5 => AuditEvent::Deletion { operator: "op2".into(), templates: vec![i, i + 1], reason: "request".into() },
        6 => AuditEvent::ThresholdChange {
            operator: "op0".into(),
            purpose: "payment".into(),
            mode: "verify".into(),
            old: Some(0.4),
            new: 0.42,
            version: i as u32,
        },
        7 => AuditEvent::Compaction { operator: "op1".into(), templates_removed: 3, bytes_before: 9000, bytes_after: 6000 },
        _ => AuditEvent::Admin { operator: "op2".into(), action: "config".into(), detail: format!("change {i}") },
    }
}

/// A closed log of ~110 records in 5 segments, commits of 1 to 7 records.
fn build_base(dir: &Path) -> u64 {
    let (log, _) = AuditLog::open(dir, key(), cfg(25, 4, Durability::Off), clock()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut i = 0u64;
    while i < 110 {
        let n = rng.gen_range(1..=7u64);
        let evs: Vec<AuditEvent> = (i..i + n).map(event).collect();
        let r = log.append_batch(evs).unwrap();
        assert_eq!(r, i..i + n);
        i += n;
    }
    log.close().unwrap();
    i
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "LOCK" {
            continue;
        }
        fs::copy(e.path(), dst.join(&name)).unwrap();
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.split_inclusive(|&b| b == b'\n').map(|l| l.to_vec()).collect()
}

fn record_hash(body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"fm-audit-record-v1\0");
    h.update(body);
    hex::encode(h.finalize())
}

/// Re-write one record and re-compute every later hash, prev and the hash
/// fields of checkpoints, headers and HEAD, as an attacker without the key
/// would. Returns a description.
fn recompute_chain(dir: &Path, rng: &mut ChaCha8Rng) -> String {
    let segs = segments(dir);
    let mut files: Vec<Vec<Vec<u8>>> = segs.iter().map(|p| lines(&fs::read(p).unwrap())).collect();
    let records: Vec<(usize, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(s, ls)| ls.iter().enumerate().filter(|(_, l)| l.starts_with(b"{\"seq\":")).map(move |(i, _)| (s, i)))
        .collect();
    let (ts, ti) = records[rng.gen_range(0..records.len())];
    let mut renamed: Vec<(String, String)> = Vec::new();
    let mut started = false;
    for (s, ls) in files.iter_mut().enumerate() {
        for (i, l) in ls.iter_mut().enumerate() {
            if (s, i) == (ts, ti) {
                started = true;
            }
            if !started {
                continue;
            }
            let mut text = String::from_utf8(l.clone()).unwrap();
            for (old, new) in &renamed {
                text = text.replace(old.as_str(), new.as_str());
            }
            if text.starts_with("{\"seq\":") {
                let body_end = text.len() - 1 - 75; // newline, then the hash suffix
                let mut body = text[..body_end].to_string();
                if (s, i) == (ts, ti) {
                    body = body.replacen("\"time_ms\":17", "\"time_ms\":16", 1);
                }
                body.push('}');
                let h = record_hash(body.as_bytes());
                let old_hash = text[body_end + 9..body_end + 9 + 64].to_string();
                renamed.push((old_hash, h.clone()));
                text = format!("{},\"hash\":\"{h}\"}}\n", &body[..body.len() - 1]);
            }
            *l = text.into_bytes();
        }
    }
    for (p, ls) in segs.iter().zip(&files) {
        fs::write(p, ls.concat()).unwrap();
    }
    let mut head = fs::read_to_string(dir.join("HEAD")).unwrap();
    for (old, new) in &renamed {
        head = head.replace(old.as_str(), new.as_str());
    }
    fs::write(dir.join("HEAD"), head).unwrap();
    format!("recomputed chain from segment {ts} line {ti}")
}

/// Apply one random mutation to the log in `dir`; returns a description.
fn mutate(dir: &Path, rng: &mut ChaCha8Rng) -> String {
    let segs = segments(dir);
    let pick_seg = |rng: &mut ChaCha8Rng| segs[rng.gen_range(0..segs.len())].clone();
    match rng.gen_range(0..11) {
        0 | 1 => {
            // Byte flip anywhere in a segment or HEAD.
            let mut files = segs.clone();
            files.push(dir.join("HEAD"));
            let total: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
            let mut at = rng.gen_range(0..total);
            for f in files {
                let mut b = fs::read(&f).unwrap();
                if at < b.len() as u64 {
                    let x: u8 = rng.gen_range(1..=255);
                    b[at as usize] ^= x;
                    fs::write(&f, b).unwrap();
                    return format!("flip byte {at} of {} with {x:#x}", f.display());
                }
                at -= b.len() as u64;
            }
            unreachable!()
        }
        2 => {
            let p = pick_seg(rng);
            let mut ls = lines(&fs::read(&p).unwrap());
            let i = rng.gen_range(0..ls.len());
            ls.remove(i);
            fs::write(&p, ls.concat()).unwrap();
            format!("delete line {i} of {}", p.display())
        }
        3 => {
            let p = pick_seg(rng);
            let mut ls = lines(&fs::read(&p).unwrap());
            let i = rng.gen_range(0..ls.len() - 1);
            let j = if rng.gen_bool(0.5) { i + 1 } else { rng.gen_range(i + 1..ls.len()) };
            ls.swap(i, j);
            fs::write(&p, ls.concat()).unwrap();
            format!("swap lines {i} and {j} of {}", p.display())
        }
        4 | 5 => {
            let p = pick_seg(rng);
            let b = fs::read(&p).unwrap();
            let at = if rng.gen_bool(0.5) {
                // At a record boundary.
                let ls = lines(&b);
                let k = rng.gen_range(0..ls.len());
                ls[..k].iter().map(|l| l.len()).sum::<usize>()
            } else {
                rng.gen_range(0..b.len())
            };
            fs::write(&p, &b[..at]).unwrap();
            format!("truncate {} to {at} of {} bytes", p.display(), b.len())
        }
        6 => recompute_chain(dir, rng),
        7 => {
            let head = dir.join("HEAD");
            match rng.gen_range(0..3) {
                0 => {
                    fs::remove_file(&head).unwrap();
                    "delete HEAD".into()
                }
                _ => {
                    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&head).unwrap()).unwrap();
                    let r = v["records"].as_u64().unwrap();
                    let new = rng.gen_range(0..r);
                    v["records"] = new.into();
                    let mut b = serde_json::to_vec(&v).unwrap();
                    b.push(b'\n');
                    fs::write(&head, b).unwrap();
                    format!("edit HEAD records {r} -> {new}")
                }
            }
        }
        8 => {
            let p = pick_seg(rng);
            fs::remove_file(&p).unwrap();
            format!("delete segment {}", p.display())
        }
        9 => {
            // Replay: a copy of some line inserted somewhere (maybe another segment).
            let (a, b) = (pick_seg(rng), pick_seg(rng));
            let la = lines(&fs::read(&a).unwrap());
            let mut lb = lines(&fs::read(&b).unwrap());
            let i = rng.gen_range(0..la.len());
            let j = rng.gen_range(0..=lb.len());
            lb.insert(j, la[i].clone());
            fs::write(&b, lb.concat()).unwrap();
            format!("copy line {i} of {} to line {j} of {}", a.display(), b.display())
        }
        _ => {
            // Reorder whole segments.
            let i = rng.gen_range(0..segs.len() - 1);
            let j = rng.gen_range(i + 1..segs.len());
            let (a, b) = (fs::read(&segs[i]).unwrap(), fs::read(&segs[j]).unwrap());
            fs::write(&segs[i], b).unwrap();
            fs::write(&segs[j], a).unwrap();
            format!("swap segment files {i} and {j}")
        }
    }
}

#[test]
fn thousand_seeded_mutations_are_all_detected() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let n = build_base(&base);
    assert!(segments(&base).len() >= 4);
    let clean = AuditLog::verify(&base, &key()).unwrap();
    assert!(clean.ok() && !clean.torn_tail, "{clean:?}");
    assert_eq!(clean.records, n);

    let last_segment = segments(&base).pop().unwrap().file_name().unwrap().to_str().unwrap().to_string();
    let mut rng = ChaCha8Rng::seed_from_u64(0x000A_0D17);
    let mut recompute_caught_by_key = 0;
    let (mut open_must_refuse, mut closed_only) = (0, 0);
    for round in 0..1000 {
        let dir = root.path().join(format!("m{round}"));
        copy_dir(&base, &dir);
        let what = mutate(&dir, &mut rng);
        let rep = AuditLog::verify(&dir, &key()).unwrap_or_else(|e| panic!("round {round}: {what}: {e}"));
        let bad = rep.first_bad.clone().unwrap_or_else(|| panic!("round {round}: undetected: {what}: {rep:?}"));
        if what.starts_with("recomputed") {
            // The attacker's hashes are right, so only keyed parts can catch it.
            assert!(bad.reason.contains("MAC") || bad.reason.contains("HEAD"), "{what}: {bad:?}");
            recompute_caught_by_key += 1;
        }
        // `open` reads only HEAD, RETIRED, the header and closing
        // checkpoint of each closed segment and the whole last segment (so
        // that opening does not cost O(log)); records inside closed
        // segments are checked by `verify` above, not by `open`. So `open`
        // must refuse every mutation that touches HEAD, RETIRED or the last
        // segment, and every deleted, swapped or truncated segment file
        // (caught by the file listing and each segment's header and closing
        // checkpoint); other mutations confined to closed segments may be
        // let through (they are still caught by `verify`, which the audit
        // CLI runs, and by retention before it deletes a segment).
        let changed = changed_files(&base, &dir);
        let structural = what.starts_with("delete segment") || what.starts_with("swap segment files") || what.starts_with("truncate");
        let must_refuse = structural || changed.iter().any(|f| f == "HEAD" || f == "RETIRED" || *f == last_segment);
        let opened = AuditLog::open(&dir, key(), cfg(25, 4, Durability::Off), clock());
        let refused = matches!(opened, Err(Error::AuditTampered { .. }));
        if must_refuse {
            assert!(refused, "round {round}: {what}: open did not refuse");
            open_must_refuse += 1;
        } else {
            assert!(refused || opened.is_ok(), "round {round}: {what}: {opened:?}");
            closed_only += 1;
        }
        drop(opened);
        fs::remove_dir_all(&dir).unwrap();
    }
    assert!(recompute_caught_by_key > 50, "{recompute_caught_by_key}");
    assert!(open_must_refuse > 300 && closed_only > 100, "{open_must_refuse} {closed_only}");
}

/// Names of the files that differ between `a` and `b` (changed, added or
/// removed), `LOCK` aside.
fn changed_files(a: &Path, b: &Path) -> Vec<String> {
    let names = |d: &Path| -> Vec<String> {
        fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n != "LOCK").collect()
    };
    let mut all = names(a);
    all.extend(names(b));
    all.sort();
    all.dedup();
    all.into_iter().filter(|n| fs::read(a.join(n)).ok() != fs::read(b.join(n)).ok()).collect()
}

#[test]
fn genuine_partial_final_record_is_a_torn_tail_that_open_repairs() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let n = build_base(&dir);
    let last = segments(&dir).pop().unwrap();
    let before = fs::read(&last).unwrap();
    // A crash mid-write leaves the start of the next record.
    let partial = br#"{"seq":110,"time_ms":1700000000000,"site":"site-A","dev"#;
    let mut b = before.clone();
    b.extend_from_slice(partial);
    fs::write(&last, &b).unwrap();
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && rep.torn_tail, "{rep:?}");

    let (log, open) = AuditLog::open(&dir, key(), cfg(25, 4, Durability::Off), clock()).unwrap();
    let t = open.torn_tail_repaired.unwrap();
    assert_eq!(t.bytes_dropped, partial.len() as u64);
    assert_eq!(open.records, n);
    assert_eq!(fs::read(&last).unwrap(), before);
    assert_eq!(log.append(event(1)).unwrap(), n);
    drop(log);
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && !rep.torn_tail, "{rep:?}");
}

#[test]
fn unconfirmed_records_after_head_are_a_torn_tail_but_confirmed_ones_are_not() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a");
    let c = cfg(1000, 1000, Durability::Off);
    let (log, _) = AuditLog::open(&dir, key(), c.clone(), clock()).unwrap();
    log.append_batch((0..5).map(event).collect()).unwrap();
    log.flush().unwrap();
    let head_at_5 = fs::read(dir.join("HEAD")).unwrap();
    log.append_batch((5..9).map(event).collect()).unwrap();
    drop(log);
    let seg = segments(&dir).pop().unwrap();
    let mut ls = lines(&fs::read(&seg).unwrap());
    assert!(ls.last().unwrap().starts_with(b"{\"type\":\"checkpoint\""));

    // Crash after the log fsync but before HEAD was replaced: HEAD lags
    // behind checkpointed records; nothing is lost or dropped.
    let lag = root.path().join("lag");
    copy_dir(&dir, &lag);
    fs::write(lag.join("HEAD"), &head_at_5).unwrap();
    let rep = AuditLog::verify(&lag, &key()).unwrap();
    assert!(rep.ok() && !rep.torn_tail && rep.records == 9, "{rep:?}");
    let (_, open) = AuditLog::open(&lag, key(), c.clone(), clock()).unwrap();
    assert_eq!(open.records, 9);

    // Crash in the middle of writing the second batch: its checkpoint never
    // arrived and HEAD still says 5. The four records were never confirmed.
    ls.pop();
    fs::write(&seg, ls.concat()).unwrap();
    fs::write(dir.join("HEAD"), &head_at_5).unwrap();
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && rep.torn_tail && rep.records == 5, "{rep:?}");
    let (log, open) = AuditLog::open(&dir, key(), c, clock()).unwrap();
    assert_eq!(open.torn_tail_repaired.unwrap().records_dropped, 4);
    assert_eq!(log.append(event(100)).unwrap(), 5);
}

/// Whether `bytes` holds something that looks like an embedding or an image.
fn biometric_findings(bytes: &[u8], probe: &[f32]) -> Vec<String> {
    let mut found = Vec::new();
    let text = String::from_utf8_lossy(bytes);
    // JSON arrays of >= 16 numbers.
    let mut run = 0usize;
    let mut in_array = false;
    let mut num = false;
    for ch in text.chars() {
        match ch {
            '[' => {
                in_array = true;
                run = 0;
                num = false;
            }
            ']' => {
                if num {
                    run += 1;
                }
                if in_array && run >= 16 {
                    found.push(format!("JSON array of {run} numbers"));
                }
                in_array = false;
            }
            ',' if in_array => {
                if num {
                    run += 1;
                }
                num = false;
            }
            c if in_array && (c.is_ascii_digit() || "-+.eE ".contains(c)) => num |= c.is_ascii_digit(),
            _ if in_array => {
                in_array = false;
            }
            _ => {}
        }
    }
    // Runs of >= 16 plausible embedding components (64 bytes) at any alignment.
    for align in 0..4 {
        let mut run = 0;
        for w in bytes.get(align..).unwrap_or(&[]).chunks_exact(4) {
            let x = f32::from_le_bytes([w[0], w[1], w[2], w[3]]).abs();
            if x.is_finite() && (1e-6..=1.0).contains(&x) {
                run += 1;
                if run == 16 {
                    found.push(format!("run of 16 plausible f32 at alignment {align}"));
                }
            } else {
                run = 0;
            }
        }
    }
    // Any 4 consecutive probe components, raw.
    let probe_bytes: Vec<u8> = probe.iter().flat_map(|x| x.to_le_bytes()).collect();
    for w in probe_bytes.windows(16).step_by(4) {
        if bytes.windows(16).any(|b| b == w) {
            found.push("raw probe bytes".into());
            break;
        }
    }
    for (magic, what) in [(&[0xFF, 0xD8, 0xFF][..], "JPEG"), (&[0x89, 0x50, 0x4E, 0x47][..], "PNG")] {
        if bytes.windows(magic.len()).any(|b| b == magic) {
            found.push(format!("{what} magic"));
        }
    }
    found
}

#[test]
fn audit_directory_holds_no_biometric_data() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut probe: Vec<f32> = (0..128).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let norm = probe.iter().map(|x| x * x).sum::<f32>().sqrt();
    probe.iter_mut().for_each(|x| *x /= norm);
    let gallery: Vec<Vec<f32>> = (0..20)
        .map(|_| {
            let mut g: Vec<f32> = (0..128).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let n = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            g.iter_mut().for_each(|x| *x /= n);
            g
        })
        .collect();

    // The detector itself must fire on what it looks for.
    let mut planted: Vec<u8> = b"{\"x\":".to_vec();
    planted.extend(probe.iter().flat_map(|x| x.to_le_bytes()));
    planted.extend_from_slice(serde_json::to_string(&probe).unwrap().as_bytes());
    planted.extend_from_slice(&[0x89, 0x50, 0x4E, 0x47, 0xFF, 0xD8, 0xFF]);
    let hits = biometric_findings(&planted, &probe);
    assert!(hits.len() >= 5, "{hits:?}");

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let (log, _) = AuditLog::open(&dir, key(), cfg(50, 16, Durability::Off), clock()).unwrap();
    for (t, g) in gallery.iter().enumerate() {
        let score: f32 = probe.iter().zip(g).map(|(a, b)| a * b).sum();
        let mut e = query(t as u64, "op", "access", Some(&format!("s{t}")));
        if let AuditEvent::Query(q) = &mut e {
            q.top_score = Some(score);
        }
        log.append(e).unwrap();
        log.append(event(t as u64)).unwrap();
    }
    drop(log);
    for f in fs::read_dir(&dir).unwrap() {
        let p = f.unwrap().path();
        let b = fs::read(&p).unwrap();
        let hits = biometric_findings(&b, &probe);
        assert!(hits.is_empty(), "{}: {hits:?}", p.display());
    }
}

#[test]
fn filters_and_export() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let clk = clock();
    let (log, _) = AuditLog::open(&dir, key(), cfg(16, 4, Durability::Off), clk.clone()).unwrap();
    for i in 0..90u64 {
        log.append(event(i)).unwrap();
        clk.advance(Duration::from_secs(60));
    }
    drop(log);
    let all = AuditLog::read(&dir, &AuditFilter::default()).unwrap();
    assert_eq!(all.len(), 90);
    assert!(all.iter().all(|r| r.site == "site-A" && r.device == "dev-7"));

    let f = AuditFilter { operator: Some("op1".into()), ..Default::default() };
    let got = AuditLog::read(&dir, &f).unwrap();
    let want: Vec<u64> = (0..90).filter(|&i| event(i).operator() == Some("op1")).collect();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), want);
    assert!(!want.is_empty());

    let f = AuditFilter { kinds: vec![EventKind::Enrolment, EventKind::Deletion], ..Default::default() };
    let got = AuditLog::read(&dir, &f).unwrap();
    assert_eq!(got.len(), 20);
    assert!(got.iter().all(|r| matches!(r.event.kind(), EventKind::Enrolment | EventKind::Deletion)));

    let f = AuditFilter { purpose: Some("payment".into()), ..Default::default() };
    let got = AuditLog::read(&dir, &f).unwrap();
    let want: Vec<u64> = (0..90).filter(|&i| event(i).has_purpose("payment")).collect();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), want);

    let f = AuditFilter { subject: Some("subject-3".into()), kinds: vec![EventKind::Query], ..Default::default() };
    let got = AuditLog::read(&dir, &f).unwrap();
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| r.event.subject() == Some("subject-3") && r.event.kind() == EventKind::Query));

    let t0 = (T0_S * 1000) as i64;
    let f = AuditFilter { from_ms: Some(t0 + 10 * 60_000), until_ms: Some(t0 + 20 * 60_000), ..Default::default() };
    let got = AuditLog::read(&dir, &f).unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), (10..20).collect::<Vec<_>>());

    // Export is JSON lines, exactly the stored records.
    let mut out = Vec::new();
    let f = AuditFilter { from_seq: Some(30), ..Default::default() };
    let n = AuditLog::export_jsonl(&dir, &f, &mut out).unwrap();
    assert_eq!(n, 60);
    let exported: Vec<AuditRecord> =
        out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
    assert_eq!(exported, all[30..].to_vec());
    // Every exported line still proves itself: its hash covers the bytes before it.
    for l in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let body = [&l[..l.len() - 75], b"}"].concat();
        let r: AuditRecord = serde_json::from_slice(l).unwrap();
        assert_eq!(record_hash(&body), r.hash);
    }
    assert_eq!(all[0].prev, genesis_hash());
}

#[test]
fn subscribe_sees_durable_records_in_order() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let (log, _) = AuditLog::open(&dir, key(), cfg(1000, 64, Durability::default()), clock()).unwrap();
    let log = Arc::new(log);
    let rx = log.subscribe();
    let dropped_rx = log.subscribe();
    drop(dropped_rx);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..25 {
                    let seq = log.append(event(t * 100 + i)).unwrap();
                    // Appended means durable: it is already in the file.
                    assert!(log.records() > seq);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let got: Vec<AuditRecord> = (0..100).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), (0..100).collect::<Vec<_>>());
    drop(Arc::try_unwrap(log).unwrap());
    assert!(rx.recv().is_err(), "feed ends when the log closes");
    let stored = AuditLog::read(&dir, &AuditFilter::default()).unwrap();
    assert_eq!(stored, got);
}

#[test]
fn retention_drops_only_segments_older_than_three_years_and_chain_still_verifies() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let clk = clock();
    let c = cfg(10, 4, Durability::Off);
    let (log, _) = AuditLog::open(&dir, key(), c.clone(), clk.clone()).unwrap();
    for i in 0..30 {
        log.append(event(i)).unwrap();
    }
    clk.advance(DAY * 400);
    for i in 30..50 {
        log.append(event(i)).unwrap();
    }
    // 1095.5 days after the first records: still inside 3 years (1096 configured).
    clk.set(UNIX_EPOCH + Duration::from_secs(T0_S) + DAY * 1095 + DAY / 2);
    assert_eq!(log.enforce_retention().unwrap(), 0);
    clk.set(UNIX_EPOCH + Duration::from_secs(T0_S) + DAY * 1097);
    assert_eq!(log.enforce_retention().unwrap(), 3);
    assert_eq!(log.enforce_retention().unwrap(), 0);
    let seq = log.append(event(99)).unwrap();
    assert_eq!(seq, 51, "seq 50 is the retention's own admin record");
    drop(log);

    assert!(!dir.join("seg-000000.log").exists());
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok(), "{rep:?}");
    assert_eq!(rep.retired_segments, 3);
    assert_eq!(rep.records, 52);
    let recs = AuditLog::read(&dir, &AuditFilter::default()).unwrap();
    assert_eq!(recs.first().unwrap().seq, 30);
    let admin = recs.iter().find(|r| r.seq == 50).unwrap();
    assert!(matches!(&admin.event, AuditEvent::Admin { action, .. } if action == "audit-retention"));

    let (_, open) = AuditLog::open(&dir, key(), c.clone(), clk.clone()).unwrap();
    assert_eq!((open.records, open.retired_segments), (52, 3));

    // The tombstones are part of the proof: removing or editing them is detected.
    let tampered = root.path().join("t1");
    copy_dir(&dir, &tampered);
    fs::remove_file(tampered.join("RETIRED")).unwrap();
    assert!(!AuditLog::verify(&tampered, &key()).unwrap().ok());
    let tampered = root.path().join("t2");
    copy_dir(&dir, &tampered);
    let r = fs::read_to_string(tampered.join("RETIRED")).unwrap();
    fs::write(tampered.join("RETIRED"), r.replacen("\"last_seq\":29", "\"last_seq\":28", 1)).unwrap();
    assert!(!AuditLog::verify(&tampered, &key()).unwrap().ok());

    // Retention below three years is refused outright.
    let short = AuditConfig { retention_days: 365, ..c };
    assert!(matches!(AuditLog::open(&dir, key(), short, clk), Err(Error::InvalidConfig { .. })));
}

#[test]
fn rekey_resigns_everything_and_keeps_records() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let clk = clock();
    let c = cfg(10, 4, Durability::Off);
    let (log, _) = AuditLog::open(&dir, key(), c.clone(), clk.clone()).unwrap();
    for i in 0..25 {
        log.append(event(i)).unwrap();
    }
    clk.advance(DAY * 1200);
    log.append(event(25)).unwrap();
    assert_eq!(log.enforce_retention().unwrap(), 2);
    drop(log);
    let before = AuditLog::read(&dir, &AuditFilter::default()).unwrap();

    let new = AuditKey::from_bytes([0x5A; 32]);
    AuditLog::rekey(&dir, &key(), &new).unwrap();
    let rep = AuditLog::verify(&dir, &new).unwrap();
    assert!(rep.ok(), "{rep:?}");
    assert_eq!(rep.retired_segments, 2);
    assert!(matches!(AuditLog::verify(&dir, &key()), Err(Error::Key(_))));
    assert!(matches!(AuditLog::rekey(&dir, &key(), &new), Err(Error::Key(_))));
    assert_eq!(AuditLog::read(&dir, &AuditFilter::default()).unwrap(), before);
    let (log, open) = AuditLog::open(&dir, new.clone(), c, clk).unwrap();
    assert_eq!(open.records, 27);
    log.append(AuditEvent::KeyRotation { operator: "admin".into() }).unwrap();
    drop(log);
    assert!(AuditLog::verify(&dir, &new).unwrap().ok());
}

#[test]
fn concurrent_group_commit_appends_are_gap_free() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let c = cfg(300, 128, Durability::GroupCommit { max_delay_us: 200, max_batch: 64, linger_us: 2000 });
    let (log, _) = AuditLog::open(&dir, key(), c, clock()).unwrap();
    let log = Arc::new(log);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || (0..100).map(|i| log.append(event(t * 1000 + i)).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let mut seqs: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, (0..800).collect::<Vec<_>>());
    // Verification of a live log: the writer is idle, so it is clean.
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && !rep.torn_tail && rep.records == 800, "{rep:?}");
    drop(log);
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && rep.records == 800 && rep.segments == 3, "{rep:?}");
}

/// Every way of committing at once: blocking appends (callers lead commits), tickets kept in
/// windows (some waited, some dropped unredeemed), flushes from another thread, a subscriber,
/// small batches and segments. Every record lands once, in order, and the subscriber sees each.
#[test]
fn mixed_appenders_tickets_flushes_and_a_subscriber_agree() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let c = cfg(97, 16, Durability::GroupCommit { max_delay_us: 0, max_batch: 7, linger_us: 300 });
    let (log, _) = AuditLog::open(&dir, key(), c, clock()).unwrap();
    let log = Arc::new(log);
    let rx = log.subscribe();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                log.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let handles: Vec<_> = (0..6u64)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                let mut window = std::collections::VecDeque::new();
                for i in 0..300u64 {
                    match t % 3 {
                        0 => seqs.push(log.append(event(t * 1000 + i)).unwrap()),
                        _ => {
                            let ticket = log.submit(event(t * 1000 + i)).unwrap();
                            seqs.push(ticket.seqs().start);
                            if t % 3 == 2 && i % 5 == 0 {
                                drop(ticket); // never redeemed: still committed
                            } else {
                                window.push_back(ticket);
                            }
                            if window.len() == 8 {
                                window.pop_front().unwrap().wait().unwrap();
                            }
                        }
                    }
                }
                for w in window {
                    w.wait().unwrap();
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().unwrap();
    seqs.sort();
    assert_eq!(seqs, (0..1800).collect::<Vec<_>>());
    log.flush().unwrap();
    let got: Vec<u64> = rx.try_iter().map(|r| r.seq).collect();
    assert_eq!(got, (0..1800).collect::<Vec<_>>(), "the subscriber saw every record once, in order");
    let st = log.stats();
    assert_eq!(st.records, 1800);
    assert!(st.commits >= 1800 / 7, "max_batch 7: {st:?}");
    drop(log);
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && rep.records == 1800, "{rep:?}");
}

#[test]
fn every_record_durability_and_reopen_after_segment_fills() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let c = cfg(5, 2, Durability::EveryRecord);
    for round in 0..3u64 {
        let (log, open) = AuditLog::open(&dir, key(), c.clone(), clock()).unwrap();
        assert_eq!(open.records, round * 5);
        for i in 0..5 {
            assert_eq!(log.append(event(i)).unwrap(), round * 5 + i);
        }
    }
    let rep = AuditLog::verify(&dir, &key()).unwrap();
    assert!(rep.ok() && rep.records == 15 && rep.segments == 3, "{rep:?}");
}

#[test]
fn removing_any_single_line_or_flipping_any_byte_of_the_log_end_is_detected() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    build_base(&base);
    let mut checked = 0;
    for (si, seg) in segments(&base).iter().enumerate() {
        let ls = lines(&fs::read(seg).unwrap());
        for i in 0..ls.len() {
            let dir = root.path().join(format!("l{si}-{i}"));
            copy_dir(&base, &dir);
            let mut m = ls.clone();
            m.remove(i);
            fs::write(dir.join(seg.file_name().unwrap()), m.concat()).unwrap();
            let rep = AuditLog::verify(&dir, &key()).unwrap();
            assert!(!rep.ok(), "removing line {i} of segment {si} went unnoticed");
            fs::remove_dir_all(&dir).unwrap();
            checked += 1;
        }
    }
    assert!(checked > 130, "{checked}");
    // Every byte of HEAD and of the last two lines (last record's tail, final checkpoint).
    let last = segments(&base).pop().unwrap();
    let bytes = fs::read(&last).unwrap();
    let ls = lines(&bytes);
    let from = bytes.len() - ls[ls.len() - 1].len() - ls[ls.len() - 2].len();
    let dir = root.path().join("flip");
    copy_dir(&base, &dir);
    let head = fs::read(base.join("HEAD")).unwrap();
    for (file, orig, start) in [(dir.join(last.file_name().unwrap()), &bytes, from), (dir.join("HEAD"), &head, 0)] {
        for at in start..orig.len() {
            let mut b = orig.clone();
            b[at] ^= 0x01;
            fs::write(&file, &b).unwrap();
            let rep = AuditLog::verify(&dir, &key()).unwrap();
            assert!(!rep.ok(), "flipping byte {at} of {} went unnoticed", file.display());
        }
        fs::write(&file, orig).unwrap();
    }
    assert!(AuditLog::verify(&dir, &key()).unwrap().ok());
}

/// One thread keeps many records in flight (`submit`), redeeming tickets
/// later: each is durable once its wait returns, seqs are in submit order,
/// a dropped ticket's record is still written, and the log verifies.
#[test]
fn submitted_records_are_durable_when_their_ticket_returns() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let (log, _) = AuditLog::open(&dir, key(), cfg(64, 16, Durability::default()), clock()).unwrap();
    let tickets: Vec<AuditTicket> = (0..200).map(|i| log.submit(event(i)).unwrap()).collect();
    let dropped = log.submit(event(999)).unwrap();
    assert_eq!(dropped.seqs(), 200..201);
    drop(dropped);
    for (i, t) in tickets.into_iter().enumerate() {
        assert_eq!(t.seqs(), i as u64..i as u64 + 1);
        let seqs = t.wait().unwrap();
        assert!(log.records() > seqs.start, "waited means durable");
    }
    let batch = log.submit_batch(vec![event(1000), event(1001)]).unwrap();
    assert_eq!(batch.wait().unwrap(), 201..203);
    log.close().unwrap();
    let report = AuditLog::verify(&dir, &key()).unwrap();
    assert_eq!(report.records, 203);
    assert_eq!(AuditLog::read(&dir, &AuditFilter::default()).unwrap().len(), 203);
}

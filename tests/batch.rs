//! Batch jobs (`facematch::batch` and the batch CLI) on the sample photos:
//! results equal to the one-at-a-time calls in input order, bounded intake,
//! CSV output, bad inputs as rows, no progress output off a terminal, and a
//! run killed with SIGKILL then resumed. Needs `scripts/setup.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use facematch::batch::{run_images, walk_images, BatchInput, BatchJob, BatchOptions, BatchOutput};
use facematch::compliance::*;
use facematch::config::GalleryConfig;
use facematch::engine::{Engine, EngineBuilder, Enrolment, QueryContext};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::store::MasterKey;

fn pipeline() -> &'static FacePipeline {
    static P: OnceLock<FacePipeline> = OnceLock::new();
    P.get_or_init(|| FacePipeline::new(PipelineConfig::default()).expect("models missing: run scripts/setup.sh"))
}

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples")
}

/// A door-access gallery with Barack (obama.jpg) and Joe (biden.jpg) enrolled; the key written to `dir/key`.
fn gallery(dir: &Path) -> (Engine, QueryContext) {
    let door = Purpose::new("door-access").unwrap();
    let mut cfg = GalleryConfig::default();
    cfg.purposes.push(PurposePolicy::new(door.clone(), 365));
    let key = MasterKey::generate();
    std::fs::write(dir.join("key"), key.to_hex()).unwrap();
    let e = EngineBuilder::new(dir.join("g")).key(key).create(cfg).unwrap();
    let op = Operator::new("batch-test").unwrap();
    for (who, img) in [("barack", "obama.jpg"), ("joe", "biden.jpg")] {
        e.record_consent(
            &op,
            ConsentRecord::new(format!("f-{who}"), who, ConsentBasis::SeparateConsent, vec![door.clone()], "clerk", AgeBracket::Adult),
        )
        .unwrap();
        let req = Enrolment::new(SubjectId::new(who).unwrap(), format!("f-{who}"), vec![door.clone()], Vec::new());
        facematch::probe::enrol_image(&e, pipeline(), &op, &std::fs::read(samples().join(img)).unwrap(), req).unwrap();
    }
    (e, QueryContext::new(op, door))
}

fn fm(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_facematch"))
        .args(args)
        .env("FACEMATCH_KEY", std::fs::read_to_string(dir.join("key")).unwrap().trim())
        .env("FACEMATCH_OPERATOR", "batch-test")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every image of the samples folder: the batch gives what `identify_image` /
/// `verify_image` / `process_path` give for it alone, in input order.
#[test]
fn batch_results_equal_the_one_at_a_time_calls_in_input_order() {
    let d = tempfile::tempdir().unwrap();
    let (e, ctx) = gallery(d.path());
    let paths: Vec<PathBuf> = walk_images([samples()]).collect();
    assert!(paths.len() >= 13, "{paths:?}");
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    let stop = AtomicBool::new(false);
    let opts = BatchOptions { threads: 2, window: 4 };

    let mut got = Vec::new();
    let job = BatchJob::Identify { engine: &e, ctx: ctx.clone(), k: 3 };
    let summary = run_images(pipeline(), &job, paths.iter().cloned().map(BatchInput::new), &opts, &stop, &mut |_| {}, &mut |item| {
        got.push(item);
        Ok(())
    })
    .unwrap();
    assert_eq!((summary.done, summary.failed, summary.cancelled), (paths.len() as u64, 0, false));
    let mut matched = 0;
    for (i, (item, path)) in got.iter().zip(&paths).enumerate() {
        assert_eq!((item.index, &item.input.path), (i as u64, path));
        let Ok(BatchOutput::Identified(b)) = &item.result else { panic!("{path:?}: {:?}", item.result) };
        let one = facematch::probe::identify_image(&e, pipeline(), &ctx, &std::fs::read(path).unwrap(), 3).unwrap();
        assert_eq!((b.faces_found, b.faces_discarded), (one.faces_found, one.faces_discarded), "{path:?}");
        assert_eq!(b.matches.len(), one.matches.len(), "{path:?}");
        for (x, y) in b.matches.iter().zip(&one.matches) {
            assert_eq!(x.face, y.face);
            assert_eq!(x.identification.decision, y.identification.decision);
            assert_eq!(x.identification.candidates, y.identification.candidates);
            assert_eq!(x.identification.threshold, y.identification.threshold);
        }
        matched += b.matches.len();
    }
    assert!(matched >= 6, "only {matched} matches");

    // 1:1 against the claimed subject, and the plain face job.
    let claims: Vec<BatchInput> = paths.iter().map(|p| BatchInput::with_subject(p, SubjectId::new("barack").unwrap())).collect();
    let mut got = Vec::new();
    run_images(pipeline(), &BatchJob::Verify { engine: &e, ctx: ctx.clone() }, claims.clone(), &opts, &stop, &mut |_| {}, &mut |item| {
        got.push(item);
        Ok(())
    })
    .unwrap();
    for (item, claim) in got.iter().zip(&claims) {
        assert_eq!(item.input, *claim);
        let Ok(BatchOutput::Verified(b)) = &item.result else { panic!("{:?}", item.result) };
        let one =
            facematch::probe::verify_image(&e, pipeline(), &ctx, &std::fs::read(&claim.path).unwrap(), claim.subject.as_ref().unwrap())
                .unwrap();
        assert_eq!((b.face, b.faces_found, b.faces_discarded), (one.face, one.faces_found, one.faces_discarded));
        assert_eq!((&b.verification.decision, b.verification.score), (&one.verification.decision, one.verification.score));
    }
    let mut got = Vec::new();
    run_images(
        pipeline(),
        &BatchJob::Faces { embeddings: true },
        paths.iter().cloned().map(BatchInput::new),
        &opts,
        &stop,
        &mut |_| {},
        &mut |item| {
            got.push(item);
            Ok(())
        },
    )
    .unwrap();
    for (item, path) in got.iter().zip(&paths) {
        let Ok(BatchOutput::Faces(b)) = &item.result else { panic!("{:?}", item.result) };
        assert_eq!(*b, pipeline().process_path(path, true).unwrap());
    }
    e.close().unwrap();
}

/// Intake never runs more than the window (plus the hand-off queue) ahead
/// of the sink, whatever the number of inputs; the cancel flag stops intake
/// and what was taken in is still delivered, in order.
#[test]
fn intake_stays_within_the_window_and_cancel_stops_it() {
    let paths: Vec<PathBuf> = walk_images([samples()]).collect();
    let many = paths.iter().cycle().take(60).cloned();
    let pulled = AtomicU64::new(0);
    let inputs = many.inspect(|_| {
        pulled.fetch_add(1, Ordering::SeqCst);
    });
    let stop = AtomicBool::new(false);
    let (threads, window) = (2, 3);
    let mut delivered = 0u64;
    let mut max_ahead = 0u64;
    let s = run_images(
        pipeline(),
        &BatchJob::Faces { embeddings: false },
        inputs.map(BatchInput::new),
        &BatchOptions { threads, window },
        &stop,
        &mut |_| {},
        &mut |item| {
            assert_eq!(item.index, delivered);
            delivered += 1;
            max_ahead = max_ahead.max(pulled.load(Ordering::SeqCst) - delivered);
            if delivered == 20 {
                stop.store(true, Ordering::SeqCst);
            }
            Ok(())
        },
    )
    .unwrap();
    // window items in flight, plus the one the feeder holds while it waits.
    assert!(max_ahead <= window as u64 + 1, "intake ran {max_ahead} ahead of the sink");
    assert!(s.cancelled);
    assert_eq!(s.done, delivered);
    assert!((20..=20 + window as u64 + 1).contains(&delivered), "{delivered}");
}

/// CSV output parses with the csv crate: a header, one row per face result
/// (per match for identify; one row for an image without a match), and
/// agrees with the JSON lines of the same run.
#[test]
fn csv_output_parses_with_one_row_per_face_result() {
    let d = tempfile::tempdir().unwrap();
    let (e, _) = gallery(d.path());
    e.close().unwrap();
    let g = d.path().join("g");
    let base = ["identify", "-g", g.to_str().unwrap(), "--purpose", "door-access", "--k", "2", "-q"];
    let s = samples();
    let csv_out = d.path().join("out.csv");
    let r = fm(d.path(), &[&base[..], &[s.to_str().unwrap(), "--format", "csv", "--out", csv_out.to_str().unwrap()]].concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    let r = fm(d.path(), &[&base[..], &[s.to_str().unwrap()]].concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    let json: Vec<serde_json::Value> = text(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(json.len(), walk_images([s.clone()]).count());

    let mut rd = csv::Reader::from_path(&csv_out).unwrap();
    let h = rd.headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name).unwrap_or_else(|| panic!("no column {name}"));
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    let mut by_input: Vec<(String, Vec<&csv::StringRecord>)> = Vec::new();
    for r in &rows {
        assert_eq!(r.len(), h.len());
        match by_input.last_mut() {
            Some((k, v)) if k == &r[0] => v.push(r),
            _ => by_input.push((r[0].to_string(), vec![r])),
        }
    }
    assert_eq!(by_input.len(), json.len());
    for ((input, rs), j) in by_input.iter().zip(&json) {
        assert_eq!(input, j["image"].as_str().unwrap());
        let matches = j["result"]["matches"].as_array().unwrap();
        assert_eq!(rs.len(), matches.len().max(1), "{input}");
        for r in rs {
            assert_eq!(&r[col("rows")], rs.len().to_string());
            assert_eq!(&r[col("faces_found")], j["result"]["faces_found"].to_string());
        }
        for (r, m) in rs.iter().zip(matches) {
            assert_eq!(&r[col("decision")], m["identification"]["decision"]["decision"].as_str().unwrap());
            assert_eq!(&r[col("subject")], m["identification"]["decision"]["subject"].as_str().unwrap());
            let score: f32 = r[col("score")].parse().unwrap();
            assert!((score as f64 - m["identification"]["candidates"][0]["score"].as_f64().unwrap()).abs() < 1e-6);
        }
    }
    assert!(rows.iter().any(|r| &r[col("subject")] == "barack") && rows.iter().any(|r| &r[col("subject")] == "joe"));
}

/// A folder of broken files, non-images and faceless photos: one error row
/// each, the good photo answered, the run completes (exit code 1: something
/// failed); files without an image extension are not inputs. Off a
/// terminal, stderr carries the one summary line and no progress bar.
#[test]
fn bad_inputs_are_error_rows_and_the_run_completes() {
    let d = tempfile::tempdir().unwrap();
    let (e, _) = gallery(d.path());
    e.close().unwrap();
    let dir = d.path().join("in");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(samples().join("obama2.jpg"), dir.join("sub/Good.JPG")).unwrap();
    std::fs::write(dir.join("broken.jpg"), &std::fs::read(samples().join("obama.jpg")).unwrap()[..2000]).unwrap();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::fs::write(dir.join("text.jpeg"), b"this is not an image\n").unwrap();
    let blank = image::RgbImage::from_pixel(320, 240, image::Rgb([40, 120, 200]));
    blank.save(dir.join("faceless.png")).unwrap();
    std::fs::write(dir.join("notes.txt"), b"skipped").unwrap();
    let g = d.path().join("g");
    let csv_out = d.path().join("bad.csv");
    for format in ["jsonl", "csv"] {
        let r = fm(
            d.path(),
            &[
                "identify",
                "-g",
                g.to_str().unwrap(),
                "--purpose",
                "door-access",
                dir.to_str().unwrap(),
                "--format",
                format,
                "--out",
                csv_out.to_str().unwrap(),
            ],
        );
        assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
        let err = text(&r.stderr);
        assert_eq!(err.lines().count(), 1, "stderr is not one summary line: {err:?}");
        assert!(err.starts_with("identify: 5 images") && err.contains("4 failed"), "{err}");
        assert!(!err.contains('\r') && !err.contains('\x1b'), "progress output off a terminal: {err:?}");
        let out = std::fs::read_to_string(&csv_out).unwrap();
        let names = ["broken.jpg", "empty.png", "faceless.png", "sub/Good.JPG", "text.jpeg"];
        if format == "jsonl" {
            let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(lines.len(), 5);
            for (l, n) in lines.iter().zip(names) {
                assert!(l["image"].as_str().unwrap().ends_with(n), "{l}");
                assert_eq!(l["error"].is_string(), n != "sub/Good.JPG", "{l}");
            }
            assert!(lines[2]["error"].as_str().unwrap().contains("no face"), "{}", lines[2]);
            assert!(lines[3]["result"]["matches"][0]["identification"]["decision"]["subject"] == "barack", "{}", lines[3]);
        } else {
            let mut rd = csv::Reader::from_reader(out.as_bytes());
            let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
            assert_eq!(rows.len(), 5);
            for (r, n) in rows.iter().zip(names) {
                assert!(r[0].ends_with(n));
                assert_eq!(&r[2] == "error", n != "sub/Good.JPG", "{r:?}");
                assert_eq!(r[r.len() - 1].is_empty(), n == "sub/Good.JPG", "{r:?}");
            }
        }
    }
}

/// `identify --from-list` killed with SIGKILL mid-run, then `--resume`d:
/// every input is answered exactly once, in input order; the audit log
/// verifies and holds a record behind every answer.
#[test]
fn a_run_killed_with_sigkill_resumes_with_every_input_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let (e, _) = gallery(d.path());
    e.close().unwrap();
    let g = d.path().join("g");
    // The samples repeated: a list long enough to kill the run half-way.
    let paths: Vec<PathBuf> = walk_images([samples()]).collect();
    let list: Vec<String> = paths.iter().cycle().take(120).map(|p| p.to_string_lossy().into_owned()).collect();
    let list_file = d.path().join("list.txt");
    std::fs::write(&list_file, list.join("\n") + "\n").unwrap();
    let out = d.path().join("out.jsonl");
    let args = [
        "identify",
        "-g",
        g.to_str().unwrap(),
        "--purpose",
        "door-access",
        "--from-list",
        list_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "2",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_facematch"))
        .args(args)
        .env("FACEMATCH_KEY", std::fs::read_to_string(d.path().join("key")).unwrap().trim())
        .env("FACEMATCH_OPERATOR", "batch-test")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once some answers are out (or whatever it reached if it was quick).
    let started = std::time::Instant::now();
    loop {
        let n = std::fs::read(&out).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0);
        if n >= 15 || started.elapsed() > std::time::Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let before = std::fs::read_to_string(&out).unwrap();
    let n_before = before.lines().count();
    eprintln!("killed after {n_before} answered of {} (torn tail: {})", list.len(), !before.is_empty() && !before.ends_with('\n'));
    assert!(n_before < list.len(), "the run finished before it could be killed ({n_before} lines, {status:?})");

    let r = fm(d.path(), &[&args[..], &["--resume"]].concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    let err = text(&r.stderr);
    assert!(err.contains("skipped (already answered)") || n_before == 0, "{err}");
    let after = std::fs::read_to_string(&out).unwrap();
    assert!(after.ends_with('\n'));
    let lines: Vec<serde_json::Value> = after.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let images: Vec<&str> = lines.iter().map(|l| l["image"].as_str().unwrap()).collect();
    assert_eq!(images, list, "not every input exactly once in input order");

    // The log verifies, and every answer has its records.
    let r = fm(d.path(), &["audit", "verify", "-g", g.to_str().unwrap()]);
    assert!(r.status.success(), "{} {}", text(&r.stdout), text(&r.stderr));
    let r = fm(d.path(), &["audit", "show", "-g", g.to_str().unwrap()]);
    assert!(r.status.success());
    let records: Vec<serde_json::Value> = text(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: HashMap<u64, &serde_json::Value> = records.iter().map(|r| (r["seq"].as_u64().unwrap(), r)).collect();
    let queries = records.iter().filter(|r| r.to_string().contains("\"identify\"")).count();
    let mut faces = 0;
    for l in &lines {
        faces += l["result"]["faces_found"].as_u64().unwrap();
        for m in l["result"]["matches"].as_array().unwrap() {
            let seq = m["identification"]["audit_seq"].as_u64().unwrap();
            let rec = seqs.get(&seq).unwrap_or_else(|| panic!("no audit record {seq} behind {l}"));
            let subject = m["identification"]["decision"]["subject"].as_str().unwrap();
            assert!(rec.to_string().contains(subject), "{rec} vs {l}");
        }
    }
    assert!(queries as u64 >= faces, "{queries} query records for {faces} faces answered");
}

/// Bulk enrolment: `consent --from-csv` records the good rows and names the
/// bad ones by line (nothing of them recorded); `enrol --from-dir` enrols a
/// `people/<subject>/` folder on each subject's consent, in a reproducible
/// order, and refuses by name the people without consent.
#[test]
fn bulk_consent_and_enrolment_from_a_folder() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    std::fs::write(d.path().join("key"), key.to_hex()).unwrap();
    let g = d.path().join("g");
    let r = fm(d.path(), &["init", "-g", g.to_str().unwrap(), "--purpose", "door-access:365", "--purpose", "payroll:30"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let people = d.path().join("people");
    for (who, imgs) in [("barack", &["obama.jpg", "obama2.jpg"][..]), ("joe", &["biden.jpg"][..]), ("stranger", &["t1.jpg"][..])] {
        std::fs::create_dir_all(people.join(who)).unwrap();
        for i in imgs {
            std::fs::copy(samples().join(i), people.join(who).join(i)).unwrap();
        }
    }
    let csv_file = d.path().join("consents.csv");
    std::fs::write(
        &csv_file,
        "subject,consent_id,purposes,basis,age,guardian\nbarack,f1,door-access;payroll,separate,adult,\njoe,f2,door-access,written,adult,\nkid,f3,door-access,separate,under-14,\nnemo,f4,,separate,adult,\n",
    )
    .unwrap();
    let r = fm(d.path(), &["consent", "-g", g.to_str().unwrap(), "--from-csv", csv_file.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    let lines: Vec<serde_json::Value> = text(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let refused: Vec<u64> = lines.iter().filter(|l| l["error"].is_string()).map(|l| l["line"].as_u64().unwrap()).collect();
    assert_eq!(refused, [4, 5], "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l["recorded"] == true).count(), 2);

    let r = fm(d.path(), &["enrol", "-g", g.to_str().unwrap(), "--from-dir", people.to_str().unwrap(), "--purpose", "door-access"]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    let lines: Vec<serde_json::Value> = text(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, Option<u64>)> = lines.iter().map(|l| (l["subject"].as_str().unwrap(), l["template"].as_u64())).collect();
    assert_eq!(got, [("barack", Some(1)), ("barack", Some(2)), ("joe", Some(3)), ("stranger", None)]);
    assert!(lines[3]["error"].as_str().unwrap().contains("stranger has no recorded consent"), "{}", lines[3]);

    let r = fm(
        d.path(),
        &["identify", "-g", g.to_str().unwrap(), "--purpose", "door-access", "-q", samples().join("obama3.jpg").to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(text(&r.stdout).contains("\"subject\":\"barack\""));
    let r = fm(d.path(), &["audit", "verify", "-g", g.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stdout));
}

/// Ctrl-C (SIGINT) stops intake: what is in flight is finished and written,
/// the exit code is non-zero, and `--resume` carries on to every input once.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_intake_flushes_and_resume_carries_on() {
    let d = tempfile::tempdir().unwrap();
    let (e, _) = gallery(d.path());
    e.close().unwrap();
    let g = d.path().join("g");
    let paths: Vec<PathBuf> = walk_images([samples()]).collect();
    let list: Vec<String> = paths.iter().cycle().take(100).map(|p| p.to_string_lossy().into_owned()).collect();
    let list_file = d.path().join("list.txt");
    std::fs::write(&list_file, list.join("\n") + "\n").unwrap();
    let out = d.path().join("out.csv");
    let args = [
        "identify",
        "-g",
        g.to_str().unwrap(),
        "--purpose",
        "door-access",
        "--from-list",
        list_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "csv",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_facematch"))
        .args(args)
        .env("FACEMATCH_KEY", std::fs::read_to_string(d.path().join("key")).unwrap().trim())
        .env("FACEMATCH_OPERATOR", "batch-test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read(&out).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0) < 10
        && started.elapsed() < std::time::Duration::from_secs(120)
        && child.try_wait().unwrap().is_none()
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let r = child.wait_with_output().unwrap();
    let err = text(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let partial = std::fs::read_to_string(&out).unwrap();
    assert!(partial.ends_with('\n'), "output not flushed whole: {partial:?}");
    let rows = csv::Reader::from_reader(partial.as_bytes()).records().collect::<Result<Vec<_>, _>>().unwrap().len();
    assert!(rows < list.len(), "the run finished before Ctrl-C: nothing left to resume");

    let r = fm(d.path(), &[&args[..], &["--resume", "-q"]].concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    let mut rd = csv::Reader::from_path(&out).unwrap();
    let mut inputs: Vec<String> = Vec::new();
    for rec in rd.records() {
        let rec = rec.unwrap();
        let rows: usize = rec[1].parse().unwrap();
        // one entry per input: the first row of its group
        if inputs.last() != Some(&rec[0].to_string()) || rows == 1 {
            inputs.push(rec[0].to_string());
        }
    }
    assert_eq!(inputs, list);
}

/// `verify --pairs FILE.csv`: one 1:1 per `image,subject` row, in row order; a bad row is an error row.
#[test]
fn verify_pairs_from_a_csv() {
    let d = tempfile::tempdir().unwrap();
    let (e, _) = gallery(d.path());
    e.close().unwrap();
    let s = samples();
    let pairs = d.path().join("pairs.csv");
    let rows = [("obama2.jpg", "barack"), ("biden.jpg", "barack"), ("biden.jpg", "joe"), ("missing.jpg", "joe"), ("obama3.jpg", "nobody")];
    let body: String = rows.iter().map(|(i, w)| format!("{},{w}\n", s.join(i).display())).collect();
    std::fs::write(&pairs, format!("image,subject\n{body}")).unwrap();
    let r = fm(
        d.path(),
        &["verify", "-g", d.path().join("g").to_str().unwrap(), "--purpose", "door-access", "--pairs", pairs.to_str().unwrap(), "-q"],
    );
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    let lines: Vec<serde_json::Value> = text(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), rows.len());
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["subject"].as_str().unwrap(),
                l["result"]["verification"]["decision"]["decision"].as_str().unwrap_or(if l["error"].is_string() { "error" } else { "?" }),
            )
        })
        .collect();
    assert_eq!(got, [("barack", "match"), ("barack", "no_match"), ("joe", "match"), ("joe", "error"), ("nobody", "error")]);
}

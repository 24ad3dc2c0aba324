//! The CLI as a user drives it: init, import (.npy + manifest), search (JSON lines), stats,
//! withdraw, audit verify / show, and clear errors for a wrong key.

use std::path::Path;
use std::process::Command;

fn fm(args: &[&str], key: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_facematch"))
        .args(args)
        .env("FACEMATCH_KEY", std::fs::read_to_string(key).unwrap().trim())
        .env("FACEMATCH_OPERATOR", "cli-test")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn import_search_withdraw_and_audit_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("key");
    let out = Command::new(env!("CARGO_BIN_EXE_facematch")).args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success());
    let g = d.path().join("g");
    let g = g.to_str().unwrap();
    let (ok, _, err) = fm(&["init", "-g", g, "--dim", "32", "--model-id", "synthetic", "--purpose", "door-access:30"], &key);
    assert!(ok, "{err}");

    let set = facematch::synth::generate(&facematch::synth::SynthConfig {
        dim: 32,
        identities: 200,
        queries: 20,
        effective_dim: 24.0,
        ..Default::default()
    })
    .unwrap();
    let npy = d.path().join("g.npy");
    facematch::npy::write_f32_matrix(&npy, &set.gallery, 200, 32).unwrap();
    let manifest = d.path().join("subjects.txt");
    std::fs::write(&manifest, (0..200).map(|i| format!("person-{i}\n")).collect::<String>()).unwrap();
    let (ok, out, err) = fm(
        &[
            "import",
            "-g",
            g,
            "--embeddings",
            npy.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
            "--purpose",
            "door-access",
            "--consent-basis",
            "written",
        ],
        &key,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["imported"], 200);

    let q = d.path().join("q.npy");
    facematch::npy::write_f32_matrix(&q, &set.queries, 20, 32).unwrap();
    let (ok, out, err) = fm(&["search", "-g", g, "--purpose", "door-access", "--embeddings", q.to_str().unwrap(), "--k", "3"], &key);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 20);
    let mut mates = 0;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["query"], i);
        assert!(l["candidates"].as_array().unwrap().len() <= 3);
        assert!(l["decision"]["decision"].is_string());
        if let Some(id) = set.query_identity[i] {
            if l["candidates"][0]["subject"] == format!("person-{id}") {
                mates += 1;
            }
        }
    }
    assert!(mates >= 12, "only {mates} of the enrolled queries found their mate first");
    // an undeclared purpose is refused with a clear message
    let (ok, _, err) = fm(&["search", "-g", g, "--purpose", "marketing", "--embeddings", q.to_str().unwrap()], &key);
    assert!(!ok && err.contains("specific-purpose"), "{err}");

    // calibrate a threshold on the probes (labels: subject or empty line) and apply it
    let labels = d.path().join("labels.txt");
    std::fs::write(
        &labels,
        set.query_identity.iter().map(|q| q.map(|i| format!("person-{i}")).unwrap_or_default() + "\n").collect::<String>(),
    )
    .unwrap();
    let cal = [
        "calibrate",
        "-g",
        g,
        "--purpose",
        "door-access",
        "--mode",
        "verify",
        "--embeddings",
        q.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
    ];
    let (ok, out, err) = fm(&[&cal[..], &["--target", "0.01", "--apply"]].concat(), &key);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["calibration"]["false_match_rate"].as_f64().unwrap() <= 0.01, "{v}");
    assert_eq!(v["applied_version"], 2, "{v}"); // the threshold version was bumped from 1
    let (ok, _, err) = fm(&[&cal[..], &["--target", "0.00001"]].concat(), &key);
    assert!(!ok && err.contains("cannot resolve"), "{err}");

    let (ok, out, _) = fm(&["withdraw", "-g", g, "--subject", "person-7", "--compact"], &key);
    assert!(ok);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["templates"].as_array().unwrap().len(), 1);
    assert_eq!(r["bytes_removed"], true);
    let (ok, out, _) = fm(&["stats", "-g", g], &key);
    assert!(ok);
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((s["templates"].as_u64(), s["people"].as_u64(), s["filing_threshold"].as_u64()), (Some(199), Some(199), Some(100_000)));

    let (ok, out, err) = fm(&["audit", "verify", "-g", g], &key);
    assert!(ok, "{out} {err}");
    let (ok, out, err) = fm(&["audit", "show", "-g", g, "--subject", "person-7"], &key);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.contains("consent_withdrawn")));

    // a wrong key: clear error, non-zero exit
    let other = d.path().join("other");
    Command::new(env!("CARGO_BIN_EXE_facematch")).args(["keygen", "--out"]).arg(&other).output().unwrap();
    let (ok, _, err) = fm(&["stats", "-g", g], &other);
    assert!(!ok && err.contains("does not open the gallery"), "{err}");
}

/// `facematch anonymise` writes a copy in which the detector finds no face; bad input is a clear error.
#[test]
fn anonymise_writes_a_copy_with_no_detectable_face() {
    let d = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples/t1.jpg");
    let out = d.path().join("anon.png");
    let run = |args: &[&std::ffi::OsStr]| Command::new(env!("CARGO_BIN_EXE_facematch")).args(args).output().unwrap();
    let r = run(&["anonymise".as_ref(), sample.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["faces_anonymised"], 6);
    let r = run(&["faces".as_ref(), out.as_os_str()]);
    assert!(r.status.success());
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["faces"].as_array().unwrap().len(), 0, "{v}");
    let r = run(&["anonymise".as_ref(), sample.as_os_str(), "--out".as_ref(), out.as_os_str(), "--mosaic".as_ref(), "40".as_ref()]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("cells"), "{}", String::from_utf8_lossy(&r.stderr));
}

/// Import states its consent basis, checks every row before writing (naming the bad line), and an
/// import that is run again (after a crash or a failure) skips the rows already in.
#[test]
fn import_is_checked_first_and_resumable() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("key");
    Command::new(env!("CARGO_BIN_EXE_facematch")).args(["keygen", "--out"]).arg(&key).output().unwrap();
    let g = d.path().join("g");
    let g = g.to_str().unwrap();
    assert!(fm(&["init", "-g", g, "--dim", "8", "--model-id", "m", "--purpose", "door-access:30"], &key).0);
    let rows: Vec<f32> = (0..40).map(|i| ((i * 37 % 11) as f32) - 5.0 + 0.5).collect();
    let npy = d.path().join("e.npy");
    facematch::npy::write_f32_matrix(&npy, &rows, 5, 8).unwrap();
    let manifest = d.path().join("m.txt");
    let args = |m: &str| -> Vec<String> {
        ["import", "-g", g, "--embeddings", npy.to_str().unwrap(), "--manifest", m, "--purpose", "door-access"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    // No basis stated: refused by the command line.
    std::fs::write(&manifest, "a\nb\nc\nd\ne\n").unwrap();
    let a: Vec<String> = args(manifest.to_str().unwrap());
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let (ok, _, err) = fm(&a, &key);
    assert!(!ok && err.contains("consent-basis"), "{err}");
    // A bad id on line 4: named, and nothing written.
    std::fs::write(&manifest, "a\nb\nc\n d\ne\n").unwrap();
    let mut a2 = a.clone();
    a2.extend(["--consent-basis", "written"]);
    let (ok, _, err) = fm(&a2, &key);
    assert!(!ok && err.contains("line 4"), "{err}");
    let (_, out, _) = fm(&["stats", "-g", g], &key);
    assert!(out.contains("\"templates\":0"), "{out}");
    // A NaN in row 3, read in blocks of 2 rows: named, and nothing written.
    std::fs::write(&manifest, "a\nb\nc\nd\ne\n").unwrap();
    let mut bad = rows.clone();
    bad[3 * 8 + 2] = f32::NAN;
    let bad_npy = d.path().join("bad.npy");
    facematch::npy::write_f32_matrix(&bad_npy, &bad, 5, 8).unwrap();
    let mut a3: Vec<String> = a2.iter().map(|s| s.replace(npy.to_str().unwrap(), bad_npy.to_str().unwrap())).collect();
    a3.extend(["--batch".to_string(), "2".to_string()]);
    let (ok, _, err) = fm(&a3.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &key);
    assert!(!ok && err.contains("row 3"), "{err}");
    let (_, out, _) = fm(&["stats", "-g", g], &key);
    assert!(out.contains("\"templates\":0"), "{out}");
    // Imported (in blocks of 2 rows), then imported again: the second run skips every row.
    let mut a2 = a2.clone();
    a2.extend(["--batch", "2"]);
    let (ok, out, err) = fm(&a2, &key);
    assert!(ok, "{err}");
    assert!(out.contains("\"imported\":5"), "{out}");
    let (ok, out, err) = fm(&a2, &key);
    assert!(ok, "{err}");
    assert!(out.contains("\"imported\":0") && out.contains("\"skipped_already_imported\":5"), "{out}");
    let (_, out, _) = fm(&["stats", "-g", g], &key);
    assert!(out.contains("\"templates\":5"), "{out}");
}

//! Throughput of the spine's stages on the sample photos, in faces per second,
//! per precision: `detect/{f32,int8}` (letterbox + YuNet + decode/NMS, one
//! image), `letterbox` (the detector's input alone, one image), `align`
//! (Umeyama + bilinear warp, one face), `embed/{f32,int8}` (SFace, batches of
//! 1 and 6 faces) and `end_to_end/{f32,int8rec,int8}`
//! (decode + detect + align + embed over all sample photos, parallel across
//! images; `int8rec` = int8 SFace behind the f32 YuNet; `int8rec_fit` = the same
//! with the detector run at the letterboxed size, `fit_input`). Needs `scripts/setup.sh`.
//!
//! `cargo bench --bench embed`

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::runtime::Precision;

fn samples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh first)", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    v.sort();
    v
}

/// The setups benched: f32, the int8 recogniser behind the f32 detector, both
/// models int8, and the default (`int8rec_fit`: the int8 recogniser, the f32
/// detector at an input fitted to the image; docs/MODELS.md).
fn setups() -> Vec<(&'static str, PipelineConfig)> {
    // The whole 640x640 detector input, except `int8rec_fit` (the default).
    let mut whole = PipelineConfig::default();
    whole.detector.fit_input = false;
    let mut f32 = whole.clone();
    f32.set_precision(Precision::F32, Precision::F32);
    let mut int8_rec = whole.clone();
    int8_rec.set_precision(Precision::Int8, Precision::F32);
    let mut int8 = whole;
    int8.set_precision(Precision::Int8, Precision::Int8);
    let fit = PipelineConfig::default();
    vec![("f32", f32), ("int8rec", int8_rec), ("int8", int8), ("int8rec_fit", fit)]
}

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/samples");
    let paths = samples();
    for (name, cfg) in setups() {
        let pipeline = FacePipeline::new(cfg).expect("pipeline (run scripts/setup.sh first)");
        let group_photo = pipeline.decode_path(&dir.join("t1.jpg")).expect("t1.jpg");
        let faces = pipeline.detect(&group_photo).expect("detect");
        assert_eq!(faces.len(), 6);

        if name == "f32" || name == "int8" || name == "int8rec_fit" {
            let mut g = c.benchmark_group(format!("detect/{name}"));
            g.sample_size(20);
            g.throughput(Throughput::Elements(faces.len() as u64));
            g.bench_function("t1_1280x886", |b| b.iter(|| pipeline.detect(&group_photo).expect("detect")));
            g.finish();
        }

        if name == "f32" {
            let spec = &pipeline.config().detector.input;
            let mut buf = vec![0f32; spec.plane_len()];
            let mut g = c.benchmark_group("letterbox");
            g.throughput(Throughput::Elements(1));
            g.bench_function("t1_1280x886_to_640", |b| {
                b.iter(|| facematch::letterbox::letterbox_into(&group_photo, spec, false, &mut buf))
            });
            g.finish();

            let mut g = c.benchmark_group("align");
            g.throughput(Throughput::Elements(1));
            g.bench_function("one_face", |b| b.iter(|| pipeline.align(&group_photo, &faces[0]).expect("align")));
            g.finish();
        }

        if name == "f32" || name == "int8rec" {
            let crops: Vec<_> = faces.iter().map(|f| pipeline.align(&group_photo, f).expect("align")).collect();
            let mut g = c.benchmark_group(format!("embed/{}", pipeline.config().recognizer.precision));
            g.sample_size(20);
            for n in [1usize, 6] {
                g.throughput(Throughput::Elements(n as u64));
                g.bench_with_input(BenchmarkId::new("batch", n), &n, |b, &n| {
                    b.iter(|| pipeline.embed_aligned(&crops[..n]).expect("embed"))
                });
            }
            g.finish();
        }

        let total: usize = pipeline.process_paths(&paths, false).into_iter().map(|r| r.expect("sample").faces.len()).sum();
        let mut g = c.benchmark_group(format!("end_to_end/{name}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(total as u64));
        g.bench_function("samples_parallel", |b| {
            b.iter(|| {
                for r in pipeline.process_paths(&paths, true) {
                    r.expect("sample");
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! End-to-end throughput of the face pipeline (decode, detect, align, embed)
//! over a set of images, printed as one JSON line. Used by
//! `scripts/bench_opencv.py` for the side-by-side with OpenCV.
//!
//! ```text
//! cargo run --release --example throughput -- [--intra N] [--threads N] [--pool N] [--rounds R] [--precision f32|int8] [--det-precision f32|int8] [--fit] IMAGE...
//! ```
//! Defaults: intra-op threads 1, rayon threads = cores, session pool = cores, 3 rounds
//! (after one warm-up round), the sample photos when no image is given. The detector
//! runs at the whole 640x640 input unless `--fit` (the library's default, `fit_input`).

use std::path::PathBuf;
use std::time::Instant;

use facematch::pipeline::{FacePipeline, PipelineConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut intra = 1usize;
    let mut threads = 0usize;
    let mut pool = 0usize;
    let mut rounds = 3usize;
    let mut stages = false;
    let mut opt: Option<facematch::runtime::GraphOptimization> = None;
    let mut precision = PipelineConfig::default().recognizer.precision;
    let mut det_precision = None;
    let mut fit = false;
    let mut images: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num =
            |name: &str| -> Result<usize, Box<dyn std::error::Error>> { Ok(args.next().ok_or(format!("{name} needs a value"))?.parse()?) };
        match a.as_str() {
            "--intra" => intra = num("--intra")?,
            "--threads" => threads = num("--threads")?,
            "--pool" => pool = num("--pool")?,
            "--rounds" => rounds = num("--rounds")?,
            "--stages" => stages = true,
            "--fit" => fit = true,
            "--precision" => precision = args.next().ok_or("--precision needs a value")?.parse()?,
            "--det-precision" => det_precision = Some(args.next().ok_or("--det-precision needs a value")?.parse()?),
            "--opt" => opt = Some(serde_json::from_str(&format!("{:?}", args.next().ok_or("--opt needs a value")?))?),
            _ => images.push(PathBuf::from(a)),
        }
    }
    if images.is_empty() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/samples");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
            .collect();
        found.sort();
        images = found;
    }
    if threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    let mut cfg = PipelineConfig::default();
    cfg.set_precision(precision, det_precision.unwrap_or(facematch::runtime::Precision::F32));
    cfg.detector.fit_input = fit;
    cfg.detector.session.intra_threads = intra;
    cfg.recognizer.session.intra_threads = intra;
    cfg.detector.session.pool_size = pool;
    cfg.recognizer.session.pool_size = pool;
    if let Some(o) = opt {
        cfg.detector.session.optimization = o;
        cfg.recognizer.session.optimization = o;
    }
    let pipeline = FacePipeline::new(cfg)?;

    if stages {
        // Sequential per-stage timing (one thread), to see where the time goes.
        let (mut t_dec, mut t_det, mut t_align, mut t_emb, mut n_faces) = (0.0, 0.0, 0.0, 0.0, 0usize);
        let mut t_lb = 0.0;
        let spec = &pipeline.config().detector.input;
        let mut lb_buf = vec![0f32; spec.plane_len()];
        for _ in 0..rounds {
            for p in &images {
                let t = Instant::now();
                let img = pipeline.decode_path(p)?;
                t_dec += t.elapsed().as_secs_f64();
                // The letterbox alone (detect does it again, inside its time).
                let t = Instant::now();
                facematch::detect::letterbox_into(&img, spec, pipeline.config().detector.upscale, &mut lb_buf);
                t_lb += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let faces = pipeline.detect(&img)?;
                t_det += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let crops = faces.iter().map(|f| pipeline.align(&img, f)).collect::<Result<Vec<_>, _>>()?;
                t_align += t.elapsed().as_secs_f64();
                let t = Instant::now();
                pipeline.embed_aligned(&crops)?;
                t_emb += t.elapsed().as_secs_f64();
                n_faces += faces.len();
            }
        }
        let n_img = (images.len() * rounds) as f64;
        println!(
            "{{\"stages_ms\":{{\"decode_per_image\":{:.2},\"letterbox_per_image\":{:.2},\"detect_per_image\":{:.2},\"align_per_face\":{:.3},\"embed_per_face\":{:.2}}}}}",
            1e3 * t_dec / n_img,
            1e3 * t_lb / n_img,
            1e3 * t_det / n_img,
            1e3 * t_align / n_faces as f64,
            1e3 * t_emb / n_faces as f64
        );
    }
    let run = || -> Result<usize, facematch::Error> {
        let mut faces = 0;
        for r in pipeline.process_paths(&images, true) {
            faces += r?.faces.len();
        }
        Ok(faces)
    };
    run()?; // warm-up
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut faces = 0;
    for _ in 0..rounds {
        faces += run()?;
    }
    let secs = start.elapsed().as_secs_f64();
    // Process CPU time per face: unlike wall time, barely moved by other load on the machine.
    let cpu_ms_per_face = 1e3 * (cpu_seconds() - cpu0) / faces.max(1) as f64;
    println!(
        "{{\"engine\":\"facematch\",\"images\":{},\"faces\":{},\"seconds\":{:.4},\"faces_per_s\":{:.2},\"images_per_s\":{:.2},\"intra_threads\":{},\"rayon_threads\":{},\"pool\":{},\"precision\":\"{}\",\"detector_precision\":\"{}\",\"ort\":{:?},\"cpu_ms_per_face\":{:.2},\"fit_input\":{}}}",
        images.len() * rounds,
        faces,
        secs,
        faces as f64 / secs,
        (images.len() * rounds) as f64 / secs,
        intra,
        rayon::current_num_threads(),
        if pool == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { pool },
        precision,
        det_precision.unwrap_or(facematch::runtime::Precision::F32),
        facematch::runtime::runtime(&Default::default())?.library().display().to_string(),
        cpu_ms_per_face,
        fit,
    );
    Ok(())
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

//! `facematch`: command-line client of the facematch library.
//!
//! ```text
//! facematch faces [--embeddings] IMAGE...
//! ```
//! prints one JSON object per image and line, in input order:
//! `{"image": PATH, "faces": [{"bbox": [x,y,w,h], "score": S, "landmarks": [[x,y] x5], "embedding": [...]}]}`
//! or `{"image": PATH, "error": "..."}`; exit code 1 if any input failed.
//! Logs go to stderr (`RUST_LOG`), never embeddings.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use facematch::pipeline::{FacePipeline, PipelineConfig};

#[derive(Parser, Debug)]
#[command(name = "facematch", version, about = "Face detection, embedding and matching engine")]
struct Cli {
    /// Pipeline configuration file (JSON, `PipelineConfig`); defaults otherwise.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Explicit path to libonnxruntime (overrides the configuration and the search).
    #[arg(long, global = true, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
    /// Recogniser precision: int8 (the default: twice as fast, interchangeable
    /// with f32, the same model id) or f32 (the reference).
    #[arg(long, global = true, value_name = "f32|int8")]
    precision: Option<facematch::runtime::Precision>,
    /// Detector precision (default f32: the int8 detector is no faster here and
    /// moves landmarks more).
    #[arg(long, global = true, value_name = "f32|int8")]
    detector_precision: Option<facematch::runtime::Precision>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Detect faces in images and print them as JSON lines.
    Faces(FacesArgs),
    /// Write a copy of an image with every face anonymised (no gallery involved).
    Anonymise(AnonymiseArgs),
    #[command(flatten)]
    Gallery(cli::GalleryCommand),
}

#[derive(clap::Args, Debug)]
struct FacesArgs {
    /// Also compute the L2-normalised embedding of every face.
    #[arg(long)]
    embeddings: bool,
    #[command(flatten)]
    inputs: cli::batch::ImageInputs,
    #[command(flatten)]
    out: cli::batch::BatchOut,
}

#[derive(clap::Args, Debug)]
struct AnonymiseArgs {
    /// The image to anonymise.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Where to write the result (.png: lossless; anything else: JPEG).
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// A coarse mosaic of this many cells across each face instead of a solid fill (1-8).
    #[arg(long, value_name = "CELLS")]
    mosaic: Option<u32>,
    /// Grow each face box by this fraction on every side.
    #[arg(long, default_value_t = 0.25)]
    margin: f32,
    /// JPEG quality (1-100).
    #[arg(long, default_value_t = 90)]
    quality: u8,
}

fn run_anonymise(pipeline: &FacePipeline, args: &AnonymiseArgs) -> anyhow::Result<bool> {
    use facematch::anonymise::{AnonymiseConfig, Redaction};
    use facematch::image_io::OutputFormat;
    let redaction = match args.mosaic {
        Some(cells) => Redaction::Mosaic { cells },
        None => Redaction::default(),
    };
    let cfg = AnonymiseConfig { redaction, margin: args.margin };
    let max = facematch::image_io::ImageLimits::default().max_file_bytes;
    let bytes = facematch::fs::read_bounded(&args.image, max)?;
    let (img, faces) = facematch::probe::anonymise_image(pipeline, &bytes, &cfg)?;
    let png = args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let format = if png { OutputFormat::Png } else { OutputFormat::Jpeg { quality: args.quality } };
    let encoded = facematch::image_io::encode(&img, format)?;
    std::fs::write(&args.out, encoded).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", serde_json::json!({ "image": args.image, "out": args.out, "faces_anonymised": faces.len() }));
    Ok(true)
}

fn load_config(cli: &Cli) -> anyhow::Result<PipelineConfig> {
    let mut cfg = match &cli.config {
        Some(path) => {
            let text = cli::read_text(path, 1 << 20)?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => PipelineConfig::default(),
    };
    if let Some(lib) = &cli.ort_lib {
        cfg.runtime.ort_library = Some(lib.clone());
    }
    if cli.precision.is_some() || cli.detector_precision.is_some() {
        cfg.set_precision(cli.precision.unwrap_or(cfg.recognizer.precision), cli.detector_precision.unwrap_or(cfg.detector.precision));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// mimalloc: opening and closing a gallery of millions allocates and frees
/// millions of small strings across threads (see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = (|| -> anyhow::Result<bool> {
        let config = load_config(&cli)?;
        match &cli.command {
            Command::Faces(args) => {
                let pipeline = FacePipeline::new(config).context("loading the face pipeline")?;
                cli::batch::run_faces(&pipeline, args.embeddings, &args.inputs, &args.out)
            }
            Command::Anonymise(args) => {
                let pipeline = FacePipeline::new(config).context("loading the face pipeline")?;
                run_anonymise(&pipeline, args)
            }
            Command::Gallery(cmd) => cli::run(cmd, &config),
        }
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("facematch: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once (a facematch error
/// already names its OS error, which is also its source).
fn error_text(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let t = cause.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

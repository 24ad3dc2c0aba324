//! The spine in one object: image -> faces -> embeddings.
//!
//! [`FacePipeline`] is built once from a [`PipelineConfig`] (ONNX Runtime
//! loaded, both models loaded into session pools) and is `Send + Sync`: share
//! it behind an `Arc` and call it from any thread. [`FacePipeline::process_paths`]
//! runs images in parallel on the rayon pool; within one image all faces are
//! embedded in one batch.
//!
//! ```no_run
//! use facematch::pipeline::{FacePipeline, PipelineConfig};
//! let pipeline = FacePipeline::new(PipelineConfig::default())?;
//! let result = pipeline.process_path("data/samples/obama.jpg".as_ref(), true)?;
//! for face in &result.faces {
//!     println!("{:?} score {:.3}", face.bbox, face.score);
//! }
//! # Ok::<(), facematch::Error>(())
//! ```

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::align::{align_face, AlignedFace};
pub use crate::detect::Face;
use crate::detect::{Detector, DetectorConfig};
use crate::embed::{Recognizer, RecognizerConfig};
use crate::image_io::{self, DecodedImage, ImageLimits};
use crate::runtime::{self, Precision, RuntimeConfig};
use crate::{Error, Result};

/// Everything the spine needs, with defaults that describe the set-up's files.
///
/// ```
/// let cfg: facematch::pipeline::PipelineConfig =
///     serde_json::from_str(r#"{"detector": {"score_threshold": 0.7}}"#).unwrap();
/// assert_eq!(cfg.detector.score_threshold, 0.7);
/// assert_eq!(cfg.recognizer.dimension, 128);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Where ONNX Runtime is.
    pub runtime: RuntimeConfig,
    /// Image decoding limits.
    pub image: ImageLimits,
    /// Detector model and post-processing.
    pub detector: DetectorConfig,
    /// Recognition model.
    pub recognizer: RecognizerConfig,
}

impl PipelineConfig {
    /// The set-up's files at these precisions, everything else as configured:
    /// sets each model's `precision` and file, and the recogniser's model id
    /// ([`RecognizerConfig::sface`], [`DetectorConfig::yunet`]). The default,
    /// an int8 recogniser behind the f32 detector, is the fast accurate choice:
    /// the int8 detector is no faster and moves landmarks by up to ~10% of the
    /// eye distance (`docs/MODELS.md`).
    ///
    /// ```
    /// use facematch::pipeline::PipelineConfig;
    /// use facematch::runtime::Precision;
    /// let mut cfg = PipelineConfig::default();
    /// cfg.detector.score_threshold = 0.7;
    /// cfg.set_precision(Precision::F32, Precision::F32);
    /// assert_eq!((cfg.recognizer.model_id.as_str(), cfg.detector.score_threshold), ("sface-2021dec", 0.7));
    /// assert_eq!(cfg.recognizer.model.to_str(), Some("models/sface.onnx"));
    /// assert_eq!(cfg.detector.model.to_str(), Some("models/yunet.onnx"));
    /// ```
    pub fn set_precision(&mut self, recognizer: Precision, detector: Precision) {
        let (d, r) = (DetectorConfig::yunet(detector), RecognizerConfig::sface(recognizer));
        self.detector.precision = detector;
        self.detector.model = d.model;
        self.recognizer.precision = recognizer;
        self.recognizer.model = r.model;
        self.recognizer.model_id = r.model_id;
    }

    /// Validate every part.
    pub fn validate(&self) -> Result<()> {
        self.runtime.validate()?;
        self.image.validate()?;
        self.detector.validate()?;
        self.recognizer.validate()
    }
}

/// The faces found in one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageFaces {
    /// Width of the (upright) image.
    pub width: u32,
    /// Height of the (upright) image.
    pub height: u32,
    /// Faces, by decreasing detection score.
    pub faces: Vec<Face>,
}

/// Detector + aligner + recogniser, loaded once (`Send + Sync`).
#[derive(Debug)]
pub struct FacePipeline {
    config: PipelineConfig,
    detector: Detector,
    recognizer: Recognizer,
}

impl FacePipeline {
    /// Validate `config`, load ONNX Runtime (once per process) and both models.
    pub fn new(config: PipelineConfig) -> Result<Self> {
        config.validate()?;
        let rt = runtime::runtime(&config.runtime)?;
        // The two models load at the same time (start-up of a short command).
        let (detector, recognizer) = std::thread::scope(|s| {
            let d = s.spawn(|| Detector::new(rt, config.detector.clone()));
            let r = Recognizer::new(rt, config.recognizer.clone());
            let d = d.join().unwrap_or_else(|_| {
                Err(Error::Model { model: config.detector.model.display().to_string(), reason: "loading panicked".into() })
            });
            (d, r)
        });
        let (detector, recognizer) = (detector?, recognizer?);
        Ok(FacePipeline { config, detector, recognizer })
    }

    /// The configuration in use.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Identifier of the embedding model (stored with templates).
    pub fn model_id(&self) -> &str {
        &self.config.recognizer.model_id
    }

    /// Embedding dimension.
    pub fn dimension(&self) -> usize {
        self.config.recognizer.dimension
    }

    /// Decode an image file with the configured limits.
    pub fn decode_path(&self, path: &Path) -> Result<DecodedImage> {
        image_io::decode_path(path, &self.config.image)
    }

    /// Decode an in-memory image with the configured limits.
    pub fn decode_bytes(&self, bytes: &[u8]) -> Result<DecodedImage> {
        image_io::decode_bytes(bytes, &self.config.image)
    }

    /// Detect faces (no embeddings).
    pub fn detect(&self, img: &DecodedImage) -> Result<Vec<Face>> {
        self.detector.detect(img)
    }

    /// Align one face onto the recogniser's template and input size.
    pub fn align(&self, img: &DecodedImage, face: &Face) -> Result<AlignedFace> {
        let r = &self.config.recognizer;
        align_face(img, &face.landmarks, &r.template, r.input.width, r.input.height)
    }

    /// Embed aligned crops (batched), L2-normalised.
    pub fn embed_aligned(&self, crops: &[AlignedFace]) -> Result<Vec<Vec<f32>>> {
        self.recognizer.embed(crops)
    }

    /// Fill `embedding` of every face of `img` (one batch per call).
    pub fn embed_faces(&self, img: &DecodedImage, faces: &mut [Face]) -> Result<()> {
        let crops = faces.iter().map(|f| self.align(img, f)).collect::<Result<Vec<_>>>()?;
        let embeddings = self.recognizer.embed(&crops)?;
        for (f, e) in faces.iter_mut().zip(embeddings) {
            f.embedding = Some(e);
        }
        Ok(())
    }

    /// Detect, and embed when asked, on a decoded image.
    pub fn process_image(&self, img: &DecodedImage, with_embeddings: bool) -> Result<ImageFaces> {
        let mut faces = self.detect(img)?;
        if with_embeddings {
            self.embed_faces(img, &mut faces)?;
        }
        Ok(ImageFaces { width: img.width(), height: img.height(), faces })
    }

    /// Decode a file and process it; errors name the file.
    pub fn process_path(&self, path: &Path, with_embeddings: bool) -> Result<ImageFaces> {
        let img = self.decode_path(path)?;
        let out = self.process_image(&img, with_embeddings);
        tracing::debug!(path = %path.display(), faces = out.as_ref().map(|r| r.faces.len()).unwrap_or(0), "processed");
        out.map_err(|e| match e {
            Error::BadImage { path: None, reason } => Error::BadImage { path: Some(path.to_path_buf()), reason },
            other => other,
        })
    }

    /// Decode bytes and process them.
    pub fn process_bytes(&self, bytes: &[u8], with_embeddings: bool) -> Result<ImageFaces> {
        let img = self.decode_bytes(bytes)?;
        self.process_image(&img, with_embeddings)
    }

    /// Process many files in parallel (rayon); results in input order, one per path.
    pub fn process_paths(&self, paths: &[PathBuf], with_embeddings: bool) -> Vec<Result<ImageFaces>> {
        paths.par_iter().map(|p| self.process_path(p, with_embeddings)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FacePipeline>();
    }

    #[test]
    fn invalid_config_is_refused_before_loading() {
        let mut cfg = PipelineConfig::default();
        cfg.image.max_pixels = 0;
        assert!(matches!(FacePipeline::new(cfg), Err(Error::InvalidConfig { .. })));
        assert!(serde_json::from_str::<PipelineConfig>(r#"{"detectr": {}}"#).is_err());
    }
}

//! Face embeddings with a recognition model (SFace by default) through ONNX
//! Runtime: aligned crops in, L2-normalised vectors out, batched.
//!
//! The model is described by [`RecognizerConfig`] (file, input name, size,
//! layout, channel order, scaling, output name, dimension, alignment
//! template), so another ONNX embedding model can be plugged in by configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::align::{AlignedFace, ARCFACE_112};
use crate::runtime::{ChannelOrder, ImageInput, Layout, Precision, Runtime, SessionPool, SessionSettings};
use crate::{Error, Result};

/// Model id of SFace, f32 or int8: the int8 file set-up quantises makes
/// embeddings interchangeable with the f32 ones (cosine to them >= 0.994 on
/// every sample face, no pair decision changes, f32 against int8 included:
/// `tests/fidelity.rs`, `docs/MODELS.md`), so a gallery takes either.
pub const SFACE_ID: &str = "sface-2021dec";
/// Model id of the f32 SFace (the same as the int8 one, [`SFACE_ID`]).
pub const SFACE_F32_ID: &str = SFACE_ID;
/// Model id of the int8 SFace (the same as the f32 one, [`SFACE_ID`]).
/// Galleries enrolled under session 9's opt-in id `sface-2021dec-int8` (an
/// earlier, less faithful int8 file) keep that id: open them with a
/// configuration that names it (`{"recognizer": {"model_id": "sface-2021dec-int8"}}`).
pub const SFACE_INT8_ID: &str = SFACE_ID;

/// Description of the recognition model.
///
/// The file follows `precision` unless given. The default is the int8 SFace
/// (twice as fast, interchangeable with f32); `{"precision": "f32"}` is the
/// f32 reference.
///
/// ```
/// use facematch::embed::RecognizerConfig;
/// use facematch::runtime::Precision;
/// let cfg = RecognizerConfig::default();
/// assert_eq!((cfg.model_id.as_str(), cfg.dimension, cfg.precision), ("sface-2021dec", 128, Precision::Int8));
/// cfg.validate().unwrap();
/// let f32: RecognizerConfig = serde_json::from_str(r#"{"precision": "f32"}"#).unwrap();
/// assert_eq!(f32, RecognizerConfig::sface(Precision::F32));
/// assert_eq!((f32.model_id.as_str(), f32.model.to_str()), ("sface-2021dec", Some("models/sface.onnx")));
/// assert_eq!(serde_json::from_str::<RecognizerConfig>("{}").unwrap(), cfg);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RecognizerConfigRepr")]
pub struct RecognizerConfig {
    /// Identifier stored with every template (galleries refuse mixing models).
    pub model_id: String,
    /// Numeric precision of the model file (sets the default file).
    pub precision: Precision,
    /// ONNX file; a relative path is searched like the ORT library (see [`crate::runtime`]).
    pub model: PathBuf,
    /// Input tensor description (SFace: `data`, 112x112, NCHW, RGB, 0..255).
    pub input: ImageInput,
    /// Output tensor name (SFace: `fc1`).
    pub output: String,
    /// Embedding dimension (SFace: 128).
    pub dimension: usize,
    /// Landmark template in input pixel coordinates (ArcFace 112x112 for SFace).
    pub template: [[f32; 2]; 5],
    /// Largest batch per inference; 1 for models with a fixed batch dimension.
    pub max_batch: usize,
    /// ORT session settings.
    pub session: SessionSettings,
}

impl Default for RecognizerConfig {
    fn default() -> Self {
        RecognizerConfig::sface(Precision::Int8)
    }
}

/// The recogniser's default precision: int8 (see [`SFACE_ID`]).
fn default_precision() -> Precision {
    Precision::Int8
}

/// The serialised form: every field optional, the model file and id defaulting from `precision`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecognizerConfigRepr {
    model_id: Option<String>,
    #[serde(default = "default_precision")]
    precision: Precision,
    model: Option<PathBuf>,
    input: Option<ImageInput>,
    output: Option<String>,
    dimension: Option<usize>,
    template: Option<[[f32; 2]; 5]>,
    max_batch: Option<usize>,
    session: Option<SessionSettings>,
}

impl From<RecognizerConfigRepr> for RecognizerConfig {
    fn from(r: RecognizerConfigRepr) -> Self {
        let d = RecognizerConfig::sface(r.precision);
        RecognizerConfig {
            model_id: r.model_id.unwrap_or(d.model_id),
            precision: r.precision,
            model: r.model.unwrap_or(d.model),
            input: r.input.unwrap_or(d.input),
            output: r.output.unwrap_or(d.output),
            dimension: r.dimension.unwrap_or(d.dimension),
            template: r.template.unwrap_or(d.template),
            max_batch: r.max_batch.unwrap_or(d.max_batch),
            session: r.session.unwrap_or(d.session),
        }
    }
}

impl RecognizerConfig {
    /// SFace as set-up provides it: `models/sface.onnx` (f32) or
    /// `models/sface-int8.onnx` (int8), both model id [`SFACE_ID`].
    pub fn sface(precision: Precision) -> Self {
        let (model_id, model) = match precision {
            Precision::F32 => (SFACE_ID, "models/sface.onnx"),
            Precision::Int8 => (SFACE_ID, "models/sface-int8.onnx"),
        };
        RecognizerConfig {
            model_id: model_id.into(),
            precision,
            model: PathBuf::from(model),
            input: ImageInput {
                name: "data".into(),
                width: 112,
                height: 112,
                layout: Layout::Nchw,
                channels: ChannelOrder::Rgb,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            output: "fc1".into(),
            dimension: 128,
            template: ARCFACE_112,
            max_batch: 32,
            session: SessionSettings::default(),
        }
    }
}

impl RecognizerConfig {
    /// Check every field.
    pub fn validate(&self) -> Result<()> {
        if self.model_id.is_empty() {
            return Err(Error::config("recognizer.model_id", "empty"));
        }
        if self.model.as_os_str().is_empty() {
            return Err(Error::config("recognizer.model", "empty path"));
        }
        self.input.validate("recognizer.input")?;
        if self.output.is_empty() {
            return Err(Error::config("recognizer.output", "empty"));
        }
        if self.dimension == 0 || self.dimension > 65_536 {
            return Err(Error::config("recognizer.dimension", "must be in 1..=65536"));
        }
        if self.template.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::config("recognizer.template", "must be finite"));
        }
        if self.max_batch == 0 || self.max_batch > 4096 {
            return Err(Error::config("recognizer.max_batch", "must be in 1..=4096"));
        }
        self.session.validate("recognizer.session")
    }
}

/// L2-normalise in place; refuses NaN/inf and zero vectors.
///
/// ```
/// let mut v = vec![3.0, 4.0];
/// facematch::embed::l2_normalize(&mut v).unwrap();
/// assert_eq!(v, vec![0.6, 0.8]);
/// assert!(facematch::embed::l2_normalize(&mut vec![0.0, 0.0]).is_err());
/// ```
pub fn l2_normalize(v: &mut [f32]) -> Result<()> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if !norm.is_finite() || norm <= f64::MIN_POSITIVE {
        return Err(Error::InvalidEmbedding { reason: format!("norm is {norm}") });
    }
    let inv = (1.0 / norm) as f32;
    v.iter_mut().for_each(|x| *x *= inv);
    Ok(())
}

/// Cosine similarity of two L2-normalised embeddings (their dot product).
///
/// ```
/// assert_eq!(facematch::embed::cosine(&[0.6, 0.8], &[0.6, 0.8]), 1.0);
/// ```
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A loaded recognition model (`Send + Sync`; sessions pooled).
#[derive(Debug)]
pub struct Recognizer {
    config: RecognizerConfig,
    pool: SessionPool,
}

impl Recognizer {
    /// Load the model described by `config` (validated first).
    pub fn new(rt: &Runtime, config: RecognizerConfig) -> Result<Self> {
        config.validate()?;
        let pool = SessionPool::load_model(rt, &config.model, "recognizer", &config.session, &config.input.name)?;
        let outputs = pool.output_names();
        if !outputs.contains(&config.output) {
            return Err(Error::Model {
                model: pool.model().to_string(),
                reason: format!("no output named {:?} (model outputs: {outputs:?})", config.output),
            });
        }
        Ok(Recognizer { config, pool })
    }

    /// The configuration in use.
    pub fn config(&self) -> &RecognizerConfig {
        &self.config
    }

    /// Embed aligned crops (each `input.width x input.height`); one
    /// L2-normalised vector per crop, same order. The crops are split into one
    /// batch per pooled session (at most `max_batch` each) run in parallel on
    /// the rayon pool: on CPU a bigger batch is not cheaper per face, spare
    /// cores are.
    pub fn embed(&self, faces: &[AlignedFace]) -> Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        let per = faces.len().div_ceil(self.pool.len()).clamp(1, self.config.max_batch);
        let batches: Vec<Vec<Vec<f32>>> = faces.par_chunks(per).map(|c| self.embed_batch(c)).collect::<Result<_>>()?;
        Ok(batches.into_iter().flatten().collect())
    }

    fn embed_batch(&self, faces: &[AlignedFace]) -> Result<Vec<Vec<f32>>> {
        if faces.is_empty() {
            return Ok(Vec::new());
        }
        let spec = &self.config.input;
        let plane = spec.plane_len();
        let mut input = vec![0f32; plane * faces.len()];
        for (face, dst) in faces.iter().zip(input.chunks_exact_mut(plane)) {
            if face.width != spec.width || face.height != spec.height || face.data.len() != plane {
                return Err(Error::InvalidConfig {
                    field: "recognizer.input".into(),
                    reason: format!("crop is {}x{}, model wants {}x{}", face.width, face.height, spec.width, spec.height),
                });
            }
            fill_tensor(face, spec, dst);
        }
        let model_err = |reason: String| Error::Model { model: self.pool.model().to_string(), reason };
        let shape = spec.shape(faces.len());
        let dim = self.config.dimension;
        let mut embeddings = self.pool.with(|session| {
            let tensor =
                ort::value::TensorRef::from_array_view((shape, input.as_slice())).map_err(|e| model_err(format!("input tensor: {e}")))?;
            let outputs =
                session.run(ort::inputs![spec.name.as_str() => tensor]).map_err(|e| model_err(format!("inference failed: {e}")))?;
            let value = outputs.get(&self.config.output).ok_or_else(|| model_err(format!("missing output {}", self.config.output)))?;
            let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| model_err(format!("output: {e}")))?;
            if data.len() != faces.len() * dim {
                return Err(Error::WrongDimension { expected: dim, got: data.len() / faces.len().max(1) });
            }
            Ok(data.chunks_exact(dim).map(<[f32]>::to_vec).collect::<Vec<_>>())
        })?;
        for e in &mut embeddings {
            l2_normalize(e)?;
        }
        Ok(embeddings)
    }
}

/// Convert an RGB8 crop into one image of the model's input tensor.
pub fn fill_tensor(face: &AlignedFace, spec: &ImageInput, out: &mut [f32]) {
    let (w, h) = (spec.width as usize, spec.height as usize);
    for c in 0..3 {
        let k = spec.rgb_index(c);
        for y in 0..h {
            for x in 0..w {
                out[spec.offset(c, y, x)] = spec.scale(c, face.data[(y * w + x) * 3 + k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_tensor_respects_order_layout_and_scaling() {
        let face = AlignedFace { width: 2, height: 1, data: vec![10, 20, 30, 40, 50, 60] };
        let spec = ImageInput {
            name: "x".into(),
            width: 2,
            height: 1,
            layout: Layout::Nchw,
            channels: ChannelOrder::Bgr,
            mean: [10.0, 0.0, 0.0],
            std: [2.0, 1.0, 1.0],
        };
        let mut out = vec![0.0; 6];
        fill_tensor(&face, &spec, &mut out);
        // channel 0 = blue: (30 - 10) / 2, (60 - 10) / 2
        assert_eq!(out, vec![10.0, 25.0, 20.0, 50.0, 10.0, 40.0]);
        let nhwc = ImageInput { layout: Layout::Nhwc, channels: ChannelOrder::Rgb, mean: [0.0; 3], std: [1.0; 3], ..spec };
        fill_tensor(&face, &nhwc, &mut out);
        assert_eq!(out, vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
    }

    #[test]
    fn config_round_trips_and_validates() {
        let cfg = RecognizerConfig::default();
        let back: RecognizerConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(cfg, back);
        assert!(RecognizerConfig { dimension: 0, ..RecognizerConfig::default() }.validate().is_err());
        assert!(RecognizerConfig { output: String::new(), ..RecognizerConfig::default() }.validate().is_err());
        // A partial description fills the rest from defaults.
        let partial: RecognizerConfig = serde_json::from_str(r#"{"dimension": 512, "model_id": "other"}"#).unwrap();
        assert_eq!(partial.output, "fc1");
        assert_eq!(partial.dimension, 512);
    }
}

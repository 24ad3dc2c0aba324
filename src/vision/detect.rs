//! Face detection with YuNet (OpenCV zoo) through ONNX Runtime.
//!
//! The image is letterboxed into the model's fixed input (resized with
//! OpenCV-style bilinear sampling, padded right and bottom), the per-stride
//! outputs are decoded anchor by anchor, filtered by score, reduced by
//! non-maximum suppression and mapped back to original-image coordinates.
//! Everything model-specific (file, input size, channel order, scaling,
//! output names, strides) comes from [`DetectorConfig`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::image_io::DecodedImage;
use crate::letterbox::fill_letterbox;
pub use crate::letterbox::{letterbox_into, Letterbox};
use crate::runtime::{ChannelOrder, ImageInput, Layout, Precision, Runtime, SessionPool, SessionSettings};
use crate::{Error, Result};

/// Where a face is, without anything biometric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaceBox {
    /// `[x, y, width, height]` in image pixels.
    pub bbox: [f32; 4],
    /// Detection confidence.
    pub score: f32,
}

/// One detected face, in original-image pixel coordinates.
///
/// Landmarks are, in order: right eye, left eye, nose tip, right mouth corner,
/// left mouth corner (the first is the eye on the image's left).
///
/// ```
/// let f = facematch::detect::Face { bbox: [1.0, 2.0, 30.0, 40.0], score: 0.9, landmarks: [[0.0; 2]; 5], embedding: None };
/// let json = serde_json::to_string(&f).unwrap();
/// assert!(json.starts_with(r#"{"bbox":[1.0,2.0,30.0,40.0],"score":0.9"#));
/// assert!(!json.contains("embedding"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Face {
    /// Bounding box `[x, y, width, height]` (may extend past the image edge).
    pub bbox: [f32; 4],
    /// Detection confidence in 0..1.
    pub score: f32,
    /// Five landmarks `[x, y]`.
    pub landmarks: [[f32; 2]; 5],
    /// L2-normalised embedding, when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}

impl std::fmt::Debug for Face {
    // The embedding is biometric data: never printed, only its presence.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Face")
            .field("bbox", &self.bbox)
            .field("score", &self.score)
            .field("landmarks", &self.landmarks)
            .field("embedding", &self.embedding.as_ref().map(|e| format!("<{} dims>", e.len())))
            .finish()
    }
}

/// Output tensor names of a YuNet-style detector; `{stride}` is replaced by each stride.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorOutputs {
    /// Classification score `[1, N, 1]`.
    pub cls: String,
    /// Objectness `[1, N, 1]`.
    pub obj: String,
    /// Box offsets `[1, N, 4]`.
    pub bbox: String,
    /// Landmark offsets `[1, N, 10]`.
    pub kps: String,
}

/// Description of the detector model and its post-processing.
///
/// The file follows `precision` unless given: `{"precision": "int8"}` is the
/// int8 YuNet set-up quantises.
///
/// ```
/// use facematch::detect::DetectorConfig;
/// use facematch::runtime::Precision;
/// let cfg = DetectorConfig::default();
/// assert_eq!((cfg.input.width, cfg.precision), (640, Precision::F32));
/// cfg.validate().unwrap();
/// let int8: DetectorConfig = serde_json::from_str(r#"{"precision": "int8", "score_threshold": 0.7}"#).unwrap();
/// assert_eq!(int8.model.to_str(), Some("models/yunet-int8.onnx"));
/// assert_eq!(int8.score_threshold, 0.7);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "DetectorConfigRepr")]
pub struct DetectorConfig {
    /// Numeric precision of the model file (sets the default file).
    pub precision: Precision,
    /// ONNX file; a relative path is searched like the ORT library (see [`crate::runtime`]).
    pub model: PathBuf,
    /// Input tensor description (YuNet: `input`, 640x640, NCHW, BGR, 0..255).
    pub input: ImageInput,
    /// Anchor strides, one output group per stride.
    pub strides: Vec<u32>,
    /// Output tensor names.
    pub outputs: DetectorOutputs,
    /// Minimum score kept.
    pub score_threshold: f32,
    /// IoU above which the lower-scored of two boxes is suppressed.
    pub nms_iou: f32,
    /// At most this many candidates enter NMS and this many faces come out.
    pub top_k: usize,
    /// Enlarge images smaller than the input (off: small images run at native scale).
    pub upscale: bool,
    /// Run the model at the letterboxed image's size rounded up to a multiple of
    /// the largest stride (e.g. 640x480 for a 4:3 photo) instead of always the
    /// full input size: less work for images that are not square or are small
    /// (the default; off, every image runs at the full size as OpenCV's
    /// `FaceDetectorYN` does at a fixed input size).
    /// An image with a face within one stride of the right or bottom edge the
    /// smaller input moved runs again at the full size (the network reads the
    /// padding as context there). Needs a model with symbolic height and width
    /// (set-up's YuNet has them).
    pub fit_input: bool,
    /// ORT session settings.
    pub session: SessionSettings,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig::yunet(Precision::F32)
    }
}

/// The serialised form: every field optional, the model file defaulting from `precision`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetectorConfigRepr {
    #[serde(default)]
    precision: Precision,
    model: Option<PathBuf>,
    input: Option<ImageInput>,
    strides: Option<Vec<u32>>,
    outputs: Option<DetectorOutputs>,
    score_threshold: Option<f32>,
    nms_iou: Option<f32>,
    top_k: Option<usize>,
    upscale: Option<bool>,
    fit_input: Option<bool>,
    session: Option<SessionSettings>,
}

impl From<DetectorConfigRepr> for DetectorConfig {
    fn from(r: DetectorConfigRepr) -> Self {
        let d = DetectorConfig::yunet(r.precision);
        DetectorConfig {
            precision: r.precision,
            model: r.model.unwrap_or(d.model),
            input: r.input.unwrap_or(d.input),
            strides: r.strides.unwrap_or(d.strides),
            outputs: r.outputs.unwrap_or(d.outputs),
            score_threshold: r.score_threshold.unwrap_or(d.score_threshold),
            nms_iou: r.nms_iou.unwrap_or(d.nms_iou),
            top_k: r.top_k.unwrap_or(d.top_k),
            upscale: r.upscale.unwrap_or(d.upscale),
            fit_input: r.fit_input.unwrap_or(d.fit_input),
            session: r.session.unwrap_or(d.session),
        }
    }
}

impl DetectorConfig {
    /// YuNet as set-up provides it: `models/yunet.onnx` (f32) or `models/yunet-int8.onnx` (int8).
    pub fn yunet(precision: Precision) -> Self {
        let model = match precision {
            Precision::F32 => "models/yunet.onnx",
            Precision::Int8 => "models/yunet-int8.onnx",
        };
        DetectorConfig {
            precision,
            model: PathBuf::from(model),
            input: ImageInput {
                name: "input".into(),
                width: 640,
                height: 640,
                layout: Layout::Nchw,
                channels: ChannelOrder::Bgr,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            strides: vec![8, 16, 32],
            outputs: DetectorOutputs {
                cls: "cls_{stride}".into(),
                obj: "obj_{stride}".into(),
                bbox: "bbox_{stride}".into(),
                kps: "kps_{stride}".into(),
            },
            score_threshold: 0.6,
            nms_iou: 0.3,
            top_k: 5000,
            upscale: false,
            fit_input: true,
            session: SessionSettings::default(),
        }
    }
}

impl DetectorConfig {
    /// Check every field.
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(Error::config("detector.model", "empty path"));
        }
        self.input.validate("detector.input")?;
        if self.strides.is_empty() {
            return Err(Error::config("detector.strides", "at least one stride"));
        }
        for &s in &self.strides {
            if s == 0 || !self.input.width.is_multiple_of(s) || !self.input.height.is_multiple_of(s) {
                return Err(Error::config("detector.strides", format!("stride {s} must divide the input size")));
            }
        }
        for (f, v) in [("cls", &self.outputs.cls), ("obj", &self.outputs.obj), ("bbox", &self.outputs.bbox), ("kps", &self.outputs.kps)] {
            if v.is_empty() {
                return Err(Error::config(format!("detector.outputs.{f}"), "empty"));
            }
        }
        if !(self.score_threshold > 0.0 && self.score_threshold <= 1.0) {
            return Err(Error::config("detector.score_threshold", "must be in (0, 1]"));
        }
        if !(self.nms_iou > 0.0 && self.nms_iou <= 1.0) {
            return Err(Error::config("detector.nms_iou", "must be in (0, 1]"));
        }
        if self.top_k == 0 {
            return Err(Error::config("detector.top_k", "must be > 0"));
        }
        self.session.validate("detector.session")
    }
}

/// Raw outputs of one stride, as flat slices (`cls`, `obj`: N; `bbox`: 4N; `kps`: 10N).
#[derive(Debug, Clone, Copy)]
pub struct StrideOutputs<'a> {
    /// Stride in input pixels.
    pub stride: u32,
    /// Classification scores.
    pub cls: &'a [f32],
    /// Objectness scores.
    pub obj: &'a [f32],
    /// Box regressions.
    pub bbox: &'a [f32],
    /// Landmark regressions.
    pub kps: &'a [f32],
}

/// Decode YuNet outputs into candidate faces in input (letterboxed) coordinates,
/// keeping those with score > `threshold`. Anchors are row-major over a
/// `(width / stride) x (height / stride)` grid.
pub fn decode_yunet(outputs: &[StrideOutputs<'_>], width: u32, threshold: f32) -> Result<Vec<Face>> {
    let mut faces = Vec::new();
    for o in outputs {
        let s = o.stride as f32;
        let cols = (width / o.stride) as usize;
        let n = o.cls.len();
        if cols == 0 || o.obj.len() != n || o.bbox.len() != 4 * n || o.kps.len() != 10 * n || n % cols != 0 {
            return Err(Error::Model {
                model: "detector".into(),
                reason: format!(
                    "stride {}: unexpected output sizes cls {} obj {} bbox {} kps {}",
                    o.stride,
                    n,
                    o.obj.len(),
                    o.bbox.len(),
                    o.kps.len()
                ),
            });
        }
        for i in 0..n {
            let score = (o.cls[i].clamp(0.0, 1.0) * o.obj[i].clamp(0.0, 1.0)).sqrt();
            // Written so that a NaN score is dropped too.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(score > threshold) {
                continue;
            }
            let (col, row) = ((i % cols) as f32, (i / cols) as f32);
            let b = &o.bbox[4 * i..4 * i + 4];
            let (cx, cy) = ((col + b[0]) * s, (row + b[1]) * s);
            let (w, h) = (b[2].exp() * s, b[3].exp() * s);
            let k = &o.kps[10 * i..10 * i + 10];
            let mut landmarks = [[0f32; 2]; 5];
            for (j, l) in landmarks.iter_mut().enumerate() {
                *l = [(k[2 * j] + col) * s, (k[2 * j + 1] + row) * s];
            }
            let bbox = [cx - w / 2.0, cy - h / 2.0, w, h];
            if bbox.iter().chain(landmarks.iter().flatten()).all(|v| v.is_finite()) {
                faces.push(Face { bbox, score, landmarks, embedding: None });
            }
        }
    }
    Ok(faces)
}

/// Intersection over union of two `[x, y, w, h]` boxes.
///
/// ```
/// let iou = facematch::detect::iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 2.0, 2.0]);
/// assert!((iou - 1.0 / 3.0).abs() < 1e-6);
/// ```
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let ix = (a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0]);
    let iy = (a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1]);
    if ix <= 0.0 || iy <= 0.0 {
        return 0.0;
    }
    let inter = ix * iy;
    let union = a[2] * a[3] + b[2] * b[3] - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression: highest score first, drop boxes with IoU >
/// `iou_threshold` against a kept one; at most `top_k` candidates and results.
pub fn nms(mut faces: Vec<Face>, iou_threshold: f32, top_k: usize) -> Vec<Face> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    faces.truncate(top_k);
    let mut kept: Vec<Face> = Vec::new();
    for f in faces {
        if kept.iter().all(|k| iou(&k.bbox, &f.bbox) <= iou_threshold) {
            kept.push(f);
            if kept.len() >= top_k {
                break;
            }
        }
    }
    kept
}

/// A loaded detector (`Send + Sync`; sessions pooled).
#[derive(Debug)]
pub struct Detector {
    config: DetectorConfig,
    pool: SessionPool,
}

thread_local! {
    /// Each thread's detector input tensor, reused from image to image.
    static INPUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Detector {
    /// Load the model described by `config` (validated first).
    pub fn new(rt: &Runtime, config: DetectorConfig) -> Result<Self> {
        config.validate()?;
        let pool = SessionPool::load_model(rt, &config.model, "detector", &config.session, &config.input.name)?;
        let outputs = pool.output_names();
        for s in &config.strides {
            for pattern in [&config.outputs.cls, &config.outputs.obj, &config.outputs.bbox, &config.outputs.kps] {
                let name = pattern.replace("{stride}", &s.to_string());
                if !outputs.contains(&name) {
                    return Err(Error::Model {
                        model: pool.model().to_string(),
                        reason: format!("no output named {name:?} (model outputs: {outputs:?})"),
                    });
                }
            }
        }
        Ok(Detector { config, pool })
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Detect faces in `img`; sorted by decreasing score, in original coordinates.
    ///
    /// Each calling thread keeps its input tensor for the next call (at most
    /// the full input: 4.9 MB at 640x640), freed when the thread ends.
    pub fn detect(&self, img: &DecodedImage) -> Result<Vec<Face>> {
        let full = &self.config.input;
        let lb = Letterbox::fit(img.width(), img.height(), full.width, full.height, self.config.upscale);
        if self.config.fit_input {
            let m = self.config.strides.iter().copied().max().unwrap_or(1);
            let up = |v: u32, cap: u32| v.div_ceil(m).saturating_mul(m).clamp(m, cap);
            let fitted = ImageInput { width: up(lb.width, full.width), height: up(lb.height, full.height), ..full.clone() };
            if fitted.width < full.width || fitted.height < full.height {
                let faces = INPUT.with_borrow_mut(|scratch| self.detect_fitted(img, &fitted, lb, scratch))?;
                // The network reads the padding's extent as context: a face within one
                // stride of an edge the smaller input moved (right or bottom) can come
                // out several pixels off (docs/MODELS.md). Such an image runs again at
                // the full input size, so that every face is found as it would be there.
                let near = |end: f32, limit: u32, r: f32| end >= (limit as f32 - m as f32 * r);
                let at_moved_edge = faces.iter().any(|f| {
                    (fitted.width < full.width && near(f.bbox[0] + f.bbox[2], img.width(), lb.rx))
                        || (fitted.height < full.height && near(f.bbox[1] + f.bbox[3], img.height(), lb.ry))
                });
                if !at_moved_edge {
                    return Ok(faces);
                }
            }
        }
        INPUT.with_borrow_mut(|scratch| self.detect_fitted(img, full, lb, scratch))
    }

    /// [`Detector::detect`] once the input size is chosen; `scratch` is this
    /// thread's input tensor, kept between calls (a fresh 4.9 MB buffer per
    /// image cost page faults: a third of a batch's system time).
    fn detect_fitted(&self, img: &DecodedImage, spec: &ImageInput, lb: Letterbox, scratch: &mut Vec<f32>) -> Result<Vec<Face>> {
        if scratch.len() < spec.plane_len() {
            scratch.resize(spec.plane_len(), 0.0);
        }
        let input = &mut scratch[..spec.plane_len()];
        fill_letterbox(img, spec, lb, input);
        let input = &*input;
        let shape = spec.shape(1);
        let model_err = |reason: String| Error::Model { model: self.pool.model().to_string(), reason };
        let candidates = self.pool.with(|session| {
            let tensor = ort::value::TensorRef::from_array_view((shape, input)).map_err(|e| model_err(format!("input tensor: {e}")))?;
            let outputs =
                session.run(ort::inputs![spec.name.as_str() => tensor]).map_err(|e| model_err(format!("inference failed: {e}")))?;
            let mut names = Vec::new();
            for s in &self.config.strides {
                let o = &self.config.outputs;
                let n = |p: &str| p.replace("{stride}", &s.to_string());
                names.push((*s, n(&o.cls), n(&o.obj), n(&o.bbox), n(&o.kps)));
            }
            let get = |name: &str| -> Result<&[f32]> {
                let v = outputs.get(name).ok_or_else(|| model_err(format!("missing output {name}")))?;
                v.try_extract_tensor::<f32>().map(|(_, d)| d).map_err(|e| model_err(format!("output {name}: {e}")))
            };
            let mut per_stride = Vec::with_capacity(names.len());
            for (stride, cls, obj, bbox, kps) in &names {
                per_stride.push(StrideOutputs { stride: *stride, cls: get(cls)?, obj: get(obj)?, bbox: get(bbox)?, kps: get(kps)? });
            }
            decode_yunet(&per_stride, spec.width, self.config.score_threshold)
        })?;
        let mut faces = nms(candidates, self.config.nms_iou, self.config.top_k);
        for f in &mut faces {
            let [x, y] = lb.map_point([f.bbox[0], f.bbox[1]]);
            f.bbox = [x, y, f.bbox[2] * lb.rx, f.bbox[3] * lb.ry];
            for l in &mut f.landmarks {
                *l = lb.map_point(*l);
            }
        }
        Ok(faces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, score: f32) -> Face {
        Face { bbox: [x, 0.0, 10.0, 10.0], score, landmarks: [[0.0; 2]; 5], embedding: None }
    }

    #[test]
    fn nms_keeps_best_and_drops_overlaps() {
        let kept = nms(vec![face(0.0, 0.7), face(1.0, 0.9), face(50.0, 0.8), face(2.0, 0.65)], 0.3, 10);
        let xs: Vec<f32> = kept.iter().map(|f| f.bbox[0]).collect();
        assert_eq!(xs, vec![1.0, 50.0]);
        assert_eq!(nms(vec![face(0.0, 0.7), face(50.0, 0.8)], 0.3, 1).len(), 1);
    }

    #[test]
    fn decode_places_anchor_and_landmarks() {
        // 2x2 grid at stride 8 on a 16x16 input; only anchor (col 1, row 0) fires.
        let mut cls = vec![0.0; 4];
        let mut obj = vec![0.0; 4];
        cls[1] = 0.81;
        obj[1] = 1.0;
        let mut bbox = vec![0.0; 16];
        bbox[4..8].copy_from_slice(&[0.5, 0.25, 0.0, (2.0f32).ln()]);
        let mut kps = vec![0.0; 40];
        kps[10..12].copy_from_slice(&[0.5, 0.5]);
        let out = [StrideOutputs { stride: 8, cls: &cls, obj: &obj, bbox: &bbox, kps: &kps }];
        let faces = decode_yunet(&out, 16, 0.6).unwrap();
        assert_eq!(faces.len(), 1);
        let f = &faces[0];
        assert!((f.score - 0.9).abs() < 1e-6);
        // cx = (1 + 0.5) * 8 = 12, cy = 0.25 * 8 = 2, w = 8, h = 16
        assert_eq!(f.bbox, [8.0, -6.0, 8.0, 16.0]);
        assert_eq!(f.landmarks[0], [12.0, 4.0]);
        assert_eq!(f.landmarks[1], [8.0, 0.0]);
        // Wrong sizes are a model error, not a panic.
        let bad = [StrideOutputs { stride: 8, cls: &cls, obj: &obj[..3], bbox: &bbox, kps: &kps }];
        assert!(decode_yunet(&bad, 16, 0.6).is_err());
    }

    #[test]
    fn config_round_trips_and_validates() {
        let cfg = DetectorConfig::default();
        let json = serde_json::to_string(&cfg).unwrap();
        let back: DetectorConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(cfg, back);
        let bad = DetectorConfig { strides: vec![7], ..DetectorConfig::default() };
        assert!(bad.validate().is_err());
        let bad = DetectorConfig { nms_iou: 0.0, ..DetectorConfig::default() };
        assert!(bad.validate().is_err());
    }
}

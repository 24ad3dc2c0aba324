//! From an image to a decision, applying the unrelated-faces rule.
//!
//! An image may hold people who have nothing to do with the service. The
//! Measures (draft art. 18) ask that their face information not be collected,
//! or be deleted at once. Here:
//! - **verification and enrolment** use one face, the largest (the person in
//!   front of the camera); every other face is discarded *before* it is
//!   embedded, so no embedding of a bystander ever exists;
//! - **identification** embeds every face (it cannot know who is enrolled
//!   without comparing), and every face that does not match is dropped from
//!   the result and its embedding zeroed; only counts reach the audit record.
//!
//! Nothing here writes the image, a crop or an embedding anywhere. The
//! `*_redacted` variants also hand back the decoded image with the faces
//! that must not be shown anonymised ([`crate::anonymise`]), for callers
//! that return or keep an image: that copy is the only one that may leave.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::anonymise::{redact, AnonymiseConfig};
use crate::compliance::SubjectId;
use crate::engine::{Engine, Enrolment, FaceCount, Identification, Identify, Pending, Query, QueryContext, Verification};
use crate::image_io::DecodedImage;
use crate::pipeline::{Face, FacePipeline};
use crate::{Error, Result};

pub use crate::vision::detect::FaceBox;

/// Verification of the main face of an image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageVerification {
    /// The face that was compared.
    pub face: FaceBox,
    /// The result.
    pub verification: Verification,
    /// Faces found in the image.
    pub faces_found: u32,
    /// Faces discarded as unrelated (never embedded).
    pub faces_discarded: u32,
}

/// One face of an image that matched.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaceIdentification {
    /// Where the face is.
    pub face: FaceBox,
    /// Candidates and decision.
    pub identification: Identification,
}

/// Identification of every face of an image; only matching faces are kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageIdentification {
    /// Faces that matched (or need human review), best first.
    pub matches: Vec<FaceIdentification>,
    /// Faces found in the image.
    pub faces_found: u32,
    /// Faces dropped because they matched nobody (their embeddings are erased).
    pub faces_discarded: u32,
}

fn area(f: &Face) -> f32 {
    f.bbox[2].max(0.0) * f.bbox[3].max(0.0)
}

/// The largest face and the boxes of the others (never embedded), or an error when there is none.
pub(crate) fn main_face(mut faces: Vec<Face>) -> Result<(Face, Vec<FaceBox>, u32, u32)> {
    let found = faces.len() as u32;
    if faces.is_empty() {
        return Err(Error::BadImage { path: None, reason: "no face found".into() });
    }
    let (i, _) = faces
        .iter()
        .enumerate()
        .max_by(|a, b| area(a.1).total_cmp(&area(b.1)))
        .ok_or_else(|| Error::BadImage { path: None, reason: "no face found".into() })?;
    let f = faces.swap_remove(i);
    let others = faces.iter().map(|o| FaceBox { bbox: o.bbox, score: o.score }).collect();
    Ok((f, others, found, found - 1))
}

pub(crate) fn embed_one(pipeline: &FacePipeline, img: &crate::image_io::DecodedImage, face: Face) -> Result<(FaceBox, Vec<f32>)> {
    let mut one = [face];
    pipeline.embed_faces(img, &mut one)?;
    let [face] = one;
    let b = FaceBox { bbox: face.bbox, score: face.score };
    let e = face.embedding.ok_or_else(|| Error::Model { model: pipeline.model_id().into(), reason: "no embedding produced".into() })?;
    Ok((b, e))
}

/// 1:1: verify the largest face of `image` (encoded bytes) against `subject`.
pub fn verify_image(
    engine: &Engine,
    pipeline: &FacePipeline,
    ctx: &QueryContext,
    image: &[u8],
    subject: &SubjectId,
) -> Result<ImageVerification> {
    Ok(verify_decoded(engine, pipeline, ctx, image, subject)?.0)
}

/// [`verify_image`], also returning the image with every face but the
/// compared one anonymised ([`crate::anonymise`]): the only copy of the
/// image that may leave the engine. Encode it with [`crate::image_io::encode`].
pub fn verify_image_redacted(
    engine: &Engine,
    pipeline: &FacePipeline,
    ctx: &QueryContext,
    image: &[u8],
    subject: &SubjectId,
    cfg: &AnonymiseConfig,
) -> Result<(ImageVerification, DecodedImage)> {
    cfg.validate()?;
    let (v, mut img, others) = verify_decoded(engine, pipeline, ctx, image, subject)?;
    redact(&mut img, &others, cfg)?;
    Ok((v, img))
}

fn verify_decoded(
    engine: &Engine,
    pipeline: &FacePipeline,
    ctx: &QueryContext,
    image: &[u8],
    subject: &SubjectId,
) -> Result<(ImageVerification, DecodedImage, Vec<FaceBox>)> {
    check_model(engine, pipeline)?;
    let img = pipeline.decode_bytes(image)?;
    let (face, others, found, discarded) = main_face(pipeline.detect(&img)?)?;
    let (fb, mut e) = embed_one(pipeline, &img, face)?;
    let r = engine.query(ctx, Query::verify(&e, subject).faces(FaceCount { found, discarded }));
    e.zeroize();
    Ok((ImageVerification { face: fb, verification: r?, faces_found: found, faces_discarded: discarded }, img, others))
}

/// 1:N: identify every face of `image`; faces that match nobody are discarded.
pub fn identify_image(engine: &Engine, pipeline: &FacePipeline, ctx: &QueryContext, image: &[u8], k: usize) -> Result<ImageIdentification> {
    Ok(identify_decoded(engine, pipeline, ctx, image, k)?.0)
}

/// [`identify_image`], also returning the image with every face that matched
/// nobody anonymised ([`crate::anonymise`]); matched faces are left as they are.
pub fn identify_image_redacted(
    engine: &Engine,
    pipeline: &FacePipeline,
    ctx: &QueryContext,
    image: &[u8],
    k: usize,
    cfg: &AnonymiseConfig,
) -> Result<(ImageIdentification, DecodedImage)> {
    cfg.validate()?;
    let (r, mut img, unmatched) = identify_decoded(engine, pipeline, ctx, image, k)?;
    redact(&mut img, &unmatched, cfg)?;
    Ok((r, img))
}

/// Anonymise every face of `image` (no gallery involved): for images that
/// leave a deployment without any face in them being needed.
pub fn anonymise_image(pipeline: &FacePipeline, image: &[u8], cfg: &AnonymiseConfig) -> Result<(DecodedImage, Vec<FaceBox>)> {
    cfg.validate()?;
    let mut img = pipeline.decode_bytes(image)?;
    let boxes: Vec<FaceBox> = pipeline.detect(&img)?.iter().map(|f| FaceBox { bbox: f.bbox, score: f.score }).collect();
    redact(&mut img, &boxes, cfg)?;
    Ok((img, boxes))
}

fn identify_decoded(
    engine: &Engine,
    pipeline: &FacePipeline,
    ctx: &QueryContext,
    image: &[u8],
    k: usize,
) -> Result<(ImageIdentification, DecodedImage, Vec<FaceBox>)> {
    check_model(engine, pipeline)?;
    let img = pipeline.decode_bytes(image)?;
    let mut faces = pipeline.detect(&img)?;
    let found = faces.len() as u32;
    if faces.is_empty() {
        return Ok((ImageIdentification { matches: Vec::new(), faces_found: 0, faces_discarded: 0 }, img, Vec::new()));
    }
    pipeline.embed_faces(&img, &mut faces)?;
    let boxes: Vec<FaceBox> = faces.iter().map(|f| FaceBox { bbox: f.bbox, score: f.score }).collect();
    let mut probes: Vec<Vec<f32>> = faces.iter_mut().filter_map(|f| f.embedding.take()).collect();
    let r = engine.identify_faces_deferred(ctx, &probes, Identify::top(k)).and_then(Pending::wait);
    for p in &mut probes {
        p.zeroize();
    }
    type Scored = Vec<(FaceBox, Identification)>;
    let (matched, unmatched): (Scored, Scored) =
        boxes.into_iter().zip(r?).partition(|(_, id)| !matches!(id.decision, crate::compliance::Decision::NoMatch { .. }));
    let matches: Vec<FaceIdentification> =
        matched.into_iter().map(|(face, identification)| FaceIdentification { face, identification }).collect();
    let discarded = found - matches.len() as u32;
    let unmatched = unmatched.into_iter().map(|(b, _)| b).collect();
    Ok((ImageIdentification { matches, faces_found: found, faces_discarded: discarded }, img, unmatched))
}

/// Enrol the one face of `image`; other faces are never embedded. The image itself is not stored.
///
/// An image with several faces is refused (`PolicyViolation("one-face-enrolment")`)
/// unless its largest face is at least `enrol_face_dominance` (gallery
/// configuration, default 2) times the area of the next: a group photo must not
/// enrol a stranger under someone's name. Choose the face with [`enrol_image_face`].
pub fn enrol_image(
    engine: &Engine,
    pipeline: &FacePipeline,
    operator: &crate::compliance::Operator,
    image: &[u8],
    request: Enrolment,
) -> Result<(u64, FaceBox, u32)> {
    enrol_image_with(engine, pipeline, operator, image, request, None)
}

/// [`enrol_image`] of the face at `index` among the detected faces, ordered by
/// decreasing area (0 is the largest): the operator chose it.
pub fn enrol_image_face(
    engine: &Engine,
    pipeline: &FacePipeline,
    operator: &crate::compliance::Operator,
    image: &[u8],
    request: Enrolment,
    index: usize,
) -> Result<(u64, FaceBox, u32)> {
    enrol_image_with(engine, pipeline, operator, image, request, Some(index))
}

/// The face to enrol among `faces`: the one at `index` (by decreasing area)
/// if chosen, else the only one, else the largest if its area is at least
/// `dominance` times the next one's; otherwise `PolicyViolation("one-face-enrolment")`.
/// Returns it and how many others were not embedded.
pub(crate) fn pick_enrol_face(mut faces: Vec<Face>, index: Option<usize>, dominance: f32) -> Result<(Face, u32)> {
    if faces.is_empty() {
        return Err(Error::BadImage { path: None, reason: "no face found".into() });
    }
    faces.sort_by(|a, b| area(b).total_cmp(&area(a)));
    let n = faces.len();
    let pick = match index {
        Some(i) if i < n => i,
        Some(i) => return Err(Error::BadImage { path: None, reason: format!("face {i} chosen, the image has {n}") }),
        None if n == 1 => 0,
        None => {
            let ratio = area(&faces[0]) / area(&faces[1]).max(f32::MIN_POSITIVE);
            if ratio < dominance {
                return Err(Error::PolicyViolation {
                    rule: "one-face-enrolment",
                    reason: format!(
                        "the image holds {n} faces and the largest is only {ratio:.1}x the area of the next (at least {dominance} needed): choose the face, or use a photo of the person alone"
                    ),
                });
            }
            0
        }
    };
    Ok((faces.swap_remove(pick), (n - 1) as u32))
}

fn enrol_image_with(
    engine: &Engine,
    pipeline: &FacePipeline,
    operator: &crate::compliance::Operator,
    image: &[u8],
    mut request: Enrolment,
    index: Option<usize>,
) -> Result<(u64, FaceBox, u32)> {
    check_model(engine, pipeline)?;
    let img = pipeline.decode_bytes(image)?;
    let need = engine.config().enrol_face_dominance;
    let (face, discarded) = pick_enrol_face(pipeline.detect(&img)?, index, need)?;
    let (fb, e) = embed_one(pipeline, &img, face)?;
    // The request owns the only copy of the embedding and wipes it when the engine drops it.
    request.embedding = zeroize::Zeroizing::new(e);
    request.model_id = Some(pipeline.model_id().to_string());
    let t = engine.enrol(operator, request)?;
    Ok((t, fb, discarded))
}

pub(crate) fn check_model(engine: &Engine, pipeline: &FacePipeline) -> Result<()> {
    let cfg = engine.config();
    if cfg.model_id != pipeline.model_id() || cfg.dim != pipeline.dimension() {
        return Err(Error::config(
            "model_id",
            format!(
                "gallery holds {} ({}-d) templates, the pipeline makes {} ({}-d)",
                cfg.model_id,
                cfg.dim,
                pipeline.model_id(),
                pipeline.dimension()
            ),
        ));
    }
    Ok(())
}

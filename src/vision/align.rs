//! Face alignment: a least-squares similarity transform (Umeyama) from the
//! five detected landmarks onto a template, then a bilinear warp of the
//! full-resolution image into the recogniser's input size.
//!
//! Pure Rust, no model involved; the warp follows OpenCV's `warpAffine`
//! conventions (pixel centres at integer coordinates, constant black border),
//! so crops match `cv2.FaceRecognizerSF.alignCrop` to within rounding.

use crate::image_io::DecodedImage;
use crate::{Error, Result};

/// The standard ArcFace 112x112 five-point template (right eye, left eye, nose
/// tip, right mouth corner, left mouth corner, as seen in the image).
pub const ARCFACE_112: [[f32; 2]; 5] = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// A 2-D similarity transform `p' = s R p + t`, stored as
/// `x' = a x - b y + tx`, `y' = b x + a y + ty`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// `s cos(theta)`.
    pub a: f64,
    /// `s sin(theta)`.
    pub b: f64,
    /// Translation x.
    pub tx: f64,
    /// Translation y.
    pub ty: f64,
}

impl Similarity {
    /// Apply to a point.
    ///
    /// ```
    /// use facematch::align::Similarity;
    /// let t = Similarity { a: 2.0, b: 0.0, tx: 1.0, ty: -1.0 };
    /// assert_eq!(t.apply([1.0, 1.0]), [3.0, 1.0]);
    /// ```
    pub fn apply(&self, p: [f64; 2]) -> [f64; 2] {
        [self.a * p[0] - self.b * p[1] + self.tx, self.b * p[0] + self.a * p[1] + self.ty]
    }

    /// The inverse transform (`None` if the scale is zero or not finite).
    pub fn inverse(&self) -> Option<Similarity> {
        let d = self.a * self.a + self.b * self.b;
        if !(d.is_finite() && d > 0.0) {
            return None;
        }
        let (a, b) = (self.a / d, -self.b / d);
        // p = R'^-1 (p' - t)
        let tx = -(a * self.tx - b * self.ty);
        let ty = -(b * self.tx + a * self.ty);
        Some(Similarity { a, b, tx, ty })
    }

    /// Uniform scale factor `s`.
    pub fn scale(&self) -> f64 {
        self.a.hypot(self.b)
    }
}

/// Least-squares similarity transform mapping `src[i]` onto `dst[i]`
/// (Umeyama 1991, restricted to proper rotations, which in 2-D has this closed form).
///
/// Errors if fewer than two points, lengths differ, a value is not finite, or
/// the source points all coincide.
///
/// ```
/// use facematch::align::{umeyama, ARCFACE_112};
/// let t = umeyama(&ARCFACE_112, &ARCFACE_112).unwrap();
/// assert!((t.a - 1.0).abs() < 1e-9 && t.b.abs() < 1e-9);
/// ```
pub fn umeyama(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Similarity> {
    let bad = |reason: &str| Error::InvalidEmbedding { reason: format!("cannot align face: {reason}") };
    if src.len() != dst.len() || src.len() < 2 {
        return Err(bad("need the same number (>= 2) of source and template points"));
    }
    if src.iter().chain(dst).flatten().any(|v| !v.is_finite()) {
        return Err(bad("landmark is not finite"));
    }
    let n = src.len() as f64;
    let mean = |pts: &[[f32; 2]]| {
        let (sx, sy) = pts.iter().fold((0.0, 0.0), |(x, y), p| (x + f64::from(p[0]), y + f64::from(p[1])));
        (sx / n, sy / n)
    };
    let (sxm, sym) = mean(src);
    let (dxm, dym) = mean(dst);
    let (mut var, mut ca, mut cb) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (x, y) = (f64::from(s[0]) - sxm, f64::from(s[1]) - sym);
        let (u, v) = (f64::from(d[0]) - dxm, f64::from(d[1]) - dym);
        var += x * x + y * y;
        ca += x * u + y * v;
        cb += x * v - y * u;
    }
    if var <= 1e-12 {
        return Err(bad("landmarks coincide"));
    }
    let (a, b) = (ca / var, cb / var);
    Ok(Similarity { a, b, tx: dxm - (a * sxm - b * sym), ty: dym - (b * sxm + a * sym) })
}

/// An aligned face crop: RGB8, row-major, `size x size`.
#[derive(Clone, PartialEq, Eq)]
pub struct AlignedFace {
    /// Width and height of the crop.
    pub width: u32,
    /// Height of the crop.
    pub height: u32,
    /// RGB8 pixels, row-major.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for AlignedFace {
    // Never print pixels (privacy).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedFace").field("width", &self.width).field("height", &self.height).finish()
    }
}

/// Warp `img` by `m` (image -> crop coordinates) into a `width x height` RGB8
/// crop with bilinear sampling; outside the image is black.
pub fn warp_similarity(img: &DecodedImage, m: &Similarity, width: u32, height: u32) -> Result<AlignedFace> {
    let inv = m.inverse().ok_or_else(|| Error::InvalidEmbedding { reason: "cannot align face: degenerate transform".into() })?;
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    let src = img.as_raw();
    let mut data = vec![0u8; width as usize * height as usize * 3];
    let px = |x: i64, y: i64| -> [f32; 3] {
        if x < 0 || y < 0 || x >= iw || y >= ih {
            return [0.0; 3];
        }
        let o = ((y * iw + x) * 3) as usize;
        [f32::from(src[o]), f32::from(src[o + 1]), f32::from(src[o + 2])]
    };
    for oy in 0..height {
        for ox in 0..width {
            let [sx, sy] = inv.apply([f64::from(ox), f64::from(oy)]);
            if !(sx > -1.0 && sy > -1.0 && sx < iw as f64 && sy < ih as f64) {
                continue; // entirely outside: stays black
            }
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (p00, p01, p10, p11) = (px(x0, y0), px(x0 + 1, y0), px(x0, y0 + 1), px(x0 + 1, y0 + 1));
            let o = (oy as usize * width as usize + ox as usize) * 3;
            for c in 0..3 {
                let top = p00[c] + (p01[c] - p00[c]) * fx;
                let bot = p10[c] + (p11[c] - p10[c]) * fx;
                let v = top + (bot - top) * fy;
                data[o + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Ok(AlignedFace { width, height, data })
}

/// Align one face: fit `landmarks -> template` and warp into `width x height`.
///
/// ```
/// use facematch::{align::{align_face, ARCFACE_112}, image_io::DecodedImage};
/// let img = DecodedImage::from_rgb8(112, 112, vec![128; 112 * 112 * 3]).unwrap();
/// let crop = align_face(&img, &ARCFACE_112, &ARCFACE_112, 112, 112).unwrap();
/// assert_eq!(crop.data.len(), 112 * 112 * 3);
/// assert_eq!(crop.data[3 * (56 * 112 + 56)], 128);
/// ```
pub fn align_face(img: &DecodedImage, landmarks: &[[f32; 2]], template: &[[f32; 2]], width: u32, height: u32) -> Result<AlignedFace> {
    let m = umeyama(landmarks, template)?;
    warp_similarity(img, &m, width, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_synthetic_similarity_exactly() {
        let truth = Similarity { a: 0.4 * 0.3f64.cos(), b: 0.4 * 0.3f64.sin(), tx: -12.5, ty: 40.25 };
        let src: Vec<[f32; 2]> = [[300.0, 200.0], [380.0, 190.0], [345.0, 260.0], [310.0, 320.0], [375.0, 318.0]].to_vec();
        let dst: Vec<[f32; 2]> = src
            .iter()
            .map(|p| {
                let q = truth.apply([f64::from(p[0]), f64::from(p[1])]);
                [q[0] as f32, q[1] as f32]
            })
            .collect();
        let est = umeyama(&src, &dst).unwrap();
        assert!((est.a - truth.a).abs() < 1e-5, "{est:?}");
        assert!((est.b - truth.b).abs() < 1e-5, "{est:?}");
        assert!((est.tx - truth.tx).abs() < 1e-3, "{est:?}");
        assert!((est.ty - truth.ty).abs() < 1e-3, "{est:?}");
    }

    #[test]
    fn least_squares_residual_is_minimal_under_noise() {
        // Perturbing the fitted transform must not lower the squared error.
        let src = [[10.0f32, 10.0], [50.0, 12.0], [31.0, 35.0], [15.0, 55.0], [48.0, 53.0]];
        let dst = ARCFACE_112;
        let est = umeyama(&src, &dst).unwrap();
        let sse = |t: &Similarity| -> f64 {
            src.iter()
                .zip(&dst)
                .map(|(s, d)| {
                    let q = t.apply([f64::from(s[0]), f64::from(s[1])]);
                    (q[0] - f64::from(d[0])).powi(2) + (q[1] - f64::from(d[1])).powi(2)
                })
                .sum()
        };
        let best = sse(&est);
        for (da, db, dx, dy) in [(1e-3, 0.0, 0.0, 0.0), (0.0, 1e-3, 0.0, 0.0), (0.0, 0.0, 0.1, 0.0), (0.0, 0.0, 0.0, -0.1)] {
            for sign in [1.0, -1.0] {
                let t = Similarity { a: est.a + sign * da, b: est.b + sign * db, tx: est.tx + sign * dx, ty: est.ty + sign * dy };
                assert!(sse(&t) >= best - 1e-9);
            }
        }
    }

    #[test]
    fn inverse_round_trips() {
        let t = Similarity { a: 1.7, b: -0.4, tx: 3.0, ty: 9.0 };
        let p = t.inverse().unwrap().apply(t.apply([12.0, -7.0]));
        assert!((p[0] - 12.0).abs() < 1e-9 && (p[1] + 7.0).abs() < 1e-9);
    }

    #[test]
    fn warp_samples_bilinearly_and_fills_black_outside() {
        // Horizontal ramp: value = 10 * x in all channels.
        let (w, h) = (20u32, 10u32);
        let data: Vec<u8> = (0..h).flat_map(|_| (0..w).flat_map(|x| [10 * x as u8; 3])).collect();
        let img = DecodedImage::from_rgb8(w, h, data).unwrap();
        // crop(x, y) = img(x + 0.5, y) : translation by -0.5 maps image -> crop.
        let m = Similarity { a: 1.0, b: 0.0, tx: -0.5, ty: 0.0 };
        let crop = warp_similarity(&img, &m, 4, 4).unwrap();
        assert_eq!(crop.data[0], 5); // between 0 and 10
        assert_eq!(crop.data[3], 15);
        // Shift far away: everything black.
        let far = Similarity { a: 1.0, b: 0.0, tx: -1000.0, ty: 0.0 };
        assert!(warp_similarity(&img, &far, 4, 4).unwrap().data.iter().all(|&v| v == 0));
    }

    #[test]
    fn degenerate_landmarks_are_errors_not_panics() {
        let same = [[5.0f32, 5.0]; 5];
        assert!(umeyama(&same, &ARCFACE_112).is_err());
        let nan = [[f32::NAN, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]];
        assert!(umeyama(&nan, &ARCFACE_112).is_err());
        assert!(umeyama(&ARCFACE_112[..2], &ARCFACE_112).is_err());
    }
}

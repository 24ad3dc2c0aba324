//! Fitting an image into a detector's input: bilinear resize keeping the
//! aspect ratio (OpenCV `INTER_LINEAR` conventions, rounded to 8 bits as
//! OpenCV does), black padding, the model's channel order, layout and scaling.

use crate::image_io::DecodedImage;
use crate::runtime::{ImageInput, Layout};

/// How an image was fitted into the detector input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    /// Resized width (<= input width).
    pub width: u32,
    /// Resized height (<= input height).
    pub height: u32,
    /// Original pixels per resized pixel, horizontally.
    pub rx: f32,
    /// Original pixels per resized pixel, vertically.
    pub ry: f32,
}

impl Letterbox {
    /// Fit `w x h` into `in_w x in_h` keeping the aspect ratio (never enlarging unless `upscale`).
    ///
    /// ```
    /// let lb = facematch::detect::Letterbox::fit(1280, 960, 640, 640, false);
    /// assert_eq!((lb.width, lb.height), (640, 480));
    /// assert_eq!(lb.map_point([0.0, 0.0]), [0.5, 0.5]);
    /// ```
    pub fn fit(w: u32, h: u32, in_w: u32, in_h: u32, upscale: bool) -> Letterbox {
        let mut s = (f64::from(in_w) / f64::from(w)).min(f64::from(in_h) / f64::from(h));
        if !upscale {
            s = s.min(1.0);
        }
        let rw = ((f64::from(w) * s).round() as u32).clamp(1, in_w);
        let rh = ((f64::from(h) * s).round() as u32).clamp(1, in_h);
        Letterbox { width: rw, height: rh, rx: w as f32 / rw as f32, ry: h as f32 / rh as f32 }
    }

    /// Map a point from resized to original coordinates (pixel centres aligned).
    pub fn map_point(&self, p: [f32; 2]) -> [f32; 2] {
        [(p[0] + 0.5) * self.rx - 0.5, (p[1] + 0.5) * self.ry - 0.5]
    }
}

/// Fill one image of an input tensor with `img` letterboxed into `spec`
/// (bilinear, OpenCV `INTER_LINEAR` conventions, rounded to 8 bits as OpenCV
/// does; padding is black).
pub fn letterbox_into(img: &DecodedImage, spec: &ImageInput, upscale: bool, out: &mut [f32]) -> Letterbox {
    let lb = Letterbox::fit(img.width(), img.height(), spec.width, spec.height, upscale);
    fill_letterbox(img, spec, lb, out);
    lb
}

/// [`letterbox_into`] with the fit already chosen (`lb` no larger than `spec`).
///
/// Separable: each source row the output needs is interpolated horizontally
/// once, into one plane per channel (a row shared by two output rows, as when
/// the scale is under 2, is kept rather than redone); the vertical blend,
/// rounding and normalisation then run over contiguous planes, which the
/// compiler vectorises. The arithmetic is the same, operation for operation,
/// as blending the four neighbours of each pixel directly (tested bit for bit
/// against that in `tests`).
pub(crate) fn fill_letterbox(img: &DecodedImage, spec: &ImageInput, lb: Letterbox, out: &mut [f32]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (lb.width as usize, lb.height as usize);
    let (sw, sh) = (spec.width as usize, spec.height as usize);
    let src = img.as_raw();
    pad(spec, ow, oh, out);
    let xs = axis(ow, w, lb.rx);
    let ys = axis(oh, h, lb.ry);
    // Horizontally interpolated source rows, planar ([channel][x], the image's RGB order).
    let (mut top, mut bottom) = (vec![0f32; ow * 3], vec![0f32; ow * 3]);
    let mut rows: (Option<usize>, Option<usize>) = (None, None);
    let mut line = vec![0f32; ow];
    let mut wide = Vec::with_capacity(w * 3);
    for (y, &(y0, y1, ty)) in ys.iter().enumerate() {
        if rows != (Some(y0), Some(y1)) {
            if rows.1 == Some(y0) {
                std::mem::swap(&mut top, &mut bottom);
            } else {
                horizontal(&src[y0 * w * 3..(y0 + 1) * w * 3], &xs, &mut wide, &mut top);
            }
            horizontal(&src[y1 * w * 3..(y1 + 1) * w * 3], &xs, &mut wide, &mut bottom);
            rows = (Some(y0), Some(y1));
        }
        for c in 0..3 {
            let k = spec.rgb_index(c);
            let (m, s) = (spec.mean[c], spec.std[c]);
            let (a, b) = (&top[k * ow..(k + 1) * ow], &bottom[k * ow..(k + 1) * ow]);
            let dst: &mut [f32] = match spec.layout {
                Layout::Nchw => &mut out[(c * sh + y) * sw..][..ow],
                Layout::Nhwc => &mut line,
            };
            for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                *d = (round_non_negative(a + (b - a) * ty) - m) / s;
            }
            if spec.layout == Layout::Nhwc {
                for (x, &v) in line.iter().enumerate() {
                    out[spec.offset(c, y, x)] = v;
                }
            }
        }
    }
}

/// Per output pixel along one axis: the two source pixels and the weight of
/// the second (OpenCV `INTER_LINEAR`: half-pixel centres, clamped at the edges).
fn axis(n_out: usize, n_in: usize, r: f32) -> Vec<(usize, usize, f32)> {
    (0..n_out)
        .map(|i| {
            let f = (i as f32 + 0.5) * r - 0.5;
            let f = f.max(0.0);
            let i0 = (f.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let t = if i0 == n_in - 1 { 0.0 } else { f - i0 as f32 };
            (i0, i1, t)
        })
        .collect()
}

/// Interpolate one interleaved RGB source row at `xs` into three planes
/// (`wide`: scratch for the row as f32, converted in one vectorised pass).
fn horizontal(row: &[u8], xs: &[(usize, usize, f32)], wide: &mut Vec<f32>, planes: &mut [f32]) {
    wide.clear();
    wide.extend(row.iter().map(|&v| f32::from(v)));
    let ow = xs.len();
    let (r, rest) = planes.split_at_mut(ow);
    let (g, b) = rest.split_at_mut(ow);
    for (((r, g), b), &(x0, x1, tx)) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()).zip(xs) {
        let (p, q) = (&wide[x0 * 3..x0 * 3 + 3], &wide[x1 * 3..x1 * 3 + 3]);
        *r = p[0] + (q[0] - p[0]) * tx;
        *g = p[1] + (q[1] - p[1]) * tx;
        *b = p[2] + (q[2] - p[2]) * tx;
    }
}

/// `v.round()` for `0 <= v < 2^31` (and -0.0 for tiny negative `v`), without a
/// libm call so that the loop around it vectorises: truncate, then add one if
/// the dropped fraction (exact in f32) is at least a half.
#[inline(always)]
fn round_non_negative(v: f32) -> f32 {
    let t = v as i32 as f32;
    if v - t >= 0.5 {
        t + 1.0
    } else {
        t
    }
}

/// Paint the part of the input the resized image does not cover (right and
/// bottom) with black in the model's scaling.
fn pad(spec: &ImageInput, ow: usize, oh: usize, out: &mut [f32]) {
    let (sw, sh) = (spec.width as usize, spec.height as usize);
    for c in 0..3 {
        let v = spec.scale(c, 0);
        match spec.layout {
            Layout::Nchw => {
                let plane = &mut out[c * sh * sw..(c + 1) * sh * sw];
                for row in plane[..oh * sw].chunks_exact_mut(sw) {
                    row[ow..].fill(v);
                }
                plane[oh * sw..].fill(v);
            }
            Layout::Nhwc => {
                for y in 0..sh {
                    let from = if y < oh { ow } else { 0 };
                    for x in from..sw {
                        out[spec.offset(c, y, x)] = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ChannelOrder;

    /// The direct four-neighbour form `fill_letterbox` must equal bit for bit.
    fn reference(img: &DecodedImage, spec: &ImageInput, lb: Letterbox, out: &mut [f32]) {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let src = img.as_raw();
        for c in 0..3 {
            let pad = spec.scale(c, 0);
            for y in 0..spec.height as usize {
                for x in 0..spec.width as usize {
                    out[spec.offset(c, y, x)] = pad;
                }
            }
        }
        // The same sample positions and weights (what is checked is the arithmetic).
        let xs = axis(lb.width as usize, w, lb.rx);
        let ys = axis(lb.height as usize, h, lb.ry);
        let identity = lb.width as usize == w && lb.height as usize == h;
        let ch: [usize; 3] = [spec.rgb_index(0), spec.rgb_index(1), spec.rgb_index(2)];
        let mut row = vec![0f32; lb.width as usize * 3];
        for (y, &(y0, y1, ty)) in ys.iter().enumerate() {
            if identity {
                let line = &src[y * w * 3..(y + 1) * w * 3];
                for (v, &s) in row.iter_mut().zip(line) {
                    *v = f32::from(s);
                }
            } else {
                let (r0, r1) = (&src[y0 * w * 3..(y0 + 1) * w * 3], &src[y1 * w * 3..(y1 + 1) * w * 3]);
                for (x, &(x0, x1, tx)) in xs.iter().enumerate() {
                    for k in 0..3 {
                        let a = f32::from(r0[x0 * 3 + k]) + (f32::from(r0[x1 * 3 + k]) - f32::from(r0[x0 * 3 + k])) * tx;
                        let b = f32::from(r1[x0 * 3 + k]) + (f32::from(r1[x1 * 3 + k]) - f32::from(r1[x0 * 3 + k])) * tx;
                        row[x * 3 + k] = (a + (b - a) * ty).round();
                    }
                }
            }
            for c in 0..3 {
                let (m, s) = (spec.mean[c], spec.std[c]);
                let k = ch[c];
                for x in 0..lb.width as usize {
                    out[spec.offset(c, y, x)] = (row[x * 3 + k] - m) / s;
                }
            }
        }
    }

    fn image(w: u32, h: u32, seed: u64) -> DecodedImage {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data = (0..w * h * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        DecodedImage::from_rgb8(w, h, data).unwrap()
    }

    #[test]
    fn separable_fill_equals_the_direct_form_bit_for_bit() {
        let base = crate::detect::DetectorConfig::default().input;
        let specs = [
            ImageInput { width: 64, height: 48, ..base.clone() },
            ImageInput {
                width: 40,
                height: 40,
                layout: Layout::Nhwc,
                channels: ChannelOrder::Rgb,
                mean: [127.5; 3],
                std: [128.0; 3],
                ..base.clone()
            },
            ImageInput { width: 33, height: 70, mean: [1.0, 2.0, 3.0], std: [0.5, 2.0, 3.0], ..base },
        ];
        let sizes = [(64, 48), (128, 96), (200, 31), (31, 200), (90, 67), (7, 5), (1, 1), (65, 49), (640, 443)];
        for spec in &specs {
            for (i, &(w, h)) in sizes.iter().enumerate() {
                let img = image(w, h, i as u64 + 1);
                for upscale in [false, true] {
                    let lb = Letterbox::fit(w, h, spec.width, spec.height, upscale);
                    let mut got = vec![f32::NAN; spec.plane_len()];
                    let mut want = vec![f32::NAN; spec.plane_len()];
                    fill_letterbox(&img, spec, lb, &mut got);
                    reference(&img, spec, lb, &mut want);
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                    assert!(same, "{w}x{h} into {}x{} ({:?}, upscale {upscale})", spec.width, spec.height, spec.layout);
                    assert!(got.iter().all(|v| !v.is_nan()), "every element written");
                }
            }
        }
    }

    #[test]
    fn letterbox_copies_at_native_scale_and_pads() {
        let img = DecodedImage::from_rgb8(2, 1, vec![10, 20, 30, 40, 50, 60]).unwrap();
        let spec = crate::detect::DetectorConfig::default().input; // BGR, NCHW, raw 0..255
        let mut out = vec![-1.0; spec.plane_len()];
        let lb = letterbox_into(&img, &spec, false, &mut out);
        assert_eq!((lb.width, lb.height, lb.rx, lb.ry), (2, 1, 1.0, 1.0));
        // channel 0 is blue
        assert_eq!(out[spec.offset(0, 0, 0)], 30.0);
        assert_eq!(out[spec.offset(2, 0, 1)], 40.0);
        assert_eq!(out[spec.offset(1, 5, 5)], 0.0);
    }

    #[test]
    fn letterbox_downscales_bilinearly() {
        // 4x4 -> input 2x2: each output pixel is the mean of a 2x2 block (half-pixel centres).
        let data: Vec<u8> = (0..16u8).flat_map(|v| [v * 10; 3]).collect();
        let img = DecodedImage::from_rgb8(4, 4, data).unwrap();
        let spec = ImageInput { width: 2, height: 2, ..crate::detect::DetectorConfig::default().input };
        let mut out = vec![0.0; spec.plane_len()];
        let lb = letterbox_into(&img, &spec, false, &mut out);
        assert_eq!((lb.width, lb.height), (2, 2));
        // output (0,0) samples at (0.5, 0.5): mean of 0, 10, 40, 50 = 25
        assert_eq!(out[spec.offset(0, 0, 0)], 25.0);
    }

    #[test]
    fn rounding_matches_round_for_every_8_bit_blend() {
        for i in 0..=255u32 * 64 {
            let v = i as f32 / 64.0;
            assert_eq!(round_non_negative(v), v.round(), "{v}");
        }
        assert_eq!(round_non_negative(0.49999997), 0.0);
        assert_eq!(round_non_negative(2.5), 3.0);
    }
}

//! Anonymising faces in images that leave the engine.
//!
//! The Measures ask that the faces of people unrelated to the service be
//! deleted or anonymised. [`crate::probe`] already keeps bystanders' faces
//! out of every embedding and record; this module covers the pixels: an
//! image handed back to a caller (a receipt, an evidence frame, a preview)
//! has every face it must not show painted over, in place, before it is
//! encoded. Redaction covers the detector's box grown by a margin (detector
//! boxes are tight around the eyes-to-chin region; hair and ears identify
//! too), clamped to the image.
//!
//! Two redactions: a solid [`Redaction::Fill`] (the default: nothing of the
//! face survives) and a coarse [`Redaction::Mosaic`] (each face becomes at
//! most `cells x cells` flat blocks, for a less jarring preview). Measured
//! in `tests/probe.rs` on a group photo: filled faces are no longer detected
//! and score at most -0.07 against their own originals in SFace; 4x4 mosaics
//! score at most 0.27 (2x2 to 6x6: 0.31), under the model's same-person
//! threshold of 0.363 but not by much: prefer the fill where it matters.
//!
//! ```
//! use facematch::anonymise::{redact, AnonymiseConfig};
//! use facematch::image_io::DecodedImage;
//! use facematch::detect::FaceBox;
//! let mut img = DecodedImage::from_rgb8(8, 8, vec![200; 8 * 8 * 3]).unwrap();
//! let face = FaceBox { bbox: [2.0, 2.0, 2.0, 2.0], score: 0.9 };
//! redact(&mut img, &[face], &AnonymiseConfig { margin: 0.0, ..Default::default() }).unwrap();
//! let px = |x: usize, y: usize| img.as_raw()[(y * 8 + x) * 3];
//! assert_eq!(px(2, 2), 0);   // inside the box: filled
//! assert_eq!(px(0, 0), 200); // outside: untouched
//! ```

use serde::{Deserialize, Serialize};

use crate::image_io::DecodedImage;
use crate::vision::detect::FaceBox;
use crate::{Error, Result};

/// How a face is painted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redaction {
    /// A solid colour (RGB).
    Fill {
        /// The colour.
        rgb: [u8; 3],
    },
    /// The face's region averaged into at most `cells x cells` flat blocks (1 to 8).
    Mosaic {
        /// Blocks across the larger side of the region.
        cells: u32,
    },
}

impl Default for Redaction {
    fn default() -> Self {
        Redaction::Fill { rgb: [0, 0, 0] }
    }
}

/// How faces are anonymised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnonymiseConfig {
    /// What to paint.
    pub redaction: Redaction,
    /// The box grows by this fraction of its size on every side (default 0.25, at most 2).
    pub margin: f32,
}

impl Default for AnonymiseConfig {
    fn default() -> Self {
        AnonymiseConfig { redaction: Redaction::default(), margin: 0.25 }
    }
}

impl AnonymiseConfig {
    /// Check the ranges.
    ///
    /// ```
    /// use facematch::anonymise::{AnonymiseConfig, Redaction};
    /// assert!(AnonymiseConfig::default().validate().is_ok());
    /// assert!(AnonymiseConfig { redaction: Redaction::Mosaic { cells: 40 }, ..Default::default() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.margin) {
            return Err(Error::config("anonymise.margin", format!("must be in 0..=2, got {}", self.margin)));
        }
        if let Redaction::Mosaic { cells } = self.redaction {
            if !(1..=8).contains(&cells) {
                return Err(Error::config(
                    "anonymise.redaction.cells",
                    format!("must be in 1..=8 (more cells keep a face recognisable), got {cells}"),
                ));
            }
        }
        Ok(())
    }
}

/// The pixel rectangle `[x0, y0, x1)` x `[y0, y1)` a box covers once grown
/// by `margin` and clamped; `None` when it misses the image or is not finite.
fn region(b: &FaceBox, margin: f32, w: u32, h: u32) -> Option<(usize, usize, usize, usize)> {
    let [x, y, bw, bh] = b.bbox;
    if ![x, y, bw, bh].iter().all(|v| v.is_finite()) || bw <= 0.0 || bh <= 0.0 {
        return None;
    }
    let (mx, my) = (bw * margin, bh * margin);
    let x0 = (x - mx).floor().max(0.0);
    let y0 = (y - my).floor().max(0.0);
    let x1 = (x + bw + mx).ceil().min(w as f32);
    let y1 = (y + bh + my).ceil().min(h as f32);
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    Some((x0 as usize, y0 as usize, x1 as usize, y1 as usize))
}

/// Paint over every face of `faces` in `img`, in place. Boxes that are not
/// finite or fall outside the image are skipped (nothing to paint).
pub fn redact(img: &mut DecodedImage, faces: &[FaceBox], cfg: &AnonymiseConfig) -> Result<()> {
    cfg.validate()?;
    let (w, h) = (img.width(), img.height());
    let stride = w as usize * 3;
    let data = img.as_raw_mut();
    for f in faces {
        let Some((x0, y0, x1, y1)) = region(f, cfg.margin, w, h) else { continue };
        match cfg.redaction {
            Redaction::Fill { rgb } => {
                for y in y0..y1 {
                    for px in data[y * stride + x0 * 3..y * stride + x1 * 3].chunks_exact_mut(3) {
                        px.copy_from_slice(&rgb);
                    }
                }
            }
            Redaction::Mosaic { cells } => {
                let side = (x1 - x0).max(y1 - y0);
                let cell = side.div_ceil(cells as usize).max(1);
                for cy in (y0..y1).step_by(cell) {
                    for cx in (x0..x1).step_by(cell) {
                        let (ex, ey) = ((cx + cell).min(x1), (cy + cell).min(y1));
                        let mut sum = [0u64; 3];
                        for y in cy..ey {
                            for px in data[y * stride + cx * 3..y * stride + ex * 3].chunks_exact(3) {
                                for c in 0..3 {
                                    sum[c] += px[c] as u64;
                                }
                            }
                        }
                        let n = ((ex - cx) * (ey - cy)) as u64;
                        let mean = [(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8];
                        for y in cy..ey {
                            for px in data[y * stride + cx * 3..y * stride + ex * 3].chunks_exact_mut(3) {
                                px.copy_from_slice(&mean);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> DecodedImage {
        let data =
            (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x + y) % 256) as u8])).collect();
        DecodedImage::from_rgb8(w, h, data).unwrap()
    }

    fn face(x: f32, y: f32, w: f32, h: f32) -> FaceBox {
        FaceBox { bbox: [x, y, w, h], score: 0.9 }
    }

    #[test]
    fn fill_covers_the_grown_box_and_nothing_else() {
        let orig = gradient(40, 30);
        let mut img = orig.clone();
        let cfg = AnonymiseConfig { redaction: Redaction::Fill { rgb: [1, 2, 3] }, margin: 0.5 };
        redact(&mut img, &[face(10.0, 10.0, 8.0, 6.0)], &cfg).unwrap();
        // grown: x 6..22, y 7..19
        for y in 0..30usize {
            for x in 0..40usize {
                let i = (y * 40 + x) * 3;
                let inside = (6..22).contains(&x) && (7..19).contains(&y);
                if inside {
                    assert_eq!(&img.as_raw()[i..i + 3], &[1, 2, 3], "({x},{y})");
                } else {
                    assert_eq!(&img.as_raw()[i..i + 3], &orig.as_raw()[i..i + 3], "({x},{y})");
                }
            }
        }
    }

    #[test]
    fn mosaic_leaves_at_most_cells_squared_colours() {
        let mut img = gradient(64, 64);
        let cfg = AnonymiseConfig { redaction: Redaction::Mosaic { cells: 4 }, margin: 0.0 };
        redact(&mut img, &[face(8.0, 8.0, 32.0, 32.0)], &cfg).unwrap();
        let mut colours = std::collections::HashSet::new();
        for y in 8..40usize {
            for x in 8..40usize {
                let i = (y * 64 + x) * 3;
                colours.insert([img.as_raw()[i], img.as_raw()[i + 1], img.as_raw()[i + 2]]);
            }
        }
        assert!(colours.len() <= 16, "{} colours", colours.len());
    }

    #[test]
    fn boxes_off_the_image_or_not_finite_are_skipped_without_panic() {
        let orig = gradient(20, 20);
        let mut img = orig.clone();
        let cfg = AnonymiseConfig::default();
        let odd = [
            face(f32::NAN, 0.0, 5.0, 5.0),
            face(100.0, 100.0, 5.0, 5.0),
            face(-50.0, -50.0, 10.0, 10.0),
            face(5.0, 5.0, -3.0, 4.0),
            face(0.0, 0.0, f32::INFINITY, 3.0),
        ];
        redact(&mut img, &odd, &cfg).unwrap();
        assert_eq!(img, orig);
        // A box hanging over the edge is clamped.
        redact(&mut img, &[face(15.0, 15.0, 20.0, 20.0)], &cfg).unwrap();
        assert_eq!(&img.as_raw()[(19 * 20 + 19) * 3..(19 * 20 + 19) * 3 + 3], &[0, 0, 0]);
        for bad in [
            AnonymiseConfig { margin: -1.0, ..cfg },
            AnonymiseConfig { margin: f32::NAN, ..cfg },
            AnonymiseConfig { redaction: Redaction::Mosaic { cells: 0 }, ..cfg },
        ] {
            assert!(redact(&mut img, &[], &bad).is_err());
        }
    }
}

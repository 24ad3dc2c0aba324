//! Decoding images safely: size limits checked from the header before any
//! pixel buffer is allocated, EXIF orientation applied, every colour type
//! converted to 8-bit RGB.
//!
//! Anything that is not a decodable image (empty file, truncated JPEG, text
//! named `.jpg`) becomes [`Error::BadImage`] with a reason, never a panic.

use std::io::{Cursor, Read};
use std::path::Path;

use image::{ImageDecoder, ImageError, ImageReader};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Limits applied to every decoded image.
///
/// ```
/// let limits = facematch::image_io::ImageLimits::default();
/// assert_eq!(limits.max_pixels, 50_000_000);
/// limits.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    /// Largest accepted width x height, as claimed by the header (after which
    /// nothing is allocated). Default 50 MP.
    pub max_pixels: u64,
    /// Largest accepted encoded file size in bytes. Default 100 MiB.
    pub max_file_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_pixels: 50_000_000, max_file_bytes: 100 << 20 }
    }
}

impl ImageLimits {
    /// Both limits must be positive.
    pub fn validate(&self) -> Result<()> {
        if self.max_pixels == 0 {
            return Err(Error::config("image.max_pixels", "must be > 0"));
        }
        if self.max_file_bytes == 0 {
            return Err(Error::config("image.max_file_bytes", "must be > 0"));
        }
        Ok(())
    }
}

/// A decoded image: 8-bit RGB, interleaved, row-major, upright (EXIF applied).
#[derive(Clone, PartialEq, Eq)]
pub struct DecodedImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl std::fmt::Debug for DecodedImage {
    // Never print pixels (privacy): size only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedImage").field("width", &self.width).field("height", &self.height).finish()
    }
}

impl DecodedImage {
    /// Wrap an RGB8 buffer (`width * height * 3` bytes).
    ///
    /// ```
    /// let img = facematch::image_io::DecodedImage::from_rgb8(2, 1, vec![0; 6]).unwrap();
    /// assert_eq!((img.width(), img.height()), (2, 1));
    /// assert!(facematch::image_io::DecodedImage::from_rgb8(2, 2, vec![0; 6]).is_err());
    /// ```
    pub fn from_rgb8(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        let expected = (width as usize).checked_mul(height as usize).and_then(|n| n.checked_mul(3));
        if width == 0 || height == 0 || expected != Some(data.len()) {
            return Err(Error::BadImage {
                path: None,
                reason: format!("RGB8 buffer of {} bytes does not match {width}x{height}x3", data.len()),
            });
        }
        Ok(DecodedImage { width, height, data })
    }
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }
    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }
    /// The RGB8 bytes, row-major, 3 per pixel.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }
    /// The RGB8 bytes, mutable (e.g. for [`crate::anonymise::redact`]).
    pub fn as_raw_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    /// Give the buffer back.
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }
}

/// How [`encode`] writes an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// Lossless PNG.
    Png,
    /// JPEG at a quality of 1 to 100.
    Jpeg {
        /// Quality (1-100).
        quality: u8,
    },
}

/// Encode an image (e.g. after [`crate::anonymise::redact`]) to bytes.
/// Nothing is written anywhere: the caller decides where the bytes go.
///
/// ```
/// use facematch::image_io::{decode_bytes, encode, DecodedImage, ImageLimits, OutputFormat};
/// let img = DecodedImage::from_rgb8(4, 3, vec![90; 36]).unwrap();
/// let png = encode(&img, OutputFormat::Png).unwrap();
/// assert_eq!(decode_bytes(&png, &ImageLimits::default()).unwrap(), img);
/// assert!(encode(&img, OutputFormat::Jpeg { quality: 0 }).is_err());
/// ```
pub fn encode(img: &DecodedImage, format: OutputFormat) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let bad = |e: image::ImageError| Error::BadImage { path: None, reason: format!("encoding: {e}") };
    match format {
        OutputFormat::Png => image::codecs::png::PngEncoder::new(&mut out)
            .write_image(&img.data, img.width, img.height, image::ExtendedColorType::Rgb8)
            .map_err(bad)?,
        OutputFormat::Jpeg { quality } => {
            if !(1..=100).contains(&quality) {
                return Err(Error::config("output.quality", format!("must be in 1..=100, got {quality}")));
            }
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .write_image(&img.data, img.width, img.height, image::ExtendedColorType::Rgb8)
                .map_err(bad)?
        }
    }
    Ok(out)
}

/// Decode an image file (format from content, extension as a fallback).
pub fn decode_path(path: &Path, limits: &ImageLimits) -> Result<DecodedImage> {
    // Regular files only: a FIFO or device is refused before it can block.
    let file = crate::fs::open_input(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > limits.max_file_bytes {
        return Err(Error::BadImage {
            path: Some(path.to_path_buf()),
            reason: format!("file is {len} bytes, more than the limit of {}", limits.max_file_bytes),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limits.max_file_bytes + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes, limits).map_err(|e| match e {
        Error::BadImage { path: None, mut reason } => {
            if let Some(ext) = path.extension() {
                reason.push_str(&format!(" (file named .{})", ext.to_string_lossy()));
            }
            Error::BadImage { path: Some(path.to_path_buf()), reason }
        }
        other => other,
    })
}

/// Decode an image held in memory.
///
/// ```
/// use facematch::image_io::{decode_bytes, ImageLimits};
/// let err = decode_bytes(b"not an image", &ImageLimits::default()).unwrap_err();
/// assert!(matches!(err, facematch::Error::BadImage { .. }));
/// ```
pub fn decode_bytes(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage> {
    let bad = |reason: String| Error::BadImage { path: None, reason };
    if bytes.is_empty() {
        return Err(bad("empty file".into()));
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(bad(format!("{} bytes, more than the limit of {}", bytes.len(), limits.max_file_bytes)));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(format!("cannot read: {e}")))?;
    let format = reader.format().ok_or_else(|| bad("not a recognised image: the content is not JPEG, PNG, BMP, WebP or TIFF".into()))?;
    if format == image::ImageFormat::Jpeg {
        // The JPEG decoder fills missing data with grey; a cut file must not pass as a photo.
        check_jpeg_structure(bytes).map_err(|r| bad(format!("truncated or corrupt JPEG: {r}")))?;
    }
    // Allocation ceiling for the decoder: the largest accepted image at 16-bit RGBA, plus slack.
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(image_limits);

    let mut decoder = reader.into_decoder().map_err(|e| describe(e, format))?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, limits)?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| describe(e, format))?;
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    DecodedImage::from_rgb8(w, h, rgb.into_raw())
}

/// Walk a JPEG's marker segments from SOI to EOI (skipping entropy-coded
/// data): `Err` with the reason if the file ends early or is malformed.
pub fn check_jpeg_structure(b: &[u8]) -> std::result::Result<(), String> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("missing start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // Skip fill bytes before a marker.
        while i < b.len() && b[i] == 0xFF && i + 1 < b.len() && b[i + 1] == 0xFF {
            i += 1;
        }
        if i + 1 >= b.len() {
            return Err(format!("ends after {} bytes without an end-of-image marker", b.len()));
        }
        if b[i] != 0xFF {
            return Err(format!("expected a marker at byte {i}"));
        }
        let marker = b[i + 1];
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        if i + 3 >= b.len() {
            return Err(format!("ends inside the header of marker 0x{marker:02X}"));
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        if len < 2 || i + 2 + len > b.len() {
            return Err(format!("segment 0x{marker:02X} at byte {i} runs past the end of the file"));
        }
        i += 2 + len;
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker other than a stuffed 0xFF00 or a restart.
            loop {
                if i + 1 >= b.len() {
                    return Err(format!("image data ends after {} bytes without an end-of-image marker", b.len()));
                }
                if b[i] == 0xFF && b[i + 1] != 0x00 && !(0xD0..=0xD7).contains(&b[i + 1]) {
                    break;
                }
                i += 1;
            }
        }
    }
}

/// Header-only check of an image's claimed size: `(width, height)` or the refusal.
pub fn check_pixels(width: u32, height: u32, limits: &ImageLimits) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::BadImage { path: None, reason: format!("empty image ({width}x{height})") });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(Error::ImageTooLarge { width, height, max_pixels: limits.max_pixels });
    }
    Ok(())
}

fn describe(e: ImageError, format: image::ImageFormat) -> Error {
    let name = format!("{format:?}").to_uppercase();
    let reason = match e {
        ImageError::Decoding(d) => format!("not a valid {name} file or truncated: {d}"),
        ImageError::Limits(l) => format!("decoder limits exceeded: {l}"),
        ImageError::Unsupported(u) => format!("unsupported {name} variant: {u}"),
        ImageError::IoError(io) => format!("truncated or unreadable {name} data: {io}"),
        other => format!("cannot decode {name}: {other}"),
    };
    Error::BadImage { path: None, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn converts_gray_rgba_and_16bit_to_rgb8() {
        let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3, image::Luma([200])));
        let d = decode_bytes(&encode(gray, image::ImageFormat::Png), &ImageLimits::default()).unwrap();
        assert_eq!((d.width(), d.height()), (4, 3));
        assert_eq!(&d.as_raw()[..3], &[200, 200, 200]);

        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(2, 2, image::Rgba([10, 20, 30, 40])));
        let d = decode_bytes(&encode(rgba, image::ImageFormat::Png), &ImageLimits::default()).unwrap();
        assert_eq!(&d.as_raw()[..3], &[10, 20, 30]);

        let rgb16 = image::DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(2, 2, image::Rgb([65535u16, 0, 32768])));
        let d = decode_bytes(&encode(rgb16, image::ImageFormat::Png), &ImageLimits::default()).unwrap();
        assert_eq!(&d.as_raw()[..3], &[255, 0, 128]);
    }

    #[test]
    fn refuses_by_pixel_count() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(100, 100));
        let limits = ImageLimits { max_pixels: 9_999, ..Default::default() };
        let err = decode_bytes(&encode(img, image::ImageFormat::Png), &limits).unwrap_err();
        assert!(matches!(err, Error::ImageTooLarge { width: 100, height: 100, .. }), "{err}");
    }

    #[test]
    fn empty_and_garbage_are_bad_images() {
        for bytes in [&b""[..], b"hello, I am text", b"\xff\xd8\xff"] {
            let err = decode_bytes(bytes, &ImageLimits::default()).unwrap_err();
            assert!(matches!(err, Error::BadImage { .. }), "{err}");
        }
    }
}

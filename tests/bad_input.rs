//! Hostile and degenerate inputs: clear errors or empty face lists, never a panic.
//!
//! The crafted files are generated here (seeded, tiny). Tests that run the
//! models need the set-up (`scripts/setup.sh`).

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use facematch::image_io::{decode_bytes, decode_path, ImageLimits};
use facematch::pipeline::{FacePipeline, PipelineConfig};
use facematch::Error;

fn pipeline() -> &'static FacePipeline {
    static P: OnceLock<FacePipeline> = OnceLock::new();
    P.get_or_init(|| {
        FacePipeline::new(PipelineConfig::default())
            .unwrap_or_else(|e| panic!("cannot build the face pipeline (run scripts/setup.sh first): {e}"))
    })
}

fn sample_jpeg() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples/person_a_1.jpg");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh first)", p.display()))
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

/// A PNG whose IHDR claims `w x h` RGB8, followed by a tiny (wrong) IDAT.
fn huge_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A real JPEG's bytes with the frame header's size patched to `w x h`.
fn huge_jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut bytes = sample_jpeg();
    let mut i = 2;
    while i + 9 < bytes.len() {
        assert_eq!(bytes[i], 0xFF, "JPEG marker expected at {i}");
        let marker = bytes[i + 1];
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if (0xC0..=0xC2).contains(&marker) {
            bytes[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
            bytes[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
            return bytes;
        }
        i += 2 + len;
    }
    panic!("no SOF marker in the sample JPEG");
}

fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).expect("encode");
    out.into_inner()
}

fn assert_bad_image(err: &Error, needle: &str) {
    assert!(matches!(err, Error::BadImage { .. }), "expected BadImage, got {err:?}");
    let msg = err.to_string();
    assert!(msg.to_lowercase().contains(needle), "message {msg:?} should mention {needle:?}");
}

#[test]
fn empty_file_is_a_bad_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.jpg");
    std::fs::write(&path, b"").unwrap();
    let err = pipeline().process_path(&path, true).unwrap_err();
    assert_bad_image(&err, "empty");
    assert!(err.to_string().contains("empty.jpg"), "error names the file: {err}");
}

#[test]
fn text_named_jpg_is_a_bad_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.jpg");
    std::fs::write(&path, "These are not the pixels you are looking for.\n").unwrap();
    let err = decode_path(&path, &ImageLimits::default()).unwrap_err();
    assert_bad_image(&err, "not a recognised image");
    assert!(err.to_string().contains(".jpg"), "{err}");
    let err = pipeline().process_path(&path, false).unwrap_err();
    assert!(matches!(err, Error::BadImage { .. }), "{err:?}");
}

#[test]
fn truncated_jpeg_is_a_bad_image() {
    let bytes = sample_jpeg();
    for cut in [bytes.len() / 2, bytes.len() - 3, 200, 20] {
        let err = decode_bytes(&bytes[..cut], &ImageLimits::default()).unwrap_err();
        assert_bad_image(&err, "truncated");
        let err = pipeline().process_bytes(&bytes[..cut], true).unwrap_err();
        assert!(matches!(err, Error::BadImage { .. }), "cut at {cut}: {err:?}");
    }
}

#[test]
fn huge_claimed_png_is_refused_before_allocating() {
    let err = decode_bytes(&huge_png(60_000, 60_000), &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, Error::ImageTooLarge { width: 60_000, height: 60_000, max_pixels: 50_000_000 }), "{err:?}");
    let err = pipeline().process_bytes(&huge_png(60_000, 60_000), true).unwrap_err();
    assert!(matches!(err, Error::ImageTooLarge { .. }), "{err:?}");
}

#[test]
fn huge_claimed_jpeg_is_refused_before_allocating() {
    let err = decode_bytes(&huge_jpeg(60_000, 60_000), &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, Error::ImageTooLarge { width: 60_000, height: 60_000, .. }), "{err:?}");
}

#[test]
fn plain_image_has_zero_faces() {
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(320, 240, image::Rgb([128, 128, 128])));
    let r = pipeline().process_bytes(&encode(img, image::ImageFormat::Png), true).unwrap();
    assert_eq!((r.width, r.height), (320, 240));
    assert!(r.faces.is_empty(), "{:?}", r.faces);
}

#[test]
fn seeded_noise_and_degenerate_shapes_do_not_panic() {
    // Deterministic noise (xorshift), a 1x1 image and extreme aspect ratios.
    let mut s: u32 = 0x9E37_79B9;
    let noise: Vec<u8> = (0..200 * 150 * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 24) as u8
        })
        .collect();
    let shapes: Vec<(u32, u32, Vec<u8>)> =
        vec![(200, 150, noise), (1, 1, vec![7; 3]), (4000, 1, vec![50; 4000 * 3]), (1, 3000, vec![200; 3000 * 3])];
    for (w, h, data) in shapes {
        let img = facematch::image_io::DecodedImage::from_rgb8(w, h, data).unwrap();
        let r = pipeline().process_image(&img, true).unwrap();
        for f in &r.faces {
            assert_eq!(f.embedding.as_ref().map(Vec::len), Some(128));
        }
    }
}

#[test]
fn grayscale_and_rgba_inputs_are_accepted() {
    let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(64, 48, image::Luma([90])));
    let r = pipeline().process_bytes(&encode(gray, image::ImageFormat::Jpeg), true).unwrap();
    assert_eq!((r.width, r.height), (64, 48));
    let rgba = image::DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(30, 20, image::Rgba([1000u16, 2000, 3000, 65535])));
    let r = pipeline().process_bytes(&encode(rgba, image::ImageFormat::Png), false).unwrap();
    assert_eq!((r.width, r.height), (30, 20));
}

/// Insert an EXIF APP1 segment with the given orientation right after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec(); // big-endian, IFD at 8
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]); // padding of the value field
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    let plain = sample_jpeg();
    let upright = decode_bytes(&plain, &ImageLimits::default()).unwrap();
    // Store the photo turned a quarter anticlockwise, tagged "rotate 90 clockwise to display" (6).
    let stored = image::load_from_memory(&plain).unwrap().rotate270();
    let tagged = with_exif_orientation(&jpeg_q95(&stored), 6);
    let shown = decode_bytes(&tagged, &ImageLimits::default()).unwrap();
    assert_eq!((shown.width(), shown.height()), (upright.width(), upright.height()));
    // Same picture up to JPEG re-encoding (the wrong turn would differ wildly).
    let mad =
        upright.as_raw().iter().zip(shown.as_raw()).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>() / upright.as_raw().len() as f64;
    assert!(mad < 6.0, "mean abs difference {mad}");
    // The face is found upright, with nearly the same embedding.
    let a = pipeline().process_image(&upright, true).unwrap();
    let b = pipeline().process_image(&shown, true).unwrap();
    assert_eq!((a.faces.len(), b.faces.len()), (1, 1));
    let c = facematch::embed::cosine(a.faces[0].embedding.as_ref().unwrap(), b.faces[0].embedding.as_ref().unwrap());
    assert!(c > 0.95, "cosine {c}");
}

/// Encode as a high-quality JPEG.
fn jpeg_q95(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(&img.to_rgb8()).unwrap();
    out
}

#[test]
fn oversized_file_is_refused() {
    let limits = ImageLimits { max_file_bytes: 1000, ..Default::default() };
    let err = decode_bytes(&sample_jpeg(), &limits).unwrap_err();
    assert_bad_image(&err, "limit");
}

#[test]
fn a_corrupt_model_file_is_a_clear_error_from_every_session_loading_it() {
    // Sessions load in parallel: the failure of each must come back as the
    // model's error, naming the file, never as a panic or a half-loaded pipeline.
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("broken.onnx");
    std::fs::write(&bad, b"this is not an ONNX protobuf, just text").unwrap();
    for which in ["detector", "recognizer"] {
        let mut cfg = PipelineConfig::default();
        if which == "detector" {
            cfg.detector.model = bad.clone();
            cfg.detector.session.pool_size = 3;
        } else {
            cfg.recognizer.model = bad.clone();
            cfg.recognizer.session.pool_size = 3;
        }
        match FacePipeline::new(cfg) {
            Err(Error::Model { model, reason }) => {
                assert!(model.ends_with("broken.onnx"), "{which}: {model}");
                assert!(reason.contains("cannot load model"), "{which}: {reason}");
            }
            Err(e) => panic!("{which}: expected a model error, got {e}"),
            Ok(_) => panic!("{which}: a corrupt model loaded"),
        }
    }
}

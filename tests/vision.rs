//! Qwen2-VL preprocessing and vision tower against the reference implementation: a tiny
//! random-weight checkpoint and reference outputs made by `scripts/vlm/make_fixture.py` with
//! PyPI `transformers` 5.17 + `torch` 2.11 (CPU, f32) — `tests/fixtures/tiny-qwen2vl/`.
//! Random weights: this proves the machinery, not any model's quality.

use safetensors::SafeTensors;
use std::path::PathBuf;
use triaxkv::model::vision::{self, preprocess, PreprocessConfig};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2vl")
}

struct Reference {
    json: serde_json::Value,
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        let d = dir();
        let json =
            serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(d.join("reference.safetensors")).unwrap();
        Reference { json, bytes }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn config(&self) -> PreprocessConfig {
        PreprocessConfig {
            min_pixels: self.json["min_pixels"].as_u64().unwrap() as usize,
            max_pixels: self.json["max_pixels"].as_u64().unwrap() as usize,
            ..PreprocessConfig::default()
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

/// Pixel values and grids of four images: two already multiples of 28 (no resize), one
/// upscaled, one downscaled under a small pixel budget (Pillow's bicubic, bit-exact).
#[test]
fn preprocessing_matches_the_reference_processor() {
    let r = Reference::load();
    let cfg = r.config();
    for (i, img) in r.json["images"].as_array().unwrap().iter().enumerate() {
        let file = dir().join(img["file"].as_str().unwrap());
        let decoded = vision::decode(&std::fs::read(&file).unwrap()).unwrap();
        let p = preprocess(&decoded, &cfg).unwrap();
        let grid: Vec<usize> = img["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.grid.to_vec(), grid, "{}", file.display());
        let (shape, want) = r.tensor(&format!("pixel_values.{i}"));
        assert_eq!(shape, vec![p.rows(), p.row_len]);
        let d = max_abs_diff(&p.pixels, &want);
        eprintln!(
            "{}: grid {grid:?}, max |Δ pixel value| {d:.2e}",
            file.display()
        );
        assert!(d < 1e-5, "{}: {d}", file.display());
    }
}

/// Vision tower + merger on the reference processor's pixel values: max |Δ| < 1e-3.
#[test]
fn vision_tower_matches_the_reference_features() {
    let r = Reference::load();
    let tower = vision::load_tower(&dir())
        .unwrap()
        .expect("a vision_config");
    for (i, img) in r.json["images"].as_array().unwrap().iter().enumerate() {
        let grid: Vec<usize> = img["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let (shape, pixels) = r.tensor(&format!("pixel_values.{i}"));
        let patches = vision::Patches {
            grid: [grid[0], grid[1], grid[2]],
            row_len: shape[1],
            pixels,
        };
        let got = tower.forward(&patches).unwrap();
        let (fshape, want) = r.tensor(&format!("features.{i}"));
        assert_eq!(fshape, vec![patches.tokens(2), tower.config.hidden_size]);
        let d = max_abs_diff(&got, &want);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!("image {i} grid {grid:?}: max |Δ feature| {d:.2e} (max |feature| {scale:.3})");
        assert!(d < 1e-3, "image {i}: {d}");
    }
}

/// A text-only model directory has no tower; bad image bytes are clear errors.
#[test]
fn text_only_models_have_no_tower_and_bad_images_are_errors() {
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    assert!(vision::load_tower(&tiny).unwrap().is_none());
    let e = vision::decode(b"GIF89a\x01\x00\x01\x00")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported image format"), "{e}");
    let png = std::fs::read(dir().join("img0.png")).unwrap();
    let e = vision::decode(&png[..200]).unwrap_err().to_string();
    assert!(e.contains("cannot decode"), "{e}");
}

/// The bicubic resize on the images that need one, against Pillow's own output
/// (`Image.resize(..., BICUBIC)`, transformers 4's processor) and torchvision's
/// (`resize(..., BICUBIC, antialias=True)` on uint8, transformers 5's): bit-exact with each.
#[test]
fn bicubic_resize_is_bit_exact_with_pillow() {
    let r = Reference::load();
    let st = SafeTensors::deserialize(&r.bytes).unwrap();
    let mut checked = 0;
    for (i, img) in r.json["images"].as_array().unwrap().iter().enumerate() {
        let Ok(t) = st.tensor(&format!("pil_resized.{i}")) else {
            continue;
        };
        let file = dir().join(img["file"].as_str().unwrap());
        let decoded = vision::decode(&std::fs::read(&file).unwrap()).unwrap();
        let (h, w) = (t.shape()[0], t.shape()[1]);
        if (w as u32, h as u32) == decoded.dimensions() {
            continue;
        }
        let want: Vec<u8> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u8)
            .collect();
        let got = vision::preprocess::resize_bicubic(&decoded, w, h);
        let differ = got
            .as_raw()
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{}: {w}x{h}, {differ} of {} values differ from Pillow",
            file.display(),
            want.len()
        );
        assert_eq!(differ, 0, "{}", file.display());
        if let Ok(tv) = st.tensor(&format!("tv_resized.{i}")) {
            let want: Vec<u8> = tv
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u8)
                .collect();
            let got = vision::preprocess::resize_bicubic_with(
                &decoded,
                w,
                h,
                vision::preprocess::ResizeArithmetic::Torch,
            );
            let differ = got
                .as_raw()
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .count();
            eprintln!(
                "   torch arithmetic: {differ} of {} values differ from torchvision",
                want.len()
            );
            assert_eq!(differ, 0, "{} (torchvision)", file.display());
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the fixture holds Pillow resizes of the resized images"
    );
}

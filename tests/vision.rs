//! Qwen2-VL and Qwen2.5-VL preprocessing, vision towers and language models against the
//! reference implementation: tiny random-weight checkpoints and reference outputs made by
//! `scripts/vlm/make_fixture.py` with PyPI `transformers` 5.17 + `torch` 2.11 (CPU, f32) —
//! `tests/fixtures/tiny-qwen2vl/` and `tests/fixtures/tiny-qwen2_5vl/`. Random weights: this
//! proves the machinery, not any model's quality.

use safetensors::SafeTensors;
use std::path::PathBuf;
use triaxkv::model::vision::{self, preprocess, PreprocessConfig};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2vl")
}

/// Both reference checkpoints: Qwen2-VL, and Qwen2.5-VL (RMSNorm, SwiGLU, windowed attention
/// in block 0 with windows of 2×2 merged patches, full attention in block 1).
fn fixtures() -> [PathBuf; 2] {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    [root.join("tiny-qwen2vl"), root.join("tiny-qwen2_5vl")]
}

struct Reference {
    json: serde_json::Value,
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        Self::load_from(&dir())
    }

    fn load_from(d: &std::path::Path) -> Self {
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

/// An image's `grid_thw` from reference.json.
fn grid_of(img: &serde_json::Value) -> Vec<usize> {
    img["grid_thw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

/// 8-bit pixel values stored as f32.
fn bytes_of(t: &safetensors::tensor::TensorView<'_>) -> Vec<u8> {
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u8)
        .collect()
}

fn count_differ(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
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
    for d in fixtures() {
        preprocessing_matches(&d);
    }
}

fn preprocessing_matches(d: &std::path::Path) {
    let r = Reference::load_from(d);
    let cfg = r.config();
    for (i, img) in r.json["images"].as_array().unwrap().iter().enumerate() {
        let file = d.join(img["file"].as_str().unwrap());
        let decoded = vision::decode(&std::fs::read(&file).unwrap()).unwrap();
        let p = preprocess(&decoded, &cfg).unwrap();
        let grid = grid_of(img);
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
    for d in fixtures() {
        tower_matches(&d);
    }
}

fn tower_matches(d: &std::path::Path) {
    let r = Reference::load_from(d);
    let tower = vision::load_tower(d).unwrap().expect("a vision_config");
    for (i, img) in r.json["images"].as_array().unwrap().iter().enumerate() {
        let grid = grid_of(img);
        let (shape, pixels) = r.tensor(&format!("pixel_values.{i}"));
        let patches = vision::Patches {
            grid: [grid[0], grid[1], grid[2]],
            row_len: shape[1],
            pixels,
        };
        let got = tower.forward(&patches).unwrap();
        let (fshape, want) = r.tensor(&format!("features.{i}"));
        assert_eq!(fshape, vec![patches.tokens(2), tower.config.hidden_size]);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let name = d.display();
        let d = max_abs_diff(&got, &want);
        eprintln!(
            "{name} image {i} grid {grid:?}: max |Δ feature| {d:.2e} (max |feature| {scale:.3})"
        );
        assert!(d < 1e-3, "{name} image {i}: {d}");
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
        let pil = bytes_of(&t);
        let got = vision::preprocess::resize_bicubic(&decoded, w, h);
        let differ = count_differ(got.as_raw(), &pil);
        eprintln!(
            "{}: {w}x{h}, {differ} of {} differ from Pillow",
            file.display(),
            pil.len()
        );
        assert_eq!(differ, 0, "{}", file.display());
        if let Ok(tv) = st.tensor(&format!("tv_resized.{i}")) {
            let torch = vision::preprocess::ResizeArithmetic::Torch;
            let got = vision::preprocess::resize_bicubic_with(&decoded, w, h, torch);
            let differ = count_differ(got.as_raw(), &bytes_of(&tv));
            eprintln!("   torch arithmetic: {differ} differ from torchvision");
            assert_eq!(differ, 0, "{} (torchvision)", file.display());
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the fixture holds Pillow resizes of the resized images"
    );
}

/// The language model with an image: the tokens of `reference.json`'s prompt (text, vision
/// start, image pads, vision end, text) with image 1's features (from our preprocessing and
/// tower) in the pad rows, at multimodal RoPE positions; positions equal the reference's
/// `get_rope_index`, logits within 1e-3 of the reference model's.
#[test]
fn language_model_with_an_image_matches_the_reference_logits() {
    for d in fixtures() {
        language_model_matches(&d);
    }
}

fn language_model_matches(dir: &std::path::Path) {
    use triaxkv::kvcache::KvCache;
    use triaxkv::model::llama::{Logits, Model};
    use triaxkv::model::safetensors::load_dir;
    use triaxkv::tags::{Modality, Role, TokenTag};
    let r = Reference::load_from(dir);
    let (config, weights) = load_dir(dir).unwrap();
    assert!(matches!(
        config.rope_scaling,
        triaxkv::model::config::RopeScaling::MRope {
            sections: [2, 3, 3]
        }
    ));
    let model = Model { config, weights };
    let tower = vision::load_tower(dir).unwrap().unwrap();
    let prompt = &r.json["prompt"];
    let ids: Vec<u32> = prompt["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let img = &r.json["images"][prompt["image"].as_u64().unwrap() as usize];
    let decoded =
        vision::decode(&std::fs::read(dir.join(img["file"].as_str().unwrap())).unwrap()).unwrap();
    let patches = preprocess(&decoded, &r.config()).unwrap();
    let feats = tower.forward(&patches).unwrap();
    let image_token = 300;
    let pos = vision::mrope_positions(&ids, image_token, &[patches.grid], 2).unwrap();
    // Reference positions: int64 [3][n].
    let st = SafeTensors::deserialize(&r.bytes).unwrap();
    let t = st.tensor("prompt.position_ids").unwrap();
    let want_pos: Vec<i64> = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let n = ids.len();
    for (i, p) in pos.iter().enumerate() {
        for a in 0..3 {
            assert_eq!(p[a] as i64, want_pos[a * n + i], "position {i} axis {a}");
        }
    }
    let h = model.config.hidden_size;
    let mut x = Vec::with_capacity(n * h);
    let mut rows = feats.chunks(h);
    for &id in &ids {
        if id == image_token {
            x.extend_from_slice(rows.next().unwrap());
        } else {
            let e = &model.weights.embed.data;
            x.extend_from_slice(&e[id as usize * h..(id as usize + 1) * h]);
        }
    }
    assert!(rows.next().is_none(), "every feature row is used");
    let tag = |m| TokenTag {
        role: Role::User,
        modality: m,
        turn: 1,
        step: 0,
    };
    let tags: Vec<TokenTag> = ids
        .iter()
        .map(|&id| {
            tag(if id == image_token {
                Modality::Image
            } else {
                Modality::Text
            })
        })
        .collect();
    let mut cache = model.new_cache();
    let got = model.forward_embedded(
        x.clone(),
        Some(&pos),
        &tags,
        &mut cache as &mut dyn KvCache,
        Logits::All,
    );
    let (shape, want) = r.tensor("prompt.logits");
    assert_eq!(shape, vec![n, model.config.vocab_size]);
    let d = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!(
        "{}: prompt with an image: max |Δ logit| {d:.2e} (max |logit| {scale:.3})",
        dir.display()
    );
    assert!(d < 1e-3, "{d}");
    // Text-only positions are plain RoPE: the M-RoPE model's `forward` on text equals
    // `forward_embedded` at positions (p, p, p).
    let text = [5u32, 17, 42, 7];
    let ttags = vec![tag(Modality::Text); text.len()];
    let mut c1 = model.new_cache();
    let a = model.forward(&text, &ttags, &mut c1 as &mut dyn KvCache, Logits::All);
    let xs: Vec<f32> = text
        .iter()
        .flat_map(|&id| model.weights.embed.data[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    let p3: Vec<[u32; 3]> = (0..text.len() as u32).map(|p| [p; 3]).collect();
    let mut c2 = model.new_cache();
    let b = model.forward_embedded(
        xs,
        Some(&p3),
        &ttags,
        &mut c2 as &mut dyn KvCache,
        Logits::All,
    );
    assert_eq!(a, b);
}

#[test]
fn mrope_positions_check_image_runs() {
    let ids = [1u32, 9, 9, 9, 9, 2, 3];
    let p = vision::mrope_positions(&ids, 9, &[[1, 4, 4]], 2).unwrap();
    assert_eq!(
        p,
        vec![
            [0, 0, 0],
            [1, 1, 1],
            [1, 1, 2],
            [1, 2, 1],
            [1, 2, 2],
            [3, 3, 3],
            [4, 4, 4]
        ]
    );
    assert!(
        vision::mrope_positions(&ids, 9, &[[1, 4, 6]], 2).is_err(),
        "6 tokens needed"
    );
    assert!(
        vision::mrope_positions(&ids, 9, &[], 2).is_err(),
        "no grid for the run"
    );
    assert!(
        vision::mrope_positions(&[1, 2], 9, &[[1, 2, 2]], 2).is_err(),
        "unused grid"
    );
}

/// `trace inspect` counts a trajectory's screenshots per step and the tokens they take in
/// Qwen2-VL's layout (512×384 → 14×18 merged patches + start/end = 254), also when the model
/// renders them as alt text. Needs the bundled SmolLM2's tokenizer (scripts/setup.sh).
#[test]
fn trace_inspect_reports_image_tokens_per_step() {
    if !triaxkv::model::load::default_model_path().exists() {
        eprintln!("SKIPPED trace_inspect_reports_image_tokens_per_step: no default model");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .args(["trace", "inspect", "--show", "0"])
        .arg(root.join("traces/test/webvoyager.jsonl"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("images per step"), "{text}");
    assert_eq!(text.matches("1 image(s), 254 tokens").count(), 3, "{text}");
}

/// calibrate → allocate → eval end to end with images: the tiny random-weight Qwen2-VL on the
/// WebVoyager test trajectory (three 512×384 screenshots, 254 tokens each). The table has
/// observation/image rows; eval feeds the 762 image tokens through the vision tower and says so.
#[test]
fn calibrate_allocate_eval_run_with_images_on_the_tiny_vlm() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = dir();
    let traces = root.join("traces/test/webvoyager.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_triaxkv"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{:?}: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let calib = tmp.path().join("calib");
    let profile = tmp.path().join("p.json");
    let eval = tmp.path().join("eval");
    let os = |s: &str| std::ffi::OsString::from(s);
    run(&[
        &os("calibrate"),
        &os("--model"),
        model.as_os_str(),
        &os("--traces"),
        traces.as_os_str(),
        &os("--value-group"),
        &os("16"),
        &os("-o"),
        calib.as_os_str(),
    ]);
    let csv = std::fs::read_to_string(calib.join("sensitivity.csv")).unwrap();
    let image_rows = csv
        .lines()
        .filter(|l| l.contains(",image,observation,"))
        .count();
    assert!(image_rows > 0, "no image rows:\n{csv}");
    run(&[
        &os("allocate"),
        &os("--model"),
        model.as_os_str(),
        &os("--calib"),
        calib.as_os_str(),
        &os("--budget"),
        &os("4"),
        &os("-o"),
        profile.as_os_str(),
    ]);
    run(&[
        &os("eval"),
        &os("--model"),
        model.as_os_str(),
        &os("--profile"),
        profile.as_os_str(),
        &os("--traces"),
        traces.as_os_str(),
        &os("--positions"),
        &os("8"),
        &os("--tool-calls"),
        &os("1"),
        &os("--gen-tokens"),
        &os("4"),
        &os("-o"),
        eval.as_os_str(),
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["trajectories"][0]["image_tokens"], 762, "{report}");
    let md = std::fs::read_to_string(eval.join("eval.md")).unwrap();
    assert!(md.contains("762 image tokens fed"), "{md}");
}

/// calibrate's per-trajectory cache keys on the image bytes too: the same trace with one
/// screenshot changed (same path, same size) is measured again, not served from the cache.
#[test]
fn calibrate_cache_sees_a_changed_image() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = dir();
    let tmp = tempfile::tempdir().unwrap();
    // The trace names its images as ../images/...: copy both, keeping that layout.
    let shots = "images/webvoyager/taskCambridge_Dictionary--29";
    std::fs::create_dir_all(tmp.path().join("test")).unwrap();
    std::fs::create_dir_all(tmp.path().join(shots)).unwrap();
    std::fs::copy(
        root.join("traces/test/webvoyager.jsonl"),
        tmp.path().join("test/webvoyager.jsonl"),
    )
    .unwrap();
    for e in std::fs::read_dir(root.join("traces").join(shots)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(shots).join(e.file_name())).unwrap();
    }
    let calib = tmp.path().join("calib");
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_triaxkv"))
            .arg("calibrate")
            .arg("--model")
            .arg(&model)
            .arg("--traces")
            .arg(tmp.path().join("test/webvoyager.jsonl"))
            .args(["--value-group", "16", "-o"])
            .arg(&calib)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    assert!(run().contains("(0 cached)"));
    assert!(run().contains("(1 cached)"), "an unchanged trace is cached");
    let shot = tmp.path().join(shots).join("screenshot10.png");
    let mut img = image::open(&shot).unwrap().to_rgb8();
    let p = img.get_pixel_mut(3, 3);
    p.0[0] = p.0[0].wrapping_add(97);
    img.save(&shot).unwrap();
    assert!(
        run().contains("(0 cached)"),
        "a changed image is measured again"
    );
}

/// The serving engine feeds a request's image to a vision model: the prompt renders the
/// image as vision tokens with features, the scheduler runs it in chunks (no prefix reuse),
/// and the greedy answer equals a direct `prefill_media` decode of the same prompt (generated
/// tokens at positions after the image's largest, as transformers continues).
#[test]
fn serve_engine_feeds_images_to_a_vision_model() {
    for d in fixtures() {
        serve_engine_feeds_images(&d);
    }
}

fn serve_engine_feeds_images(dir: &std::path::Path) {
    use base64::Engine as _;
    use std::sync::Arc;
    use triaxkv::kvcache::FullCache;
    use triaxkv::model::llama::Logits;
    use triaxkv::runtime::{
        CpuBackend, CpuKv, Engine, EngineConfig, Event, GenerationRequest, Prompter,
    };
    use triaxkv::trace::schema::Trajectory;

    let mut loaded = triaxkv::model::load::load(dir).unwrap();
    let tower = Arc::new(loaded.vision.take().expect("a vision tower"));
    let tokenizer = Arc::new(loaded.tokenizer);
    let model = Arc::new(loaded.model);
    let prompter = Prompter::new(tokenizer.clone()).unwrap().with_vision(tower);
    let png = std::fs::read(dir.join("img1.png")).unwrap();
    let (w, h) = image::load_from_memory(&png)
        .unwrap()
        .to_rgb8()
        .dimensions();
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let conv: Trajectory = serde_json::from_value(serde_json::json!({
        "id": "serve-image",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "data": uri, "width": w, "height": h}
        ]}]
    }))
    .unwrap();
    let prompt = prompter.render(&conv).unwrap();
    let media = prompt.media.clone().expect("image features");
    let image_tokens = media.row_of.iter().filter(|r| r.is_some()).count();
    assert!(image_tokens > 0);

    // Reference: the whole prompt at once, then one token at a time.
    let end = prompter.end_ids();
    let mut cache = FullCache::new(model.kv_shape());
    let mut logits = model.prefill_media(
        &prompt.ids,
        &prompt.tags,
        &media,
        0,
        &mut cache,
        Logits::Last,
        usize::MAX,
        &mut |_| {},
    );
    let mut want = Vec::new();
    for _ in 0..6 {
        let next = triaxkv::model::sampling::argmax(&logits) as u32;
        if end.contains(&next) {
            break;
        }
        want.push(next);
        let at = prompt.ids.len() + want.len() - 1;
        logits = model.prefill_media(
            &[next],
            &[prompt.gen_tag],
            &media,
            at,
            &mut cache,
            Logits::Last,
            usize::MAX,
            &mut |_| {},
        );
    }
    let want_text = tokenizer.decode(&want).unwrap();
    eprintln!("greedy after the image: {want:?} {want_text:?}");
    assert!(
        !want.is_empty(),
        "the reference answer is empty: a weak check"
    );

    // The engine, with prompt chunks of 7 tokens (the image spans several).
    let config = EngineConfig {
        prefill_chunk: 7,
        step_tokens: 7,
        ..Default::default()
    };
    let engine = Engine::start(
        CpuBackend::new(model.clone(), CpuKv::F32),
        prompter,
        "tiny-vlm".into(),
        config,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let run = |engine: &Engine| {
        let mut rx = engine
            .submit(GenerationRequest {
                prompt: prompt.clone(),
                max_tokens: 6,
                sampling: Default::default(),
                stop: vec![],
            })
            .unwrap();
        rt.block_on(async {
            let (mut text, mut started) = (String::new(), None);
            while let Some(e) = rx.recv().await {
                match e {
                    Event::Started {
                        prompt_tokens,
                        cached_tokens,
                    } => started = Some((prompt_tokens, cached_tokens)),
                    Event::Text(t) => text.push_str(&t),
                    Event::Done { .. } => break,
                    Event::Failed(e) => panic!("{e}"),
                }
            }
            (text, started)
        })
    };
    let (text, started) = run(&engine);
    assert_eq!(started, Some((prompt.ids.len(), 0)));
    assert_eq!(text, want_text, "engine vs direct decode");
    // A second identical request reuses nothing: image tokens share one id.
    let (again, started) = run(&engine);
    assert_eq!(started, Some((prompt.ids.len(), 0)));
    assert_eq!(again, want_text);
    engine.shutdown();
}

//! Vision-language models of the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL; DESIGN §9): image
//! preprocessing, the vision tower, and the multimodal RoPE positions of a sequence holding
//! image tokens (the language model itself is `model::llama` with M-RoPE).

pub mod preprocess;
pub mod qwen2vl;

pub use preprocess::{decode, preprocess, ImageError, Patches, PreprocessConfig};
pub use qwen2vl::{VisionConfig, VisionTower};

use crate::model::safetensors::SafetensorsError;
use std::path::Path;

/// Whether `dir/config.json` has a `vision_config` (a vision-language model); false when it
/// cannot be read (the loader reports that).
pub fn has_vision_config(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("vision_config").is_some())
}

/// The vision tower of a Qwen2-VL or Qwen2.5-VL model directory, or `None` when its config has no
/// `vision_config` (a text-only model).
pub fn load_tower(dir: &Path) -> Result<Option<VisionTower>, SafetensorsError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| SafetensorsError::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| SafetensorsError::ConfigJson {
            path: path.clone(),
            source,
        })?;
    match v.get("vision_config") {
        None => Ok(None),
        Some(vc) => {
            let config = VisionConfig::from_json(vc, &path)?;
            Ok(Some(VisionTower::load(dir, config)?))
        }
    }
}

/// Qwen2-VL's multimodal RoPE positions `(t, h, w)` of a token sequence whose images appear
/// as runs of `image_token` (one run per entry of `grids`, each `t · h · w / merge²` tokens,
/// in order): text advances all three together; an image's tokens take their merged-grid
/// coordinates after the preceding text, and the text after it resumes past their largest.
pub fn mrope_positions(
    ids: &[u32],
    image_token: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<Vec<[u32; 3]>, String> {
    let mut out = Vec::with_capacity(ids.len());
    let mut next = 0u32; // the position the next text token takes
    let mut i = 0;
    let mut images = grids.iter();
    while i < ids.len() {
        if ids[i] != image_token {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let Some(&[t, h, w]) = images.next() else {
            return Err(format!(
                "more image runs than the {} images given",
                grids.len()
            ));
        };
        if merge == 0 || h % merge != 0 || w % merge != 0 {
            return Err(format!("grid {:?} does not merge by {merge}", [t, h, w]));
        }
        let (lh, lw) = (h / merge, w / merge);
        let n = t * lh * lw;
        if ids.len() < i + n || ids[i..i + n].iter().any(|&x| x != image_token) {
            return Err(format!(
                "an image of grid {:?} needs {n} consecutive image tokens at {i}",
                [t, h, w]
            ));
        }
        let mut top = next;
        for ti in 0..t {
            for hi in 0..lh {
                for wi in 0..lw {
                    let p = [next + ti as u32, next + hi as u32, next + wi as u32];
                    top = top.max(p[0]).max(p[1]).max(p[2]);
                    out.push(p);
                }
            }
        }
        next = top + 1;
        i += n;
    }
    if images.next().is_some() {
        return Err(format!(
            "{} images given, fewer image runs in the tokens",
            grids.len()
        ));
    }
    Ok(out)
}

/// The [`Media`](crate::model::llama::Media) of a rendered trajectory for a Qwen2-VL model:
/// every image part of `messages` (in order; a `path` relative to `trace_dir`, or a base64
/// `data` URI) is decoded, preprocessed and run through `tower`; its features fill the
/// `<|image_pad|>` tokens (`image_token`) of `ids` in order, and the positions are the
/// multimodal ones. Errors name the message and part.
pub fn media_for(
    tower: &VisionTower,
    messages: &[crate::trace::schema::Message],
    trace_dir: &Path,
    ids: &[u32],
    image_token: u32,
) -> Result<crate::model::llama::Media, String> {
    use crate::trace::schema::Part;
    use base64::Engine;
    let cfg = PreprocessConfig::default();
    let mut grids = Vec::new();
    let mut features = Vec::new();
    for (mi, m) in messages.iter().enumerate() {
        for (pi, part) in m.content.iter().enumerate() {
            let Part::Image { path, data, .. } = part else {
                continue;
            };
            let at = |e: String| format!("message {mi}, part {pi}: {e}");
            let bytes = match (path, data) {
                (Some(p), _) => {
                    let f = trace_dir.join(p);
                    std::fs::read(&f).map_err(|e| at(format!("{}: {e}", f.display())))?
                }
                (None, Some(d)) => {
                    let payload = d.split_once(',').map_or(d.as_str(), |(_, b)| b);
                    base64::engine::general_purpose::STANDARD
                        .decode(payload.trim())
                        .map_err(|e| at(format!("invalid base64: {e}")))?
                }
                (None, None) => return Err(at("an image part needs `path` or `data`".into())),
            };
            let img = decode(&bytes).map_err(|e| at(e.to_string()))?;
            let patches = preprocess(&img, &cfg).map_err(|e| at(e.to_string()))?;
            features.extend(tower.forward(&patches).map_err(|e| at(e.to_string()))?);
            grids.push(patches.grid);
        }
    }
    let positions = mrope_positions(ids, image_token, &grids, cfg.merge_size)?;
    let mut row_of = Vec::with_capacity(ids.len());
    let mut next = 0usize;
    for &id in ids {
        if id == image_token {
            row_of.push(Some(next));
            next += 1;
        } else {
            row_of.push(None);
        }
    }
    let rows = features.len() / tower.config.hidden_size.max(1);
    if next != rows {
        return Err(format!(
            "{next} image tokens in the rendering, {rows} feature rows from its images"
        ));
    }
    Ok(crate::model::llama::Media {
        row_of,
        features,
        positions,
    })
}

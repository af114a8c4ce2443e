//! Vision-language models: image preprocessing and the vision tower of the Qwen2-VL family
//! (DESIGN §9). The language model side (M-RoPE positions, image tokens in the chat template)
//! is not built yet: images still render as their `alt` text.

pub mod preprocess;
pub mod qwen2vl;

pub use preprocess::{decode, preprocess, ImageError, Patches, PreprocessConfig};
pub use qwen2vl::{VisionConfig, VisionTower};

use crate::model::safetensors::SafetensorsError;
use std::path::Path;

/// The vision tower of a Qwen2-VL model directory, or `None` when its config has no
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

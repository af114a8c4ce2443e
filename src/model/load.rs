//! Finding and loading a model: a GGUF file or a Hugging Face safetensors directory,
//! with its tokenizer and identity (name, sha256) for profiles and reports.

use super::gguf::{GgufError, GgufFile};
use super::llama::Model;
use super::safetensors::SafetensorsError;
use super::tokenizer::{Tokenizer, TokenizerError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// File name of the bundled default model inside `$TRIAXKV_HOME/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the default model is not at {path}; run `scripts/setup.sh` to fetch it (or pass --model PATH)")]
    MissingDefault { path: PathBuf },
    #[error("model path {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path} is neither a .gguf file nor a directory with config.json and *.safetensors")]
    UnknownFormat { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("tokenizer of {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
    #[error("{path}: the tokenizer has {tokenizer} tokens but the model's vocabulary is {model}")]
    VocabMismatch {
        path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    SafetensorsDir(PathBuf),
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// File stem of the GGUF or the directory name.
    pub name: String,
    /// sha256 of the GGUF file, or of the directory's config.json and safetensors files.
    pub sha256: String,
    pub source: ModelSource,
    /// A vision-language model's vision tower (Qwen2-VL safetensors directories).
    pub vision: Option<super::vision::VisionTower>,
}

impl LoadedModel {
    /// How trajectories render for this model: image parts as vision tokens when it has a
    /// vision tower, else as their alt text.
    pub fn render_options(&self) -> crate::trace::render::RenderOptions {
        crate::trace::render::RenderOptions {
            images: self
                .vision
                .as_ref()
                .map(|_| crate::trace::template::ImageTokens::qwen2_vl()),
            ..Default::default()
        }
    }

    /// The image inputs of a rendered trajectory (`ids`, rendered with
    /// [`render_options`](Self::render_options)) for a vision-language model; `None` for a
    /// text-only model or a rendering without image tokens. Image paths are relative to
    /// `trace_dir`; errors name the message and part.
    pub fn media(
        &self,
        messages: &[crate::trace::schema::Message],
        trace_dir: &Path,
        ids: &[u32],
    ) -> Result<Option<super::llama::Media>, String> {
        let image_token = self
            .tokenizer
            .token_to_id(crate::trace::template::IMAGE_PAD);
        match (&self.vision, image_token) {
            (Some(tower), Some(t)) if ids.contains(&t) => {
                super::vision::media_for(tower, messages, trace_dir, ids, t).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// `$TRIAXKV_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> PathBuf {
    crate::util::triaxkv_home()
        .join("models")
        .join(DEFAULT_MODEL_FILE)
}

/// Load `path`, or the default model when `None` (with a message naming the setup script
/// when it has not been fetched).
pub fn load_or_default(path: Option<&Path>) -> Result<LoadedModel, ModelError> {
    match path {
        Some(p) => load(p),
        None => {
            let p = default_model_path();
            if !p.exists() {
                return Err(ModelError::MissingDefault { path: p });
            }
            load(&p)
        }
    }
}

pub fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        return load_safetensors_dir(path);
    }
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(ModelError::UnknownFormat {
            path: path.to_path_buf(),
        });
    }
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let weights = file.weights(&config)?;
    let tokenizer =
        Tokenizer::from_gguf(&file.content).map_err(|source| ModelError::Tokenizer {
            path: path.to_path_buf(),
            source,
        })?;
    let sha256 = hex(&Sha256::digest(file.bytes()));
    let loaded = LoadedModel {
        model: Model { config, weights },
        tokenizer,
        name: stem(path),
        sha256,
        source: ModelSource::Gguf(path.to_path_buf()),
        vision: None,
    };
    check_vocab(&loaded, path)?;
    Ok(loaded)
}

fn load_safetensors_dir(dir: &Path) -> Result<LoadedModel, ModelError> {
    if !dir.join("config.json").is_file() {
        return Err(ModelError::UnknownFormat {
            path: dir.to_path_buf(),
        });
    }
    let (config, weights) = super::safetensors::load_dir(dir)?;
    let tok_config = dir.join("tokenizer_config.json");
    let tokenizer = Tokenizer::from_file(
        &dir.join("tokenizer.json"),
        tok_config.is_file().then_some(tok_config.as_path()),
    )
    .map_err(|source| ModelError::Tokenizer {
        path: dir.to_path_buf(),
        source,
    })?;
    let loaded = LoadedModel {
        model: Model { config, weights },
        tokenizer,
        name: stem(dir),
        sha256: hash_dir(dir)?,
        source: ModelSource::SafetensorsDir(dir.to_path_buf()),
        vision: super::vision::load_tower(dir)?,
    };
    check_vocab(&loaded, dir)?;
    Ok(loaded)
}

/// A model's name, sha256 and architecture, read without its weights or tokenizer.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub sha256: String,
    pub config: super::config::ModelConfig,
    pub source: ModelSource,
}

/// [`ModelInfo`] of `path`, or of the default model when `None`: what a profile's model
/// identity needs, at the cost of hashing the files (no dequantization, no tokenizer).
pub fn inspect(path: Option<&Path>) -> Result<ModelInfo, ModelError> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let p = default_model_path();
            if !p.exists() {
                return Err(ModelError::MissingDefault { path: p });
            }
            p
        }
    };
    if !path.exists() {
        return Err(ModelError::NotFound { path });
    }
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(ModelError::UnknownFormat { path });
        }
        let config = super::safetensors::load_config(&path.join("config.json"))?;
        return Ok(ModelInfo {
            name: stem(&path),
            sha256: hash_dir(&path)?,
            config,
            source: ModelSource::SafetensorsDir(path),
        });
    }
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(ModelError::UnknownFormat { path });
    }
    let file = GgufFile::open(&path)?;
    Ok(ModelInfo {
        name: stem(&path),
        sha256: hex(&Sha256::digest(file.bytes())),
        config: file.config()?,
        source: ModelSource::Gguf(path),
    })
}

/// The tokenizer may have fewer ids than the embedding (padded vocabularies) but never more.
fn check_vocab(m: &LoadedModel, path: &Path) -> Result<(), ModelError> {
    let (tokenizer, model) = (m.tokenizer.vocab_size(), m.model.config.vocab_size);
    if tokenizer > model {
        return Err(ModelError::VocabMismatch {
            path: path.to_path_buf(),
            tokenizer,
            model,
        });
    }
    Ok(())
}

/// sha256 over `config.json` and every `*.safetensors`, in name order, each preceded by
/// its name, so renaming or editing any of them changes the identity.
fn hash_dir(dir: &Path) -> Result<String, ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()) == Some("config.json")
                || p.extension().and_then(|e| e.to_str()) == Some("safetensors")
        })
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for p in &names {
        h.update(
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update(std::fs::read(p).map_err(io(p))?);
    }
    Ok(hex(&h.finalize()))
}

fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_paths_name_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.gguf");
        let err = load(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("nope.gguf"), "{err}");
        let txt = dir.path().join("model.bin");
        std::fs::write(&txt, b"x").unwrap();
        let err = load(&txt).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("neither a .gguf"), "{err}");
        let err = ModelError::MissingDefault { path: p }.to_string();
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }

    #[test]
    fn stem_drops_only_the_gguf_suffix() {
        assert_eq!(stem(Path::new("/a/SmolLM2.Q4_1.gguf")), "SmolLM2.Q4_1");
        assert_eq!(stem(Path::new("/a/qwen3-tiny")), "qwen3-tiny");
    }

    #[test]
    fn inspect_reads_the_shape_and_identity_without_weights() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let info = inspect(Some(&dir)).unwrap();
        assert_eq!(
            (
                info.config.num_layers,
                info.config.num_kv_heads,
                info.config.head_dim
            ),
            (2, 2, 16)
        );
        assert_eq!(info.sha256, hash_dir(&dir).unwrap());
        assert_eq!(info.name, "tiny-llama");
    }
}

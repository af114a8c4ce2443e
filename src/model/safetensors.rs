//! Hugging Face model directories: `config.json` into [`ModelConfig`] and `model.safetensors`
//! (single file or a sharded set with `model.safetensors.index.json`) into f32 [`Weights`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Dtype, TensorView};
use candle_core::safetensors::MmapedSafetensors;
use serde::Deserialize;
use serde_json::Value;

use super::config::{Arch, ModelConfig, RopeScaling};
use super::weights::{LayerWeights, Matrix, Weights};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for a model config: {source}")]
    ConfigJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing field `{field}`")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: field `{field}`: {reason}")]
    InvalidField {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: unknown architecture {found}; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")]
    UnknownArch { path: PathBuf, found: String },
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{dir}: no weights: expected `{SINGLE_FILE}` or `{INDEX_FILE}`")]
    NoWeights { dir: PathBuf },
    #[error("{path}: bad shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{path}: not a readable safetensors file (truncated or corrupt?): {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("tensor `{name}` is missing (looked in {files})")]
    MissingTensor { name: String, files: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; supported: F32, F16, BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
}

type Result<T> = std::result::Result<T, SafetensorsError>;

/// Load a Hugging Face model directory (config.json + safetensors) as f32.
pub fn load_dir(dir: &Path) -> Result<(ModelConfig, Weights)> {
    let config = load_config(&dir.join(CONFIG_FILE))?;
    let store = TensorStore::open(dir)?;
    let weights = read_weights(&config, &store)?;
    Ok((config, weights))
}

/// The subset of a Hugging Face `config.json` that decides the forward pass. Every field is
/// optional here so a missing one is reported by name rather than as a serde position.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers >= 5 folds `rope_theta` and `rope_scaling` into this one object.
    rope_parameters: Option<Value>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    /// transformers >= 5 lists each layer's attention kind.
    layer_types: Option<Vec<String>>,
}

/// Parse `config.json` into a [`ModelConfig`].
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_config(&text, path)
}

/// Parse the text of a `config.json`; `path` only labels errors.
pub fn parse_config(text: &str, path: &Path) -> Result<ModelConfig> {
    let json_err = |source| SafetensorsError::ConfigJson {
        path: path.to_path_buf(),
        source,
    };
    let mut value: Value = serde_json::from_str(text).map_err(json_err)?;
    // A vision-language config (transformers 5) nests the language model's fields in
    // `text_config`: read them as if they were at the top.
    if let Some(Value::Object(text_config)) = value.get("text_config").cloned() {
        if let Value::Object(top) = &mut value {
            for (k, v) in text_config {
                top.insert(k, v);
            }
        }
    }
    let raw: RawConfig =
        serde_path_to_error::deserialize(value).map_err(|e| SafetensorsError::InvalidField {
            path: path.to_path_buf(),
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })?;
    let missing = |field: &str| SafetensorsError::MissingField {
        path: path.to_path_buf(),
        field: field.to_string(),
    };
    let invalid = |field: &str, reason: String| SafetensorsError::InvalidField {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    let unsupported = |what: String| SafetensorsError::Unsupported {
        path: path.to_path_buf(),
        what,
    };

    let arch = detect_arch(&raw, path)?;
    let vocab_size = raw.vocab_size.ok_or_else(|| missing("vocab_size"))?;
    let hidden_size = raw.hidden_size.ok_or_else(|| missing("hidden_size"))?;
    let intermediate_size = raw
        .intermediate_size
        .ok_or_else(|| missing("intermediate_size"))?;
    let num_layers = raw
        .num_hidden_layers
        .ok_or_else(|| missing("num_hidden_layers"))?;
    let num_heads = raw
        .num_attention_heads
        .ok_or_else(|| missing("num_attention_heads"))?;
    // Multi-head checkpoints omit the KV head count; transformers then uses one KV head per head.
    let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
    let max_position_embeddings = raw
        .max_position_embeddings
        .ok_or_else(|| missing("max_position_embeddings"))?;
    let rms_norm_eps = raw.rms_norm_eps.ok_or_else(|| missing("rms_norm_eps"))? as f32;

    for (field, value) in [
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_hidden_layers", num_layers),
        ("num_attention_heads", num_heads),
        ("num_key_value_heads", num_kv_heads),
    ] {
        if value == 0 {
            return Err(invalid(field, "must be positive".into()));
        }
    }
    if num_heads % num_kv_heads != 0 {
        return Err(invalid(
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let head_dim = match raw.head_dim {
        Some(0) => return Err(invalid("head_dim", "must be positive".into())),
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(invalid(
                "num_attention_heads",
                format!(
                "{num_heads} does not divide hidden_size {hidden_size} and no head_dim is given"
            ),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(invalid(
            "head_dim",
            format!("{head_dim} is odd; RoPE needs pairs"),
        ));
    }
    if let Some(act) = &raw.hidden_act {
        if act != "silu" {
            return Err(unsupported(format!("hidden_act `{act}` (only `silu`)")));
        }
    }
    if raw.mlp_bias == Some(true) {
        return Err(unsupported("mlp_bias = true".into()));
    }
    if let Some(kind) = raw
        .layer_types
        .iter()
        .flatten()
        .find(|t| *t != "full_attention")
    {
        return Err(unsupported(format!(
            "layer_types entry `{kind}` (only `full_attention`)"
        )));
    }
    if raw.use_sliding_window == Some(true) {
        return Err(unsupported(
            "use_sliding_window = true (sliding-window attention)".into(),
        ));
    }

    let (rope_theta, rope_scaling) = parse_rope(&raw, path)?;
    if let RopeScaling::MRope { sections } = rope_scaling {
        if sections.iter().sum::<usize>() != head_dim / 2 {
            return Err(invalid(
                "mrope_section",
                format!(
                    "{sections:?} does not sum to head_dim / 2 = {}",
                    head_dim / 2
                ),
            ));
        }
    }

    // Qwen2 always has q/k/v biases and its config has no switch for them.
    let attention_bias = match arch {
        Arch::Qwen2 => true,
        Arch::Llama | Arch::Qwen3 => raw.attention_bias.unwrap_or(false),
    };
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta,
        rope_scaling,
        rms_norm_eps,
        max_position_embeddings,
        // The transformers default for all three families is untied.
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        attention_bias,
        qk_norm: arch == Arch::Qwen3,
    })
}

fn detect_arch(raw: &RawConfig, path: &Path) -> Result<Arch> {
    if let Some(archs) = &raw.architectures {
        for a in archs {
            match a.as_str() {
                "LlamaForCausalLM" => return Ok(Arch::Llama),
                "Qwen2ForCausalLM" => return Ok(Arch::Qwen2),
                "Qwen3ForCausalLM" => return Ok(Arch::Qwen3),
                // The language model of Qwen2-VL and Qwen2.5-VL is Qwen2 with multimodal RoPE.
                "Qwen2VLForConditionalGeneration" | "Qwen2_5_VLForConditionalGeneration" => {
                    return Ok(Arch::Qwen2)
                }
                _ => {}
            }
        }
    }
    match raw.model_type.as_deref() {
        Some("llama") => Ok(Arch::Llama),
        Some("qwen2") | Some("qwen2_vl") | Some("qwen2_5_vl") => Ok(Arch::Qwen2),
        Some("qwen3") => Ok(Arch::Qwen3),
        other => {
            if raw.architectures.is_none() && other.is_none() {
                return Err(SafetensorsError::MissingField {
                    path: path.to_path_buf(),
                    field: "architectures".into(),
                });
            }
            let found = format!(
                "(architectures {:?}, model_type {:?})",
                raw.architectures.as_deref().unwrap_or_default(),
                other.unwrap_or("")
            );
            Err(SafetensorsError::UnknownArch {
                path: path.to_path_buf(),
                found,
            })
        }
    }
}

/// RoPE base and scaling, from the transformers 4 fields (`rope_theta`, `rope_scaling`) or the
/// transformers 5 `rope_parameters` object.
fn parse_rope(raw: &RawConfig, path: &Path) -> Result<(f32, RopeScaling)> {
    let params = match &raw.rope_parameters {
        Some(Value::Null) | None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(SafetensorsError::InvalidField {
                path: path.to_path_buf(),
                field: "rope_parameters".into(),
                reason: "expected an object".into(),
            })
        }
    };
    let theta = raw
        .rope_theta
        .or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10_000.0) as f32;
    let (field, scaling) = match (&raw.rope_scaling, params) {
        (Some(Value::Object(m)), _) => ("rope_scaling", Some(m)),
        (Some(Value::Null) | None, Some(p)) => ("rope_parameters", Some(p)),
        (Some(Value::Null) | None, None) => ("rope_scaling", None),
        (Some(_), _) => {
            return Err(SafetensorsError::InvalidField {
                path: path.to_path_buf(),
                field: "rope_scaling".into(),
                reason: "expected an object or null".into(),
            })
        }
    };
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    if let Some(sec) = s.get("mrope_section") {
        let v: Vec<usize> = sec
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        return match v.as_slice() {
            &[t, h, w] => Ok((
                theta,
                RopeScaling::MRope {
                    sections: [t, h, w],
                },
            )),
            _ => Err(SafetensorsError::InvalidField {
                path: path.to_path_buf(),
                field: format!("{field}.mrope_section"),
                reason: "expected three integers".into(),
            }),
        };
    }
    // Older configs spell the key `type`.
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| SafetensorsError::MissingField {
                path: path.to_path_buf(),
                field: format!("{field}.{key}"),
            })
    };
    match kind {
        "default" => Ok((theta, RopeScaling::None)),
        "llama3" => Ok((
            theta,
            RopeScaling::Llama3 {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            },
        )),
        other => Err(SafetensorsError::Unsupported {
            path: path.to_path_buf(),
            what: format!("{field}.rope_type `{other}` (only `default` and `llama3`)"),
        }),
    }
}

/// Memory-mapped safetensors files of one model and which file holds each tensor.
pub(crate) struct TensorStore {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    location: HashMap<String, usize>,
}

impl TensorStore {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let paths = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_paths(&index, dir)?
        } else {
            return Err(SafetensorsError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            if let Err(source) = std::fs::metadata(&path) {
                return Err(SafetensorsError::Io { path, source });
            }
            // SAFETY: the mapping is only read while `load_dir` copies every tensor into owned
            // f32 buffers and is dropped before it returns; a concurrent writer to the model
            // file is outside what a loader can defend against (as for every mmap loader).
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|source| {
                SafetensorsError::Format {
                    path: path.clone(),
                    source,
                }
            })?;
            for (name, _) in st.tensors() {
                location.insert(name, i);
            }
            files.push((path, st));
        }
        Ok(Self { files, location })
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }

    /// Tensor `name` as f32, checked against `shape`.
    pub(crate) fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| SafetensorsError::MissingTensor {
                name: name.to_string(),
                files: self.file_list(),
            })?;
        let (path, st) = &self.files[i];
        let view = st.get(name).map_err(|source| SafetensorsError::Format {
            path: path.clone(),
            source,
        })?;
        if view.shape() != shape {
            return Err(SafetensorsError::Shape {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        to_f32(&view).ok_or_else(|| SafetensorsError::Dtype {
            path: path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", view.dtype()),
        })
    }

    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(Matrix {
            rows,
            cols,
            data: self.read(name, &[rows, cols])?,
        })
    }
}

/// The shard files named by `model.safetensors.index.json`, in first-seen order.
fn shard_paths(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: Option<BTreeMap<String, String>>,
    }
    let bad = |reason: String| SafetensorsError::Index {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|source| SafetensorsError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = parsed
        .weight_map
        .ok_or_else(|| bad("missing field `weight_map`".into()))?;
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    for file in map.values() {
        // A shard must sit in the model directory; reject names that climb out of it.
        let plain = Path::new(file).components().count() == 1 && !file.starts_with('.');
        if !plain {
            return Err(bad(format!("shard name `{file}` is not a plain file name")));
        }
        if seen.insert(file.clone()) {
            paths.push(dir.join(file));
        }
    }
    if paths.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(paths)
}

/// Little-endian F32/F16/BF16 bytes to f32; `None` for any other dtype.
fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
}

fn read_weights(c: &ModelConfig, st: &TensorStore) -> Result<Weights> {
    let (h, q, kv, ff, hd) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.head_dim,
    );
    let embed = st.matrix("model.embed_tokens.weight", c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>> {
            if c.attention_bias {
                st.read(&format!("{p}.self_attn.{name}.bias"), &[len])
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        let head_norm = |name: &str| -> Result<Option<Vec<f32>>> {
            if c.qk_norm {
                st.read(&format!("{p}.self_attn.{name}.weight"), &[hd])
                    .map(Some)
            } else {
                Ok(None)
            }
        };
        layers.push(LayerWeights {
            attn_norm: st.read(&format!("{p}.input_layernorm.weight"), &[h])?,
            wq: st.matrix(&format!("{p}.self_attn.q_proj.weight"), q, h)?,
            wk: st.matrix(&format!("{p}.self_attn.k_proj.weight"), kv, h)?,
            wv: st.matrix(&format!("{p}.self_attn.v_proj.weight"), kv, h)?,
            wo: st.matrix(&format!("{p}.self_attn.o_proj.weight"), h, q)?,
            bq: bias("q_proj", q)?,
            bk: bias("k_proj", kv)?,
            bv: bias("v_proj", kv)?,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            ffn_norm: st.read(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            w_gate: st.matrix(&format!("{p}.mlp.gate_proj.weight"), ff, h)?,
            w_up: st.matrix(&format!("{p}.mlp.up_proj.weight"), ff, h)?,
            w_down: st.matrix(&format!("{p}.mlp.down_proj.weight"), h, ff)?,
        });
    }
    let final_norm = st.read("model.norm.weight", &[h])?;
    // A tied checkpoint may still carry a copy of the head; the config decides.
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(st.matrix("lm_head.weight", c.vocab_size, h)?)
    };
    Ok(Weights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    const QWEN3_CONFIG: &str = r#"{
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "hidden_act": "silu", "rope_theta": 1000000.0, "rope_scaling": null,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "tie_word_embeddings": true,
        "attention_bias": false
    }"#;

    fn parse(text: &str) -> Result<ModelConfig> {
        parse_config(text, Path::new("dir/config.json"))
    }

    fn edit(text: &str, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(text).unwrap();
        f(v.as_object_mut().unwrap());
        v.to_string()
    }

    #[test]
    fn qwen3_config_has_explicit_head_dim_and_qk_norm() {
        let c = parse(QWEN3_CONFIG).unwrap();
        assert_eq!(c.arch, Arch::Qwen3);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 8));
        assert_eq!(c.q_dim(), 32, "Qwen3's head_dim need not be hidden/heads");
        assert!(c.qk_norm && c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(c.rope_theta, 1.0e6);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn qwen2_always_has_attention_bias_and_derives_head_dim() {
        let text = edit(QWEN3_CONFIG, |m| {
            m.insert(
                "architectures".into(),
                serde_json::json!(["Qwen2ForCausalLM"]),
            );
            m.remove("head_dim");
            m.remove("attention_bias");
        });
        let c = parse(&text).unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.attention_bias && !c.qk_norm);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn llama3_rope_scaling_in_both_config_generations() {
        let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let expected = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let v4 = edit(QWEN3_CONFIG, |m| {
            m.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            m.insert("rope_scaling".into(), scaling.clone());
            m.insert("rope_theta".into(), serde_json::json!(500000.0));
        });
        let c = parse(&v4).unwrap();
        assert_eq!(
            (c.arch, c.rope_scaling, c.rope_theta),
            (Arch::Llama, expected, 500000.0)
        );

        let v5 = edit(QWEN3_CONFIG, |m| {
            m.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            m.remove("rope_scaling");
            m.remove("rope_theta");
            let mut p = scaling.clone();
            p["rope_theta"] = serde_json::json!(500000.0);
            m.insert("rope_parameters".into(), p);
        });
        let c = parse(&v5).unwrap();
        assert_eq!((c.rope_scaling, c.rope_theta), (expected, 500000.0));

        let plain_v5 = edit(QWEN3_CONFIG, |m| {
            m.remove("rope_theta");
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "default", "rope_theta": 5000.0}),
            );
        });
        let c = parse(&plain_v5).unwrap();
        assert_eq!((c.rope_scaling, c.rope_theta), (RopeScaling::None, 5000.0));
    }

    #[test]
    fn config_errors_name_the_field() {
        let no_layers = edit(QWEN3_CONFIG, |m| {
            m.remove("num_hidden_layers");
        });
        let e = parse(&no_layers).unwrap_err().to_string();
        assert!(
            e.contains("dir/config.json") && e.contains("`num_hidden_layers`"),
            "{e}"
        );

        let yarn = edit(QWEN3_CONFIG, |m| {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            );
        });
        let e = parse(&yarn).unwrap_err().to_string();
        assert!(e.contains("unsupported") && e.contains("yarn"), "{e}");

        let llama3_partial = edit(QWEN3_CONFIG, |m| {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "llama3", "factor": 4.0}),
            );
        });
        let e = parse(&llama3_partial).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");

        let unknown = edit(QWEN3_CONFIG, |m| {
            m.insert(
                "architectures".into(),
                serde_json::json!(["MistralForCausalLM"]),
            );
            m.insert("model_type".into(), serde_json::json!("mistral"));
        });
        let e = parse(&unknown).unwrap_err().to_string();
        assert!(
            e.contains("unknown architecture") && e.contains("MistralForCausalLM"),
            "{e}"
        );

        let bad_gqa = edit(QWEN3_CONFIG, |m| {
            m.insert("num_key_value_heads".into(), serde_json::json!(3));
        });
        let e = parse(&bad_gqa).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");

        let wrong_type = edit(QWEN3_CONFIG, |m| {
            m.insert("hidden_size".into(), serde_json::json!("sixteen"));
        });
        let e = parse(&wrong_type).unwrap_err().to_string();
        assert!(e.contains("hidden_size") || e.contains("line"), "{e}");

        let gelu = edit(QWEN3_CONFIG, |m| {
            m.insert("hidden_act".into(), serde_json::json!("gelu"));
        });
        assert!(parse(&gelu).unwrap_err().to_string().contains("hidden_act"));
    }

    fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Map<String, TensorView<'_>> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        ::safetensors::serialize_to_file(&views, None, path).unwrap();
    }

    #[test]
    fn dtypes_convert_to_f32_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let i32b: Vec<u8> = [1i32, 2, 3, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write_st(
            &path,
            &[
                ("a", Dtype::F32, vec![2, 2], f32b),
                ("b", Dtype::F16, vec![2, 2], f16b),
                ("c", Dtype::BF16, vec![2, 2], bf16b),
                ("d", Dtype::I32, vec![4], i32b),
            ],
        );
        let st = unsafe { MmapedSafetensors::new(&path) }.unwrap();
        let store = TensorStore {
            location: st.tensors().into_iter().map(|(n, _)| (n, 0)).collect(),
            files: vec![(path.clone(), st)],
        };
        assert_eq!(store.read("a", &[2, 2]).unwrap(), vals);
        let f16 = store.read("b", &[2, 2]).unwrap();
        let bf16 = store.read("c", &[2, 2]).unwrap();
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(f16[i], half::f16::from_f32(*v).to_f32());
            assert_eq!(bf16[i], half::bf16::from_f32(*v).to_f32());
        }
        assert_eq!(f16[0..2], [1.5, -2.25]);
        let e = store.read("d", &[4]).unwrap_err().to_string();
        assert!(e.contains("`d`") && e.contains("I32"), "{e}");
        let e = store.read("a", &[4]).unwrap_err().to_string();
        assert!(
            e.contains("`a`") && e.contains("[2, 2]") && e.contains("t.safetensors"),
            "{e}"
        );
        let e = store.read("zz", &[1]).unwrap_err().to_string();
        assert!(e.contains("`zz`") && e.contains("t.safetensors"), "{e}");
    }

    #[test]
    fn sharded_index_routes_tensors_and_rejects_escaping_names() {
        let dir = tempfile::tempdir().unwrap();
        let one = |v: f32| v.to_le_bytes().to_vec();
        write_st(
            &dir.path().join("s1.safetensors"),
            &[("x", Dtype::F32, vec![1], one(1.0))],
        );
        write_st(
            &dir.path().join("s2.safetensors"),
            &[("y", Dtype::F32, vec![1], one(2.0))],
        );
        let index = dir.path().join(INDEX_FILE);
        std::fs::write(
            &index,
            r#"{"metadata": {}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}"#,
        )
        .unwrap();
        let store = TensorStore::open(dir.path()).unwrap();
        assert_eq!(store.files.len(), 2);
        assert_eq!(store.read("x", &[1]).unwrap(), [1.0]);
        assert_eq!(store.read("y", &[1]).unwrap(), [2.0]);
        assert!(store.location.contains_key("y") && !store.location.contains_key("z"));

        std::fs::write(&index, r#"{"weight_map": {"x": "../s1.safetensors"}}"#).unwrap();
        let e = TensorStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("not a plain file name"), "{e}");

        std::fs::write(&index, r#"{"weight_map": {"x": "gone.safetensors"}}"#).unwrap();
        let e = TensorStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("gone.safetensors"), "{e}");
    }
}

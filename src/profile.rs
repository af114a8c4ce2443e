//! The precision profile (`triaxkv.profile/v1`, DESIGN §4): which bit width each
//! (layer, K|V, tag) gets, for which model and quantizer, and how it was made.
//! `allocate` writes it; `eval` and `serve` read it and refuse one made for another model.

use crate::kvcache::quantized::{KvPolicy, PolicyError, PrecisionClass, QuantCacheConfig, KEEP};
use crate::quant::KeyMode;
use crate::tags::{Modality, Recency, RecencyUnit, Role, Tag};
use crate::util::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub const SCHEMA: &str = "triaxkv.profile/v1";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: field `{field}`: {msg}")]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error(
        "{path}: schema is {found:?}, this triaxkv reads {SCHEMA:?} (re-run `triaxkv allocate`)"
    )]
    Schema { path: PathBuf, found: String },
    /// The profile belongs to another model; the message names both.
    #[error("profile {path}: {detail}")]
    ModelMismatch { path: PathBuf, detail: Box<str> },
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
}

/// The model a profile belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    pub name: String,
    pub sha256: String,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl ModelIdentity {
    pub fn of(m: &crate::model::load::LoadedModel) -> Self {
        let shape = m.model.kv_shape();
        ModelIdentity {
            name: m.name.clone(),
            sha256: m.sha256.clone(),
            layers: shape.num_layers,
            kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
        }
    }
}

/// How keys are grouped, as written in a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyModeName {
    PerChannel,
    PerToken,
    PerTokenHadamard,
}

impl From<KeyMode> for KeyModeName {
    fn from(m: KeyMode) -> Self {
        match m {
            KeyMode::PerChannel => KeyModeName::PerChannel,
            KeyMode::PerToken { rotate: false } => KeyModeName::PerToken,
            KeyMode::PerToken { rotate: true } => KeyModeName::PerTokenHadamard,
        }
    }
}

impl From<KeyModeName> for KeyMode {
    fn from(m: KeyModeName) -> Self {
        match m {
            KeyModeName::PerChannel => KeyMode::PerChannel,
            KeyModeName::PerToken => KeyMode::PerToken { rotate: false },
            KeyModeName::PerTokenHadamard => KeyMode::PerToken { rotate: true },
        }
    }
}

/// Quantizer and cache geometry the profile was calibrated and solved for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub key_mode: KeyModeName,
    /// Tokens per key group (per-channel) or head-dimension elements (per-token).
    pub key_group: usize,
    pub value_group: usize,
    /// Tokens per block (also the per-channel key group).
    pub block_tokens: usize,
    /// Attention sinks kept at 16 bits.
    pub sinks: usize,
    /// Residual window of the newest tokens kept at 16 bits.
    pub window: usize,
    pub recency_unit: RecencyUnit,
    /// The sinks, the window and the tokens waiting for a key group are held as FP8 (E4M3,
    /// scale 1), not 16 bits, and the budget charges the sinks and window at 8 bits
    /// (`allocate --hold-fp8`). `eval`, `serve` and `bench serve` apply it without flags: in
    /// the CPU cache `--wait-fp8 --sinks-fp8 --window-fp8`, in the GPU pool those and
    /// `--decode-fp8`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_fp8: bool,
    /// Fraction of each per-channel key group's elements kept exactly (dense-and-sparse
    /// keys, `allocate --key-outliers`; 4 bytes each, charged to the keys' bits). `eval`
    /// and `serve` (CPU) apply it; the GPU pool does not store outliers and refuses it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_outliers: f64,
    /// The key outliers of a group are chosen over all its KV heads together (as many in all
    /// as per head times the heads) instead of a fixed number per head (`allocate
    /// --key-outliers-pooled`, or a table calibrated so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_outliers_pooled: bool,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl CacheSettings {
    pub fn cache_config(&self) -> QuantCacheConfig {
        QuantCacheConfig {
            sinks: self.sinks,
            window: self.window,
            block_tokens: self.block_tokens,
            key_mode: self.key_mode.into(),
            key_group: self.key_group,
            value_group: self.value_group,
            unit: self.recency_unit,
            value_clip: false,
            wait_fp8: self.hold_fp8,
            sinks_fp8: self.hold_fp8,
            window_fp8: self.hold_fp8,
            key_outliers: self.key_outliers,
            key_outliers_pooled: self.key_outliers_pooled && self.key_outliers > 0.0,
        }
    }

    pub fn from_cache_config(c: &QuantCacheConfig) -> Self {
        CacheSettings {
            key_mode: c.key_mode.into(),
            key_group: c.key_group,
            value_group: c.value_group,
            block_tokens: c.block_tokens,
            sinks: c.sinks,
            window: c.window,
            recency_unit: c.unit,
            hold_fp8: c.wait_fp8 && c.sinks_fp8 && c.window_fp8,
            key_outliers: c.key_outliers,
            key_outliers_pooled: c.key_outliers_pooled,
        }
    }
}

/// The memory budget asked for and what the assignment achieves, in average effective
/// bits per K/V element (scales, sinks and window included) over the calibration mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// None for baseline policies that take no budget (`uniform-int4`, ...).
    pub asked_bits: Option<f64>,
    pub achieved_bits: f64,
    /// When the budget was given in bytes: the bytes, context and batch it was stated for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
}

/// K or V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kv {
    K,
    V,
}

impl Kv {
    pub fn as_str(self) -> &'static str {
        match self {
            Kv::K => "k",
            Kv::V => "v",
        }
    }
}

/// One (layer, K|V, tag) and its bit width (2, 4, 8 or 16 = kept at 16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub layer: usize,
    pub kv: Kv,
    pub recency: Recency,
    pub modality: Modality,
    pub role: Role,
    pub bits: u8,
}

impl Assignment {
    pub fn tag(&self) -> Tag {
        Tag {
            recency: self.recency,
            modality: self.modality,
            role: self.role,
        }
    }
}

/// Where the profile came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileProvenance {
    /// The sensitivity table solved over (path as given) and its sha256.
    pub calibration: Option<String>,
    pub calibration_sha256: Option<String>,
    /// e.g. "microlp", "dp", "none" (fixed baseline).
    pub solver: String,
    /// Objective value: the summed weighted distortion of the assignment.
    pub objective: Option<f64>,
    pub solve_s: Option<f64>,
    pub triaxkv_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// `allocate --value-weight`, when not 1: the factor on value items' objective weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_weight: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub schema: String,
    /// Short name, e.g. "triaxial-2.5" or "kivi2".
    pub name: String,
    /// The policy that made it: triaxial, uniform-int4, uniform-int2, kivi2, kivi4,
    /// role-only, recency-only, modality-only, layer-only, tag-only.
    pub policy: String,
    pub model: ModelIdentity,
    pub cache: CacheSettings,
    pub budget: Budget,
    /// Bit widths the solver could choose from.
    pub bit_choices: Vec<u8>,
    /// Bits of a (layer, K|V, tag) not listed in `assignments` (a tag unseen in calibration).
    pub default_k_bits: u8,
    pub default_v_bits: u8,
    pub assignments: Vec<Assignment>,
    pub provenance: ProfileProvenance,
}

fn check_bits(b: u8) -> bool {
    [2, 4, 8, KEEP].contains(&b)
}

impl Profile {
    /// Read and validate; every error names the file and the field.
    pub fn read(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let field = |field: &str, msg: String| ProfileError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            msg,
        };
        // The schema is checked first so an old or foreign file gets the version message.
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| field("(document)", e.to_string()))?;
        match value.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => {
                return Err(ProfileError::Schema {
                    path: path.to_path_buf(),
                    found: other.to_string(),
                })
            }
            None => return Err(field("schema", format!("missing; expected {SCHEMA:?}"))),
        }
        let profile: Profile = serde_path_to_error::deserialize(value).map_err(|e| {
            let f = e.path().to_string();
            field(&f, e.into_inner().to_string())
        })?;
        profile.validate(path)?;
        Ok(profile)
    }

    fn validate(&self, path: &Path) -> Result<(), ProfileError> {
        let field = |field: String, msg: String| ProfileError::Field {
            path: path.to_path_buf(),
            field,
            msg,
        };
        for (name, b) in [
            ("default_k_bits", self.default_k_bits),
            ("default_v_bits", self.default_v_bits),
        ] {
            if !check_bits(b) {
                return Err(field(name.into(), format!("{b} is not one of 2, 4, 8, 16")));
            }
        }
        let hd = self.model.head_dim;
        let c = &self.cache;
        if c.value_group == 0 || hd % c.value_group != 0 {
            return Err(field(
                "cache.value_group".into(),
                format!("{} does not divide head_dim {hd}", c.value_group),
            ));
        }
        if c.block_tokens == 0 {
            return Err(field("cache.block_tokens".into(), "must be > 0".into()));
        }
        let mut seen = HashSet::new();
        for (i, a) in self.assignments.iter().enumerate() {
            if !check_bits(a.bits) {
                return Err(field(
                    format!("assignments[{i}].bits"),
                    format!("{} is not one of 2, 4, 8, 16", a.bits),
                ));
            }
            if a.layer >= self.model.layers {
                return Err(field(
                    format!("assignments[{i}].layer"),
                    format!(
                        "{} is outside the model's {} layers",
                        a.layer, self.model.layers
                    ),
                ));
            }
            if !seen.insert((a.layer, a.kv, a.tag())) {
                return Err(field(
                    format!("assignments[{i}]"),
                    format!(
                        "layer {} {} {} is assigned twice",
                        a.layer,
                        a.kv.as_str(),
                        a.tag()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Write atomically, pretty-printed.
    pub fn write(&self, path: &Path) -> Result<(), ProfileError> {
        write_atomic(path, |w| {
            serde_json::to_writer_pretty(&mut *w, self).map_err(std::io::Error::other)?;
            w.write_all(b"\n")
        })
        .map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Refuse a profile made for another model (`path` names the profile in the error).
    pub fn check_model(&self, path: &Path, got: &ModelIdentity) -> Result<(), ProfileError> {
        let m = &self.model;
        if m.sha256 != got.sha256
            || m.layers != got.layers
            || m.kv_heads != got.kv_heads
            || m.head_dim != got.head_dim
        {
            return Err(ProfileError::ModelMismatch {
                path: path.to_path_buf(),
                detail: format!(
                    "made for model {} (sha256 {}, {} layers, {} kv heads, head dim {}), not for \
                     {} (sha256 {}, {} layers, {} kv heads, head dim {}); re-run calibrate and \
                     allocate for this model",
                    m.name,
                    m.sha256,
                    m.layers,
                    m.kv_heads,
                    m.head_dim,
                    got.name,
                    got.sha256,
                    got.layers,
                    got.kv_heads,
                    got.head_dim
                )
                .into(),
            });
        }
        Ok(())
    }

    /// The per-(layer, tag) precision classes of the CPU cache and the GPU runtime.
    pub fn to_policy(&self) -> Result<KvPolicy, ProfileError> {
        let default = PrecisionClass::new(self.default_k_bits, self.default_v_bits)?;
        let mut policy = KvPolicy::uniform(self.model.layers, default);
        for a in &self.assignments {
            let cur = policy.get(a.layer, a.tag());
            let class = match a.kv {
                Kv::K => PrecisionClass::new(a.bits, cur.v)?,
                Kv::V => PrecisionClass::new(cur.k, a.bits)?,
            };
            policy.set(a.layer, a.tag(), class)?;
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            schema: SCHEMA.into(),
            name: "test".into(),
            policy: "triaxial".into(),
            model: ModelIdentity {
                name: "m".into(),
                sha256: "ab".into(),
                layers: 2,
                kv_heads: 1,
                head_dim: 64,
            },
            cache: CacheSettings::from_cache_config(&QuantCacheConfig::default()),
            budget: Budget {
                asked_bits: Some(2.5),
                achieved_bits: 2.49,
                asked_bytes: None,
                context: None,
                batch: None,
            },
            bit_choices: vec![2, 4],
            default_k_bits: 4,
            default_v_bits: 4,
            assignments: vec![
                Assignment {
                    layer: 1,
                    kv: Kv::K,
                    recency: Recency::Older,
                    modality: Modality::Text,
                    role: Role::Observation,
                    bits: 2,
                },
                Assignment {
                    layer: 1,
                    kv: Kv::V,
                    recency: Recency::Older,
                    modality: Modality::Text,
                    role: Role::Observation,
                    bits: 16,
                },
            ],
            provenance: ProfileProvenance {
                calibration: None,
                calibration_sha256: None,
                solver: "none".into(),
                objective: None,
                solve_s: None,
                triaxkv_version: env!("CARGO_PKG_VERSION").into(),
                created_unix: 0,
                value_weight: None,
            },
        }
    }

    #[test]
    fn round_trip_and_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let p = sample();
        p.write(&path).unwrap();
        let back = Profile::read(&path).unwrap();
        assert_eq!(back, p);
        let policy = back.to_policy().unwrap();
        let tag = p.assignments[0].tag();
        assert_eq!(policy.get(1, tag), PrecisionClass::new(2, 16).unwrap());
        assert_eq!(policy.get(0, tag), PrecisionClass::new(4, 4).unwrap());
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["assignments"][1]["bits"] = serde_json::json!(3);
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Profile::read(&path).unwrap_err().to_string();
        assert!(e.contains("assignments[1].bits"), "{e}");

        v["assignments"][1]["bits"] = serde_json::json!("four");
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Profile::read(&path).unwrap_err().to_string();
        assert!(e.contains("assignments[1].bits"), "{e}");

        v["schema"] = serde_json::json!("triaxkv.profile/v0");
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Profile::read(&path).unwrap_err().to_string();
        assert!(e.contains("triaxkv.profile/v0"), "{e}");
    }

    #[test]
    fn refuses_another_model() {
        let p = sample();
        let mut other = p.model.clone();
        other.sha256 = "cd".into();
        let e = p.check_model(Path::new("p.json"), &other).unwrap_err();
        assert!(e.to_string().contains("re-run calibrate"), "{e}");
        p.check_model(Path::new("p.json"), &p.model).unwrap();
    }
}

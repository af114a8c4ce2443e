//! Calibration: replay trajectories in full precision, measure how much quantizing each tag's
//! keys or values distorts attention per layer and bit width, and write the sensitivity table.

pub mod capture;
pub mod distortion;
pub mod plot;
pub mod run;
pub mod summary;
pub mod table;

pub use distortion::{
    layer_distortion, quantize_layer, LayerDistortion, Protected, QuantizedLayer,
};
pub use run::{calibrate, CalibrateOptions, CalibrateReport};
pub use table::SensitivityTable;

use crate::quant::{KeyMode, QuantError};
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("no trajectories to calibrate on (the trace set is empty)")]
    NoTrajectories,
    #[error("trajectory {id} ({file}): {msg}")]
    Trajectory {
        id: String,
        file: PathBuf,
        msg: String,
    },
    #[error("quantization: {0}")]
    Quant(#[from] QuantError),
    #[error("shape: {0}")]
    Shape(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    #[error("bad option: {0}")]
    Option(String),
}

/// How keys and values are grouped for quantization (bits vary per tag; these do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantizerSettings {
    pub key_mode: KeyMode,
    /// Tokens per key group (per-channel) or head-dimension elements per key group (per-token).
    pub key_group: usize,
    /// Head-dimension elements per value group.
    pub value_group: usize,
    /// Dense-and-sparse keys (`quant::outliers`): the share of each per-channel key group
    /// and KV head kept exactly, in millionths (0: none; a whole number keeps the settings
    /// `Eq` and `Hash`).
    pub key_outliers_ppm: u32,
    /// The outliers of a key group chosen over all its KV heads together (as many in all).
    pub key_outliers_pooled: bool,
}

impl QuantizerSettings {
    /// `key_outliers_ppm` as a fraction.
    pub fn key_outliers(&self) -> f64 {
        f64::from(self.key_outliers_ppm) / 1e6
    }
}

impl Default for QuantizerSettings {
    /// The measured winner of `triaxkv calibrate --compare-quantizers` on SmolLM2
    /// (docs/QUANTIZER_CHOICE.md).
    fn default() -> Self {
        QuantizerSettings {
            key_mode: KeyMode::PerChannel,
            key_group: 64,
            value_group: 64,
            key_outliers_ppm: 0,
            key_outliers_pooled: false,
        }
    }
}

impl fmt::Display for QuantizerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.key_mode {
            KeyMode::PerChannel => "per_channel".to_string(),
            KeyMode::PerToken { rotate: false } => "per_token".to_string(),
            KeyMode::PerToken { rotate: true } => "per_token_hadamard".to_string(),
        };
        write!(
            f,
            "k={k}/g{} v=per_token/g{} scale+zero=fp16",
            self.key_group, self.value_group
        )?;
        if self.key_outliers_ppm > 0 {
            write!(f, " k_outliers={}", self.key_outliers())?;
            if self.key_outliers_pooled {
                write!(f, "/pooled")?;
            }
        }
        Ok(())
    }
}

/// A quantizer description that [`QuantizerSettings`]'s `Display` did not write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "quantizer {text:?}: {msg} (expected e.g. \"k=per_channel/g64 v=per_token/g64 scale+zero=fp16\")"
)]
pub struct ParseQuantizerError {
    pub text: String,
    pub msg: String,
}

impl std::str::FromStr for QuantizerSettings {
    type Err = ParseQuantizerError;

    /// The inverse of `Display` (the `quantizer` column of a sensitivity table).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |msg: String| ParseQuantizerError {
            text: text.to_string(),
            msg,
        };
        let group = |part: &str, g: &str| -> Result<usize, ParseQuantizerError> {
            g.strip_prefix('g')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| err(format!("{part}: group {g:?} is not g<N> with N > 0")))
        };
        let (mut key, mut value, mut params) = (None, None, false);
        let (mut key_outliers_ppm, mut key_outliers_pooled) = (0, false);
        for part in text.split_whitespace() {
            if let Some(k) = part.strip_prefix("k=") {
                let (mode, g) = k
                    .split_once('/')
                    .ok_or_else(|| err(format!("{part}: no /g<N>")))?;
                let mode = match mode {
                    "per_channel" => KeyMode::PerChannel,
                    "per_token" => KeyMode::PerToken { rotate: false },
                    "per_token_hadamard" => KeyMode::PerToken { rotate: true },
                    other => return Err(err(format!("unknown key mode {other:?}"))),
                };
                key = Some((mode, group(part, g)?));
            } else if let Some(v) = part.strip_prefix("v=") {
                let (mode, g) = v
                    .split_once('/')
                    .ok_or_else(|| err(format!("{part}: no /g<N>")))?;
                if mode != "per_token" {
                    return Err(err(format!("unknown value mode {mode:?}")));
                }
                value = Some(group(part, g)?);
            } else if part == "scale+zero=fp16" {
                params = true;
            } else if let Some(o) = part.strip_prefix("k_outliers=") {
                let (frac, pooled) = match o.strip_suffix("/pooled") {
                    Some(f) => (f, true),
                    None => (o, false),
                };
                let ppm = frac
                    .parse::<f64>()
                    .ok()
                    .filter(|x| (0.0..=0.25).contains(x))
                    .map(|x| (x * 1e6).round() as u32)
                    .ok_or_else(|| err(format!("{part}: not a fraction between 0 and 0.25")))?;
                (key_outliers_ppm, key_outliers_pooled) = (ppm, pooled);
            } else {
                return Err(err(format!("unknown part {part:?}")));
            }
        }
        match (key, value, params) {
            (Some((key_mode, key_group)), Some(value_group), true) => Ok(QuantizerSettings {
                key_mode,
                key_group,
                value_group,
                key_outliers_ppm,
                key_outliers_pooled,
            }),
            (None, _, _) => Err(err("no k=...".into())),
            (_, None, _) => Err(err("no v=...".into())),
            _ => Err(err("no scale+zero=fp16".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizer_settings_parse_what_display_writes() {
        for key_mode in [
            KeyMode::PerChannel,
            KeyMode::PerToken { rotate: false },
            KeyMode::PerToken { rotate: true },
        ] {
            for (key_outliers_ppm, key_outliers_pooled) in [(0, false), (5000, false), (20, true)] {
                let q = QuantizerSettings {
                    key_mode,
                    key_group: 32,
                    value_group: 128,
                    key_outliers_ppm,
                    key_outliers_pooled,
                };
                assert_eq!(q.to_string().parse::<QuantizerSettings>(), Ok(q));
            }
        }
        // Tables written before outliers existed read as none.
        let old: QuantizerSettings = "k=per_channel/g64 v=per_token/g64 scale+zero=fp16"
            .parse()
            .unwrap();
        assert_eq!(old, QuantizerSettings::default());
        assert_eq!(
            QuantizerSettings {
                key_outliers_ppm: 5000,
                key_outliers_pooled: true,
                ..QuantizerSettings::default()
            }
            .to_string(),
            "k=per_channel/g64 v=per_token/g64 scale+zero=fp16 k_outliers=0.005/pooled"
        );
        for bad in [
            "",
            "k=per_channel/g64 v=per_token/g64",
            "k=per_row/g64 v=per_token/g64 scale+zero=fp16",
            "k=per_channel/g0 v=per_token/g64 scale+zero=fp16",
            "k=per_channel/64 v=per_token/g64 scale+zero=fp16",
            "k=per_channel/g64 v=per_token/g64 scale+zero=fp16 k_outliers=0.5",
            "k=per_channel/g64 v=per_token/g64 scale+zero=fp16 k_outliers=x/pooled",
        ] {
            let e = bad.parse::<QuantizerSettings>().unwrap_err();
            assert!(e.to_string().contains("expected e.g."), "{e}");
        }
    }
}

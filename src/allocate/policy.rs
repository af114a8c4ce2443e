//! The policies `allocate` can produce: the tri-axial integer program, its single-axis
//! ablations (restrictions of it), and fixed baselines (uniform INT4/INT2, KIVI-2/4).

use super::problem::ItemKey;
use crate::profile::Kv;
use crate::tags::{Modality, Recency, Role};
use std::fmt;

/// KIVI keeps the most recent tokens in full precision and no attention sinks: its
/// reference implementation (github.com/jy-yuan/KIVI, `utils/process_args.py`) defaults to
/// `buffer_length = 128` full-precision tokens (the paper, arXiv 2402.02750, calls it the
/// residual length R). Its group size (32 in the paper's examples) is not taken over: the
/// profile keeps the calibration's groups so that all policies share one quantizer.
pub const KIVI_RESIDUAL: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// One bit width per (layer, K|V, tag): the integer program of DESIGN §7.
    Triaxial,
    /// The program with one bit width per (layer, K|V, role): tags differing only in
    /// recency or modality are forced together.
    RoleOnly,
    /// One bit width per (layer, K|V, recency bucket).
    RecencyOnly,
    /// One bit width per (layer, K|V, modality).
    ModalityOnly,
    /// One bit width per (layer, K|V): no tag axis at all.
    LayerOnly,
    /// One bit width per tag, shared by every layer and K and V: no layer axis. What the GPU
    /// block pool serves exactly (a block holds a token's K and V in every layer).
    TagOnly,
    /// One bit width per (tag, K|V), shared by every layer: tag-only with keys and values
    /// apart (the GPU pool would need blocks whose K and V differ in class).
    TagKv,
    /// Every token at 4 (2) bits; no sinks, no window.
    UniformInt4,
    UniformInt2,
    /// Every token at 4 (2) bits except a 16-bit window of the newest `KIVI_RESIDUAL`.
    Kivi4,
    Kivi2,
}

impl Policy {
    pub const ALL: [Policy; 11] = [
        Policy::Triaxial,
        Policy::RoleOnly,
        Policy::RecencyOnly,
        Policy::ModalityOnly,
        Policy::LayerOnly,
        Policy::TagOnly,
        Policy::TagKv,
        Policy::UniformInt4,
        Policy::UniformInt2,
        Policy::Kivi4,
        Policy::Kivi2,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Triaxial => "triaxial",
            Policy::RoleOnly => "role-only",
            Policy::RecencyOnly => "recency-only",
            Policy::ModalityOnly => "modality-only",
            Policy::LayerOnly => "layer-only",
            Policy::TagOnly => "tag-only",
            Policy::TagKv => "tag-kv",
            Policy::UniformInt4 => "uniform-int4",
            Policy::UniformInt2 => "uniform-int2",
            Policy::Kivi4 => "kivi4",
            Policy::Kivi2 => "kivi2",
        }
    }

    /// The bits of a fixed baseline; `None` for the policies solved under a budget.
    pub fn fixed_bits(self) -> Option<u8> {
        match self {
            Policy::UniformInt4 | Policy::Kivi4 => Some(4),
            Policy::UniformInt2 | Policy::Kivi2 => Some(2),
            _ => None,
        }
    }

    /// Sinks and window of the cache this policy runs with, given the calibration's.
    pub fn protected(self, sinks: usize, window: usize) -> (usize, usize) {
        match self {
            Policy::UniformInt4 | Policy::UniformInt2 => (0, 0),
            Policy::Kivi4 | Policy::Kivi2 => (0, KIVI_RESIDUAL),
            _ => (sinks, window),
        }
    }

    /// Items with equal keys must take the same bit width. The triaxial key is the whole
    /// item, so every ablation is a restriction of it and can never reach a lower objective.
    pub fn group(self, k: &ItemKey) -> GroupKey {
        let t = k.tag;
        let (role, modality, recency) = match self {
            Policy::RoleOnly => (Some(t.role), None, None),
            Policy::RecencyOnly => (None, None, Some(t.recency)),
            Policy::ModalityOnly => (None, Some(t.modality), None),
            Policy::LayerOnly => (None, None, None),
            _ => (Some(t.role), Some(t.modality), Some(t.recency)),
        };
        let (layer, kv) = match self {
            Policy::TagOnly => (0, Kv::K),
            Policy::TagKv => (0, k.kv),
            _ => (k.layer, k.kv),
        };
        GroupKey {
            layer,
            kv,
            role,
            modality,
            recency,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The band of `layer` when `layers` layers are split into `bands` contiguous bands of
/// (nearly) equal size: what a pool with per-band classes stores together.
pub fn layer_band(layer: usize, bands: usize, layers: usize) -> usize {
    layer * bands / layers.max(1)
}

/// What items sharing one bit width have in common under a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub layer: usize,
    pub kv: Kv,
    pub role: Option<Role>,
    pub modality: Option<Modality>,
    pub recency: Option<Recency>,
}

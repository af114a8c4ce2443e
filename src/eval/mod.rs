//! Fidelity of profiles against the unquantized KV cache on held-out traces (DESIGN §10):
//! teacher-forced replay, metrics, tool-call match, reports, and the distortion-vs-KL check.

pub mod gpu_forward;
pub mod metrics;
pub mod plot;
pub mod proxy;
pub mod replay;
pub mod report;
pub mod run;
pub mod toolcall;

pub use run::{evaluate, prepare_plans, render_plans, EvalOptions, EvalReport, NamedProfile};

use crate::calibrate::table::TableError;
use crate::profile::ProfileError;
use crate::quant::QuantError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("no trajectories to evaluate on (the trace set is empty)")]
    NoTrajectories,
    #[error("no trajectory has an assistant token to score within the token limit")]
    NothingToScore,
    #[error("trajectory {id} ({file}): {msg}")]
    Trajectory {
        id: String,
        file: PathBuf,
        msg: String,
    },
    /// Boxed: a profile error carries two model identities.
    #[error(transparent)]
    Profile(Box<ProfileError>),
    #[error("profile {path}: {source}")]
    Cache { path: PathBuf, source: QuantError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Table { path: PathBuf, msg: String },
    #[error(transparent)]
    SensitivityTable(#[from] TableError),
    #[error("bad option: {0}")]
    Option(String),
}

impl From<ProfileError> for EvalError {
    fn from(e: ProfileError) -> Self {
        EvalError::Profile(Box::new(e))
    }
}

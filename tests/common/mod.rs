//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// The bundled SmolLM2, or `None` after printing why the test skips (not fetched yet:
/// `scripts/setup.sh`).
pub fn default_model() -> Option<PathBuf> {
    let p = triaxkv::model::load::default_model_path();
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: the default model is not at {} (run scripts/setup.sh)",
            p.display()
        );
        None
    }
}

//! Models: architecture config, f32 weights, loaders (GGUF, safetensors), tokenizers and
//! the CPU reference forward pass.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod safetensors;
pub mod sampling;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use weights::{LayerWeights, Matrix, Weights};

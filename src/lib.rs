//! lora-compose: composing pre-trained LoRA modules.
//!
//! One composed linear layer (DESIGN §2):
//!
//! ```text
//! y_t = W x_t + b + Σ_i C[σ(t), i] · s_i · B_i (A_i x_t)
//! ```
//!
//! - [`compose`]: the layer's math — a plain f64 reference and the fused two-GEMM fast path.
//! - [`alloc`]: the binaries' allocator settings.
//! - [`check`]: the one comparison helper every test uses.
//! - [`peft`]: LoRA adapters in PEFT's on-disk layout, and module libraries.
//! - [`merge`]: weighted composition written back as an adapter or folded into base weights.
//! - [`model`]: a small ViT / BERT encoder whose linear layers carry compositions; forward,
//!   hand-written backward, training pieces, all-MiniLM-L6-v2 weights and sentence embeddings.

pub mod alloc;
pub mod check;
pub mod compose;
pub mod error;
pub mod experiment;
pub mod merge;
pub mod model;
pub mod peft;
// CUDA kernels: the launch interface, the GPU backend and the CPU execution harness.
pub mod gpu;
pub mod harness;
pub mod kernels;
pub mod launch;

pub use error::{Error, Result};

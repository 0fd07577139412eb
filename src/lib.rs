//! dynamos: live updates for a running Linux kernel.
//!
//! The pipeline is the architecture: `patch → build → diff → generate →
//! package → apply`, with `vm` beside it for trying packages in a throwaway
//! machine. Each stage is one module with a typed input and output; the
//! binaries in `src/bin` only parse arguments and call them.

pub mod apply;
pub mod build;
pub mod cache;
pub mod cli;
pub mod deb;
pub mod debian;
pub mod diff;
pub mod error;
pub mod generate;
pub mod identity;
pub mod multi_target;
pub mod package;
pub mod patch;
pub mod pipeline;
pub mod report;
pub mod runpre;
pub mod shadow;
pub mod synchronize;
pub mod target;
pub mod vm;

pub use error::{Error, Refusal};

/// Version of the tool, recorded in every package it builds.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

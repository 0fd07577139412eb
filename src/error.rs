//! Errors shared by every pipeline stage, and the exit code each one maps to.

use std::path::PathBuf;

/// Exit codes of `dynamos-build`, `dynamos diff` and friends.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const REFUSED: i32 = 2;
    pub const NO_CHANGE: i32 = 3;
}

/// A reason the pipeline will not produce a package for a change it understood.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// The function, data symbol, section or header the refusal is about.
    pub symbol: String,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.symbol, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The change is understood but not safe (or not yet supported) to apply live.
    #[error("refused: {}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Refusal>),
    /// The patch compiles to exactly the same code.
    #[error("no binary change: the patch does not change any compiled function")]
    NoChange,
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => exit::REFUSED,
            Error::NoChange => exit::NO_CHANGE,
            _ => exit::ERROR,
        }
    }

    pub fn refused(symbol: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Refused(vec![Refusal {
            symbol: symbol.into(),
            reason: reason.into(),
        }])
    }
}

/// `Ok` when nothing was refused, else one error carrying every refusal.
pub fn refuse_any(refusals: Vec<Refusal>) -> anyhow::Result<()> {
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused(refusals).into())
    }
}

/// Exit code for any error that reached the CLI: typed pipeline errors keep
/// their meaning, everything else is a plain failure.
pub fn exit_code_of(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Error>())
        .map_or(exit::ERROR, Error::exit_code)
}

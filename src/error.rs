//! Typed errors of the backend. At the C boundary each becomes a status code and its message.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// A bad `--kv-backend-opts` entry: names the key, the value and what is accepted.
    #[error("option '{key}': {problem}")]
    Option { key: String, problem: String },
    /// The model or context cannot be served as configured.
    #[error("{0}")]
    Config(String),
    /// A request that breaks the cache's rules (bad sequence id, shift while unsupported, ...).
    #[error("{0}")]
    Request(String),
    /// A saved state that cannot be restored into this cache.
    #[error("state: {0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `n` copies of `x` in a new vector, or, when the memory is not there, an error that names
/// `what` and the size (instead of the abort of a failed infallible allocation).
pub fn filled<T: Clone>(n: usize, x: T, what: &str) -> Result<Vec<T>> {
    let too_big = || {
        let mib = n as f64 * std::mem::size_of::<T>() as f64 / (1024.0 * 1024.0);
        Error::Config(format!("cannot allocate {mib:.1} MiB for {what}"))
    };
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| too_big())?;
    v.resize(n, x);
    Ok(v)
}

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

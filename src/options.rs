//! `--kv-backend-opts`: one `key=value,key=value` string. Every key is listed in [`KEYS`] with
//! its default and what it accepts; the README's options table is the same list.

use crate::error::{Error, Result};

/// How keys are stored in the fast tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCodec {
    /// Exact half-precision keys.
    F16,
}

/// The parsed options of one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub keys: KeyCodec,
    /// Attention mass that the selected tokens must reach; 1 = attend to every token.
    pub tau: f32,
}

impl Default for Options {
    fn default() -> Self {
        Options { keys: KeyCodec::F16, tau: 1.0 }
    }
}

/// (key, default, accepted values, meaning)
pub const KEYS: &[(&str, &str, &str, &str)] = &[
    ("keys", "f16", "f16", "how keys are stored in the fast tier (f16 = exact)"),
    ("tau", "1", "1", "attention mass the selected tokens must cover (1 = every token, exact)"),
];

fn bad(key: &str, problem: impl Into<String>) -> Error {
    Error::Option { key: key.to_string(), problem: problem.into() }
}

impl Options {
    /// Parse an options string. The empty string gives the defaults (the exact mode).
    pub fn parse(s: &str) -> Result<Options> {
        let mut o = Options::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| bad(item, "expected key=value"))?;
            match key {
                "keys" => {
                    o.keys = match value {
                        "f16" => KeyCodec::F16,
                        _ => return Err(bad(key, format!("unknown value '{value}'; accepted: f16"))),
                    }
                }
                "tau" => {
                    let t: f32 = value
                        .parse()
                        .map_err(|_| bad(key, format!("'{value}' is not a number; accepted: 1")))?;
                    if !(t > 0.0 && t <= 1.0) {
                        return Err(bad(key, format!("{value} is outside (0, 1]; accepted: 1")));
                    }
                    if t < 1.0 {
                        return Err(bad(key, format!("{value}: token selection is not available in this build; accepted: 1")));
                    }
                    o.tau = t;
                }
                _ => {
                    let known: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
                    return Err(bad(key, format!("unknown option (value '{value}'); known options: {}", known.join(", "))));
                }
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_exact_defaults() {
        assert_eq!(Options::parse("").unwrap(), Options::default());
        assert_eq!(Options::parse(" , ").unwrap(), Options::default());
        assert_eq!(Options::parse("keys=f16,tau=1").unwrap(), Options::default());
        assert_eq!(Options::parse(" keys = f16 , tau = 1.0 ").unwrap(), Options::default());
    }

    #[test]
    fn errors_name_key_value_and_accepted() {
        let e = Options::parse("foo=3").unwrap_err().to_string();
        assert!(e.contains("'foo'") && e.contains("'3'") && e.contains("keys, tau"), "{e}");
        let e = Options::parse("keys=pq9").unwrap_err().to_string();
        assert!(e.contains("'keys'") && e.contains("pq9") && e.contains("accepted: f16"), "{e}");
        let e = Options::parse("tau=abc").unwrap_err().to_string();
        assert!(e.contains("'tau'") && e.contains("abc") && e.contains("accepted"), "{e}");
        let e = Options::parse("tau=1.5").unwrap_err().to_string();
        assert!(e.contains("1.5") && e.contains("(0, 1]"), "{e}");
        let e = Options::parse("tau").unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        assert!(Options::parse("tau=nan").is_err());
        assert!(Options::parse("tau=0.9").is_err());
    }

    #[test]
    fn every_documented_key_parses_with_its_default() {
        for (key, default, _, _) in KEYS {
            Options::parse(&format!("{key}={default}")).unwrap();
        }
    }
}

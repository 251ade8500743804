//! [`ConfigError`]: every way loading a local config can fail.

use std::path::{Path, PathBuf};

/// Why a local config could not be loaded. Display reads `file:line:column: field: what`.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Bad YAML or a bad value at a known position.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Field path such as `workloads[0].protocol`, when the error is about a field.
        field: Option<String>,
        /// `field: what` (or just `what` for syntax errors), without the position.
        message: String,
    },
    /// A problem with no position, e.g. several YAML documents in one file.
    #[error("{}: {message}", path.display())]
    Document {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::Document { path, .. } => path,
        }
    }

    /// 1-based (line, column), when known.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }

    /// The field path (`workloads[0].protocol`), when the error is about a field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// Converts a `serde_yaml_ng` error, moving its ` at line L column C` into the prefix.
    pub(crate) fn from_yaml(path: &Path, err: &serde_yaml_ng::Error) -> Self {
        let full = err.to_string();
        let path = path.to_path_buf();
        match err.location() {
            Some(loc) => {
                let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                let message = full.replacen(&suffix, "", 1);
                let field = field_prefix(&message).map(str::to_owned);
                ConfigError::Invalid {
                    path,
                    line: loc.line(),
                    column: loc.column(),
                    field,
                    message,
                }
            }
            None => ConfigError::Document {
                path,
                message: full,
            },
        }
    }
}

/// serde_yaml_ng writes `path: message` when the error has a field path; a path has no
/// whitespace (messages like `invalid type: ...` do), so that tells the two apart.
fn field_prefix(message: &str) -> Option<&str> {
    let (prefix, _) = message.split_once(": ")?;
    let looks_like_path = !prefix.is_empty()
        && !prefix.contains(char::is_whitespace)
        && !prefix.contains('`')
        && !prefix.contains('"');
    looks_like_path.then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_prefix_heuristic() {
        assert_eq!(
            field_prefix("workloads[0].protocol: unknown variant `X`"),
            Some("workloads[0].protocol")
        );
        assert_eq!(field_prefix("invalid type: sequence, expected x"), None);
        assert_eq!(field_prefix("missing field `namespace`"), None);
        assert_eq!(
            field_prefix("workloads[0].services.default/x.svc: invalid type: string"),
            Some("workloads[0].services.default/x.svc")
        );
    }

    #[test]
    fn display_forms() {
        let e = ConfigError::Invalid {
            path: "/etc/ringtun/config.yaml".into(),
            line: 8,
            column: 13,
            field: Some("workloads[0].protocol".into()),
            message: "workloads[0].protocol: unknown variant `HBON`".into(),
        };
        assert_eq!(
            e.to_string(),
            "/etc/ringtun/config.yaml:8:13: workloads[0].protocol: unknown variant `HBON`"
        );
        assert_eq!(e.location(), Some((8, 13)));
        assert_eq!(e.field(), Some("workloads[0].protocol"));
        let r = ConfigError::Read {
            path: "/nope.yaml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(r
            .to_string()
            .starts_with("/nope.yaml: cannot read config file: "));
        assert_eq!(r.path(), Path::new("/nope.yaml"));
    }
}

//! Errors: the CNI wire error ([`CniError`], what a plugin prints and a runtime parses) and the
//! library's own error type ([`Error`]) for the runtime side.
//!
//! A plugin returns a [`CniError`] from every operation; [`crate::plugin::run`] prints it as the
//! spec's error JSON (`{"cniVersion", "code", "msg", "details"}`) on stdout and exits 1.

use serde::{Deserialize, Serialize};

/// Error code for plugin failures that are not one of the spec's (netlink, firewall, ...).
pub const INTERNAL_ERROR: u32 = 999;

/// The well-known error codes of the CNI spec (1.1, "Error" section). Codes 1–99 are reserved by
/// the spec; plugins use 100 and above for their own errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: incompatible CNI version.
    IncompatibleVersion,
    /// 2: unsupported field in the network configuration.
    UnsupportedField,
    /// 3: container unknown or does not exist.
    UnknownContainer,
    /// 4: invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    InvalidEnvironment,
    /// 5: I/O failure.
    Io,
    /// 6: failed to decode content.
    Decode,
    /// 7: invalid network config.
    InvalidNetworkConfig,
    /// 11: try again later (transient, e.g. an exhausted pool or a busy resource).
    TryAgainLater,
    /// 50: the plugin is not available (STATUS).
    NotAvailable,
    /// 100 and above: plugin specific. Any other number is kept as is.
    Other(u32),
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a number.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::UnknownContainer,
            4 => ErrorCode::InvalidEnvironment,
            5 => ErrorCode::Io,
            6 => ErrorCode::Decode,
            7 => ErrorCode::InvalidNetworkConfig,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::NotAvailable,
            n => ErrorCode::Other(n),
        }
    }
}

/// The error a plugin reports, serialised as the spec's error JSON:
/// `{"cniVersion": "1.1.0", "code": 7, "msg": "...", "details": "..."}`.
///
/// `cniVersion` is filled in by [`crate::plugin::run`] (the version the caller asked for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's `cniVersion` of the error; empty when not yet known.
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub cni_version: String,
    /// The numeric code (see [`ErrorCode`]).
    pub code: u32,
    /// A short message.
    #[serde(default)]
    pub msg: String,
    /// Longer details; may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            cni_version: String::new(),
            code: code.code(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The code as an [`ErrorCode`].
    pub fn kind(&self) -> ErrorCode {
        ErrorCode::from_code(self.code)
    }

    /// Code 1.
    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::IncompatibleVersion, msg)
    }
    /// Code 2.
    pub fn unsupported_field(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnsupportedField, msg)
    }
    /// Code 3.
    pub fn unknown_container(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnknownContainer, msg)
    }
    /// Code 4.
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidEnvironment, msg)
    }
    /// Code 5.
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Io, msg)
    }
    /// Code 6.
    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Decode, msg)
    }
    /// Code 7.
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidNetworkConfig, msg)
    }
    /// Code 11.
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::TryAgainLater, msg)
    }
    /// Code 50.
    pub fn not_available(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotAvailable, msg)
    }
    /// A plugin-specific error (`code` should be 100 or above).
    pub fn plugin(code: u32, msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Other(code), msg)
    }

    /// The error JSON in `cni_version` (the version field is replaced).
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut e = self.clone();
        e.cni_version = cni_version.to_string();
        // A struct of strings and a number always serialises.
        serde_json::to_string(&e).unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code))
    }
}

impl From<std::io::Error> for CniError {
    fn from(e: std::io::Error) -> Self {
        CniError::io(e.to_string())
    }
}

impl From<serde_json::Error> for CniError {
    fn from(e: serde_json::Error) -> Self {
        CniError::decode(e.to_string())
    }
}

/// The library's error on the runtime side (loading configs, executing plugins, the cache).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A network configuration (file or list) is invalid.
    #[error("invalid network configuration{}: {msg}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    InvalidConfig {
        /// The file, when it came from one.
        path: Option<std::path::PathBuf>,
        /// What is wrong.
        msg: String,
    },
    /// No plugin binary of that type on the plugin path.
    #[error("failed to find plugin {plugin:?} in path {path:?}")]
    PluginNotFound {
        /// The plugin type.
        plugin: String,
        /// The directories searched.
        path: Vec<std::path::PathBuf>,
    },
    /// The plugin ran and reported an error.
    #[error("plugin {plugin} failed ({command}): {error}")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// The CNI command.
        command: String,
        /// The error it printed (or one made from its stderr).
        error: Box<CniError>,
    },
    /// The plugin's output could not be understood.
    #[error("plugin {plugin} ({command}) gave invalid output: {msg}")]
    InvalidOutput {
        /// The plugin type.
        plugin: String,
        /// The CNI command.
        command: String,
        /// Why.
        msg: String,
    },
    /// No version is shared by the runtime, the configuration and the plugins.
    #[error("incompatible CNI versions: {0}")]
    IncompatibleVersion(String),
    /// The operation is not allowed for this network (e.g. CHECK with `disableCheck`).
    #[error("{0}")]
    NotAllowed(String),
    /// No cached result where one is needed (CHECK).
    #[error("no cached result for {0}")]
    NoCachedResult(String),
    /// A blocking task could not complete (async entry points).
    #[error("background task failed: {0}")]
    Task(String),
    /// Several errors (GC: one per stale attachment or plugin).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Multiple(Vec<Error>),
}

impl Error {
    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The CNI error when this came from a plugin.
    pub fn cni_error(&self) -> Option<&CniError> {
        match self {
            Error::Plugin { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_round_trip() {
        let e = CniError::invalid_config("bad subnet").with_details("10.0.0.0/33");
        let json = e.to_json("1.1.0");
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid json");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad subnet");
        assert_eq!(v["details"], "10.0.0.0/33");
        let back: CniError = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.kind(), ErrorCode::InvalidNetworkConfig);
        assert_eq!(back.to_string(), "bad subnet: 10.0.0.0/33");
    }

    #[test]
    fn codes() {
        for (c, n) in [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::Io, 5),
            (ErrorCode::Decode, 6),
            (ErrorCode::InvalidNetworkConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::NotAvailable, 50),
            (ErrorCode::Other(123), 123),
        ] {
            assert_eq!(c.code(), n);
            assert_eq!(ErrorCode::from_code(n), c);
        }
        let no_details = CniError::try_again_later("x").to_json("1.0.0");
        assert!(!no_details.contains("details"), "{no_details}");
    }
}

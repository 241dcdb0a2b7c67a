//! CNI spec versions: parsing, comparison, the versions this library speaks, and the `VERSION`
//! command's reply.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::CniError;

/// A CNI spec version `major.minor.patch` (ordered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CniVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl CniVersion {
    /// 0.1.0 (legacy result format: refused by this library).
    pub const V0_1_0: CniVersion = CniVersion::new(0, 1, 0);
    /// 0.2.0 (legacy result format: refused by this library).
    pub const V0_2_0: CniVersion = CniVersion::new(0, 2, 0);
    /// 0.3.0.
    pub const V0_3_0: CniVersion = CniVersion::new(0, 3, 0);
    /// 0.3.1.
    pub const V0_3_1: CniVersion = CniVersion::new(0, 3, 1);
    /// 0.4.0 (adds CHECK).
    pub const V0_4_0: CniVersion = CniVersion::new(0, 4, 0);
    /// 1.0.0 (drops the `version` field of IPs).
    pub const V1_0_0: CniVersion = CniVersion::new(1, 0, 0);
    /// 1.1.0 (adds GC, STATUS, `cniVersions`, route and interface attributes).
    pub const V1_1_0: CniVersion = CniVersion::new(1, 1, 0);

    /// The newest version this library speaks.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// A version.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        CniVersion {
            major,
            minor,
            patch,
        }
    }

    /// Whether this library can produce and parse results of this version.
    pub fn is_supported(self) -> bool {
        SUPPORTED_VERSIONS.contains(&self)
    }

    /// Whether CHECK exists in this version (0.4.0 and later).
    pub fn supports_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// Whether GC and STATUS exist in this version (1.1.0 and later).
    pub fn supports_gc_status(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Parses, turning a malformed version into the spec's code 1 error.
    pub fn parse_cni(s: &str) -> Result<CniVersion, CniError> {
        s.parse()
            .map_err(|e: ParseVersionError| CniError::incompatible_version(e.to_string()))
    }
}

/// The versions this library supports, oldest first.
pub const SUPPORTED_VERSIONS: &[CniVersion] = &[
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

impl Default for CniVersion {
    fn default() -> Self {
        CniVersion::LATEST
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A string that is not a `major.minor.patch` version.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid CNI version {0:?}")]
pub struct ParseVersionError(pub String);

impl FromStr for CniVersion {
    type Err = ParseVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.to_string());
        let mut parts = s.trim().split('.');
        let mut next = |required: bool| -> Result<u32, ParseVersionError> {
            match parts.next() {
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                    p.parse().map_err(|_| err())
                }
                None if !required => Ok(0),
                _ => Err(err()),
            }
        };
        let major = next(true)?;
        let minor = next(false)?;
        let patch = next(false)?;
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(CniVersion {
            major,
            minor,
            patch,
        })
    }
}

impl Serialize for CniVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CniVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The reply to `VERSION`: `{"cniVersion": "...", "supportedVersions": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version of this reply (the one asked for, or the latest).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The versions the plugin supports.
    #[serde(rename = "supportedVersions", default)]
    pub supported_versions: Vec<String>,
}

impl VersionInfo {
    /// The supported versions that parse, ignoring the others.
    pub fn versions(&self) -> Vec<CniVersion> {
        self.supported_versions
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect()
    }

    /// Whether `v` is in the list.
    pub fn supports(&self, v: CniVersion) -> bool {
        self.versions().contains(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!(
            "1.1.0".parse::<CniVersion>().expect("v"),
            CniVersion::V1_1_0
        );
        assert_eq!("0.3".parse::<CniVersion>().expect("v"), CniVersion::V0_3_0);
        assert!("1.x.0".parse::<CniVersion>().is_err());
        assert!("".parse::<CniVersion>().is_err());
        assert!("1.0.0.0".parse::<CniVersion>().is_err());
        assert!(CniVersion::V0_3_1 < CniVersion::V0_4_0);
        assert!(CniVersion::V1_0_0 < CniVersion::V1_1_0);
        assert!(!CniVersion::V0_2_0.is_supported());
        assert!(CniVersion::V0_4_0.supports_check() && !CniVersion::V0_3_1.supports_check());
        assert_eq!(CniVersion::V0_3_1.to_string(), "0.3.1");
        let e = CniVersion::parse_cni("abc").expect_err("bad");
        assert_eq!(e.code, 1);
    }
}

//! Validated names and digests: once parsed, a value of these types is known to be well formed.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Checks the rule omicron applies to service names, which we also apply to package and target
/// names: ASCII, starting with a letter, then letters, digits, `-` or `_`.
///
/// Package names become file names under `out/` and service names become directory names on the
/// servers, so anything that could be a path separator, `..` or a shell metacharacter is refused.
fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(format!("{kind} must not be empty")),
        Some(c) if !c.is_ascii_alphabetic() => {
            return Err(format!("{kind} `{name}` must start with an ASCII letter"))
        }
        Some(_) => {}
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(format!(
            "{kind} `{name}` contains {bad:?}; only ASCII letters, digits, `-` and `_` are allowed"
        ));
    }
    Ok(())
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $ty(String);

        impl $ty {
            pub fn new(name: impl Into<String>) -> Result<Self, String> {
                let name = name.into();
                check_name($kind, &name)?;
                Ok(Self(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                Self::new(name).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_name!(
    /// The key of a `[package.<name>]` table; also the stem of its output file.
    PackageName,
    "package name"
);
validated_name!(
    /// The `service_name` of a package: the directory under `/opt/flotilla/` on a server.
    ServiceName,
    "service name"
);
validated_name!(
    /// The name of a stored build target (`cargo xtask target create NAME`).
    TargetName,
    "target name"
);

/// A SHA-256 digest written as 64 hexadecimal digits, stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Sha256Digest(String);

impl Sha256Digest {
    pub fn new(text: &str) -> Result<Self, String> {
        if text.len() != 64 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "malformed sha256 `{text}`: expected 64 hexadecimal digits, found {} characters",
                text.len()
            ));
        }
        Ok(Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_omicron_rules() {
        assert!(ServiceName::new("sled-agent").is_ok());
        assert!(ServiceName::new("clickhouse_svc").is_ok());
        assert_eq!(
            ServiceName::new("1nexus").unwrap_err(),
            "service name `1nexus` must start with an ASCII letter"
        );
        assert_eq!(
            PackageName::new("a/b").unwrap_err(),
            "package name `a/b` contains '/'; only ASCII letters, digits, `-` and `_` are allowed"
        );
        assert_eq!(ServiceName::new("").unwrap_err(), "service name must not be empty");
        assert!(ServiceName::new("nexüs").is_err());
    }

    #[test]
    fn sha256_is_checked_and_normalised() {
        let upper = "AB".repeat(32);
        assert_eq!(Sha256Digest::new(&upper).unwrap().as_str(), "ab".repeat(32));
        assert_eq!(
            Sha256Digest::new("abc").unwrap_err(),
            "malformed sha256 `abc`: expected 64 hexadecimal digits, found 3 characters"
        );
        assert!(Sha256Digest::new(&"g".repeat(64)).is_err());
    }
}

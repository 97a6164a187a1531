//! Names from requests, checked once: [`SecretName`] for secrets,
//! [`ObjectName`] for CAs, clusters and keys, and [`lookup`], the one
//! "does not exist" answer for a named vault entry.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};

/// Longest secret name, in bytes.
pub const MAX_SECRET_NAME_BYTES: usize = 256;

/// A secret name: 1 to 256 bytes of `A-Z a-z 0-9 . _ - + @ = : ,` in
/// segments separated by single `/`, none of them `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretName(String);

impl SecretName {
    /// Checks `name` (the request field `name`).
    pub fn parse(name: String) -> Result<Self> {
        let bad = |reason: String| Error::InvalidArgument {
            field: "name",
            reason,
        };
        if name.is_empty() {
            return Err(bad("must not be empty".into()));
        }
        if name.len() > MAX_SECRET_NAME_BYTES {
            return Err(bad(format!(
                "is {} bytes; the limit is {MAX_SECRET_NAME_BYTES}",
                name.len()
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-+@=:,/".contains(*c)))
        {
            return Err(bad(format!(
                "contains {c:?}; allowed are A-Z a-z 0-9 . _ - + @ = : , and / between segments"
            )));
        }
        for segment in name.split('/') {
            match segment {
                "" => {
                    return Err(bad(
                        "has an empty segment (leading, trailing or double '/')".into(),
                    ));
                }
                "." | ".." => return Err(bad("must not contain '.' or '..' segments".into())),
                _ => {}
            }
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a CA, cluster or key: 1-64 characters of `A-Z a-z 0-9 . _ -`,
/// not `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectName(String);

impl ObjectName {
    /// Checks `name`, the request field `field`.
    pub fn parse(field: &'static str, name: String) -> Result<Self> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && name != "."
            && name != "..";
        if ok {
            Ok(Self(name))
        } else {
            Err(Error::InvalidArgument {
                field,
                reason: format!("{name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The entry `name` of `map`, or NOT_FOUND naming the `kind` of thing.
pub fn lookup<'a, V>(
    map: &'a BTreeMap<String, V>,
    kind: &'static str,
    name: &str,
) -> Result<&'a V> {
    map.get(name).ok_or_else(|| Error::NotFound {
        kind,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        for good in ["db/prod/password", "a", "k8s:prod/admin@x", "x.y_z-1"] {
            assert!(SecretName::parse(good.into()).is_ok(), "{good}");
        }
        let long = "a".repeat(257);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "..",
            ".",
            "a b",
            "a\0b",
            "ü",
            long.as_str(),
        ] {
            assert!(SecretName::parse(bad.into()).is_err(), "{bad:?}");
        }
        assert!(SecretName::parse("a".repeat(256)).is_ok());
    }

    #[test]
    fn object_names() {
        for good in ["kube-prod", "a", "etcd_1.x"] {
            assert!(ObjectName::parse("name", good.into()).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"a".repeat(65)] {
            let e = ObjectName::parse("ca", bad.into()).unwrap_err();
            assert!(e.to_string().starts_with("ca: "), "{e}");
        }
    }
}

//! Choosing a token: by label, by serial, or by an RFC 7512 `pkcs11:` URI.

use std::fmt;

use crate::{Error, TokenDescription};

/// Which token to use. Tokens are never chosen by slot index: slot numbers
/// change when tokens are added or removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// `token=` / `--token-label`: the token's label.
    pub label: Option<String>,
    /// `serial=` / `--token-serial`.
    pub serial: Option<String>,
    /// `manufacturer=` (URI only).
    pub manufacturer: Option<String>,
    /// `model=` (URI only).
    pub model: Option<String>,
}

impl Selector {
    /// Matches any token (useful when the module shows exactly one).
    pub fn any() -> Self {
        Self::default()
    }

    /// A token with this label.
    pub fn label(label: impl Into<String>) -> Self {
        Self {
            label: Some(label.into()),
            ..Self::default()
        }
    }

    /// A token with this serial number.
    pub fn serial(serial: impl Into<String>) -> Self {
        Self {
            serial: Some(serial.into()),
            ..Self::default()
        }
    }

    /// Parses a `pkcs11:` URI (RFC 7512). Only the token attributes are
    /// understood. `module-path` and `module-name` are refused: a URI must
    /// never make Keyholder load a library. `pin-value` and `pin-source` are
    /// refused too: the PIN is asked for separately.
    pub fn from_uri(uri: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::InvalidSelector(why);
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad(format!("{uri:?} does not start with \"pkcs11:\"")))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut sel = Self::default();
        for part in path.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("URI attribute {part:?} has no '='")))?;
            let bytes = percent_decode_bytes(value)
                .ok_or_else(|| bad(format!("URI attribute {key:?} has a bad %-escape")))?;
            // `id` is arbitrary bytes; every other attribute is text.
            if key == "id" {
                continue;
            }
            let value = String::from_utf8(bytes)
                .map_err(|_| bad(format!("URI attribute {key:?} is not UTF-8")))?;
            match key {
                "token" => sel.label = Some(value),
                "serial" => sel.serial = Some(value),
                "manufacturer" => sel.manufacturer = Some(value),
                "model" => sel.model = Some(value),
                // Object attributes name keys, not tokens; Keyholder finds its own key.
                "object" | "type" => {}
                "library-description"
                | "library-manufacturer"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {
                    return Err(bad(format!(
                        "URI attribute {key:?} is not supported; select the token by token=, serial=, manufacturer= or model="
                    )));
                }
                other => return Err(bad(format!("unknown URI attribute {other:?}"))),
            }
        }
        // Every query attribute is refused: the module and the PIN come
        // from elsewhere, and anything else is unknown.
        if let Some(part) = query.and_then(|q| q.split('&').find(|p| !p.is_empty())) {
            let key = part.split_once('=').map_or(part, |(k, _)| k);
            return Err(bad(match key {
                "module-path" | "module-name" => format!(
                    "URI attribute {key:?} is refused: the PKCS#11 module comes only from keyholderd's own configuration"
                ),
                "pin-value" | "pin-source" => format!(
                    "URI attribute {key:?} is refused: give the PIN when asked, not in the URI"
                ),
                other => format!("unknown URI query attribute {other:?}"),
            }));
        }
        Ok(sel)
    }

    /// Whether `token` satisfies every attribute that is set.
    pub fn matches(&self, token: &TokenDescription) -> bool {
        let ok = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        ok(&self.label, &token.label)
            && ok(&self.serial, &token.serial)
            && ok(&self.manufacturer, &token.manufacturer)
            && ok(&self.model, &token.model)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(l) = &self.label {
            parts.push(format!("label {l:?}"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s:?}"));
        }
        if let Some(m) = &self.manufacturer {
            parts.push(format!("manufacturer {m:?}"));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model {m:?}"));
        }
        if parts.is_empty() {
            f.write_str("any token")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// The key an RFC 7512 URI names: `object=` (`CKA_LABEL`) and `id=` (`CKA_ID`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectSelector {
    /// `CKA_LABEL`.
    pub label: Option<String>,
    /// `CKA_ID` bytes.
    pub id: Option<Vec<u8>>,
}

impl ObjectSelector {
    /// The object attributes of a `pkcs11:` URI (its token attributes are
    /// parsed, and checked, by [`Selector::from_uri`]).
    pub fn from_uri(uri: &str) -> Result<Self, Error> {
        Selector::from_uri(uri)?;
        let path = uri.strip_prefix("pkcs11:").unwrap_or_default();
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let mut out = Self::default();
        for part in path.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                continue;
            };
            let bytes = percent_decode_bytes(value).ok_or_else(|| {
                Error::InvalidSelector(format!("URI attribute {key:?} has a bad %-escape"))
            })?;
            match key {
                "object" => {
                    out.label = Some(String::from_utf8(bytes).map_err(|_| {
                        Error::InvalidSelector("URI attribute \"object\" is not UTF-8".into())
                    })?)
                }
                "id" => out.id = Some(bytes),
                _ => {}
            }
        }
        if out.label.is_none() && out.id.is_none() {
            return Err(Error::InvalidSelector(
                "the URI names no key: give object= or id=".into(),
            ));
        }
        Ok(out)
    }
}

/// Decodes RFC 3986 %-escapes into bytes; `None` on a malformed escape.
fn percent_decode_bytes(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(label: &str, serial: &str) -> TokenDescription {
        TokenDescription {
            slot: cryptoki::slot::Slot::try_from(1u64).expect("slot id"),
            label: label.into(),
            serial: serial.into(),
            manufacturer: "SoftHSM project".into(),
            model: "SoftHSM v2".into(),
            pin: Default::default(),
        }
    }

    #[test]
    fn uri_with_escapes_selects_by_label_and_serial() {
        let sel = Selector::from_uri("pkcs11:token=ops%20team;serial=42ab;object=x").unwrap();
        assert_eq!(sel.label.as_deref(), Some("ops team"));
        assert!(sel.matches(&token("ops team", "42ab")));
        assert!(!sel.matches(&token("ops team", "42ac")));
        assert!(!sel.matches(&token("ops", "42ab")));
    }

    #[test]
    fn object_and_id_name_a_key() {
        let o = ObjectSelector::from_uri("pkcs11:token=ops;object=ca%20key;id=%01%ff").unwrap();
        assert_eq!(o.label.as_deref(), Some("ca key"));
        assert_eq!(o.id, Some(vec![1, 255]));
        assert!(ObjectSelector::from_uri("pkcs11:token=ops").is_err());
    }

    #[test]
    fn uri_that_names_a_module_is_refused() {
        let err = Selector::from_uri("pkcs11:token=ops?module-path=/tmp/evil.so").unwrap_err();
        assert!(err.to_string().contains("module-path"), "{err}");
        assert!(Selector::from_uri("pkcs11:token=ops?pin-value=1234").is_err());
    }

    #[test]
    fn malformed_uris_are_errors_not_panics() {
        for bad in [
            "pkcs:token=a",
            "pkcs11:token",
            "pkcs11:token=%4",
            "pkcs11:token=%zz",
            "pkcs11:foo=1",
            "pkcs11:token=%ff",
        ] {
            assert!(Selector::from_uri(bad).is_err(), "{bad}");
        }
        assert_eq!(Selector::from_uri("pkcs11:").unwrap(), Selector::any());
    }
}

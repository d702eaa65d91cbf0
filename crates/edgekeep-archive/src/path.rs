//! Archive paths: raw bytes relative to the state root, with `/` separators.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A path inside an archive, kept as raw bytes so non-UTF-8 names survive.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArchivePath(Vec<u8>);

impl ArchivePath {
    /// Wraps raw path bytes without checking them.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Converts the bytes to a relative `PathBuf` without any re-encoding.
    pub fn to_path(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(&self.0))
    }

    /// Appends `name` as a new last component.
    pub fn join(&self, name: &[u8]) -> Self {
        let mut bytes = self.0.clone();
        if !bytes.is_empty() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name);
        Self(bytes)
    }

    /// Splits the path on `/`. Empty components are kept so validation can reject them.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/')
    }

    /// Returns the parent path, or `None` for a single-component path.
    pub fn parent(&self) -> Option<ArchivePath> {
        let slash = self.0.iter().rposition(|&b| b == b'/')?;
        Some(Self(self.0[..slash].to_vec()))
    }

    /// Returns the last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(slash) => &self.0[slash + 1..],
            None => &self.0,
        }
    }
}

impl From<&str> for ArchivePath {
    fn from(value: &str) -> Self {
        Self(value.as_bytes().to_vec())
    }
}

impl From<&[u8]> for ArchivePath {
    fn from(value: &[u8]) -> Self {
        Self(value.to_vec())
    }
}

impl fmt::Display for ArchivePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

/// Stored as a JSON string when the bytes are UTF-8, else as `{"b64": "..."}`.
impl Serialize for ArchivePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => Base64Path {
                b64: BASE64.encode(&self.0),
            }
            .serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ArchivePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match WirePath::deserialize(deserializer)? {
            WirePath::Text(text) => Ok(Self(text.into_bytes())),
            WirePath::Base64(Base64Path { b64 }) => BASE64
                .decode(b64.as_bytes())
                .map(Self)
                .map_err(|err| D::Error::custom(format!("invalid base64 path {b64:?}: {err}"))),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Base64Path {
    b64: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WirePath {
    Text(String),
    Base64(Base64Path),
}

/// Checks that `path` is a non-empty relative path without `.`, `..`, empty
/// components or NUL bytes. Returns the reason when it is not.
pub(crate) fn check_entry_path(path: &ArchivePath) -> Result<(), String> {
    if path.as_bytes().is_empty() {
        return Err("the path is empty".into());
    }
    if path.as_bytes().contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    if path.as_bytes()[0] == b'/' {
        return Err("the path is absolute".into());
    }
    for component in path.components() {
        match component {
            b"" => return Err("the path has an empty component".into()),
            b"." => return Err("the path has a `.` component".into()),
            b".." => return Err("the path has a `..` component".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Checks that a symlink at `link` pointing to `target` stays inside the state
/// root when the target is resolved lexically from the link's folder.
pub(crate) fn check_link_target(link: &ArchivePath, target: &ArchivePath) -> Result<(), String> {
    let bytes = target.as_bytes();
    if bytes.is_empty() {
        return Err("the symlink target is empty".into());
    }
    if bytes.contains(&0) {
        return Err("the symlink target contains a NUL byte".into());
    }
    if bytes[0] == b'/' {
        return Err(format!("the symlink target {target} is absolute"));
    }
    let mut depth: Vec<&[u8]> = link.components().collect();
    depth.pop();
    for component in target.components() {
        match component {
            b"" | b"." => {}
            b".." => {
                if depth.pop().is_none() {
                    return Err(format!("the symlink target {target} leaves the state root"));
                }
            }
            name => depth.push(name),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_path_uses_base64_json() {
        let path = ArchivePath::from_bytes(b"caf\xe9".to_vec());
        let json = serde_json::to_string(&path).unwrap();
        assert_eq!(json, r#"{"b64":"Y2Fm6Q=="}"#);
        let back: ArchivePath = serde_json::from_str(&json).unwrap();
        assert_eq!(back, path);
    }

    #[test]
    fn utf8_path_is_plain_json_string() {
        let json = serde_json::to_string(&ArchivePath::from("etc/app.yaml")).unwrap();
        assert_eq!(json, r#""etc/app.yaml""#);
    }

    #[test]
    fn link_target_resolution() {
        let link = ArchivePath::from("a/b/link");
        assert!(check_link_target(&link, &"../x".into()).is_ok());
        assert!(check_link_target(&link, &"../../x".into()).is_ok());
        assert!(check_link_target(&link, &"../../../x".into()).is_err());
        assert!(check_link_target(&link, &"c/../../../../x".into()).is_err());
        assert!(check_link_target(&"top".into(), &"..".into()).is_err());
        assert!(check_link_target(&"top".into(), &"sibling".into()).is_ok());
        assert!(check_link_target(&"top".into(), &"/etc".into()).is_err());
    }

    #[test]
    fn entry_path_rules() {
        for bad in [
            "", "/abs", "a//b", "a/./b", "a/../b", "..", ".", "a/", "a\0b",
        ] {
            assert!(check_entry_path(&bad.into()).is_err(), "{bad:?} accepted");
        }
        assert!(check_entry_path(&"a/b.c/..d".into()).is_ok());
    }
}

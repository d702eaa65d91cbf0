//! Comparing dotted platform versions such as `2.14.0`.

use std::cmp::Ordering;

/// Compares two dotted numeric versions component by component; a missing
/// component counts as 0, so `2.14` equals `2.14.0`. A suffix after `-` or
/// `+` (`2.14.0-rc1`) is ignored.
pub fn compare_versions(a: &str, b: &str) -> Result<Ordering, String> {
    let a = parse_version(a)?;
    let b = parse_version(b)?;
    for index in 0..a.len().max(b.len()) {
        let left = a.get(index).copied().unwrap_or(0);
        let right = b.get(index).copied().unwrap_or(0);
        match left.cmp(&right) {
            Ordering::Equal => {}
            other => return Ok(other),
        }
    }
    Ok(Ordering::Equal)
}

/// Checks that `version` is a dotted numeric version, as [`compare_versions`]
/// needs.
pub(crate) fn check_version(version: &str) -> Result<(), String> {
    parse_version(version).map(|_| ())
}

fn parse_version(version: &str) -> Result<Vec<u64>, String> {
    let core = version.split(['-', '+']).next().unwrap_or_default().trim();
    core.split('.')
        .map(|part| part.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!("platform version {version:?} is not a dotted numeric version such as 2.14.0")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("2.10.0", "2.9.1"), Ok(Ordering::Greater));
        assert_eq!(compare_versions("2.14", "2.14.0"), Ok(Ordering::Equal));
        assert_eq!(
            compare_versions("2.14.0-rc1", "2.14.0"),
            Ok(Ordering::Equal)
        );
        assert_eq!(compare_versions("1.9", "2.0"), Ok(Ordering::Less));
    }

    #[test]
    fn invalid_version_is_named() {
        let err = compare_versions("two", "2.0").unwrap_err();
        assert!(err.contains("\"two\""), "{err}");
    }
}

//! How results are shown: times as text and JSON, and files only the user may read.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::failure::{CliResult, io_failure};

/// A time as RFC 3339 with how long ago or ahead it is; `-` when absent.
pub(crate) fn when(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return "-".into();
    };
    let Ok(t) = SystemTime::try_from(*ts) else {
        return "-".into();
    };
    let rel = match t.duration_since(SystemTime::now()) {
        Ok(d) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(d.as_secs()))
        ),
        Err(e) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(e.duration().as_secs()))
        ),
    };
    format!("{} ({rel})", humantime::format_rfc3339_seconds(t))
}

/// A time as an RFC 3339 JSON string; `null` when absent.
pub(crate) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> serde_json::Value {
    ts.and_then(|t| SystemTime::try_from(*t).ok())
        .map(|t| serde_json::Value::String(humantime::format_rfc3339_seconds(t).to_string()))
        .unwrap_or(serde_json::Value::Null)
}

/// Creates `dir` and its missing parents with mode 0700 (what is written
/// there may be a key); existing directories are left as they are.
pub(crate) fn create_private_dir(dir: &Path) -> CliResult {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_failure("cannot create", dir, e))
}

/// Creates the missing parents of `path` (mode 0700, see [`create_private_dir`]).
pub(crate) fn create_parents(path: &Path) -> CliResult {
    match path.parent() {
        Some(dir) => create_private_dir(dir),
        None => Ok(()),
    }
}

/// Writes `bytes` to `path`, created with mode 0600 (an existing file is
/// truncated and keeps its mode); missing parent directories are created
/// with mode 0700.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> CliResult {
    use std::os::unix::fs::OpenOptionsExt;
    create_parents(path)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_failure("cannot write", path, e))?;
    f.write_all(bytes)
        .map_err(|e| io_failure("cannot write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_times_show_as_dash_and_null() {
        assert_eq!(when(None), "-");
        assert_eq!(rfc3339(None), serde_json::Value::Null);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let ts = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        };
        assert_eq!(rfc3339(Some(&ts)), "2027-01-15T08:00:00Z");
        assert!(when(Some(&ts)).starts_with("2027-01-15T08:00:00Z ("));
    }
}

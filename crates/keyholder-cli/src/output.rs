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

/// Writes `bytes` to `path` as a new file of mode 0600, whole or not at
/// all: they go to a temporary file created beside it (exclusively, so
/// never through a link or into a file someone else made), which is synced
/// and then renamed over `path`. An existing `path` is replaced, never
/// opened, so its mode, owner and links do not carry over; one that is not
/// a regular file (a symbolic link, a pipe, a device) is refused. Missing
/// parent directories are created with mode 0700.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> CliResult {
    use std::os::unix::fs::OpenOptionsExt;
    create_parents(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(crate::failure::Failure::new(
                2,
                format!(
                    "{}: not a regular file (a link, pipe or device); secrets are written only to a regular file Keyholder replaces",
                    path.display()
                ),
            ));
        }
        _ => {}
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut attempt = 0u32;
    let (temp, mut file) = loop {
        let temp = dir.join(format!(
            ".{base}.{}-{nanos:x}-{attempt}.tmp",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(f) => break (temp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(io_failure("cannot write", path, e)),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io_failure("cannot write", path, e));
    }
    // The rename itself reaches the disk with the directory.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to stdout. When stdout is a regular file (`> output`),
/// the shell created it before Keyholder ran, with the caller's umask: if
/// others may open it, a process that already did would read what is
/// written, whatever mode it gets now, so that is refused (exit 2) and
/// nothing is written; otherwise it is made 0600 first.
pub(crate) fn write_stdout_private(bytes: &[u8], what: &str) -> CliResult {
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;
    let stdout = std::io::stdout();
    let fd = stdout
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| crate::failure::Failure::new(1, format!("cannot use stdout: {e}")))?;
    let file = std::fs::File::from(fd);
    if let Ok(m) = file.metadata()
        && m.is_file()
    {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(crate::failure::Failure::new(
                2,
                format!(
                    "stdout is a file others may open (mode {mode:o}), so {what} would be readable by them; \
                     write it with --out FILE (created 0600), or redirect under `umask 077`"
                ),
            ));
        }
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| {
                crate::failure::Failure::new(1, format!("cannot make the output file 0600: {e}"))
            })?;
    }
    let mut out = stdout.lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| crate::failure::Failure::new(1, format!("cannot write to stdout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_replace_whole_never_follow_links_and_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kh-out-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let target = dir.join("app.conf");
        std::fs::write(&target, "old").expect("old");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("mode");
        write_private_file(&target, b"new").expect("write");
        assert_eq!(std::fs::read(&target).expect("read"), b"new");
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A link planted where the file goes is refused, and what it points
        // to is untouched.
        let victim = dir.join("victim");
        std::fs::write(&victim, "mine").expect("victim");
        let link = dir.join("link.conf");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        let refused = write_private_file(&link, b"secret").expect_err("a link is refused");
        assert_eq!(refused.code, 2);
        assert_eq!(std::fs::read(&victim).expect("victim"), b"mine");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        std::fs::remove_dir_all(&dir).expect("clean");
    }

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

//! What commands read besides their flags: text files, and durations in the
//! whole seconds the API takes.

use std::path::Path;
use std::time::Duration;

use crate::failure::{CliResult, io_failure};

/// A duration flag as API seconds: 0 (the daemon's default) when not given,
/// at least 1 when given.
pub(crate) fn seconds(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_secs().max(1))
}

/// A whole text file.
pub(crate) fn read_text(path: &Path) -> CliResult<String> {
    std::fs::read_to_string(path).map_err(|e| io_failure("cannot read", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_zero_and_given_is_at_least_one_second() {
        assert_eq!(seconds(None), 0);
        assert_eq!(seconds(Some(Duration::from_millis(10))), 1);
        assert_eq!(seconds(Some(Duration::from_secs(90))), 90);
    }
}

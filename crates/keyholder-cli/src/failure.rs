//! Why a command failed, and the exit status each failure maps to.

use std::path::Path;

use tonic::Code;

/// A failure with the exit status it maps to.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A failure that has already said what it had to: only the status.
    pub(crate) fn quiet(code: u8) -> Self {
        Self {
            code,
            message: String::new(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            Code::FailedPrecondition => 3,
            Code::NotFound => 4,
            Code::AlreadyExists => 5,
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => 6,
            Code::PermissionDenied | Code::Unauthenticated => 7,
            Code::Unavailable => 8,
            Code::DataLoss => 9,
            _ => 1,
        };
        let message = if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_owned()
        };
        Self { code, message }
    }
}

/// What every command returns.
pub(crate) type CliResult<T = ()> = Result<T, Failure>;

/// A failed file operation, with the path.
pub(crate) fn io_failure(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::new(1, format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_documented_exit_statuses() {
        for (code, exit) in [
            (Code::FailedPrecondition, 3),
            (Code::NotFound, 4),
            (Code::AlreadyExists, 5),
            (Code::InvalidArgument, 6),
            (Code::ResourceExhausted, 6),
            (Code::OutOfRange, 6),
            (Code::PermissionDenied, 7),
            (Code::Unauthenticated, 7),
            (Code::Unavailable, 8),
            (Code::DataLoss, 9),
            (Code::Internal, 1),
            (Code::Aborted, 1),
        ] {
            let f = Failure::from(tonic::Status::new(code, "why"));
            assert_eq!(f.code, exit, "{code:?}");
            assert_eq!(f.message, "why");
        }
    }

    #[test]
    fn an_empty_status_message_names_the_code() {
        let f = Failure::from(tonic::Status::new(Code::NotFound, ""));
        assert_eq!(f.message, "NotFound");
    }
}

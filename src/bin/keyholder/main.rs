//! `keyholder`: the command-line client. The code is in the `keyholder-cli`
//! crate; this binary only runs it.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    keyholder_cli::main()
}

//! `keyholder`: the command-line client. The code is in the `keyholder-cli`
//! crate; this binary only runs it, except for `keyholder vault migrate`,
//! which copies the encrypted vault between stores (migrate.rs) and so
//! lives outside the gRPC client.

#![forbid(unsafe_code)]

use std::process::ExitCode;

mod migrate;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "vault") && argv.get(2).is_some_and(|a| a == "migrate") {
        return migrate::main(argv.into_iter().skip(2).collect());
    }
    keyholder_cli::main()
}

//! `keyholder run`: starts a command with secrets in its environment, and
//! nowhere else (not its command line, not a file).
//!
//! Every secret is read first; only when all of them are there does
//! `keyholder` replace itself with the command (`execvp`), so the command
//! has keyholder's PID, receives every signal sent to it directly, and its
//! exit status (or the signal that killed it) is the one the caller sees.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;

use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure};

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// NAME=SECRET: set the variable NAME to the value of the secret SECRET
    /// (repeatable), e.g. DB_PASSWORD=db/prod/password.
    #[arg(long = "env", value_name = "NAME=SECRET")]
    env: Vec<String>,
    /// Every secret under this prefix (repeatable), e.g. app/prod/: the rest
    /// of its name, upper-cased, with every character other than A-Z and 0-9
    /// turned into `_`, is the variable (app/prod/db/password becomes
    /// DB_PASSWORD). --env wins over a prefix for the same variable.
    #[arg(long = "env-prefix", value_name = "PREFIX")]
    env_prefix: Vec<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Whether `name` can be an environment variable a shell can read:
/// `[A-Za-z_][A-Za-z0-9_]*`.
fn valid_variable(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variable for a secret found under a prefix: the rest of its name,
/// upper-cased, anything but A-Z 0-9 as `_`, and `_` in front of a leading
/// digit.
pub(crate) fn variable_for(rest: &str) -> String {
    let mut v: String = rest
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if v.starts_with(|c: char| c.is_ascii_digit()) {
        v.insert(0, '_');
    }
    v
}

/// A prefix as a whole path segment: `app/prod` and `app/prod/` both mean
/// the secrets under `app/prod/`.
fn segment_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    }
}

/// Variables a secret under a prefix may not set: they decide which program
/// runs, what it loads or how its shell or interpreter starts, so whoever
/// may write a secret under the prefix would choose the code that runs. An
/// explicit `--env` may still set them.
fn steers_execution(variable: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "SHELL",
        "ENV",
        "BASH_ENV",
        "IFS",
        "PS4",
        "SHELLOPTS",
        "BASHOPTS",
        "CDPATH",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RESOLV_HOST_CONF",
        "TMPDIR",
        "GLIBC_TUNABLES",
        "NODE_OPTIONS",
        "NODE_PATH",
        "PERLLIB",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "EDITOR",
        "VISUAL",
        "PAGER",
        "SSH_AUTH_SOCK",
        "SSH_ASKPASS",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_RUNTIME_DIR",
        "KUBECONFIG",
        "GNUPGHOME",
        "PROMPT_COMMAND",
    ];
    const PREFIXES: &[&str] = &[
        "LD_",
        "DYLD_",
        "MALLOC_",
        "PYTHON",
        "PERL5",
        "RUBY",
        "GEM_",
        "LUA_",
        "GIT_",
        "KEYHOLDER_",
        "BASH_FUNC_",
    ];
    EXACT.contains(&variable) || PREFIXES.iter().any(|p| variable.starts_with(p))
}

/// Which secret each variable gets: `--env` first, then `--env-prefix` for
/// the variables `--env` does not name. Two secrets under prefixes that map
/// to one variable, a prefix with no secret under it and a prefix secret
/// that would set a variable steering execution ([`steers_execution`]) are
/// errors, before anything starts.
async fn plan(
    secrets: &mut v1::secrets_client::SecretsClient<Channel>,
    args: &RunArgs,
) -> CliResult<BTreeMap<String, String>> {
    let mut explicit: BTreeMap<String, String> = BTreeMap::new();
    for pair in &args.env {
        let Some((variable, name)) = pair.split_once('=') else {
            return Err(Failure::new(
                2,
                format!("--env {pair:?}: expected NAME=SECRET, e.g. DB_PASSWORD=db/prod/password"),
            ));
        };
        if !valid_variable(variable) {
            return Err(Failure::new(
                2,
                format!(
                    "--env {pair:?}: {variable:?} is not a variable name (letters, digits and _, not starting with a digit)"
                ),
            ));
        }
        if let Some(before) = explicit.insert(variable.to_owned(), name.to_owned())
            && before != name
        {
            return Err(Failure::new(
                2,
                format!("--env gives {variable} twice ({before:?} and {name:?})"),
            ));
        }
    }
    let mut from_prefix: BTreeMap<String, String> = BTreeMap::new();
    for prefix in &args.env_prefix {
        let prefix = segment_prefix(prefix);
        let listed = secrets
            .list(v1::ListSecretsRequest {
                prefix: prefix.clone(),
            })
            .await?
            .into_inner();
        let mut found = false;
        for meta in listed.secrets {
            let Some(rest) = meta.name.strip_prefix(&prefix) else {
                continue;
            };
            found = true;
            let variable = variable_for(rest);
            if explicit.contains_key(&variable) {
                continue;
            }
            if steers_execution(&variable) {
                return Err(Failure::new(
                    2,
                    format!(
                        "secret {:?} would set {variable}, which changes what the command runs or loads; \
                         refused for a prefix (name it with --env {variable}=... if that is what you mean)",
                        meta.name
                    ),
                ));
            }
            if let Some(other) = from_prefix.get(&variable)
                && *other != meta.name
            {
                return Err(Failure::new(
                    2,
                    format!(
                        "secrets {other:?} and {:?} would both set {variable}; name one with --env",
                        meta.name
                    ),
                ));
            }
            from_prefix.insert(variable, meta.name);
        }
        if !found {
            return Err(Failure::new(
                4,
                format!("--env-prefix {prefix:?}: no secret under it; nothing was started"),
            ));
        }
    }
    from_prefix.extend(explicit);
    Ok(from_prefix)
}

/// Reads every secret `plan` names; the first that is missing (or a locked
/// vault, or a refusal) fails the whole run, before anything starts.
pub(crate) async fn read_secrets(
    secrets: &mut v1::secrets_client::SecretsClient<Channel>,
    names: impl IntoIterator<Item = String>,
) -> CliResult<BTreeMap<String, Zeroizing<Vec<u8>>>> {
    let mut values = BTreeMap::new();
    for name in names {
        if values.contains_key(&name) {
            continue;
        }
        let value = secrets
            .get(v1::GetSecretRequest {
                name: name.clone(),
                version: 0,
            })
            .await
            .map_err(|s| {
                let f = Failure::from(s);
                Failure::new(f.code, format!("secret {name:?}: {}", f.message))
            })?
            .into_inner()
            .value;
        values.insert(name, Zeroizing::new(value));
    }
    Ok(values)
}

pub(crate) async fn run(channel: Channel, args: RunArgs) -> CliResult {
    let mut secrets = v1::secrets_client::SecretsClient::new(channel);
    let plan = plan(&mut secrets, &args).await?;
    let values = read_secrets(&mut secrets, plan.values().cloned()).await?;
    let Some((program, rest)) = args.command.split_first() else {
        return Err(Failure::new(2, "no command given after --"));
    };
    let mut command = std::process::Command::new(program);
    command.args(rest);
    for (variable, name) in &plan {
        let Some(value) = values.get(name) else {
            continue;
        };
        if value.contains(&0) {
            return Err(Failure::new(
                6,
                format!(
                    "secret {name:?} holds a NUL byte, which an environment variable cannot; nothing was started"
                ),
            ));
        }
        // The environment block handed to execve is the only copy that
        // outlives this process image.
        command.env(variable, OsString::from_vec(value.to_vec()));
    }
    // Only returns when the command could not be started.
    let e = command.exec();
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    Err(Failure::new(
        code,
        format!("cannot run {}: {e}", program.to_string_lossy()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_names_become_shell_variables() {
        assert_eq!(variable_for("db/password"), "DB_PASSWORD");
        assert_eq!(variable_for("api-key"), "API_KEY");
        assert_eq!(variable_for("tls.crt"), "TLS_CRT");
        assert_eq!(variable_for("1st"), "_1ST");
        assert!(valid_variable(&variable_for("a+b@c=d:e,f")));
    }

    #[test]
    fn variable_names_are_checked() {
        assert!(valid_variable("DB_PASSWORD"));
        assert!(valid_variable("_x1"));
        assert!(!valid_variable("1X"));
        assert!(!valid_variable("A-B"));
        assert!(!valid_variable(""));
    }

    #[test]
    fn a_prefix_is_a_whole_segment() {
        assert_eq!(segment_prefix("app/prod"), "app/prod/");
        assert_eq!(segment_prefix("app/prod/"), "app/prod/");
        assert_eq!(segment_prefix(""), "");
    }
}

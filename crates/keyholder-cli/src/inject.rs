//! `keyholder inject`: renders `{{ secret "NAME" }}` references in a
//! template (stdin or --in) to stdout or a 0600 file. The whole template is
//! parsed and every secret read before a byte is written, so a malformed
//! template or a missing secret leaves no output behind.

use std::io::Read;
use std::path::PathBuf;

use keyholder_proto::v1;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure, io_failure};
use crate::output::write_private_file;
use crate::run::read_secrets;

/// Largest template read, in bytes.
const MAX_TEMPLATE_BYTES: usize = 16 << 20;

#[derive(clap::Args, Debug)]
pub(crate) struct InjectArgs {
    /// Read the template from this file instead of stdin.
    #[arg(long = "in", value_name = "FILE")]
    input: Option<PathBuf>,
    /// Write the result to this file (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// A piece of a parsed template.
#[derive(Debug, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    Secret(&'a str),
}

/// Parses `template`: text, `{{ secret "NAME" }}` and `{{ "{{" }}` (a
/// literal `{{`). Anything else between `{{` and `}}` is an error naming
/// its line.
fn parse(template: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    let mut line = 1usize;
    while let Some(start) = rest.find("{{") {
        let (text, after) = rest.split_at(start);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        line = line.saturating_add(text.matches('\n').count());
        let inner_start = &after[2..];
        let Some(end) = inner_start.find("}}") else {
            return Err(format!("line {line}: `{{{{` without a closing `}}}}`"));
        };
        let inner = inner_start[..end].trim();
        if inner.contains('\n') || inner_start[..end].contains('\n') {
            return Err(format!(
                "line {line}: a `{{{{ ... }}}}` reference must be on one line"
            ));
        }
        if inner == "\"{{\"" {
            parts.push(Part::Text("{{"));
        } else {
            let name = inner
                .strip_prefix("secret")
                .filter(|r| r.starts_with([' ', '\t']))
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('"'))
                .and_then(|r| r.strip_suffix('"'))
                .filter(|n| !n.is_empty() && !n.contains(['"', '\\']));
            match name {
                Some(n) => parts.push(Part::Secret(n)),
                None => {
                    return Err(format!(
                        "line {line}: expected {{{{ secret \"NAME\" }}}}, found {{{{ {} }}}}",
                        printable(inner)
                    ));
                }
            }
        }
        rest = &inner_start[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

fn read_template(args: &InjectArgs) -> CliResult<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    let limit = u64::try_from(MAX_TEMPLATE_BYTES).unwrap_or(u64::MAX);
    let read = match &args.input {
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(limit.saturating_add(1)).read_to_end(&mut buf))
            .map_err(|e| io_failure("cannot read", path, e))?,
        None => std::io::stdin()
            .lock()
            .take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| Failure::new(1, format!("cannot read the template from stdin: {e}")))?,
    };
    if read > MAX_TEMPLATE_BYTES {
        return Err(Failure::new(
            6,
            format!("the template is larger than {MAX_TEMPLATE_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

/// `text` with control characters (terminal escapes among them) shown as
/// `\u{..}`, for echoing template text in an error.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub(crate) async fn inject(channel: Channel, args: InjectArgs, json: bool) -> CliResult {
    let template = read_template(&args)?;
    let text = std::str::from_utf8(&template)
        .map_err(|_| Failure::new(6, "the template is not UTF-8 text"))?;
    let parts = parse(text).map_err(|e| Failure::new(6, format!("malformed template: {e}")))?;
    let names: Vec<String> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Secret(n) => Some((*n).to_owned()),
            Part::Text(_) => None,
        })
        .collect();
    let mut secrets = v1::secrets_client::SecretsClient::new(channel);
    let values = read_secrets(&mut secrets, names.iter().cloned()).await?;
    // Sized in advance: a buffer that grew would leave unwiped copies.
    let size = parts.iter().fold(0usize, |n, part| {
        n.saturating_add(match part {
            Part::Text(t) => t.len(),
            Part::Secret(name) => values.get(*name).map_or(0, |v| v.len()),
        })
    });
    let mut rendered = Zeroizing::new(Vec::with_capacity(size));
    for part in &parts {
        match part {
            Part::Text(t) => rendered.extend_from_slice(t.as_bytes()),
            Part::Secret(n) => {
                if let Some(v) = values.get(*n) {
                    rendered.extend_from_slice(v);
                }
            }
        }
    }
    match &args.out {
        Some(path) => {
            write_private_file(path, &rendered)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "out": path.display().to_string(),
                        "size": rendered.len(),
                        "secrets": values.keys().collect::<Vec<_>>(),
                    })
                );
            }
            Ok(())
        }
        None => crate::output::write_stdout_private(&rendered, "the rendered secrets"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_found_between_text() {
        let p = parse("user=app\npass={{ secret \"db/pw\" }}\nx={{secret \"a\"}}").unwrap();
        assert_eq!(
            p,
            [
                Part::Text("user=app\npass="),
                Part::Secret("db/pw"),
                Part::Text("\nx="),
                Part::Secret("a"),
            ]
        );
    }

    #[test]
    fn a_literal_open_brace_pair_is_written_as_a_string() {
        assert_eq!(
            parse("a {{ \"{{\" }} b").unwrap(),
            [Part::Text("a "), Part::Text("{{"), Part::Text(" b")]
        );
    }

    #[test]
    fn malformed_references_name_their_line() {
        for bad in [
            "a\nb {{ secret db }}",
            "a\nb {{ secrets \"x\" }}",
            "a\nb {{ secret \"x\"",
            "a\nb {{ env \"HOME\" }}",
            "a\nb {{ secret \"\" }}",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn text_without_references_is_kept() {
        assert_eq!(parse("plain } text").unwrap(), [Part::Text("plain } text")]);
        assert!(parse("").unwrap().is_empty());
    }
}

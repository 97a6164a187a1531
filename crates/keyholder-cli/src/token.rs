//! `keyholder token enrol`, `list` and `revoke`: the tokens enrolled in the
//! vault, each of which opens it (docs/team.md). Not to be confused with
//! `keyholder tokens`, which lists the tokens keyholderd's module sees on
//! this machine, enrolled or not.

use std::path::PathBuf;

use keyholder_proto::v1;
use secrecy::{ExposeSecret, SecretString};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure, io_failure};
use crate::session::{
    PinSource, ask_pin, ask_pinentry, attestation_line, first_line, piv_key_json, piv_key_line,
};

/// `keyholder token ...`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Add another token as a recipient of the open vault: a key generated
    /// on it (or adopted), its own authentication entry and rollback
    /// record. Asks for the new token's PIN and, again, the session's.
    Enrol(Box<EnrolArgs>),
    /// List the tokens enrolled in the open vault: label, serial, backend,
    /// attestation, last use.
    List,
    /// Remove an enrolled token and write the vault under a fresh file key
    /// without it. Copies of the vault file made before still open with it.
    Revoke(RevokeArgs),
}

/// `keyholder token enrol` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct EnrolArgs {
    /// The new token's label.
    #[arg(long, group = "token")]
    token_label: Option<String>,
    /// The new token's serial number.
    #[arg(long, group = "token")]
    token_serial: Option<String>,
    /// An RFC 7512 URI; one that names a key (object= or id=) adopts it.
    #[arg(long, group = "token")]
    token_uri: Option<String>,
    /// The PKCS#11 module the new token is reached through, when it is not
    /// keyholderd's own (absolute path; loaded by keyholderd for this
    /// command only).
    #[arg(long, value_name = "PATH")]
    pkcs11_module: Option<PathBuf>,
    /// The module's C_Initialize arguments (NSS softokn's database).
    #[arg(long, requires = "pkcs11_module", value_name = "ARGS")]
    pkcs11_init_args: Option<String>,
    /// The new token's backend: pkcs11 or yubikey (native PIV); default
    /// keyholderd's own.
    #[arg(long, value_parser = ["pkcs11", "yubikey"])]
    token_backend: Option<String>,
    /// Read the new token's PIN from this file (first line).
    #[arg(long, conflicts_with = "token_pin_fd", value_name = "FILE")]
    token_pin_file: Option<PathBuf>,
    /// Read the new token's PIN from this open file descriptor.
    #[arg(long, value_name = "FD")]
    token_pin_fd: Option<u32>,
    /// Enrol a token that cannot store the rollback record: a daemon that
    /// opens the vault with it has no rollback detection.
    #[arg(long)]
    without_rollback_record: bool,
    /// How the key is made on a PIV card, as at `init`.
    #[command(flatten)]
    piv: crate::session::PivKeyArgs,
    /// The PIN that unlocked the session, asked for again (--pin-file,
    /// --pin-fd, --pinentry or the terminal).
    #[command(flatten)]
    pin: PinSource,
}

/// `keyholder token revoke` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct RevokeArgs {
    /// The token: its label, serial, recipient (age1tag1...) or key id, as
    /// `keyholder token list` shows them.
    token: String,
    /// The PIN that unlocked the session, asked for again.
    #[command(flatten)]
    pin: PinSource,
}

/// Most PINs of the new token asked for through pinentry in one command.
const PINENTRY_ATTEMPTS: u32 = 3;

fn read_first_line(path: &PathBuf, what: &str) -> CliResult<SecretString> {
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| io_failure(&format!("cannot read {what} from"), path, e))?,
    );
    first_line(&bytes, what)
}

/// The new token's PIN: its file or descriptor, else pinentry when the
/// session's PIN comes from it, else the terminal.
fn token_pin(args: &EnrolArgs) -> CliResult<SecretString> {
    let path = match (&args.token_pin_file, args.token_pin_fd) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(fd)) => Some(PathBuf::from(format!("/dev/fd/{fd}"))),
        (None, None) => None,
    };
    if let Some(path) = path {
        return read_first_line(&path, "the new token's PIN");
    }
    if let Some(program) = args.pin.pinentry_program() {
        return ask_pinentry(program, "the token being enrolled", None);
    }
    rpassword::prompt_password("PIN of the token to enrol: ")
        .map(SecretString::from)
        .map_err(|e| {
            Failure::new(
                1,
                format!(
                    "cannot ask for the new token's PIN ({e}); without a terminal use \
                     --token-pin-file or --token-pin-fd"
                ),
            )
        })
}

fn enrolled_json(t: &v1::EnrolledToken) -> serde_json::Value {
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    serde_json::json!({
        "label": t.label,
        "serial": t.serial,
        "backend": text(&t.backend),
        "module": text(&t.module),
        "recipient": t.recipient,
        "key_id": t.key_id,
        "attestation": t.vault_key.as_ref().map(piv_key_json),
        "enrolled_at": text(&t.enrolled_at),
        "last_used": text(&t.last_used),
        "rollback_record": t.rollback_record,
        "current": t.current,
    })
}

fn print_enrolled(t: &v1::EnrolledToken) {
    let or = |s: &str, none: &str| {
        if s.is_empty() {
            none.to_owned()
        } else {
            s.to_owned()
        }
    };
    let current = if t.current { "  (this session)" } else { "" };
    println!("{} (serial {}){current}", t.label, t.serial);
    let backend = match (t.backend.as_str(), t.module.as_str()) {
        ("", _) => "not recorded".to_owned(),
        (b, "") => b.to_owned(),
        (b, m) => format!("{b} ({m})"),
    };
    println!("  backend:     {backend}");
    println!("  recipient:   {}", t.recipient);
    println!("  key id:      {}", t.key_id);
    match &t.vault_key {
        Some(k) => {
            println!("  vault key:   {}", piv_key_line(k));
            println!("  attestation: {}", attestation_line(k));
        }
        None => println!("  attestation: none (not a PIV key reached natively)"),
    }
    println!(
        "  enrolled:    {}",
        or(&t.enrolled_at, "when the vault was created")
    );
    println!("  last used:   {}", or(&t.last_used, "not recorded"));
    if !t.rollback_record {
        println!("  rollback:    OFF while this token is in use (it cannot store the record)");
    }
}

pub(crate) async fn token(channel: Channel, cmd: TokenCommand, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel);
    match cmd {
        TokenCommand::Enrol(args) => {
            let attestation_roots_pem = args.piv.attestation_roots_pem()?;
            let management_key = args.piv.management_key()?;
            let new_pin = token_pin(&args)?;
            let pin = ask_pin(&args.pin, "to enrol another token")?;
            let mut request = v1::EnrolTokenRequest {
                token: Some(v1::TokenSelector {
                    label: args.token_label.clone().unwrap_or_default(),
                    serial: args.token_serial.clone().unwrap_or_default(),
                    uri: args.token_uri.clone().unwrap_or_default(),
                }),
                token_pin: new_pin.expose_secret().to_owned(),
                pin: pin.expose_secret().to_owned(),
                allow_final_pin_try: args.pin.allow_final_pin_try(),
                token_backend: args.token_backend.clone().unwrap_or_default(),
                pkcs11_module: args
                    .pkcs11_module
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                pkcs11_init_args: args.pkcs11_init_args.clone().unwrap_or_default(),
                without_rollback_record: args.without_rollback_record,
                piv_slot: args.piv.piv_slot.clone().unwrap_or_default(),
                management_key: management_key.expose_secret().to_owned(),
                allow_default_management_key: args.piv.allow_default_management_key,
                pin_policy: args.piv.pin_policy.clone().unwrap_or_default(),
                touch_policy: args.piv.touch_policy.clone().unwrap_or_default(),
                allow_imported_key: args.piv.allow_imported_key,
                attestation_roots_pem,
                protect_management_key: args.piv.protect_management_key,
            };
            // As unlock does: through pinentry, a wrong PIN of the new token
            // is asked for again, up to 3 tries in all.
            let mut asked = 1;
            let resp = loop {
                match admin.enrol_token(request.clone()).await {
                    Ok(r) => break r.into_inner(),
                    Err(status) => {
                        let program = args.pin.pinentry_program().filter(|_| {
                            args.token_pin_file.is_none() && args.token_pin_fd.is_none()
                        });
                        let again = status.code() == tonic::Code::PermissionDenied
                            && status.message().contains("did not accept the PIN")
                            && asked < PINENTRY_ATTEMPTS
                            && (args.pin.allow_final_pin_try()
                                || !status.message().contains("ONE try remains"));
                        match program.filter(|_| again) {
                            Some(program) => {
                                asked += 1;
                                let error = format!(
                                    "{} (try {asked} of {PINENTRY_ATTEMPTS})",
                                    status.message()
                                );
                                let next =
                                    ask_pinentry(program, "the token being enrolled", Some(error))?;
                                request.token_pin = next.expose_secret().to_owned();
                            }
                            None => return Err(status.into()),
                        }
                    }
                }
            };
            let t = resp.token.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "token": enrolled_json(&t),
                        "generation": resp.generation,
                    })
                );
            } else {
                println!(
                    "enrolled token {:?} (serial {}): recipient {}",
                    t.label, t.serial, t.recipient
                );
                if let Some(k) = &t.vault_key {
                    println!("attestation: {}", attestation_line(k));
                }
                println!("vault generation {}", resp.generation);
            }
        }
        TokenCommand::List => {
            let resp = admin
                .list_enrolled_tokens(v1::ListEnrolledTokensRequest {})
                .await?
                .into_inner();
            if json {
                let list: Vec<_> = resp.tokens.iter().map(enrolled_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for t in &resp.tokens {
                    print_enrolled(t);
                }
            }
        }
        TokenCommand::Revoke(args) => {
            let pin = ask_pin(&args.pin, "to revoke a token")?;
            let resp = admin
                .revoke_token(v1::RevokeTokenRequest {
                    token: args.token.clone(),
                    pin: pin.expose_secret().to_owned(),
                })
                .await?
                .into_inner();
            let t = resp.token.unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "token": enrolled_json(&t),
                        "generation": resp.generation,
                        "remaining": resp.remaining,
                    })
                );
            } else {
                println!(
                    "revoked token {:?} (serial {}): vault generation {} no longer opens with it; {} token(s) remain",
                    t.label, t.serial, resp.generation, resp.remaining
                );
                println!(
                    "copies of the vault file made before still open with it: rotate the secrets that matter"
                );
            }
        }
    }
    Ok(())
}

//! `keyholder init`, `unlock`, `lock`, `status` and `tokens`: the vault's
//! session and the tokens that open it.

use std::path::PathBuf;
use std::time::Duration;

use keyholder_proto::v1;
use secrecy::{ExposeSecret, SecretString};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::failure::{CliResult, Failure, io_failure};
use crate::input::seconds;
use crate::output::{rfc3339, when};

/// Where the PIN comes from when not typed at the terminal.
#[derive(clap::Args, Debug)]
pub(crate) struct PinSource {
    /// Read the PIN from this file (first line).
    #[arg(long, conflicts_with = "pin_fd")]
    pin_file: Option<PathBuf>,
    /// Read the PIN from this open file descriptor (first line).
    #[arg(long)]
    pin_fd: Option<u32>,
    /// Ask for the PIN through pinentry (the dialog gpg uses): PROGRAM, or
    /// `pinentry` from PATH when none is given. A wrong PIN is asked again,
    /// up to 3 tries in all. --pin-file and --pin-fd take precedence.
    #[arg(
        long,
        env = "KEYHOLDER_PINENTRY",
        value_name = "PROGRAM",
        num_args = 0..=1,
        default_missing_value = "pinentry"
    )]
    pinentry: Option<PathBuf>,
    /// Spend the token's final PIN try if it comes to that.
    #[arg(long)]
    allow_final_pin_try: bool,
}

impl PinSource {
    /// The pinentry program, unless a file or descriptor gives the PIN.
    /// Whether the final PIN try may be spent.
    pub(crate) fn allow_final_pin_try(&self) -> bool {
        self.allow_final_pin_try
    }

    pub(crate) fn pinentry_program(&self) -> Option<&PathBuf> {
        if self.pin_file.is_some() || self.pin_fd.is_some() {
            return None;
        }
        self.pinentry.as_ref().filter(|p| !p.as_os_str().is_empty())
    }
}

/// `keyholder init` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct InitArgs {
    /// The token's label.
    #[arg(long, group = "token")]
    token_label: Option<String>,
    /// The token's serial number.
    #[arg(long, group = "token")]
    token_serial: Option<String>,
    /// An RFC 7512 URI, e.g. "pkcs11:token=ops". A URI that also names a
    /// key ("pkcs11:token=ops;id=%03", or object=LABEL) adopts that P-256
    /// key, which must allow ECDH (CKA_DERIVE), instead of generating one.
    #[arg(long, group = "token")]
    token_uri: Option<String>,
    /// An X25519 age recipient (age1...) that can also decrypt the vault;
    /// keep its identity offline.
    #[arg(long)]
    recovery_recipient: Option<String>,
    /// Create the vault even if the token cannot store its generation
    /// record: then an older copy of the vault file opens without notice
    /// (no rollback detection), and `status` says so.
    #[arg(long)]
    without_rollback_protection: bool,
    #[command(flatten)]
    piv: PivKeyArgs,
    #[command(flatten)]
    pin: PinSource,
}

/// How a vault key is made on a PIV card (`init` and `token enrol`).
#[derive(clap::Args, Debug)]
pub(crate) struct PivKeyArgs {
    /// For a PIV card through its PKCS#11 module (a YubiKey through
    /// ykcs11): generate the vault key in this empty slot, 9d (key
    /// management) or a retired slot 82 to 95. Needs the card's management
    /// key, asked for at the terminal unless --management-key-file is given.
    #[arg(long, conflicts_with = "token_uri")]
    pub(crate) piv_slot: Option<String>,
    /// Read the PIV management key (hex, the PKCS#11 SO PIN) from this file
    /// (first line); used for the key generation only, never stored.
    #[arg(long, requires = "piv_slot")]
    pub(crate) management_key_file: Option<PathBuf>,
    /// Go on although the card still has the factory default management
    /// key (keyholderd's native YubiKey backend refuses it otherwise: with
    /// that key anyone holding the card can replace its keys without the
    /// PIN).
    #[arg(long, requires = "piv_slot")]
    pub(crate) allow_default_management_key: bool,
    /// keyholderd's native YubiKey backend: the card keeps its management
    /// key behind the PIN (set by --protect-management-key or `ykman piv
    /// access change-management-key --protect`): read it from the card
    /// after verifying the PIN, instead of asking for it.
    #[arg(long, requires = "piv_slot", conflicts_with_all = ["management_key_file", "protect_management_key"])]
    pub(crate) management_key_on_card: bool,
    /// keyholderd's native YubiKey backend: replace the card's management
    /// key (the one given, typically the factory default) by a random key
    /// kept on the card behind the PIN, as ykman's --protect does, then
    /// generate the vault key with it. Later inits on the card use
    /// --management-key-on-card.
    #[arg(long, requires = "piv_slot")]
    pub(crate) protect_management_key: bool,
    /// keyholderd's native YubiKey backend: the vault key's PIN policy,
    /// once (default) or always (the PIN is verified again before each use;
    /// such a vault does not open through ykcs11).
    #[arg(long, requires = "piv_slot", value_parser = ["once", "always"])]
    pub(crate) pin_policy: Option<String>,
    /// keyholderd's native YubiKey backend: the vault key's touch policy,
    /// never (default), cached (a touch, then none for 15 s) or always (a
    /// touch for every unlock).
    #[arg(long, requires = "piv_slot", value_parser = ["never", "cached", "always"])]
    pub(crate) touch_policy: Option<String>,
    /// Enroll a key the card reports as imported (or will not attest, which
    /// a YubiKey does for imported keys): a copy of it may exist elsewhere.
    #[arg(long)]
    pub(crate) allow_imported_key: bool,
    /// Also trust the PEM certificate(s) in FILE as roots for the key's
    /// attestation (a test root, or the issuer of an organisation's own
    /// attestation certificate in slot f9), besides Yubico's.
    #[arg(long, value_name = "FILE")]
    pub(crate) attestation_root: Option<PathBuf>,
}

impl PivKeyArgs {
    /// The PIV management key for `--piv-slot`: from its file, or asked
    /// for without echo; empty without a slot or with it on the card.
    pub(crate) fn management_key(&self) -> CliResult<SecretString> {
        if self.piv_slot.is_none() || self.management_key_on_card {
            return Ok(SecretString::from(String::new()));
        }
        if let Some(path) = &self.management_key_file {
            let bytes = Zeroizing::new(
                std::fs::read(path)
                    .map_err(|e| io_failure("cannot read the management key from", path, e))?,
            );
            return first_line(&bytes, "management key");
        }
        let key = rpassword::prompt_password("PIV management key (hex): ").map_err(|e| {
            Failure::new(
                1,
                format!(
                    "cannot ask for the management key ({e}); without a terminal use --management-key-file"
                ),
            )
        })?;
        Ok(SecretString::from(key))
    }

    /// The extra attestation roots (PEM), empty without `--attestation-root`.
    pub(crate) fn attestation_roots_pem(&self) -> CliResult<String> {
        match &self.attestation_root {
            None => Ok(String::new()),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| io_failure("cannot read the attestation root from", path, e)),
        }
    }
}

/// `keyholder tokens` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct TokensArgs {
    /// Also print what the vault key's attestation showed when it was
    /// enrolled (native YubiKey backend), or why it is not attested.
    #[arg(long)]
    attestation: bool,
}

/// `keyholder unlock` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct UnlockArgs {
    /// Session lifetime, e.g. 8h (default: the daemon's session_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Lock after this long without use, e.g. 30m (default: the daemon's idle_timeout).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle: Option<Duration>,
    /// Open a vault file older than the generation the token recorded
    /// (a backup restored on purpose); without it that is refused as a rollback.
    #[arg(long)]
    accept_older_vault: bool,
    #[command(flatten)]
    pin: PinSource,
}

/// `keyholder status` arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    /// Keep printing each change until interrupted.
    #[arg(long)]
    watch: bool,
}

pub(crate) fn first_line(bytes: &[u8], what: &str) -> CliResult<SecretString> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Failure::new(6, format!("the {what} is not UTF-8")))?;
    let line = text.lines().next().unwrap_or("");
    Ok(SecretString::from(line.to_owned()))
}

/// Most PINs asked for through pinentry in one command: the first and two
/// retries after a wrong PIN.
const PINENTRY_ATTEMPTS: u32 = 3;

/// Exit status when the PIN dialog was cancelled or timed out.
const EXIT_PIN_CANCELLED: u8 = 10;

/// Where the PIN comes from, in order of precedence: --pin-file or
/// --pin-fd, then --pinentry (or KEYHOLDER_PINENTRY), then the terminal.
/// Only pinentry asks again after a wrong PIN.
struct PinPrompt<'a> {
    src: &'a PinSource,
    /// What the PIN is for, shown in the dialog.
    purpose: &'static str,
    asked: u32,
}

impl<'a> PinPrompt<'a> {
    fn new(src: &'a PinSource, purpose: &'static str) -> Self {
        Self {
            src,
            purpose,
            asked: 0,
        }
    }

    fn pinentry(&self) -> Option<&'a PathBuf> {
        if self.src.pin_file.is_some() || self.src.pin_fd.is_some() {
            return None;
        }
        self.src
            .pinentry
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// The first PIN.
    fn first(&mut self) -> CliResult<SecretString> {
        self.asked = 1;
        match self.pinentry() {
            Some(program) => ask_pinentry(program, self.purpose, None),
            None => read_pin(self.src),
        }
    }

    /// After the daemon refused: the next PIN, when the PIN was wrong,
    /// pinentry asks, and tries are left; `None` to give up with `status`.
    fn retry(&mut self, status: &tonic::Status) -> CliResult<Option<SecretString>> {
        let Some(program) = self.pinentry() else {
            return Ok(None);
        };
        if !wrong_pin(status) || self.asked >= PINENTRY_ATTEMPTS {
            return Ok(None);
        }
        // The daemon would refuse to spend the final try: do not ask for
        // a PIN that cannot be used.
        if final_try_next(status) && !self.src.allow_final_pin_try {
            return Ok(None);
        }
        self.asked += 1;
        let error = format!(
            "{} (try {} of {PINENTRY_ATTEMPTS})",
            status.message(),
            self.asked
        );
        ask_pinentry(program, self.purpose, Some(error)).map(Some)
    }
}

/// Whether the daemon refused the PIN itself (and not the final try, a
/// locked PIN or the caller): only then is asking again worth a try.
fn wrong_pin(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::PermissionDenied
        && status.message().contains("did not accept the PIN")
}

/// Whether the token said that the next wrong PIN locks it.
fn final_try_next(status: &tonic::Status) -> bool {
    status.message().contains("ONE try remains")
}

/// The PIN for a step-up (changing policy or grants): --pin-file,
/// --pin-fd, pinentry or the terminal, asked once.
pub(crate) fn ask_pin(src: &PinSource, purpose: &'static str) -> CliResult<SecretString> {
    PinPrompt::new(src, purpose).first()
}

pub(crate) fn ask_pinentry(
    program: &std::path::Path,
    purpose: &str,
    error: Option<String>,
) -> CliResult<SecretString> {
    let request = keyholder_pinentry::PinRequest {
        title: Some("Keyholder".into()),
        description: Some(format!(
            "Enter the PIN of the token that opens the Keyholder vault ({purpose})."
        )),
        prompt: Some("PIN:".into()),
        error,
    };
    keyholder_pinentry::Pinentry::new(program)
        .tty(keyholder_pinentry::stdin_tty())
        .get_pin(&request)
        .map_err(|e| match e {
            keyholder_pinentry::Error::Cancelled | keyholder_pinentry::Error::Timeout(_) => {
                Failure::new(EXIT_PIN_CANCELLED, e.to_string())
            }
            e => Failure::new(1, e.to_string()),
        })
}

fn read_pin(src: &PinSource) -> CliResult<SecretString> {
    let path = match (&src.pin_file, src.pin_fd) {
        (Some(p), _) => Some(p.clone()),
        // /dev/fd/N reaches an inherited descriptor without unsafe code.
        (None, Some(fd)) => Some(PathBuf::from(format!("/dev/fd/{fd}"))),
        (None, None) => None,
    };
    if let Some(path) = path {
        let bytes = Zeroizing::new(
            std::fs::read(&path).map_err(|e| io_failure("cannot read PIN from", &path, e))?,
        );
        return first_line(&bytes, "PIN");
    }
    let pin = rpassword::prompt_password("Token PIN: ").map_err(|e| {
        Failure::new(
            1,
            format!(
                "cannot ask for the PIN ({e}); without a terminal use --pin-file, --pin-fd or --pinentry"
            ),
        )
    })?;
    Ok(SecretString::from(pin))
}

fn state_name(s: &v1::StatusResponse) -> &'static str {
    match v1::SessionState::try_from(s.state).unwrap_or(v1::SessionState::Unspecified) {
        v1::SessionState::Uninitialized => "uninitialized",
        v1::SessionState::Locked => "locked",
        v1::SessionState::Unlocked => "unlocked",
        v1::SessionState::Unspecified => "unknown",
    }
}

fn token_json(t: &v1::TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "label": t.label,
        "serial": t.serial,
        "manufacturer": t.manufacturer,
        "model": t.model,
        "pin_count_low": t.pin_count_low,
        "pin_final_try": t.pin_final_try,
        "pin_locked": t.pin_locked,
        "recipients": t.recipients,
        "rollback_protection": match t.rollback_protection.as_str() {
            "on" => serde_json::Value::Bool(true),
            "off" => serde_json::Value::Bool(false),
            _ => serde_json::Value::Null,
        },
        "vault_key": t.vault_key.as_ref().map(piv_key_json),
    })
}

pub(crate) fn piv_key_json(k: &v1::PivKeyInfo) -> serde_json::Value {
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    serde_json::json!({
        "slot": k.slot,
        "firmware": text(&k.firmware),
        "pin_policy": text(&k.pin_policy),
        "touch_policy": text(&k.touch_policy),
        "form_factor": text(&k.form_factor),
        "origin": text(&k.origin),
        "attested": k.attested,
        "attestation": k.attestation,
        "management_key": text(&k.management_key),
    })
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

/// One line about a PIV vault key: its slot and policies.
pub(crate) fn piv_key_line(k: &v1::PivKeyInfo) -> String {
    let mut line = format!(
        "PIV slot {}, PIN policy {}, touch policy {}",
        k.slot,
        or_unknown(&k.pin_policy),
        or_unknown(&k.touch_policy)
    );
    if k.management_key == "pin-protected" {
        line.push_str(", management key PIN-protected on the card");
    }
    line
}

/// One line about a PIV vault key's attestation.
pub(crate) fn attestation_line(k: &v1::PivKeyInfo) -> String {
    if k.attested {
        format!("verified: {}", k.attestation)
    } else if k.attestation.is_empty() {
        "not known (unlock once to read the vault's record)".to_owned()
    } else {
        format!("not attested: {}", k.attestation)
    }
}

/// Whether the vault key waits for a touch.
fn needs_touch(k: &v1::PivKeyInfo) -> bool {
    matches!(k.touch_policy.as_str(), "cached" | "always")
}

fn unlocked(s: &v1::StatusResponse) -> bool {
    s.state == v1::SessionState::Unlocked as i32
}

fn status_json(s: &v1::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "state": state_name(s),
        "token": s.token.as_ref().map(token_json),
        "unlocked_at": rfc3339(s.unlocked_at.as_ref()),
        "expires_at": rfc3339(s.expires_at.as_ref()),
        "idle_deadline": rfc3339(s.idle_deadline.as_ref()),
        "vault_path": s.vault_path,
        "generation": s.generation,
        "secret_count": s.secret_count,
        "rollback_protection": unlocked(s).then_some(s.rollback_protection),
        "lock_reason": s.lock_reason,
        "vault_key": s.vault_key.as_ref().map(piv_key_json),
    })
}

fn print_status(s: &v1::StatusResponse, json: bool) {
    if json {
        println!("{}", status_json(s));
        return;
    }
    println!("state:       {}", state_name(s));
    if let Some(t) = &s.token {
        println!(
            "token:       {} (serial {}, {} {})",
            t.label, t.serial, t.manufacturer, t.model
        );
    }
    if s.state == v1::SessionState::Unlocked as i32 {
        println!("unlocked:    {}", when(s.unlocked_at.as_ref()));
        println!("expires:     {}", when(s.expires_at.as_ref()));
        println!("idle lock:   {}", when(s.idle_deadline.as_ref()));
        println!("generation:  {}", s.generation);
        println!("secrets:     {}", s.secret_count);
        if s.rollback_protection {
            println!("rollback:    on (the token records the vault's generation)");
        } else {
            println!(
                "rollback:    OFF (the token cannot store the record: an older copy of the vault file would open)"
            );
        }
    } else if !s.lock_reason.is_empty() {
        println!("locked by:   {}", s.lock_reason);
    }
    if let Some(k) = &s.vault_key {
        println!("vault key:   {}", piv_key_line(k));
        println!("attestation: {}", attestation_line(k));
    }
    println!("vault:       {}", s.vault_path);
    if s.state == v1::SessionState::Uninitialized as i32 {
        println!("hint:        run `keyholder init --token-label <label>` to create the vault");
    }
}

pub(crate) async fn init(channel: Channel, args: InitArgs, json: bool) -> CliResult {
    let management_key = args.piv.management_key()?;
    let attestation_roots_pem = args.piv.attestation_roots_pem()?;
    let mut prompt = PinPrompt::new(&args.pin, "keyholder init");
    let mut pin = prompt.first()?;
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let resp = loop {
        let request = v1::InitRequest {
            token: Some(v1::TokenSelector {
                label: args.token_label.clone().unwrap_or_default(),
                serial: args.token_serial.clone().unwrap_or_default(),
                uri: args.token_uri.clone().unwrap_or_default(),
            }),
            pin: pin.expose_secret().to_owned(),
            allow_final_pin_try: args.pin.allow_final_pin_try,
            recovery_recipient: args.recovery_recipient.clone().unwrap_or_default(),
            without_rollback_protection: args.without_rollback_protection,
            piv_slot: args.piv.piv_slot.clone().unwrap_or_default(),
            management_key: management_key.expose_secret().to_owned(),
            allow_default_management_key: args.piv.allow_default_management_key,
            pin_policy: args.piv.pin_policy.clone().unwrap_or_default(),
            touch_policy: args.piv.touch_policy.clone().unwrap_or_default(),
            allow_imported_key: args.piv.allow_imported_key,
            attestation_roots_pem: attestation_roots_pem.clone(),
            protect_management_key: args.piv.protect_management_key,
        };
        match admin.init(request).await {
            Ok(r) => break r.into_inner(),
            Err(status) => match prompt.retry(&status)? {
                Some(next) => pin = next,
                None => return Err(status.into()),
            },
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "vault_path": resp.vault_path,
                "token_recipient": resp.token_recipient,
                "token": resp.token.as_ref().map(token_json),
                "vault_key": resp.vault_key.as_ref().map(piv_key_json),
            })
        );
    } else {
        let label = resp.token.as_ref().map(|t| t.label.as_str()).unwrap_or("");
        println!("created vault {}", resp.vault_path);
        println!("token {label:?} recipient: {}", resp.token_recipient);
        if let Some(k) = &resp.vault_key {
            println!("vault key: {}", piv_key_line(k));
            println!("attestation: {}", attestation_line(k));
        }
        println!("next: keyholder unlock");
    }
    Ok(())
}

pub(crate) async fn unlock(channel: Channel, args: UnlockArgs, json: bool) -> CliResult {
    let mut prompt = PinPrompt::new(&args.pin, "keyholder unlock");
    let mut pin = prompt.first()?;
    let mut session = v1::session_client::SessionClient::new(channel);
    // A key that waits for a touch: say so rather than hang silently.
    if let Ok(s) = session.status(v1::StatusRequest {}).await {
        let s = s.into_inner();
        if let Some(k) = s.vault_key.as_ref().filter(|k| needs_touch(k))
            && !unlocked(&s)
        {
            eprintln!(
                "Touch the YubiKey when it blinks: its vault key (PIV slot {}) has touch policy {}.",
                k.slot, k.touch_policy
            );
        }
    }
    let resp = loop {
        let request = v1::UnlockRequest {
            pin: pin.expose_secret().to_owned(),
            allow_final_pin_try: args.pin.allow_final_pin_try,
            ttl_seconds: seconds(args.ttl),
            idle_timeout_seconds: seconds(args.idle),
            accept_older_vault: args.accept_older_vault,
        };
        match session.unlock(request).await {
            Ok(r) => break r.into_inner(),
            Err(status) => match prompt.retry(&status)? {
                Some(next) => pin = next,
                None => return Err(status.into()),
            },
        }
    };
    print_status(&resp.status.unwrap_or_default(), json);
    Ok(())
}

pub(crate) async fn lock(channel: Channel, json: bool) -> CliResult {
    let mut session = v1::session_client::SessionClient::new(channel);
    let resp = session.lock(v1::LockRequest {}).await?.into_inner();
    print_status(&resp.status.unwrap_or_default(), json);
    Ok(())
}

pub(crate) async fn status(channel: Channel, args: StatusArgs, json: bool) -> CliResult {
    let mut session = v1::session_client::SessionClient::new(channel);
    if !args.watch {
        let s = session.status(v1::StatusRequest {}).await?.into_inner();
        print_status(&s, json);
        return Ok(());
    }
    let mut stream = session
        .watch_status(v1::StatusRequest {})
        .await?
        .into_inner();
    while let Some(s) = stream.message().await? {
        print_status(&s, json);
        if !json {
            println!();
        }
    }
    Ok(())
}

pub(crate) async fn tokens(channel: Channel, args: TokensArgs, json: bool) -> CliResult {
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let resp = admin
        .list_tokens(v1::ListTokensRequest {})
        .await?
        .into_inner();
    if json {
        let list: Vec<_> = resp.tokens.iter().map(token_json).collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for t in &resp.tokens {
            println!(
                "{} (serial {}, {} {})",
                t.label, t.serial, t.manufacturer, t.model
            );
            for r in &t.recipients {
                println!("  keyholder key: {r}");
            }
            if let Some(k) = &t.vault_key {
                println!("  vault key: {}", piv_key_line(k));
                if args.attestation {
                    println!("  attestation: {}", attestation_line(k));
                    if !k.firmware.is_empty() {
                        println!("  firmware: {}", k.firmware);
                    }
                    if !k.form_factor.is_empty() {
                        println!("  form factor: {}", k.form_factor);
                    }
                    if !k.origin.is_empty() {
                        println!("  origin: {}", k.origin);
                    }
                }
            } else if args.attestation {
                println!("  attestation: none recorded for this token");
            }
            match t.rollback_protection.as_str() {
                "on" => {
                    println!("  rollback protection: on (the token records the vault's generation)")
                }
                "off" => println!(
                    "  rollback protection: OFF (the token cannot store the record: an older copy of the vault file would open)"
                ),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_the_first_line_of_its_file() {
        assert_eq!(
            first_line(b"1234\nrest\n", "PIN").unwrap().expose_secret(),
            "1234"
        );
        assert_eq!(first_line(b"1234", "PIN").unwrap().expose_secret(), "1234");
        assert_eq!(first_line(b"", "PIN").unwrap().expose_secret(), "");
        let err = first_line(b"\xff\xfe", "PIN").unwrap_err();
        assert_eq!(err.code, 6);
    }

    #[test]
    fn status_names_every_state() {
        let mut s = v1::StatusResponse::default();
        for (state, name) in [
            (v1::SessionState::Uninitialized, "uninitialized"),
            (v1::SessionState::Locked, "locked"),
            (v1::SessionState::Unlocked, "unlocked"),
            (v1::SessionState::Unspecified, "unknown"),
        ] {
            s.state = state as i32;
            assert_eq!(state_name(&s), name);
            assert_eq!(status_json(&s)["state"], name);
        }
        s.state = 99;
        assert_eq!(state_name(&s), "unknown");
    }

    #[test]
    fn a_piv_vault_key_is_described_in_words() {
        let mut k = v1::PivKeyInfo {
            slot: "9d".into(),
            pin_policy: "once".into(),
            touch_policy: "cached".into(),
            ..Default::default()
        };
        assert_eq!(
            piv_key_line(&k),
            "PIV slot 9d, PIN policy once, touch policy cached"
        );
        assert!(needs_touch(&k));
        assert_eq!(
            attestation_line(&k),
            "not known (unlock once to read the vault's record)"
        );
        k.attestation = "the card has no attestation certificate (slot f9)".into();
        assert!(attestation_line(&k).starts_with("not attested: the card has no"));
        k.attested = true;
        k.attestation = "generated on the card: YubiKey serial 1".into();
        assert_eq!(
            attestation_line(&k),
            "verified: generated on the card: YubiKey serial 1"
        );
        k.touch_policy = "never".into();
        k.pin_policy.clear();
        k.management_key = "pin-protected".into();
        assert!(!needs_touch(&k));
        assert_eq!(
            piv_key_line(&k),
            "PIV slot 9d, PIN policy unknown, touch policy never, management key PIN-protected on the card"
        );
        let json = piv_key_json(&k);
        assert_eq!(json["pin_policy"], serde_json::Value::Null);
        assert_eq!(json["attested"], true);
    }
}

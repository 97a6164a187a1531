//! Unlock on demand in-process, on the software token: what the prompt
//! does with a token on its final PIN try, and who may not prompt. (The
//! end-to-end tests in tests/e2e/pinentry.rs cover the rest against the
//! real daemon.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use keyholder_daemon::Core;
use keyholder_daemon::config::Config;
use keyholder_daemon::core::NewVaultKey;
use keyholder_daemon::error::Error;
use keyholder_daemon::gate::{Caller, Channel, Needs};
use keyholder_token::software::SoftwareToken;
use keyholder_token::{PinStatus, Selector};
use secrecy::SecretString;

mod common;
use common::MemoryStorage;

const PIN: &str = "123456";

/// A pinentry stand-in that answers every GETPIN with PIN and counts them.
fn stand_in(dir: &Path) -> std::path::PathBuf {
    let program = dir.join("pinentry");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\necho OK\nwhile IFS= read -r line; do\n  case \"$line\" in\n    GETPIN) echo x >> \"{}\"; printf 'D {PIN}\\nOK\\n';;\n    BYE) echo OK; exit 0;;\n    *) echo OK;;\n  esac\ndone\n",
            dir.join("prompts").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    program
}

fn prompts(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("prompts"))
        .unwrap_or_default()
        .lines()
        .count()
}

async fn locked_core(dir: &Path) -> (Arc<Core>, SoftwareToken) {
    let token = SoftwareToken::new("soft", PIN);
    let config = Config {
        pkcs11_module: Some("/nonexistent".into()),
        socket: dir.join("keyholder.sock"),
        ssh_agent_socket: dir.join("agent.sock"),
        key_stock: 0,
        unlock_on_demand: true,
        pinentry: stand_in(dir),
        ..Config::default()
    };
    let core = Core::new(config, token.clone(), MemoryStorage::default());
    core.init(
        Selector::label("soft"),
        SecretString::from(PIN.to_owned()),
        false,
        Vec::new(),
        false,
        NewVaultKey::Generate,
    )
    .await
    .expect("init");
    (core, token)
}

fn me() -> Caller {
    Caller::from_peer(
        rustix::process::getuid().as_raw(),
        Some(std::process::id() as i32),
        Channel::Agent,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_unlocks_but_never_spends_the_final_pin_try() {
    let dir = tempfile::tempdir().unwrap();
    let (core, token) = locked_core(dir.path()).await;

    // Not allowed to prompt (a forwarded agent connection): locked, no dialog.
    let e = core
        .enter_or_prompt(&me(), "Agent.Sign", Needs::Unlocked, false)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Locked), "{e}");
    assert_eq!(prompts(dir.path()), 0);

    // A token on its final try: the dialog is shown, the PIN is not spent.
    token.set_pin_status(PinStatus {
        count_low: true,
        final_try: true,
        locked: false,
    });
    let e = core
        .enter_or_prompt(&me(), "Agent.Sign", Needs::Unlocked, true)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Locked), "{e}");
    assert_eq!(prompts(dir.path()), 1);
    assert_eq!(token.logins(), 1, "only init's login");
    assert!(!core.is_unlocked());

    // Operations that need nothing never prompt.
    token.set_pin_status(PinStatus::default());
    core.enter_or_prompt(&me(), "Session.Status", Needs::Nothing, true)
        .await
        .unwrap();
    assert_eq!(prompts(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_unlocks_and_the_request_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (core, token) = locked_core(dir.path()).await;
    core.enter_or_prompt(&me(), "Secrets.Get", Needs::Unlocked, true)
        .await
        .unwrap();
    assert!(core.is_unlocked());
    assert_eq!(prompts(dir.path()), 1);
    assert_eq!(token.logins(), 2);
    // Unlocked: no further dialog.
    core.enter_or_prompt(&me(), "Secrets.Get", Needs::Unlocked, true)
        .await
        .unwrap();
    assert_eq!(prompts(dir.path()), 1);
}

//! The daemon run in-process on the software token (a token that can be
//! taken away on request, which no real token here can do) and an
//! in-memory vault home: session locking on tokio's paused clock, a token
//! failure during issuance, and the gate seen by gRPC and agent requests.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyholder_daemon::config::Config;
use keyholder_daemon::core::{LockReason, NewVaultKey, SessionState};
use keyholder_daemon::error::Result as DaemonResult;
use keyholder_daemon::gate::{Caller, Channel, GateHook};
use keyholder_daemon::{Core, bind_socket, run};
use keyholder_proto::v1;
use keyholder_token::Selector;
use keyholder_token::software::SoftwareToken;
use secrecy::SecretString;

mod common;
use common::MemoryStorage;

const PIN: &str = "123456";

fn pin() -> SecretString {
    SecretString::from(PIN.to_owned())
}

fn config(dir: &Path) -> Config {
    Config {
        pkcs11_module: Some("/nonexistent".into()),
        socket: dir.join("keyholder.sock"),
        ssh_agent_socket: dir.join("agent.sock"),
        key_stock: 0,
        // Token presence is checked by hand in these tests.
        token_poll_interval: Duration::from_secs(3600),
        ..Config::default()
    }
}

async fn initialised(dir: &Path) -> (Arc<Core>, SoftwareToken) {
    let token = SoftwareToken::new("soft", PIN);
    let core = Core::new(config(dir), token.clone(), MemoryStorage::default());
    core.init(
        Selector::label("soft"),
        pin(),
        false,
        Vec::new(),
        false,
        NewVaultKey::Generate,
    )
    .await
    .expect("init");
    (core, token)
}

fn lock_reason(core: &Core) -> Option<LockReason> {
    match core.status().state {
        SessionState::Locked(r) => Some(r),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn idle_and_ttl_lock_on_the_paused_clock() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _token) = initialised(dir.path()).await;
    let ticker = tokio::spawn(keyholder_daemon::serve::tick_loop(core.clone()));

    // Idle: 20 s without a request locks, requests keep it open.
    core.unlock(
        pin(),
        false,
        Some(Duration::from_secs(3600)),
        Some(Duration::from_secs(20)),
        false,
    )
    .await
    .expect("unlock");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(core.is_unlocked(), "locked while in use");
        core.touch();
    }
    tokio::time::sleep(Duration::from_secs(22)).await;
    assert_eq!(lock_reason(&core), Some(LockReason::Idle));

    // TTL: 60 s ends the session however busy it is.
    core.unlock(
        pin(),
        false,
        Some(Duration::from_secs(60)),
        Some(Duration::from_secs(3600)),
        false,
    )
    .await
    .expect("unlock");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(11)).await;
        core.touch();
        assert!(core.is_unlocked(), "locked before its TTL");
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(lock_reason(&core), Some(LockReason::Expired));
    ticker.abort();
}

/// One operation seen at the gate: listener, operation, uid, pid.
type Seen = (Channel, &'static str, u32, Option<i32>);

/// Records every operation the gate sees.
#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl GateHook for Recorder {
    fn check(&self, caller: &Caller, op: &'static str) -> DaemonResult<()> {
        self.0
            .lock()
            .unwrap()
            .push((caller.channel, op, caller.uid, caller.pid));
        Ok(())
    }
}

async fn channel(path: &Path) -> tonic::transport::Channel {
    keyholder_proto::socket::connect(path)
        .await
        .expect("connect")
}

/// Starts the gRPC and agent listeners for `core`; returns the stop sender
/// and the server task.
fn serve(
    core: &Arc<Core>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = bind_socket(&core.config.socket).expect("bind");
    let agent = bind_socket(&core.config.ssh_agent_socket).expect("bind agent");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(core.clone(), listener, Some(agent), async move {
        let _ = stopped.await;
    }));
    (
        stop,
        tokio::spawn(async move { task.await.unwrap().unwrap() }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_gone_during_issuance_is_unavailable_and_the_daemon_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (core, token) = initialised(dir.path()).await;
    let (stop, server) = serve(&core);
    let ch = channel(&core.config.socket).await;
    let mut session = v1::session_client::SessionClient::new(ch.clone());
    let mut admin = v1::admin_client::AdminClient::new(ch.clone());
    let mut creds = v1::credentials_client::CredentialsClient::new(ch.clone());
    session
        .unlock(v1::UnlockRequest {
            pin: PIN.into(),
            ..Default::default()
        })
        .await
        .expect("unlock");
    admin
        .create_ca(v1::CreateCaRequest {
            name: "on-token".into(),
            on_token: true,
            ..Default::default()
        })
        .await
        .expect("CA on the token");
    let issue = v1::IssueCertificateRequest {
        ca: "on-token".into(),
        common_name: "alice".into(),
        ..Default::default()
    };
    creds
        .issue_certificate(issue.clone())
        .await
        .expect("issued while the token is there");

    token.set_present(false);
    let err = creds
        .issue_certificate(issue.clone())
        .await
        .expect_err("no token, no signature");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no longer available"), "{err:?}");
    let err = admin
        .create_ca(v1::CreateCaRequest {
            name: "second".into(),
            on_token: true,
            ..Default::default()
        })
        .await
        .expect_err("no token, no key");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    // The daemon still answers, and the token coming back makes it work again.
    token.set_present(true);
    creds
        .issue_certificate(issue)
        .await
        .expect("issued once the token is back");
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_agent_requests_pass_the_one_gate_with_their_caller() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _token) = initialised(dir.path()).await;
    let recorder = Arc::new(Recorder::default());
    core.add_gate_hook(recorder.clone());
    let (stop, server) = serve(&core);
    let ch = channel(&core.config.socket).await;
    v1::session_client::SessionClient::new(ch.clone())
        .unlock(v1::UnlockRequest {
            pin: PIN.into(),
            ..Default::default()
        })
        .await
        .expect("unlock");
    v1::secrets_client::SecretsClient::new(ch.clone())
        .list(v1::ListSecretsRequest::default())
        .await
        .expect("list");

    // SSH_AGENTC_REQUEST_IDENTITIES, then SSH_AGENTC_LOCK with an empty
    // passphrase, as ssh-add sends them.
    let agent = core.config.ssh_agent_socket.clone();
    let replies = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(agent).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut replies = Vec::new();
        for msg in [&[0u8, 0, 0, 1, 11][..], &[0, 0, 0, 5, 22, 0, 0, 0, 0]] {
            s.write_all(msg).unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut body).unwrap();
            replies.push(body[0]);
        }
        replies
    })
    .await
    .unwrap();
    // IDENTITIES_ANSWER, then SUCCESS.
    assert_eq!(replies, [12, 6]);
    assert!(!core.is_unlocked(), "the agent's LOCK locked the session");

    let seen = recorder.0.lock().unwrap().clone();
    let ops: Vec<_> = seen.iter().map(|(ch, op, _, _)| (*ch, *op)).collect();
    assert_eq!(
        ops,
        [
            (Channel::Grpc, "Session.Unlock"),
            (Channel::Grpc, "Secrets.List"),
            (Channel::Agent, "Agent.RequestIdentities"),
            (Channel::Agent, "Agent.Lock"),
        ]
    );
    let me = std::process::id() as i32;
    for (_, op, uid, pid) in &seen {
        assert_eq!(*uid, rustix::process::getuid().as_raw(), "{op}");
        assert_eq!(*pid, Some(me), "{op}");
    }
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_exec_credential_version_is_reported_before_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _token) = initialised(dir.path()).await;
    let (stop, server) = serve(&core);
    let mut creds =
        v1::credentials_client::CredentialsClient::new(channel(&core.config.socket).await);
    let request = |version: &str| v1::IssueExecCredentialRequest {
        cluster: "prod".into(),
        user: "alice".into(),
        api_version: version.into(),
        ..Default::default()
    };
    let err = creds
        .issue_exec_credential(request("v2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("api_version"), "{err:?}");
    let err = creds
        .issue_exec_credential(request("v1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let _ = stop.send(());
    server.await.unwrap();
}

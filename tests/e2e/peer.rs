//! Only the daemon's own uid is served, whatever the file modes say.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::util::{Env, assert_fails, keyholder_bin};

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_client_running_as_another_uid_is_refused_and_the_refusal_logged() {
    assert!(
        rustix::process::getuid().is_root(),
        "this test switches to uid nobody and must run as root (CI does)"
    );
    let env = Env::new();
    let daemon = env.start_daemon(&[]);
    env.init();
    // Open the socket, its directory and the way to them to everyone, so
    // only the peer-credential check stands in the way.
    chmod(env.path(), 0o755);
    chmod(&env.runtime, 0o755);
    chmod(&env.runtime.join("keyholder"), 0o711);
    chmod(&env.socket(), 0o777);
    let bin = env.path().join("keyholder");
    std::fs::copy(keyholder_bin(), &bin).expect("copy the CLI where nobody can run it");
    chmod(&bin, 0o755);
    // The CLI only dials a socket in a directory of its own user, so give
    // nobody one, holding a link to the daemon's socket.
    let theirs = env.path().join("nobody");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
    chmod(&theirs, 0o700);
    let link = theirs.join("keyholder.sock");
    std::os::unix::fs::symlink(env.socket(), &link).expect("symlink");

    let pin = theirs.join("pin");
    std::fs::write(&pin, "1234\n").expect("pin file");
    std::os::unix::fs::chown(&pin, Some(65534), Some(65534)).expect("chown");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .arg("--socket")
            .arg(&link)
            .args(args)
            .output()
            .expect("setpriv runs")
    };
    let pin_arg = pin.to_str().expect("utf8");
    for args in [
        &["status"][..],
        &["unlock", "--pin-file", pin_arg],
        &["secret", "get", "db/password"],
    ] {
        let out = as_nobody(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("vault"), "nobody saw the status: {stdout}");
        // The README's exit status for a refusal of another uid, with a
        // message that says so.
        assert_fails(&out, 7, "serves only uid 0; you are uid 65534");
    }

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !daemon
        .log_text()
        .contains("refused connection from another uid")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(daemon.log_text().contains("uid=65534"));
    // The owner is still served.
    assert!(env.ok(&["status"]).contains("locked"));
}

//! The vault's files as a user meets them: damaged in place and restored
//! from a backup, a directory others can write, a full disk, a vault never
//! created.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Env, assert_fails};

fn pin_args(env: &Env) -> [String; 3] {
    [
        "unlock".into(),
        "--pin-file".into(),
        env.pin_file.to_str().expect("utf8").into(),
    ]
}

fn unlock_output(env: &Env) -> std::process::Output {
    let args = pin_args(env);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.cli(&args)
}

/// The one command in backquotes after "restore it with" in `message`.
fn restore_command(message: &str) -> String {
    let after = message
        .split("restore it with `")
        .nth(1)
        .unwrap_or_else(|| panic!("no restore command in: {message}"));
    after
        .split('`')
        .next()
        .expect("closing backquote")
        .to_owned()
}

/// Runs the restore command the message gives, as written, in a shell.
fn run_restore_command(message: &str) {
    let command = restore_command(message);
    let status = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .status()
        .expect("sh runs");
    assert!(status.success(), "{command}");
}

fn overwrite_in_place(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open vault in place");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(bytes).expect("overwrite");
}

fn backups(env: &Env) -> Vec<PathBuf> {
    let dir = env.vault.parent().expect("vault dir");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read vault dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("vault.age.gen-"))
        .collect();
    found.sort();
    found
}

#[test]
fn a_vault_damaged_in_place_names_its_newest_intact_backup_and_the_restore_works() {
    let env = Env::new();
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/pw", b"hunter2");
    env.put("db/user", b"admin");
    env.ok(&["lock"]);
    let generation_files = backups(&env);
    assert!(!generation_files.is_empty());
    let vault_inode = std::fs::metadata(&env.vault).expect("vault").ino();
    for b in &generation_files {
        let meta = std::fs::metadata(b).expect("backup");
        assert_eq!(meta.nlink(), 1, "{b:?} is a file of its own");
        assert_ne!(meta.ino(), vault_inode, "{b:?} is not the vault file");
    }

    // Damage in the payload, written in place (the inode stays the same).
    let len = std::fs::metadata(&env.vault).expect("vault").len();
    overwrite_in_place(&env.vault, len - 40, &[0x5a; 16]);
    let out = unlock_output(&env);
    assert_fails(&out, 9, "is damaged");
    let message = String::from_utf8_lossy(&out.stderr).into_owned();
    let newest = generation_files.last().expect("a backup");
    let newest_name = newest.file_name().expect("name").to_string_lossy();
    assert!(
        message.contains(&*newest_name),
        "names the newest backup {newest_name}: {message}"
    );
    assert!(
        !message.contains("--accept-older-vault"),
        "the newest backup is the last generation: {message}"
    );
    assert!(env.ok(&["status"]).contains("locked"));

    // The command in the message, run as written, restores the vault.
    run_restore_command(&message);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "hunter2");
    assert_eq!(env.ok(&["secret", "get", "db/user"]), "admin");
    env.put("db/after", b"restored");
    env.ok(&["lock"]);

    // A malformed p256tag stanza in the header is damage too (exit 9, not
    // "not encrypted to this token"), and the backups are still checked.
    let text = std::fs::read(&env.vault).expect("vault");
    let at = text
        .windows(11)
        .position(|w| w == b"-> p256tag ")
        .expect("p256tag stanza") as u64;
    // Turn the space between the tag and the share into a letter: one
    // argument instead of two.
    let line_end = text[at as usize..]
        .iter()
        .position(|&b| b == b'\n')
        .expect("line end") as u64;
    let space = text[at as usize + 11..(at + line_end) as usize]
        .iter()
        .position(|&b| b == b' ')
        .expect("space between tag and share") as u64;
    overwrite_in_place(&env.vault, at + 11 + space, b"A");
    let out = unlock_output(&env);
    assert_fails(&out, 9, "p256tag");
    let message = String::from_utf8_lossy(&out.stderr).into_owned();
    run_restore_command(&message);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/after"]), "restored");
    drop(daemon);
}

#[test]
fn a_vault_directory_others_can_write_stops_the_daemon() {
    let env = Env::new();
    let dir = env.vault.parent().expect("vault dir").to_owned();
    std::fs::create_dir_all(&dir).expect("vault dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let vault = env.vault.to_str().expect("utf8");
    let out = env.run_daemon_to_exit(&[
        "--pkcs11-module",
        env.module.to_str().expect("utf8"),
        "--vault",
        vault,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mode 0777"), "{stderr}");
    assert!(stderr.contains("chmod 700"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&dir).expect("dir").mode() & 0o777,
        0o777,
        "the directory's mode is the user's to change"
    );
    // After the fix the user is told, the daemon starts.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let _daemon = env.start_daemon(&[]);
    env.init();
}

#[test]
fn a_daemon_whose_vault_was_never_created_sends_the_user_to_init() {
    let env = Env::new();
    let _daemon = env.start_daemon(&[]);
    for args in [
        &["secret", "get", "db/pw"][..],
        &["secret", "list"][..],
        &["key", "list"][..],
    ] {
        let out = env.cli(args);
        assert_fails(&out, 3, "keyholder init");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("keyholder unlock"), "{args:?}: {stderr}");
    }
    env.init();
    assert_fails(
        &env.cli(&["secret", "get", "db/pw"]),
        3,
        "locked: run `keyholder unlock`",
    );
}

/// A small tmpfs mounted over the vault's directory, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount tmpfs (the tests run as root)");
        Self {
            dir: dir.to_owned(),
        }
    }

    fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.dir).expect("statvfs");
        st.f_bavail.saturating_mul(st.f_frsize)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

#[test]
fn a_full_disk_is_named_and_leaves_the_vault_readable() {
    let env = Env::new();
    let disk = SmallDisk::mount(env.vault.parent().expect("vault dir"), "2m");
    let daemon = env.start_daemon(&[]);
    env.init();
    env.unlock();
    env.put("db/pw", b"hunter2");
    let before = std::fs::read(&env.vault).expect("vault");

    // Leave less room than one more generation (vault and its backup) needs.
    let filler = disk.dir.join("filler");
    let room = disk.free_bytes().saturating_sub(16 * 1024);
    std::fs::write(&filler, vec![0u8; usize::try_from(room).expect("fits")]).expect("filler");
    let big: Vec<u8> = (0..48 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let out = env.cli_with_stdin(&["secret", "put", "big"], Some(&big));
    assert_fails(&out, 6, "disk holding the vault is full");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the vault is unchanged"),
        "{out:?}"
    );

    // Still served, unchanged, and no temp file left taking the space.
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "hunter2");
    assert_fails(&env.cli(&["secret", "get", "big"]), 4, "does not exist");
    assert_eq!(std::fs::read(&env.vault).expect("vault"), before);
    let leftovers: Vec<String> = std::fs::read_dir(&disk.dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    env.ok(&["lock"]);
    env.unlock();
    assert_eq!(env.ok(&["secret", "get", "db/pw"]), "hunter2");

    // With room again, the same write goes through.
    std::fs::remove_file(&filler).expect("rm filler");
    env.put("big", &big);
    assert_eq!(env.ok(&["secret", "get", "big"]).len(), big.len());
    drop(daemon);
    drop(disk);
}

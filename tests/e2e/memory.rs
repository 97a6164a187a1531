//! What stays in keyholderd's memory after a lock: a root scan of every
//! readable mapping (/proc/PID/maps and /proc/PID/mem) must find no copy of
//! a secret value that was stored and read, of the PIN, or of a private key
//! that was in the vault and signed.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use crate::util::Env;

/// Occurrences of each needle in the readable memory of `pid`.
fn scan(pid: i32, needles: &[&[u8]]) -> Vec<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem (needs root)");
    let finders: Vec<_> = needles.iter().map(memchr::memmem::Finder::new).collect();
    let mut counts = vec![0; needles.len()];
    let mut buf = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let Ok(len) = usize::try_from(end - start) else {
            continue;
        };
        buf.resize(len, 0);
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        for (count, finder) in counts.iter_mut().zip(&finders) {
            *count += finder.find_iter(&buf).count();
        }
    }
    counts
}

fn canary(n: u8) -> Vec<u8> {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("random");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("canary{n}-{hex}").into_bytes()
}

#[test]
fn after_lock_no_secret_pin_or_private_key_is_left_in_memory() {
    if rustix::process::getuid().as_raw() != 0 {
        eprintln!("skipped: reading another process's memory needs root");
        return;
    }
    let env = Env::new();
    // A PIN no other byte sequence in the process is likely to equal.
    let pin = String::from_utf8(canary(0)).expect("ascii");
    env.add_token_with_pin("canary", &pin);
    let daemon = env.start_daemon(&[]);
    let pin_file = env.file("long-pin", &format!("{pin}\n"));
    let pin_arg = pin_file.to_str().expect("utf8");
    env.ok(&["init", "--token-label", "canary", "--pin-file", pin_arg]);
    env.ok(&["unlock", "--pin-file", pin_arg]);

    let values: Vec<Vec<u8>> = (1..=3).map(canary).collect();
    for (i, v) in values.iter().enumerate() {
        env.put(&format!("canary/{i}"), v);
        for _ in 0..3 {
            let got = env.cli(&["secret", "get", &format!("canary/{i}")]);
            assert_eq!(&got.stdout, v);
        }
    }
    // A private key that was in the vault, used to sign.
    let key = env.path().join("ed.pem");
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let der = std::process::Command::new("openssl")
        .args(["pkey", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .expect("openssl")
        .stdout;
    let seed = der[der.len() - 32..].to_vec();
    env.ok(&["key", "import", "ed", "--file", key.to_str().expect("utf8")]);
    let data = env.file("data", "sign me");
    env.ok(&["sign", "--key", "ed", "--in", data.to_str().expect("utf8")]);

    let mut needles: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    needles.push(pin.as_bytes());
    needles.push(&seed);
    let before = scan(daemon.pid(), &needles);
    assert!(
        before[..3].iter().all(|&n| n > 0),
        "the scan must see the values while unlocked: {before:?}"
    );

    env.ok(&["lock"]);
    // Connections of the last CLI calls close asynchronously; give the
    // daemon a moment to drop them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let counts = scan(daemon.pid(), &needles);
        if counts.iter().all(|&n| n == 0) || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("copies while unlocked {before:?}, after lock {after:?} (3 values, PIN, key seed)");
    assert_eq!(
        after,
        vec![0; needles.len()],
        "copies left after lock: values 1-3, PIN, key"
    );
}

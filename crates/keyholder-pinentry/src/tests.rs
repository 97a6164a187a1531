//! Against scripted stand-ins for pinentry: `/bin/sh` scripts that speak
//! (or break) the Assuan protocol. Each script gets the path of a log file
//! it writes every received line to, and the PIN to answer with.

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use super::*;

/// Answers every command with OK and GETPIN with the PIN ($2), after a
/// status line and a comment; logs what it receives to $1.
const GOOD: &str = r#"
log="$1"; pin="$2"
echo "OK Pleased to meet you"
while IFS= read -r line; do
  printf '%s\n' "$line" >> "$log"
  case "$line" in
    GETPIN) printf 'S PIN_REPEATED\n# a comment\nD %s\nOK\n' "$pin";;
    BYE) echo "OK closing connection"; exit 0;;
    *) echo OK;;
  esac
done
"#;

struct StandIn {
    dir: tempfile::TempDir,
}

impl StandIn {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

fn stand_in(script: &str, pin: &str) -> (StandIn, Pinentry) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pinentry.sh");
    std::fs::write(&path, script).unwrap();
    let p = Pinentry::new("/bin/sh")
        .arg(&path)
        .arg(dir.path().join("log"))
        .arg(pin)
        .display(None)
        .step_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    (StandIn { dir }, p)
}

fn request() -> PinRequest {
    PinRequest {
        title: Some("Keyholder".into()),
        description: Some("line one\nline two 100%\r".into()),
        prompt: Some("PIN:".into()),
        error: None,
    }
}

#[test]
fn a_pin_is_read_and_percent_decoded() {
    let (s, p) = stand_in(GOOD, "12%2534%0A");
    let p = p.tty(Some("/dev/pts/9".into()));
    let pin = p.get_pin(&request()).unwrap();
    assert_eq!(pin.expose_secret(), "12%34\n");
    let log = s.log();
    assert!(log.contains("OPTION ttyname=/dev/pts/9\n"), "{log}");
    assert!(log.contains("SETTIMEOUT 3\n"), "{log}");
    assert!(log.contains("SETTITLE Keyholder\n"), "{log}");
    assert!(
        log.contains("SETDESC line one%0Aline two 100%25%0D\n"),
        "{log}"
    );
    assert!(log.contains("SETPROMPT PIN:\n"), "{log}");
    assert!(!log.contains("SETERROR"), "{log}");
    assert!(log.ends_with("GETPIN\nBYE\n"), "{log}");
}

#[test]
fn a_retry_shows_the_error() {
    let (s, p) = stand_in(GOOD, "1234");
    let mut r = request();
    r.error = Some("Wrong PIN (2 tries left)".into());
    p.get_pin(&r).unwrap();
    assert!(s.log().contains("SETERROR Wrong PIN (2 tries left)\n"));
}

#[test]
fn no_tty_sends_no_terminal_options() {
    let (s, p) = stand_in(GOOD, "1234");
    p.display(Some(":7".into())).get_pin(&request()).unwrap();
    let log = s.log();
    assert!(!log.contains("ttyname"), "{log}");
    assert!(!log.contains("ttytype"), "{log}");
    assert!(log.contains("OPTION display=:7\n"), "{log}");
}

#[test]
fn cancel_is_its_own_error() {
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) echo "ERR 83886179 Operation cancelled <Pinentry>";;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Cancelled)));
}

#[test]
fn an_unknown_option_is_not_fatal_but_other_refusals_are() {
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    OPTION*) echo "ERR 83886254 Unknown option";;
    SETPROMPT*) echo "ERR 536871187 Unknown IPC command";;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    let e = p.tty(Some("/dev/pts/1".into())).get_pin(&request());
    match e {
        Err(Error::Refused { command, code, .. }) => {
            assert_eq!(command, "SETPROMPT");
            assert_eq!(code, 536871187);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn inquire_is_answered_with_can() {
    let script = r#"
log="$1"
echo OK
while IFS= read -r line; do
  printf '%s\n' "$line" >> "$log"
  case "$line" in
    GETPIN) echo "INQUIRE PINENTRY_LAUNCHED 1234";;
    CAN) printf 'D 4321\nOK\n';;
    *) echo OK;;
  esac
done
"#;
    let (s, p) = stand_in(script, "");
    let pin = p.get_pin(&request()).unwrap();
    assert_eq!(pin.expose_secret(), "4321");
    assert!(s.log().contains("GETPIN\nCAN\n"));
}

#[test]
fn an_empty_pin_is_refused_before_it_reaches_the_token() {
    let script = "echo OK\nwhile IFS= read -r line; do echo OK; done\n";
    let (_s, p) = stand_in(script, "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Empty)));
}

#[test]
fn a_long_pin_is_refused() {
    let long = "7".repeat(MAX_PIN + 1);
    let (_s, p) = stand_in(GOOD, &long);
    assert!(matches!(p.get_pin(&request()), Err(Error::PinTooLong)));
}

#[test]
fn no_greeting_times_out_and_the_program_is_killed() {
    let (_s, p) = stand_in("exec sleep 30\n", "");
    let started = Instant::now();
    let e = p
        .step_timeout(Duration::from_millis(500))
        .get_pin(&request());
    assert!(matches!(e, Err(Error::Timeout(_))), "{e:?}");
    // 0.5 s for the greeting, EXIT_WAIT before the kill.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_pin_never_entered_times_out() {
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) exec sleep 30;;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    let started = Instant::now();
    let e = p.timeout(Duration::from_millis(300)).get_pin(&request());
    assert!(matches!(e, Err(Error::Timeout(_))), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn pinentrys_own_timeout_is_a_timeout() {
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) echo "ERR 83886142 Timeout <Pinentry>";;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Timeout(_))));
}

#[test]
fn a_program_that_ignores_bye_is_killed() {
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) printf 'D 1234\nOK\n';;
    BYE) exec sleep 30;;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    let started = Instant::now();
    let pin = p.get_pin(&request()).unwrap();
    assert_eq!(pin.expose_secret(), "1234");
    let took = started.elapsed();
    assert!(
        took >= EXIT_WAIT && took < EXIT_WAIT + Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn a_huge_line_is_refused() {
    let script = "head -c 100000 /dev/zero | tr '\\0' A; echo\n";
    let (_s, p) = stand_in(script, "");
    assert!(matches!(p.get_pin(&request()), Err(Error::LineTooLong)));
}

#[test]
fn garbage_is_refused() {
    let (_s, p) = stand_in("echo 'HELLO I AM NOT ASSUAN'; sleep 1\n", "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Protocol(_))));
    let (_s, p) = stand_in("echo 'ERR nonsense'; sleep 1\n", "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Protocol(_))));
    // A status flood never ends an answer.
    let (_s, p) = stand_in("while :; do echo 'S PROGRESS'; done\n", "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Protocol(_))));
    let bad_escape = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) printf 'D 12%%G4\nOK\n';;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(bad_escape, "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Protocol(_))));
}

#[test]
fn a_program_that_closes_early_is_an_error() {
    let (_s, p) = stand_in("exit 0\n", "");
    assert!(matches!(p.get_pin(&request()), Err(Error::Closed(_))));
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) exit 1;;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    assert!(matches!(
        p.get_pin(&request()),
        Err(Error::Closed("GETPIN"))
    ));
}

#[test]
fn a_missing_program_is_named() {
    let e = Pinentry::new("/nonexistent/pinentry")
        .get_pin(&request())
        .unwrap_err();
    assert!(matches!(e, Error::Spawn { .. }));
    assert!(e.to_string().contains("/nonexistent/pinentry"), "{e}");
}

#[test]
fn requests_are_escaped_and_cut_to_one_line() {
    assert_eq!(encode_request("BYE", None), b"BYE\n");
    assert_eq!(
        encode_request("SETDESC", Some("a\\b\\")),
        b"SETDESC a\\b%5C\n"
    );
    assert_eq!(encode_request("SETDESC", Some("\t%")), b"SETDESC %09%25\n");
    let long = "é".repeat(2000);
    let line = encode_request("SETDESC", Some(&long));
    assert!(line.len() <= MAX_REQUEST);
    assert!(std::str::from_utf8(&line).is_ok());
    assert_eq!(line.last(), Some(&b'\n'));
}

#[test]
fn errors_never_show_the_pin() {
    let (_s, p) = stand_in(GOOD, "secret-pin-1234");
    let pin = p.get_pin(&request()).unwrap();
    assert!(!format!("{pin:?}").contains("secret-pin"));
    let long = format!("secret-pin-{}", "9".repeat(MAX_PIN));
    let (_s, p) = stand_in(GOOD, &long);
    let e = p.get_pin(&request()).unwrap_err();
    assert!(!format!("{e} {e:?}").contains("secret-pin"));
}

#[test]
fn an_abort_ends_the_dialog_at_once() {
    let script = r#"
echo OK
while IFS= read -r line; do
  case "$line" in
    GETPIN) exec sleep 30;;
    *) echo OK;;
  esac
done
"#;
    let (_s, p) = stand_in(script, "");
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let p = p.timeout(Duration::from_secs(30)).abort_flag(flag.clone());
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let started = Instant::now();
    let e = p.get_pin(&request());
    setter.join().unwrap();
    assert!(matches!(e, Err(Error::Aborted)), "{e:?}");
    // The flag, a tenth of a second, EXIT_WAIT before the kill.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

//! The agent protocol's messages (draft-miller-ssh-agent), decoded by hand.
//!
//! Keyholder answers only a handful of requests, so the decoder is small and
//! strict: every length is checked against the bytes present before anything
//! is allocated, trailing bytes are an error, and nothing here can panic on
//! any input (the fuzz target in `fuzz/` holds it to that).

use zeroize::Zeroizing;

/// Largest message accepted; a longer length prefix closes the connection.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Request message numbers.
pub mod code {
    #![allow(missing_docs)]
    pub const REQUEST_IDENTITIES: u8 = 11;
    pub const SIGN_REQUEST: u8 = 13;
    pub const ADD_IDENTITY: u8 = 17;
    pub const REMOVE_IDENTITY: u8 = 18;
    pub const REMOVE_ALL_IDENTITIES: u8 = 19;
    pub const ADD_SMARTCARD_KEY: u8 = 20;
    pub const REMOVE_SMARTCARD_KEY: u8 = 21;
    pub const LOCK: u8 = 22;
    pub const UNLOCK: u8 = 23;
    pub const ADD_ID_CONSTRAINED: u8 = 25;
    pub const ADD_SMARTCARD_KEY_CONSTRAINED: u8 = 26;
    pub const EXTENSION: u8 = 27;
    pub const FAILURE: u8 = 5;
    pub const SUCCESS: u8 = 6;
    pub const IDENTITIES_ANSWER: u8 = 12;
    pub const SIGN_RESPONSE: u8 = 14;
}

/// A decoded request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// List keys.
    RequestIdentities,
    /// Sign `data` with the key whose blob is `key_blob`.
    Sign {
        /// Public key (or certificate) blob.
        key_blob: Vec<u8>,
        /// What to sign.
        data: Vec<u8>,
        /// `0x02` rsa-sha2-256, `0x04` rsa-sha2-512.
        flags: u32,
    },
    /// Lock the agent with a passphrase.
    Lock(Zeroizing<String>),
    /// Unlock the agent with a passphrase.
    Unlock(Zeroizing<String>),
    /// An extension request.
    Extension {
        /// Extension name, e.g. `session-bind@openssh.com`.
        name: String,
        /// Its payload.
        contents: Vec<u8>,
    },
    /// A request Keyholder refuses by policy (adding or removing keys,
    /// smartcard providers); carries the message number for logging.
    Refused(u8),
    /// A message number Keyholder does not know.
    Unknown(u8),
}

/// Why a message did not decode.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The message is empty (no type byte).
    Empty,
    /// A field runs past the end of the message.
    Truncated,
    /// Bytes are left after the last field.
    TrailingBytes,
    /// A string field that must be UTF-8 is not.
    NotUtf8,
}

/// Reads SSH wire fields from a byte slice, never past its end.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Reads from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*head))
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (b, rest) = self.0.split_first().ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*b)
    }

    /// A length-prefixed byte string.
    pub fn string(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(s)
    }

    /// A length-prefixed UTF-8 string.
    pub fn utf8(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.string()?).map_err(|_| DecodeError::NotUtf8)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Decodes one message (type byte and payload, without the length prefix).
pub fn decode(message: &[u8]) -> Result<Request, DecodeError> {
    let (&kind, payload) = message.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader::new(payload);
    let request = match kind {
        code::REQUEST_IDENTITIES => Request::RequestIdentities,
        code::SIGN_REQUEST => {
            let key_blob = r.string()?.to_vec();
            let data = r.string()?.to_vec();
            let flags = r.u32()?;
            Request::Sign {
                key_blob,
                data,
                flags,
            }
        }
        code::LOCK => Request::Lock(Zeroizing::new(r.utf8()?.to_owned())),
        code::UNLOCK => Request::Unlock(Zeroizing::new(r.utf8()?.to_owned())),
        code::EXTENSION => {
            let name = r.utf8()?.to_owned();
            let contents = r.0.to_vec();
            r.0 = &[];
            Request::Extension { name, contents }
        }
        code::ADD_IDENTITY
        | code::ADD_ID_CONSTRAINED
        | code::REMOVE_IDENTITY
        | code::REMOVE_ALL_IDENTITIES
        | code::ADD_SMARTCARD_KEY
        | code::ADD_SMARTCARD_KEY_CONSTRAINED
        | code::REMOVE_SMARTCARD_KEY => {
            // Refused without parsing: their contents are never used.
            return Ok(Request::Refused(kind));
        }
        other => return Ok(Request::Unknown(other)),
    };
    r.finish()?;
    Ok(request)
}

/// A `session-bind@openssh.com` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionBind {
    /// The server's host key blob.
    pub host_key: Vec<u8>,
    /// The SSH session identifier (exchange hash).
    pub session_id: Vec<u8>,
    /// The server's signature over `session_id`.
    pub signature: Vec<u8>,
    /// Whether this binding is for a forwarded agent.
    pub forwarding: bool,
}

/// Parses the contents of a `session-bind@openssh.com` extension.
pub fn decode_session_bind(contents: &[u8]) -> Result<SessionBind, DecodeError> {
    let mut r = Reader::new(contents);
    let host_key = r.string()?.to_vec();
    let session_id = r.string()?.to_vec();
    let signature = r.string()?.to_vec();
    let forwarding = r.u8()? != 0;
    r.finish()?;
    Ok(SessionBind {
        host_key,
        session_id,
        signature,
        forwarding,
    })
}

/// A reply.
#[derive(Debug)]
pub enum Response {
    /// `SSH_AGENT_FAILURE`.
    Failure,
    /// `SSH_AGENT_SUCCESS`.
    Success,
    /// Key blobs with comments.
    Identities(Vec<(Vec<u8>, String)>),
    /// A signature blob.
    Signature(Vec<u8>),
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Encodes a reply with its length prefix.
pub fn encode(response: &Response) -> Vec<u8> {
    let mut body = Vec::new();
    match response {
        Response::Failure => body.push(code::FAILURE),
        Response::Success => body.push(code::SUCCESS),
        Response::Identities(ids) => {
            body.push(code::IDENTITIES_ANSWER);
            body.extend_from_slice(&(ids.len() as u32).to_be_bytes());
            for (blob, comment) in ids {
                put_string(&mut body, blob);
                put_string(&mut body, comment.as_bytes());
            }
        }
        Response::Signature(sig) => {
            body.push(code::SIGN_RESPONSE);
            put_string(&mut body, sig);
        }
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_request(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
        let mut m = vec![code::SIGN_REQUEST];
        put_string(&mut m, blob);
        put_string(&mut m, data);
        m.extend_from_slice(&flags.to_be_bytes());
        m
    }

    #[test]
    fn sign_request_round_trip_and_strictness() {
        let m = sign_request(b"blob", b"data", 2);
        assert_eq!(
            decode(&m).unwrap(),
            Request::Sign {
                key_blob: b"blob".to_vec(),
                data: b"data".to_vec(),
                flags: 2
            }
        );
        let mut trailing = m.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError::TrailingBytes));
        for cut in 1..m.len() {
            assert_eq!(decode(&m[..cut]), Err(DecodeError::Truncated), "cut {cut}");
        }
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode(&[code::REQUEST_IDENTITIES, 0]),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(decode(&[200]).unwrap(), Request::Unknown(200));
        assert_eq!(
            decode(&[code::ADD_SMARTCARD_KEY, 1, 2]).unwrap(),
            Request::Refused(code::ADD_SMARTCARD_KEY)
        );
    }

    #[test]
    fn huge_inner_lengths_do_not_allocate_or_panic() {
        let mut m = vec![code::SIGN_REQUEST];
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&m), Err(DecodeError::Truncated));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let mut m: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            if let Some(first) = m.first_mut() {
                *first = [11, 13, 22, 23, 27, 17][rng.gen_range(0..6)];
            }
            let _ = decode(&m);
            let _ = decode_session_bind(&m);
        }
    }

    /// Replays the fuzz corpus in fuzz/corpus/agent_decode.
    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/agent_decode");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus dir").flatten() {
            let bytes = std::fs::read(entry.path()).expect("corpus file");
            crate::fuzz_one(&bytes);
            n += 1;
        }
        assert!(n >= 10, "corpus too small: {n}");
    }
}

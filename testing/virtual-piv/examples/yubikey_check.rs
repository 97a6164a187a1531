//! Checks the virtual card through the `yubikey` crate, as Keyholder's native PIV backend
//! would use it: open, version, serial, PIN, management key, key generation in a retired
//! slot, ECDSA signature and ECDH (`decrypt_data`), each result checked with `p256`.
//!
//! Run with the environment of DIR/token.env (PCSCLITE_CSOCK_NAME):
//! `PCSCLITE_CSOCK_NAME=DIR/run/pcscd/pcscd.comm cargo run --example yubikey_check`

use std::error::Error;

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::{PublicKey, SecretKey};
use yubikey::piv::{self, AlgorithmId, RetiredSlotId, SlotId};
use yubikey::{MgmKey, PinPolicy, TouchPolicy, YubiKey};

fn main() -> Result<(), Box<dyn Error>> {
    let mut yk = YubiKey::open()?;
    println!("reader: {}", yk.name());
    println!("version: {}", yk.version());
    println!("serial: {}", yk.serial());
    println!("PIN retries: {}", yk.get_pin_retries()?);

    match yk.verify_pin(b"654321") {
        Ok(()) => return Err("a wrong PIN was accepted".into()),
        Err(e) => println!("wrong PIN: {e} ({e:?})"),
    }
    println!("PIN retries after a wrong PIN: {}", yk.get_pin_retries()?);
    yk.verify_pin(b"123456")?;
    println!("PIN retries after the right PIN: {}", yk.get_pin_retries()?);

    yk.authenticate(MgmKey::default())?;
    let slot = SlotId::Retired(RetiredSlotId::R2);
    let spki = piv::generate(
        &mut yk,
        slot,
        AlgorithmId::EccP256,
        PinPolicy::Default,
        TouchPolicy::Default,
    )?;
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or("public key is not a whole number of bytes")?;
    let card_key = PublicKey::from_sec1_bytes(point)?;
    println!("generated P-256 key in {slot:?}");

    match piv::metadata(&mut yk, slot) {
        Ok(m) => {
            let public = m.public.ok_or("metadata without the public key")?;
            if public.subject_public_key.as_bytes() != Some(point) {
                return Err("metadata gives another public key".into());
            }
            println!(
                "metadata: {:?}, policy {:?}, origin {:?}, same public key",
                m.algorithm, m.policy, m.origin
            );
        }
        Err(e) => println!("metadata: {e} (the card runs without --metadata)"),
    }

    let digest = [0x42u8; 32];
    yk.verify_pin(b"123456")?;
    let sig = piv::sign_data(&mut yk, &digest, AlgorithmId::EccP256, slot)?;
    let sig = Signature::from_der(&sig)?;
    VerifyingKey::from(&card_key).verify_prehash(&digest, &sig)?;
    println!("ECDSA signature verified");

    let peer = SecretKey::from_slice(&[7u8; 32])?;
    let peer_point = peer.public_key().to_sec1_bytes();
    yk.verify_pin(b"123456")?;
    let shared = piv::decrypt_data(&mut yk, &peer_point, AlgorithmId::EccP256, slot)?;
    let expected = p256::ecdh::diffie_hellman(peer.to_nonzero_scalar(), card_key.as_affine());
    if shared.as_slice() != expected.raw_secret_bytes().as_slice() {
        return Err("ECDH secret differs".into());
    }
    println!("ECDH secret matches");
    Ok(())
}

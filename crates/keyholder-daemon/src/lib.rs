//! The running Keyholder agent. The crate's map:
//!
//! - [`core`]: the session (locked/unlocked, unlock, lock, write, tick) over
//!   a token [`keyholder_token::Backend`] and a vault [`keyholder_vault::Storage`].
//! - [`gate`]: the one gate every operation passes (gRPC and ssh-agent),
//!   and who is calling; [`access`]: what a request asks for, decided by
//!   [`policy`] and [`grants`] (through [`trust`]) and recorded by audit.
//! - [`audit`]: the audit log, hash-chained, anchored in the vault,
//!   durable before a result is released.
//! - [`signers`]: every key that signs, the keyring that caches them, and
//!   where slow signatures run.
//! - [`status`]: what the session shows of itself (domain types).
//! - [`rollback`]: the vault generation record on the token; `damage`: a
//!   damaged vault file and the backup that restores it.
//! - [`names`]: names from requests, checked once.
//! - [`ondemand`]: unlock on demand, one pinentry prompt for a locked session.
//! - [`services`]: the gRPC services, with the proto boundary in
//!   [`services::convert`].
//! - [`agent`]: the ssh-agent backend.
//! - [`serve`]: sockets, listeners and the tick task; [`config`]: settings;
//!   [`open`]: a daemon from its settings, with typed start errors.
//!
//! [`run`] takes an already bound listener and a shutdown future, so tests
//! and the `keyholderd` binary start it the same way. This crate holds no CLI
//! code; the binary parses flags and calls in here.

// One call has no safe wrapper: setting the stock thread's scheduling
// policy (keypool.rs).
#![deny(unsafe_code)]

pub mod access;
pub mod agent;
pub mod audit;
pub mod config;
pub mod core;
mod damage;
pub mod error;
pub mod escape;
pub mod gate;
pub mod grants;
mod keypool;
pub mod listen;
pub mod metrics;
pub mod names;
pub mod ondemand;
pub mod open;
mod oversize;
pub mod policy;
pub mod remote;
pub mod rollback;
pub mod serve;
pub mod services;
pub mod signers;
pub mod status;
pub mod trust;

pub use crate::core::Core;
pub use config::Config;
pub use listen::raise_open_file_limit;
pub use open::{StartError, open};
pub use serve::{bind_socket, harden_process, run};

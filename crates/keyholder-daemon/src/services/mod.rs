//! One module per gRPC service.

pub mod admin;
pub mod credentials;
pub mod secrets;
pub mod session;
pub mod signer;

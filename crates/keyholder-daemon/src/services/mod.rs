//! One module per gRPC service.

pub mod admin;
pub mod secrets;
pub mod session;

//! `keyholder.v1.Audit`: reading the audit log.

use std::pin::Pin;
use std::sync::Arc;

use keyholder_proto::v1;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::core::Core;

/// The Audit service.
pub struct AuditService(pub Arc<Core>);

/// A stream of log lines.
pub type Lines = Pin<Box<dyn Stream<Item = Result<v1::AuditLine, Status>> + Send>>;

#[tonic::async_trait]
impl v1::audit_server::Audit for AuditService {
    type TailStream = Lines;

    async fn tail(
        &self,
        _request: Request<v1::AuditTailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        Err(Status::unimplemented("the audit log is not readable yet"))
    }
}

//! `keyholder.v1.Session`: Unlock, Lock, Status, WatchStatus.

use std::pin::Pin;
use std::sync::Arc;

use keyholder_proto::v1;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::Unlock;
use super::{admit, enter};
use crate::access::Access;
use crate::core::{Core, LockReason};
use crate::gate::Needs;

/// The Session service.
pub struct SessionService(pub Arc<Core>);

#[tonic::async_trait]
impl v1::session_server::Session for SessionService {
    async fn unlock(
        &self,
        request: Request<v1::UnlockRequest>,
    ) -> Result<Response<v1::UnlockResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Session.Unlock",
            Needs::Nothing,
            Access::Unlock,
        )
        .await?;
        let req = Unlock::from(request.into_inner());
        let status = self
            .0
            .unlock(
                req.pin,
                req.allow_final_try,
                req.ttl,
                req.idle,
                req.accept_older,
            )
            .await
            .map(|status| {
                let response = v1::UnlockResponse {
                    status: Some((&status).into()),
                };
                (response, Vec::new())
            });
        Ok(Response::new(ticket.finish(status).await?))
    }

    async fn lock(
        &self,
        request: Request<v1::LockRequest>,
    ) -> Result<Response<v1::LockResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Session.Lock",
            Needs::Nothing,
            Access::Session,
        )
        .await?;
        let was_unlocked = self.0.lock(LockReason::Request);
        let response = v1::LockResponse {
            status: Some((&self.0.status()).into()),
        };
        let details = vec![("was_unlocked", was_unlocked.to_string())];
        Ok(Response::new(ticket.finish(Ok((response, details))).await?))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        enter(&self.0, &request, "Session.Status", Needs::Nothing).await?;
        Ok(Response::new((&self.0.status()).into()))
    }

    type WatchStatusStream = Pin<Box<dyn Stream<Item = Result<v1::StatusResponse, Status>> + Send>>;

    async fn watch_status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        enter(&self.0, &request, "Session.WatchStatus", Needs::Nothing).await?;
        let mut updates = self.0.watch_status();
        let mut shutdown = self.0.shutdown_signal();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Forward changes until the client goes away or the daemon shuts
        // down; ending the stream on shutdown keeps graceful shutdown from
        // waiting on watchers forever.
        tokio::spawn(async move {
            let mut next = Some(v1::StatusResponse::from(&*updates.borrow_and_update()));
            while let Some(status) = next.take() {
                if tx.send(Ok(status)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_ok() {
                            next = Some(v1::StatusResponse::from(&*updates.borrow_and_update()));
                        }
                    }
                    _ = shutdown.wait_for(|stopping| *stopping) => {}
                    () = tx.closed() => {}
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

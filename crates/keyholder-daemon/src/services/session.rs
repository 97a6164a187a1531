//! `keyholder.v1.Session`: Unlock, Lock, Status, WatchStatus.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use keyholder_proto::v1;
use secrecy::SecretString;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::core::{Core, LockReason};
use crate::gate::Needs;

/// The Session service.
pub struct SessionService(pub Arc<Core>);

fn seconds(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

#[tonic::async_trait]
impl v1::session_server::Session for SessionService {
    async fn unlock(
        &self,
        request: Request<v1::UnlockRequest>,
    ) -> Result<Response<v1::UnlockResponse>, Status> {
        self.0.enter(&request, "Session.Unlock", Needs::Nothing)?;
        let mut req = request.into_inner();
        let pin = SecretString::from(std::mem::take(&mut req.pin));
        let status = self
            .0
            .unlock(
                pin,
                req.allow_final_pin_try,
                seconds(req.ttl_seconds),
                seconds(req.idle_timeout_seconds),
                req.accept_older_vault,
            )
            .await?;
        Ok(Response::new(v1::UnlockResponse {
            status: Some(status),
        }))
    }

    async fn lock(
        &self,
        request: Request<v1::LockRequest>,
    ) -> Result<Response<v1::LockResponse>, Status> {
        self.0.enter(&request, "Session.Lock", Needs::Nothing)?;
        self.0.lock(LockReason::Request);
        Ok(Response::new(v1::LockResponse {
            status: Some(self.0.status()),
        }))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.0.enter(&request, "Session.Status", Needs::Nothing)?;
        Ok(Response::new(self.0.status()))
    }

    type WatchStatusStream = Pin<Box<dyn Stream<Item = Result<v1::StatusResponse, Status>> + Send>>;

    async fn watch_status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        self.0
            .enter(&request, "Session.WatchStatus", Needs::Nothing)?;
        let mut updates = self.0.watch_status();
        let mut shutdown = self.0.shutdown_signal();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Forward changes until the client goes away or the daemon shuts
        // down; ending the stream on shutdown keeps graceful shutdown from
        // waiting on watchers forever.
        tokio::spawn(async move {
            let mut next = Some(updates.borrow_and_update().clone());
            while let Some(status) = next.take() {
                if tx.send(Ok(status)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_ok() {
                            next = Some(updates.borrow_and_update().clone());
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

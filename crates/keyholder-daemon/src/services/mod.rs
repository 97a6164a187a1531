//! The gRPC services: each adapts requests through [`convert`] to the
//! session ([`crate::core::Core`]) and the signers, one file per service
//! (Admin, split by noun, in a folder of its own).

pub mod admin;
pub mod audit;
pub mod convert;
pub mod credentials;
pub mod secrets;
pub mod session;
pub mod signer;
pub mod trust;

use tonic::Request;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::{Caller, Channel, Needs};

/// Passes `request` through the gate as operation `op`; with
/// `unlock_on_demand`, an operation that needs the open vault may first show
/// a PIN prompt ([`Core::enter_or_prompt`]). The future holds only `core`,
/// not the request.
pub fn enter<'c, T>(
    core: &'c Core,
    request: &Request<T>,
    op: &'static str,
    needs: Needs,
) -> impl Future<Output = Result<Caller>> + use<'c, T> {
    let caller = caller(core, request, op);
    async move {
        let caller = caller?;
        // A PIN prompt is never raised for a request from another machine.
        let may_prompt = caller.channel != Channel::Tcp;
        core.enter_or_prompt(&caller, op, needs, may_prompt).await?;
        Ok(caller)
    }
}

/// [`enter`], then [`Core::authorize`] for `access`: the ticket the
/// handler finishes with its result.
pub async fn admit<T>(
    core: &std::sync::Arc<Core>,
    request: &Request<T>,
    op: &'static str,
    needs: Needs,
    access: crate::access::Access,
) -> Result<crate::access::Ticket> {
    let caller = enter(core, request, op, needs).await?;
    core.authorize(&caller, op, access).await
}

/// Who sent `request`, from the Unix socket's peer credentials.
fn caller<T>(core: &Core, request: &Request<T>, op: &'static str) -> Result<Caller> {
    if let Some(info) = request.extensions().get::<crate::remote::TcpConnectInfo>() {
        if request.metadata().contains_key(crate::grants::METADATA_KEY) {
            tracing::warn!(op, peer = %info.peer.addr, "grant refused over TCP");
            return Err(Error::Unauthenticated(
                "grants are not accepted over TCP: the client certificate is the credential".into(),
            ));
        }
        return Ok(Caller {
            uid: u32::MAX,
            channel: Channel::Tcp,
            remote: Some(info.peer.clone()),
            ..Caller::default()
        });
    }
    let info = request.extensions().get::<crate::listen::GrpcConnectInfo>();
    let cred = info.and_then(|info| info.uds.peer_cred);
    let Some(cred) = cred else {
        // Every listener Keyholder runs is a Unix socket; a request
        // without peer credentials did not come through one.
        tracing::warn!(op, "request without peer credentials refused");
        return Err(Error::PermissionDenied(
            "peer credentials unavailable".into(),
        ));
    };
    let mut caller = match info {
        Some(info) => info
            .caller
            .get_or_init(|| Caller::from_peer(cred.uid(), cred.pid(), Channel::Grpc))
            .clone(),
        None => Caller::from_peer(cred.uid(), cred.pid(), Channel::Grpc),
    };
    caller.grant = crate::grants::presented(&core.trust().grants, request)?;
    Ok(caller)
}

//! `keyholder.v1.Admin`: Init, ListTokens.

use std::sync::Arc;

use keyholder_proto::v1;
use keyholder_token::Selector;
use secrecy::SecretString;
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::error::{Error, Result};
use crate::gate::Needs;

/// The Admin service.
pub struct AdminService(pub Arc<Core>);

fn selector(s: Option<v1::TokenSelector>) -> Result<Selector> {
    let s = s.unwrap_or_default();
    let set = [&s.label, &s.serial, &s.uri]
        .iter()
        .filter(|v| !v.is_empty())
        .count();
    if set > 1 {
        return Err(Error::InvalidArgument {
            field: "token",
            reason: "give one of label, serial or uri".into(),
        });
    }
    Ok(if !s.uri.is_empty() {
        Selector::from_uri(&s.uri).map_err(|e| Error::InvalidArgument {
            field: "token.uri",
            reason: e.to_string(),
        })?
    } else if !s.serial.is_empty() {
        Selector::serial(s.serial)
    } else if !s.label.is_empty() {
        Selector::label(s.label)
    } else {
        Selector::any()
    })
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn init(
        &self,
        request: Request<v1::InitRequest>,
    ) -> Result<Response<v1::InitResponse>, Status> {
        self.0.enter(&request, "Admin.Init", Needs::Nothing)?;
        let mut req = request.into_inner();
        let selector = selector(req.token.take())?;
        let pin = SecretString::from(std::mem::take(&mut req.pin));
        let recovery: Vec<String> = Some(req.recovery_recipient)
            .filter(|r| !r.is_empty())
            .into_iter()
            .collect();
        let response = self
            .0
            .init(selector, pin, req.allow_final_pin_try, recovery)
            .await?;
        Ok(Response::new(response))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        self.0.enter(&request, "Admin.ListTokens", Needs::Nothing)?;
        let tokens = self.0.list_tokens()?;
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }
}

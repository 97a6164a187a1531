//! `keyholder.v1.Admin`: one service over four nouns, each in its own file:
//! tokens and vault creation ([`tokens`]), CAs ([`cas`]), cluster profiles
//! ([`clusters`]) and signing keys ([`keys`]). This file only routes.

mod cas;
pub(crate) mod cluster_pki;
pub(crate) mod clusters;
mod keys;
mod tokens;

use std::sync::Arc;

use keyholder_proto::v1;
use tonic::{Request, Response, Status};

use super::admit;
use crate::access::Access;
use crate::core::Core;
use crate::gate::Needs;

/// The Admin service.
pub struct AdminService(pub Arc<Core>);

/// The token a request names, for policy and audit (`token:LABEL`).
fn token_name(t: Option<&v1::TokenSelector>) -> String {
    t.map(|t| {
        [&t.label, &t.serial, &t.uri]
            .into_iter()
            .find(|v| !v.is_empty())
            .cloned()
            .unwrap_or_default()
    })
    .unwrap_or_default()
}

/// Enrolling and revoking tokens change who opens the vault: like policy,
/// never from another machine (and EnrolToken loads a module the caller
/// names, which only a local caller of keyholderd's own uid may).
fn not_over_tcp<T>(request: &Request<T>) -> crate::error::Result<()> {
    if request
        .extensions()
        .get::<crate::remote::TcpConnectInfo>()
        .is_some()
    {
        return Err(crate::error::Error::PermissionDenied(
            "tokens are enrolled and revoked through the local socket only".into(),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn init(
        &self,
        request: Request<v1::InitRequest>,
    ) -> Result<Response<v1::InitResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.Init",
            Needs::Nothing,
            Access::Unlock,
        )
        .await?;
        let result = tokens::init(&self.0, request.into_inner()).await;
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ListTokens",
            Needs::Nothing,
            Access::Session,
        )
        .await?;
        let result = tokens::list(&self.0);
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn enrol_token(
        &self,
        request: Request<v1::EnrolTokenRequest>,
    ) -> Result<Response<v1::EnrolTokenResponse>, Status> {
        let access = Access::Admin {
            object: format!("token:{}", token_name(request.get_ref().token.as_ref())),
        };
        let ticket = admit(
            &self.0,
            &request,
            "Admin.EnrolToken",
            Needs::Unlocked,
            access,
        )
        .await?;
        let result = not_over_tcp(&request).map(|()| request.into_inner());
        let result = match result {
            Ok(req) => tokens::enrol(&self.0, req).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn list_enrolled_tokens(
        &self,
        request: Request<v1::ListEnrolledTokensRequest>,
    ) -> Result<Response<v1::ListEnrolledTokensResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ListEnrolledTokens",
            Needs::Unlocked,
            Access::List {
                what: "tokens",
                prefix: String::new(),
            },
        )
        .await?;
        let result = tokens::list_enrolled(&self.0);
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.RevokeToken",
            Needs::Unlocked,
            Access::Admin {
                object: format!("token:{}", request.get_ref().token),
            },
        )
        .await?;
        let result = not_over_tcp(&request).map(|()| request.into_inner());
        let result = match result {
            Ok(req) => tokens::revoke(&self.0, req).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn create_ca(
        &self,
        request: Request<v1::CreateCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.CreateCa",
            Needs::Unlocked,
            Access::Admin {
                object: format!("ca:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = cas::create(&self.0, request.into_inner()).await;
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn import_ca(
        &self,
        request: Request<v1::ImportCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ImportCa",
            Needs::Unlocked,
            Access::Admin {
                object: format!("ca:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = cas::import(&self.0, request.into_inner()).await;
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn list_cas(
        &self,
        request: Request<v1::ListCasRequest>,
    ) -> Result<Response<v1::ListCasResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ListCas",
            Needs::Unlocked,
            Access::List {
                what: "cas",
                prefix: String::new(),
            },
        )
        .await?;
        let result = cas::list(&self.0);
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn get_ca(
        &self,
        request: Request<v1::GetCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.GetCa",
            Needs::Unlocked,
            Access::Describe {
                object: format!("ca:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = cas::get(&self.0, &request.into_inner().name);
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn add_cluster(
        &self,
        request: Request<v1::AddClusterRequest>,
    ) -> Result<Response<v1::ClusterInfo>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.AddCluster",
            Needs::Unlocked,
            Access::Admin {
                object: format!("cluster:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = clusters::add(&self.0, request.into_inner()).await;
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn list_clusters(
        &self,
        request: Request<v1::ListClustersRequest>,
    ) -> Result<Response<v1::ListClustersResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ListClusters",
            Needs::Unlocked,
            Access::List {
                what: "clusters",
                prefix: String::new(),
            },
        )
        .await?;
        let result = clusters::list(&self.0);
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn remove_cluster(
        &self,
        request: Request<v1::RemoveClusterRequest>,
    ) -> Result<Response<v1::RemoveClusterResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.RemoveCluster",
            Needs::Unlocked,
            Access::Admin {
                object: format!("cluster:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = clusters::remove(&self.0, request.into_inner().name)
            .await
            .map(|()| (v1::RemoveClusterResponse {}, Vec::new()));
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn generate_key(
        &self,
        request: Request<v1::GenerateKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.GenerateKey",
            Needs::Unlocked,
            Access::Admin {
                object: format!("key:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = keys::generate(&self.0, request.into_inner()).await;
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn import_key(
        &self,
        request: Request<v1::ImportKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ImportKey",
            Needs::Unlocked,
            Access::Admin {
                object: format!("key:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = keys::import(&self.0, request.into_inner()).await;
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }

    async fn delete_key(
        &self,
        request: Request<v1::DeleteKeyRequest>,
    ) -> Result<Response<v1::DeleteKeyResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.DeleteKey",
            Needs::Unlocked,
            Access::Admin {
                object: format!("key:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = keys::delete(&self.0, request.into_inner().name)
            .await
            .map(|()| (v1::DeleteKeyResponse {}, Vec::new()));
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn cluster_pki(
        &self,
        request: Request<v1::ClusterPkiRequest>,
    ) -> Result<Response<v1::ClusterPkiResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ClusterPki",
            Needs::Unlocked,
            Access::Admin {
                object: format!("cluster-pki:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = cluster_pki::pki(&self.0, request.into_inner()).await;
        Ok(Response::new(ticket.finish(result).await?))
    }

    async fn list_cluster_certs(
        &self,
        request: Request<v1::ListClusterCertsRequest>,
    ) -> Result<Response<v1::ListClusterCertsResponse>, Status> {
        let ticket = admit(
            &self.0,
            &request,
            "Admin.ListClusterCerts",
            Needs::Unlocked,
            Access::Describe {
                object: format!("cluster-pki:{}", request.get_ref().name),
            },
        )
        .await?;
        let result = cluster_pki::list(&self.0, &request.into_inner().name);
        Ok(Response::new(
            ticket.finish(result.map(|r| (r, Vec::new()))).await?,
        ))
    }
}

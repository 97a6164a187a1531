//! `keyholder.v1.Admin`: one service over four nouns, each in its own file:
//! tokens and vault creation ([`tokens`]), CAs ([`cas`]), cluster profiles
//! ([`clusters`]) and signing keys ([`keys`]). This file only routes.

mod cas;
pub(crate) mod clusters;
mod keys;
mod tokens;

use std::sync::Arc;

use keyholder_proto::v1;
use tonic::{Request, Response, Status};

use super::enter;
use crate::core::Core;
use crate::gate::Needs;

/// The Admin service.
pub struct AdminService(pub Arc<Core>);

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn init(
        &self,
        request: Request<v1::InitRequest>,
    ) -> Result<Response<v1::InitResponse>, Status> {
        enter(&self.0, &request, "Admin.Init", Needs::Nothing).await?;
        Ok(Response::new(
            tokens::init(&self.0, request.into_inner()).await?,
        ))
    }

    async fn list_tokens(
        &self,
        request: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        enter(&self.0, &request, "Admin.ListTokens", Needs::Nothing).await?;
        Ok(Response::new(tokens::list(&self.0)?))
    }

    async fn create_ca(
        &self,
        request: Request<v1::CreateCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        enter(&self.0, &request, "Admin.CreateCa", Needs::Unlocked).await?;
        Ok(Response::new(
            cas::create(&self.0, request.into_inner()).await?,
        ))
    }

    async fn import_ca(
        &self,
        request: Request<v1::ImportCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        enter(&self.0, &request, "Admin.ImportCa", Needs::Unlocked).await?;
        Ok(Response::new(
            cas::import(&self.0, request.into_inner()).await?,
        ))
    }

    async fn list_cas(
        &self,
        request: Request<v1::ListCasRequest>,
    ) -> Result<Response<v1::ListCasResponse>, Status> {
        enter(&self.0, &request, "Admin.ListCas", Needs::Unlocked).await?;
        Ok(Response::new(cas::list(&self.0)?))
    }

    async fn get_ca(
        &self,
        request: Request<v1::GetCaRequest>,
    ) -> Result<Response<v1::CaInfo>, Status> {
        enter(&self.0, &request, "Admin.GetCa", Needs::Unlocked).await?;
        Ok(Response::new(cas::get(
            &self.0,
            &request.into_inner().name,
        )?))
    }

    async fn add_cluster(
        &self,
        request: Request<v1::AddClusterRequest>,
    ) -> Result<Response<v1::ClusterInfo>, Status> {
        enter(&self.0, &request, "Admin.AddCluster", Needs::Unlocked).await?;
        Ok(Response::new(
            clusters::add(&self.0, request.into_inner()).await?,
        ))
    }

    async fn list_clusters(
        &self,
        request: Request<v1::ListClustersRequest>,
    ) -> Result<Response<v1::ListClustersResponse>, Status> {
        enter(&self.0, &request, "Admin.ListClusters", Needs::Unlocked).await?;
        Ok(Response::new(clusters::list(&self.0)?))
    }

    async fn remove_cluster(
        &self,
        request: Request<v1::RemoveClusterRequest>,
    ) -> Result<Response<v1::RemoveClusterResponse>, Status> {
        enter(&self.0, &request, "Admin.RemoveCluster", Needs::Unlocked).await?;
        clusters::remove(&self.0, request.into_inner().name).await?;
        Ok(Response::new(v1::RemoveClusterResponse {}))
    }

    async fn generate_key(
        &self,
        request: Request<v1::GenerateKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        enter(&self.0, &request, "Admin.GenerateKey", Needs::Unlocked).await?;
        Ok(Response::new(
            keys::generate(&self.0, request.into_inner()).await?,
        ))
    }

    async fn import_key(
        &self,
        request: Request<v1::ImportKeyRequest>,
    ) -> Result<Response<v1::KeyInfo>, Status> {
        enter(&self.0, &request, "Admin.ImportKey", Needs::Unlocked).await?;
        Ok(Response::new(
            keys::import(&self.0, request.into_inner()).await?,
        ))
    }

    async fn delete_key(
        &self,
        request: Request<v1::DeleteKeyRequest>,
    ) -> Result<Response<v1::DeleteKeyResponse>, Status> {
        enter(&self.0, &request, "Admin.DeleteKey", Needs::Unlocked).await?;
        keys::delete(&self.0, request.into_inner().name).await?;
        Ok(Response::new(v1::DeleteKeyResponse {}))
    }
}

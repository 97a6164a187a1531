//! Admin: Kubernetes cluster profiles (server URL, issuing CA, default
//! groups, longest credential).

use std::time::Duration;

use keyholder_proto::v1;
use keyholder_vault::ClusterEntry;
use keyholder_vault::document::now_rfc3339;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::names::{ObjectName, lookup};
use crate::services::convert::ttl_or;

/// Default longest kubeconfig credential of a cluster: 1 hour.
const DEFAULT_CLUSTER_MAX_TTL: Duration = Duration::from_secs(3600);

fn cluster_info(name: &str, c: &ClusterEntry) -> v1::ClusterInfo {
    v1::ClusterInfo {
        name: name.to_owned(),
        server: c.server.clone(),
        ca: c.ca.clone(),
        default_groups: c.default_groups.clone(),
        max_ttl_seconds: c.max_ttl_seconds,
        server_ca_pem: c.server_ca_pem.clone(),
    }
}

/// A server CA bundle from a request: empty, or PEM certificates that parse.
pub fn server_ca(pem: String) -> Result<String> {
    if pem.is_empty() {
        return Ok(pem);
    }
    keyholder_pki::certificate_bundle(&pem).map_err(|e| Error::InvalidArgument {
        field: "server_ca_pem",
        reason: e.to_string(),
    })?;
    Ok(pem)
}

/// Admin.AddCluster.
pub async fn add(core: &Core, req: v1::AddClusterRequest) -> Result<v1::ClusterInfo> {
    let name = ObjectName::parse("name", req.name)?;
    let server_ok = req.server.strip_prefix("https://").is_some_and(|rest| {
        !rest.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
    });
    if !server_ok {
        return Err(Error::InvalidArgument {
            field: "server",
            reason: format!("{:?} is not an https:// URL", req.server),
        });
    }
    for g in &req.default_groups {
        if g.is_empty() || g.chars().any(char::is_control) {
            return Err(Error::InvalidArgument {
                field: "default_groups",
                reason: format!("{g:?} is not a group name"),
            });
        }
    }
    let entry = ClusterEntry {
        server: req.server,
        ca: req.ca,
        default_groups: req.default_groups,
        max_ttl_seconds: ttl_or(req.max_ttl_seconds, DEFAULT_CLUSTER_MAX_TTL).as_secs(),
        created_at: now_rfc3339(),
        server_ca_pem: server_ca(req.server_ca_pem)?,
    };
    let info = cluster_info(name.as_str(), &entry);
    core.write(|body| {
        lookup(&body.cas, "CA", &entry.ca)?;
        if body.clusters.contains_key(name.as_str()) && !req.overwrite {
            return Err(Error::AlreadyExists {
                kind: "cluster",
                name: name.to_string(),
            });
        }
        body.clusters.insert(name.to_string(), entry);
        Ok(())
    })
    .await?;
    Ok(info)
}

/// Admin.ListClusters.
pub fn list(core: &Core) -> Result<v1::ListClustersResponse> {
    let clusters = core.with_body(|body| {
        Ok(body
            .clusters
            .iter()
            .map(|(n, c)| cluster_info(n, c))
            .collect())
    })?;
    Ok(v1::ListClustersResponse { clusters })
}

/// Admin.RemoveCluster.
pub async fn remove(core: &Core, name: String) -> Result<()> {
    core.write(|body| {
        lookup(&body.clusters, "cluster", &name)?;
        body.clusters.remove(&name);
        Ok(())
    })
    .await
    .map(drop)
}

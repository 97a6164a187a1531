//! Admin.ClusterPki and Admin.ListClusterCerts: a whole cluster's PKI in
//! kubeadm's layout from one spec, remembered in the vault so that re-runs
//! keep what is valid and `--renew` re-issues what is about to expire.
//!
//! The daemon decides everything (what is issued for whom, with which
//! names); the caller only says what is on disk (hashes) and writes the
//! files it gets back. docs/kubernetes.md has the table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyholder_pki::keys::SoftKey;
use keyholder_pki::kube::{self, KubeUser};
use keyholder_pki::{IssueRequest, KeyAlgorithm, Profile};
use keyholder_proto::v1;
use keyholder_vault::ClusterEntry;
use keyholder_vault::cluster_pki::{ClusterPkiEntry, IssuedCertificate, ServiceAccountKey};
use keyholder_vault::document::now_rfc3339;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::access::Details;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::names::ObjectName;
use crate::services::convert::{check_ttl, unix_timestamp};
use crate::services::credentials::{KeySource, issue};
use crate::signers::off_worker;

/// Every certificate's lifetime unless the spec says otherwise: 1 year, as kubeadm.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(365 * 86400);
/// The renewal window unless asked otherwise (capped at a third of a
/// certificate's lifetime).
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86400);
/// Most hosts in one spec (the response, every kubelet's files in it,
/// stays well under gRPC's usual 4 MiB).
const MAX_HOSTS: usize = 500;
/// Most addresses of one host.
const MAX_ADDRESSES: usize = 64;

/// The components a lifetime can be set for.
pub const COMPONENTS: &[&str] = &[
    "apiserver",
    "apiserver-kubelet-client",
    "apiserver-etcd-client",
    "front-proxy-client",
    "admin",
    "controller-manager",
    "scheduler",
    "kube-proxy",
    "kubelet",
    "etcd-server",
    "etcd-peer",
    "etcd-healthcheck-client",
];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Host {
    name: String,
    addresses: Vec<String>,
}

/// The spec, as stored in the vault (defaults filled in).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Spec {
    server: String,
    control_plane: Vec<Host>,
    workers: Vec<Host>,
    etcd: Vec<Host>,
    service_ip: String,
    domain: String,
    apiserver_sans: Vec<String>,
    cluster_ca: String,
    etcd_ca: String,
    front_proxy_ca: String,
    lifetime_seconds: u64,
    lifetimes: BTreeMap<String, u64>,
    key_algorithm: String,
    service_account_key_algorithm: String,
}

fn hosts(v: Vec<v1::ClusterHost>) -> Vec<Host> {
    v.into_iter()
        .map(|h| Host {
            name: h.name,
            addresses: h.addresses,
        })
        .collect()
}

impl From<v1::ClusterPkiSpec> for Spec {
    fn from(s: v1::ClusterPkiSpec) -> Self {
        Self {
            server: s.server,
            control_plane: hosts(s.control_plane),
            workers: hosts(s.workers),
            etcd: hosts(s.etcd),
            service_ip: s.service_ip,
            domain: s.domain,
            apiserver_sans: s.apiserver_sans,
            cluster_ca: s.cluster_ca,
            etcd_ca: s.etcd_ca,
            front_proxy_ca: s.front_proxy_ca,
            lifetime_seconds: s.lifetime_seconds,
            lifetimes: s.lifetimes.into_iter().collect(),
            key_algorithm: s.key_algorithm,
            service_account_key_algorithm: s.service_account_key_algorithm,
        }
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// A host or node name: a lower-case DNS name (it is also a directory name).
fn check_host_name(field: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{name:?} is not a lower-case DNS name (a Kubernetes node name)"),
        ))
    }
}

/// An address: an IP address, else a DNS name.
enum Addr {
    Ip(IpAddr),
    Dns(String),
}

fn addr(field: &'static str, s: &str) -> Result<Addr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Addr::Ip(ip));
    }
    check_host_name(field, &s.to_ascii_lowercase()).map_err(|_| {
        bad(
            field,
            format!("{s:?} is neither an IP address nor a DNS name"),
        )
    })?;
    Ok(Addr::Dns(s.to_ascii_lowercase()))
}

impl Spec {
    /// Checks the spec and fills in its defaults.
    fn normalized(mut self, name: &str) -> Result<Self> {
        if self.control_plane.is_empty() {
            return Err(bad("spec.control_plane", "name at least one host"));
        }
        if self.etcd.is_empty() {
            return Err(bad("spec.etcd", "name at least one member"));
        }
        let total = self.control_plane.len() + self.workers.len() + self.etcd.len();
        if total > MAX_HOSTS {
            return Err(bad("spec", format!("at most {MAX_HOSTS} hosts")));
        }
        let mut nodes = BTreeSet::new();
        for (field, list) in [
            ("spec.control_plane", &self.control_plane),
            ("spec.workers", &self.workers),
        ] {
            for h in list {
                check_host_name(field, &h.name)?;
                if !nodes.insert(h.name.clone()) {
                    return Err(bad(field, format!("{:?} is named twice", h.name)));
                }
            }
        }
        let mut members = BTreeSet::new();
        for h in &self.etcd {
            check_host_name("spec.etcd", &h.name)?;
            if !members.insert(h.name.clone()) {
                return Err(bad("spec.etcd", format!("{:?} is named twice", h.name)));
            }
        }
        for h in self
            .control_plane
            .iter()
            .chain(&self.workers)
            .chain(&self.etcd)
        {
            if h.addresses.len() > MAX_ADDRESSES {
                return Err(bad(
                    "spec.addresses",
                    format!("{:?}: at most {MAX_ADDRESSES} addresses", h.name),
                ));
            }
            for a in &h.addresses {
                addr("spec.addresses", a)?;
            }
        }
        for a in &self.apiserver_sans {
            addr("spec.apiserver_sans", a)?;
        }
        if self.service_ip.is_empty() {
            return Err(bad(
                "spec.service_ip",
                "give the service CIDR's first address (e.g. 10.96.0.1)",
            ));
        }
        self.service_ip.parse::<IpAddr>().map_err(|_| {
            bad(
                "spec.service_ip",
                format!("{:?} is not an IP address", self.service_ip),
            )
        })?;
        if self.domain.is_empty() {
            self.domain = "cluster.local".into();
        }
        check_host_name("spec.domain", &self.domain)?;
        if self.server.is_empty() {
            let first = self.control_plane[0]
                .addresses
                .first()
                .cloned()
                .unwrap_or_else(|| self.control_plane[0].name.clone());
            self.server = match first.parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) => format!("https://[{v6}]:6443"),
                _ => format!("https://{first}:6443"),
            };
        }
        if server_host(&self.server).is_none() {
            return Err(bad(
                "spec.server",
                format!("{:?} is not an https://HOST[:PORT] URL", self.server),
            ));
        }
        for (ca, default) in [
            (&mut self.cluster_ca, format!("{name}-ca")),
            (&mut self.etcd_ca, format!("{name}-etcd-ca")),
            (&mut self.front_proxy_ca, format!("{name}-front-proxy-ca")),
        ] {
            if ca.is_empty() {
                *ca = default;
            }
            ObjectName::parse("spec.ca", ca.clone())?;
        }
        for (component, seconds) in &self.lifetimes {
            if !COMPONENTS.contains(&component.as_str()) {
                return Err(bad(
                    "spec.lifetimes",
                    format!("{component:?} is not one of {}", COMPONENTS.join(", ")),
                ));
            }
            if *seconds == 0 {
                return Err(bad(
                    "spec.lifetimes",
                    format!("{component}: must be over 0"),
                ));
            }
        }
        KeyAlgorithm::parse_certificate_key(&self.key_algorithm)?;
        let sa = KeyAlgorithm::parse_certificate_key(&self.service_account_key_algorithm)?;
        if sa == KeyAlgorithm::Ed25519 {
            return Err(bad(
                "spec.service_account_key_algorithm",
                "kube-apiserver signs service-account tokens with ECDSA or RSA keys",
            ));
        }
        Ok(self)
    }

    fn lifetime(&self, component: &str) -> Duration {
        let default = if self.lifetime_seconds > 0 {
            Duration::from_secs(self.lifetime_seconds)
        } else {
            DEFAULT_LIFETIME
        };
        self.lifetimes
            .get(component)
            .map(|s| Duration::from_secs(*s))
            .unwrap_or(default)
    }
}

/// The host of an `https://HOST[:PORT][/...]` URL.
fn server_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty()
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_owned);
    }
    authority.split(':').next().map(str::to_owned)
}

/// Which of the cluster's three CAs signs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Cluster,
    Etcd,
    FrontProxy,
}

/// One certificate to have, and where it goes.
struct Item {
    id: String,
    component: &'static str,
    role: Role,
    profile: Profile,
    cn: String,
    o: Vec<String>,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: Duration,
    /// Certificate and key files (relative paths).
    pair: Option<(String, String)>,
    /// Kubeconfig embedding the certificate.
    conf: Option<String>,
}

impl Item {
    fn files(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some((c, k)) = &self.pair {
            v.push(c.clone());
            v.push(k.clone());
        }
        v.extend(self.conf.iter().cloned());
        v
    }

    /// What the certificate is issued for; a record with another one is
    /// re-issued.
    fn requirement(&self, key_algorithm: &str, server: &str) -> String {
        let mut r = format!(
            "{:?} cn={} o={:?} dns={:?} ip={:?} ttl={} key={key_algorithm}",
            self.profile,
            self.cn,
            self.o,
            self.dns,
            self.ips,
            self.ttl.as_secs()
        );
        // A kubeconfig holds the server URL too.
        if self.conf.is_some() {
            r.push_str(" server=");
            r.push_str(server);
        }
        r
    }

    fn subject(&self) -> String {
        let mut s = format!("CN={}", self.cn);
        for o in &self.o {
            s.push_str(",O=");
            s.push_str(o);
        }
        s
    }
}

/// Appends `a` (an address) to the DNS or IP list, once.
fn push_addr(dns: &mut Vec<String>, ips: &mut Vec<IpAddr>, a: &str) {
    match addr("", a) {
        Ok(Addr::Ip(ip)) if !ips.contains(&ip) => ips.push(ip),
        Ok(Addr::Dns(d)) if !dns.contains(&d) => dns.push(d),
        _ => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn item(
    spec: &Spec,
    id: String,
    component: &'static str,
    role: Role,
    profile: Profile,
    cn: &str,
    o: &[&str],
    sans: &[&str],
    pair: Option<(String, String)>,
    conf: Option<String>,
) -> Item {
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    for s in sans {
        push_addr(&mut dns, &mut ips, s);
    }
    Item {
        id,
        component,
        role,
        profile,
        cn: cn.to_owned(),
        o: o.iter().map(|s| (*s).to_owned()).collect(),
        dns,
        ips,
        ttl: spec.lifetime(component),
        pair,
        conf,
    }
}

fn pair(base: &str) -> Option<(String, String)> {
    Some((format!("{base}.crt"), format!("{base}.key")))
}

/// A client certificate: component, CA, CN, O, cert/key files, kubeconfig.
type ClientRow = (
    &'static str,
    Role,
    &'static str,
    &'static [&'static str],
    Option<(String, String)>,
    Option<String>,
);

/// Every certificate the spec's cluster needs (the table in docs/kubernetes.md).
fn plan(spec: &Spec) -> Vec<Item> {
    let mut items = Vec::new();
    let mut apiserver_sans: Vec<String> = Vec::new();
    for h in &spec.control_plane {
        apiserver_sans.push(h.name.clone());
        apiserver_sans.extend(h.addresses.iter().cloned());
    }
    apiserver_sans
        .extend(["kubernetes", "kubernetes.default", "kubernetes.default.svc"].map(str::to_owned));
    apiserver_sans.push(format!("kubernetes.default.svc.{}", spec.domain));
    apiserver_sans.push(spec.service_ip.clone());
    apiserver_sans.extend(spec.apiserver_sans.iter().cloned());
    apiserver_sans.extend(server_host(&spec.server));
    let sans: Vec<&str> = apiserver_sans.iter().map(String::as_str).collect();
    items.push(item(
        spec,
        "apiserver".into(),
        "apiserver",
        Role::Cluster,
        Profile::Server,
        "kube-apiserver",
        &[],
        &sans,
        pair("pki/apiserver"),
        None,
    ));
    let clients: [ClientRow; 8] = [
        (
            "apiserver-kubelet-client",
            Role::Cluster,
            "kube-apiserver-kubelet-client",
            &["system:masters"],
            pair("pki/apiserver-kubelet-client"),
            None,
        ),
        (
            "apiserver-etcd-client",
            Role::Etcd,
            "kube-apiserver-etcd-client",
            &[],
            pair("pki/apiserver-etcd-client"),
            None,
        ),
        (
            "etcd-healthcheck-client",
            Role::Etcd,
            "kube-etcd-healthcheck-client",
            &[],
            pair("pki/etcd/healthcheck-client"),
            None,
        ),
        (
            "front-proxy-client",
            Role::FrontProxy,
            "front-proxy-client",
            &[],
            pair("pki/front-proxy-client"),
            None,
        ),
        (
            "admin",
            Role::Cluster,
            "kubernetes-admin",
            &["system:masters"],
            None,
            Some("admin.conf".into()),
        ),
        (
            "controller-manager",
            Role::Cluster,
            "system:kube-controller-manager",
            &[],
            None,
            Some("controller-manager.conf".into()),
        ),
        (
            "scheduler",
            Role::Cluster,
            "system:kube-scheduler",
            &[],
            None,
            Some("scheduler.conf".into()),
        ),
        (
            "kube-proxy",
            Role::Cluster,
            "system:kube-proxy",
            &["system:node-proxier"],
            None,
            Some("kube-proxy.conf".into()),
        ),
    ];
    for (component, role, cn, o, files, conf) in clients {
        items.push(item(
            spec,
            component.into(),
            component,
            role,
            Profile::Client,
            cn,
            o,
            &[],
            files,
            conf,
        ));
    }
    for h in spec.control_plane.iter().chain(&spec.workers) {
        let mut sans = vec![h.name.as_str()];
        sans.extend(h.addresses.iter().map(String::as_str));
        items.push(item(
            spec,
            format!("kubelet/{}", h.name),
            "kubelet",
            Role::Cluster,
            Profile::Peer,
            &format!("system:node:{}", h.name),
            &["system:nodes"],
            &sans,
            pair(&format!("nodes/{}/pki/kubelet", h.name)),
            Some(format!("nodes/{}/kubelet.conf", h.name)),
        ));
    }
    for h in &spec.etcd {
        let mut sans = vec![h.name.as_str(), "localhost"];
        sans.extend(h.addresses.iter().map(String::as_str));
        sans.extend(["127.0.0.1", "::1"]);
        for (component, profile, file) in [
            ("etcd-server", Profile::Server, "server"),
            ("etcd-peer", Profile::Peer, "peer"),
        ] {
            items.push(item(
                spec,
                format!("{component}/{}", h.name),
                component,
                Role::Etcd,
                profile,
                &h.name,
                &[],
                &sans,
                pair(&format!("nodes/{}/pki/etcd/{file}", h.name)),
                None,
            ));
        }
    }
    items
}

fn sha256_hex(bytes: &[u8]) -> String {
    keyholder_pki::hex(&Sha256::digest(bytes))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A file to hand back, unless the disk already holds exactly it.
struct Out {
    files: Vec<v1::ClusterPkiFile>,
    written: BTreeMap<String, String>,
}

impl Out {
    fn add(
        &mut self,
        on_disk: &BTreeMap<String, String>,
        path: String,
        content: Vec<u8>,
        private: bool,
    ) {
        let hash = sha256_hex(&content);
        if on_disk.get(&path) != Some(&hash) {
            self.files.push(v1::ClusterPkiFile {
                path: path.clone(),
                content,
                private,
            });
        }
        self.written.insert(path, hash);
    }
}

/// The CA `name`: reused when it exists, created (with kubeadm's common
/// name) when it does not.
async fn ensure_ca(core: &Core, name: &str, common_name: &str) -> Result<()> {
    let exists = core.with_body(|b| Ok(b.cas.get(name).map(|c| c.kind)))?;
    match exists {
        Some(keyholder_vault::CaKind::X509) => Ok(()),
        Some(_) => Err(bad(
            "spec.ca",
            format!("{name:?} is an SSH CA, not an X.509 one"),
        )),
        None => super::cas::create(
            core,
            v1::CreateCaRequest {
                name: name.to_owned(),
                common_name: common_name.to_owned(),
                ..Default::default()
            },
        )
        .await
        .map(drop),
    }
}

fn cert_info(id: &str, c: &IssuedCertificate, action: &str, reason: &str) -> v1::ClusterCert {
    v1::ClusterCert {
        id: id.to_owned(),
        component: c.component.clone(),
        ca: c.ca.clone(),
        subject: c.subject.clone(),
        serial: c.serial.clone(),
        not_before: unix_timestamp(c.not_before),
        not_after: unix_timestamp(c.not_after),
        files: c.files.clone(),
        action: action.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Admin.ClusterPki.
pub async fn pki(
    core: &Core,
    req: v1::ClusterPkiRequest,
) -> Result<(v1::ClusterPkiResponse, Details)> {
    let name = ObjectName::parse("name", req.name)?;
    let previous = core.with_body(|b| Ok(b.cluster_pki.get(name.as_str()).cloned()))?;
    let spec = match (req.spec, &previous) {
        (Some(s), _) if !req.renew => Spec::from(s),
        (_, Some(p)) => serde_json::from_value::<Spec>(p.spec.clone())
            .map_err(|e| Error::Internal(format!("the recorded spec does not read: {e}")))?,
        (_, None) => {
            return Err(Error::NotFound {
                kind: "cluster PKI (give --spec for the first run)",
                name: name.to_string(),
            });
        }
    };
    let spec = spec.normalized(name.as_str())?;
    let out_dir = match (req.out_dir.is_empty(), &previous) {
        (false, _) => req.out_dir,
        (true, Some(p)) if !p.out_dir.is_empty() => p.out_dir.clone(),
        _ => return Err(bad("out_dir", "give the directory to write to")),
    };
    if !out_dir.starts_with('/') {
        return Err(bad("out_dir", "must be an absolute path"));
    }
    if let Some(p) = previous
        .as_ref()
        .filter(|p| req.renew && p.out_dir != out_dir)
    {
        return Err(bad(
            "out_dir",
            format!(
                "--renew renews the files in {}, where they were written",
                p.out_dir
            ),
        ));
    }
    let renew_before =
        (req.renew_before_seconds > 0).then(|| Duration::from_secs(req.renew_before_seconds));
    // Records count only for the same directory.
    let previous = previous.filter(|p| p.out_dir == out_dir);
    let empty = ClusterPkiEntry::default();
    let prev = previous.as_ref().unwrap_or(&empty);
    // What is on disk: the recorded files, unless the caller says they
    // changed or are gone, and whatever else it reports.
    let missing: BTreeSet<String> = req.missing.into_iter().collect();
    let mut on_disk: BTreeMap<String, String> = prev
        .written
        .iter()
        .filter(|(path, _)| !missing.contains(*path))
        .map(|(path, hash)| (path.clone(), hash.clone()))
        .collect();
    on_disk.extend(req.on_disk);

    // The TCP listener's CAs sign only what keyholderd issues for the
    // listener (see remote::listener_ca_misuse): never a cluster's server,
    // peer or kubelet certificates.
    let tcp = &core.config.tcp;
    for ca in [&spec.cluster_ca, &spec.etcd_ca, &spec.front_proxy_ca] {
        if !tcp.client_ca.is_empty() && (*ca == tcp.client_ca || ca.as_str() == tcp.server_ca()) {
            return Err(Error::PermissionDenied(format!(
                "CA {ca:?} signs the TCP listener's certificates (tcp.client_ca / tcp.server_ca): \
                 a cluster's PKI needs CAs of its own"
            )));
        }
    }
    for (ca, cn) in [
        (&spec.cluster_ca, "kubernetes"),
        (&spec.etcd_ca, "etcd-ca"),
        (&spec.front_proxy_ca, "front-proxy-ca"),
    ] {
        ensure_ca(core, ca, cn).await?;
    }
    let cas = [
        (
            Role::Cluster,
            core.x509_ca(&spec.cluster_ca)?,
            spec.cluster_ca.clone(),
        ),
        (
            Role::Etcd,
            core.x509_ca(&spec.etcd_ca)?,
            spec.etcd_ca.clone(),
        ),
        (
            Role::FrontProxy,
            core.x509_ca(&spec.front_proxy_ca)?,
            spec.front_proxy_ca.clone(),
        ),
    ];
    let ca_of = |role: Role| {
        cas.iter()
            .find(|(r, ..)| *r == role)
            .map(|(_, ca, name)| (ca.clone(), name.clone()))
            .ok_or_else(|| Error::Internal("no CA for a role".into()))
    };
    let mut fingerprints = BTreeMap::new();
    for (role, ca, _) in &cas {
        let fp = keyholder_pki::certificate_info(&ca.certificate_pem)?.fingerprint_sha256;
        fingerprints.insert(*role as u8, fp);
    }
    let key_alg = KeyAlgorithm::parse_certificate_key(&spec.key_algorithm)?;
    let cluster_ca_pem = ca_of(Role::Cluster)?.0.certificate_pem.clone();

    let now = SystemTime::now();
    let items = plan(&spec);
    // Decide what to issue.
    let mut decisions = Vec::with_capacity(items.len());
    let mut foreign = Vec::new();
    for it in &items {
        let requirement = it.requirement(key_alg.as_str(), &spec.server);
        let fp = &fingerprints[&(it.role as u8)];
        let window = renew_before.unwrap_or(DEFAULT_RENEW_BEFORE.min(it.ttl / 3));
        let files = it.files();
        let rec = prev.certificates.get(&it.id);
        let expiring =
            |r: &IssuedCertificate| r.not_after <= unix(now).saturating_add(window.as_secs());
        let reason = match rec {
            _ if req.renew => match rec {
                Some(r) if expiring(r) => Some("expiring"),
                _ => None,
            },
            None => Some("new"),
            Some(r) if r.requirement != requirement => Some("spec changed"),
            Some(r) if &r.ca_fingerprint != fp => Some("CA changed"),
            Some(_) if files.iter().any(|f| !on_disk.contains_key(f)) => Some("missing"),
            Some(_) if files.iter().any(|f| on_disk.get(f) != prev.written.get(f)) => {
                Some("changed on disk")
            }
            Some(r) if expiring(r) => Some("expiring"),
            Some(_) => None,
        };
        if reason.is_some() {
            foreign.extend(
                files
                    .iter()
                    .filter(|f| {
                        on_disk
                            .get(*f)
                            .is_some_and(|h| prev.written.get(*f) != Some(h))
                    })
                    .cloned(),
            );
        }
        if req.renew && rec.is_none() {
            decisions.push(None);
            continue;
        }
        decisions.push(Some((reason, requirement)));
    }

    // The service-account key: made once, kept in the vault.
    let sa = match &prev.service_account_key {
        Some(k) => k.clone(),
        None => match core.with_body(|b| {
            Ok(b.cluster_pki
                .get(name.as_str())
                .and_then(|p| p.service_account_key.clone()))
        })? {
            Some(k) => k,
            None => {
                let alg = KeyAlgorithm::parse_certificate_key(&spec.service_account_key_algorithm)?;
                let key = off_worker(alg.is_rsa(), move || SoftKey::generate(alg)).await??;
                ServiceAccountKey {
                    algorithm: alg.as_str().to_owned(),
                    private_key_pem: key.pkcs8_pem()?,
                    public_key_pem: key.public_pem().to_owned(),
                    created_at: now_rfc3339(),
                }
            }
        },
    };

    // Files that are not Keyholder's, among those it would write.
    let mut statics: Vec<(String, Vec<u8>, bool)> = Vec::new();
    if !req.renew {
        statics.push((
            "pki/ca.crt".into(),
            cluster_ca_pem.clone().into_bytes(),
            false,
        ));
        statics.push((
            "pki/etcd/ca.crt".into(),
            ca_of(Role::Etcd)?.0.certificate_pem.clone().into_bytes(),
            false,
        ));
        statics.push((
            "pki/front-proxy-ca.crt".into(),
            ca_of(Role::FrontProxy)?
                .0
                .certificate_pem
                .clone()
                .into_bytes(),
            false,
        ));
        for h in spec.control_plane.iter().chain(&spec.workers) {
            statics.push((
                format!("nodes/{}/pki/ca.crt", h.name),
                cluster_ca_pem.clone().into_bytes(),
                false,
            ));
        }
        for h in &spec.etcd {
            statics.push((
                format!("nodes/{}/pki/etcd/ca.crt", h.name),
                ca_of(Role::Etcd)?.0.certificate_pem.clone().into_bytes(),
                false,
            ));
        }
        statics.push((
            "pki/sa.pub".into(),
            sa.public_key_pem.clone().into_bytes(),
            false,
        ));
        statics.push((
            "pki/sa.key".into(),
            sa.private_key_pem.as_bytes().to_vec(),
            true,
        ));
        for (path, content, _) in &statics {
            if let Some(h) = on_disk.get(path)
                && *h != sha256_hex(content)
                && prev.written.get(path) != Some(h)
            {
                foreign.push(path.clone());
            }
        }
    }
    if !foreign.is_empty() && !req.force {
        let more = foreign.len() - 1;
        return Err(Error::AlreadyExists {
            kind: "file not written by Keyholder",
            name: if more > 0 {
                format!("{} (and {more} more)", foreign[0])
            } else {
                foreign[0].clone()
            },
        });
    }

    // Issue.
    let mut out = Out {
        files: Vec::new(),
        written: BTreeMap::new(),
    };
    for (path, content, private) in statics {
        out.add(&on_disk, path, content, private);
    }
    let mut records: BTreeMap<String, IssuedCertificate> = BTreeMap::new();
    let mut certs = Vec::with_capacity(items.len());
    let mut serials = Vec::new();
    let mut issued_by = Vec::new();
    for (it, decision) in items.iter().zip(decisions) {
        let Some((reason, requirement)) = decision else {
            continue;
        };
        let Some(reason) = reason else {
            if let Some(r) = prev.certificates.get(&it.id) {
                for f in &r.files {
                    if let Some(h) = prev.written.get(f) {
                        out.written.insert(f.clone(), h.clone());
                    }
                }
                certs.push(cert_info(&it.id, r, "kept", ""));
                records.insert(it.id.clone(), r.clone());
            }
            continue;
        };
        let (ca, ca_name) = ca_of(it.role)?;
        check_ttl(it.ttl, ca.max_ttl, &format!("{} (CA {ca_name})", it.id))?;
        let request = IssueRequest {
            profile: it.profile,
            common_name: it.cn.clone(),
            organizations: it.o.clone(),
            dns_names: it.dns.clone(),
            ip_addresses: it.ips.clone(),
            ttl: it.ttl,
            backdate: core.config.clock_skew,
        };
        let source = match (key_alg, core.key_pool().take()) {
            (KeyAlgorithm::EcdsaP256, Some(k)) => KeySource::Stocked(k),
            _ => KeySource::Generate(key_alg),
        };
        let issued = issue(ca.clone(), request, source).await?;
        let key = issued
            .private_key_pem
            .as_ref()
            .ok_or_else(|| Error::Internal("no key was generated".into()))?;
        if let Some((crt, k)) = &it.pair {
            out.add(
                &on_disk,
                crt.clone(),
                issued.certificate_pem.clone().into_bytes(),
                false,
            );
            out.add(&on_disk, k.clone(), key.as_bytes().to_vec(), true);
        }
        if let Some(conf) = &it.conf {
            let text = kube::kubeconfig(
                name.as_str(),
                &spec.server,
                &cluster_ca_pem,
                &it.cn,
                &KubeUser::Certificate {
                    certificate_pem: &issued.certificate_pem,
                    private_key_pem: key,
                },
            );
            out.add(&on_disk, conf.clone(), text.as_bytes().to_vec(), true);
        }
        tracing::info!(
            cluster = name.as_str(),
            ca = ca_name.as_str(),
            id = it.id.as_str(),
            serial = %issued.serial,
            not_after = %humantime::format_rfc3339_seconds(issued.not_after),
            "cluster certificate issued"
        );
        serials.push(format!("{}={}", it.id, issued.serial));
        issued_by.push(format!(
            "{ca_name}:{}",
            format!("{:?}", it.profile).to_lowercase()
        ));
        let record = IssuedCertificate {
            component: it.component.to_owned(),
            ca: ca_name,
            serial: issued.serial.clone(),
            subject: it.subject(),
            requirement,
            ca_fingerprint: fingerprints[&(it.role as u8)].clone(),
            not_before: unix(issued.not_before),
            not_after: unix(issued.not_after),
            files: it.files(),
        };
        certs.push(cert_info(&it.id, &record, "issued", reason));
        records.insert(it.id.clone(), record);
    }

    let issued_count = certs.iter().filter(|c| c.action == "issued").count();
    let kept_count = certs.len() - issued_count;
    let spec_json =
        serde_json::to_value(&spec).map_err(|e| Error::Internal(format!("spec: {e}")))?;
    let (cluster_ca, etcd_ca, front_proxy_ca) = (
        spec.cluster_ca.clone(),
        spec.etcd_ca.clone(),
        spec.front_proxy_ca.clone(),
    );
    let server = spec.server.clone();
    let renew = req.renew;
    let written = out.written;
    let ((), generation) = core
        .write(|body| {
            let now = now_rfc3339();
            let entry =
                body.cluster_pki
                    .entry(name.to_string())
                    .or_insert_with(|| ClusterPkiEntry {
                        created_at: now.clone(),
                        ..Default::default()
                    });
            if entry.out_dir != out_dir {
                entry.certificates.clear();
                entry.written.clear();
            }
            entry.spec = spec_json;
            entry.out_dir = out_dir.clone();
            entry.cluster_ca = cluster_ca.clone();
            entry.etcd_ca = etcd_ca;
            entry.front_proxy_ca = front_proxy_ca;
            if renew {
                entry.certificates.extend(records);
                entry.written.extend(written);
            } else {
                entry.certificates = records;
                entry.written = written;
            }
            entry.service_account_key = Some(sa);
            entry.updated_at = now.clone();
            // A cluster profile for `keyholder kubeconfig NAME`, unless one exists.
            body.clusters
                .entry(name.to_string())
                .or_insert_with(|| ClusterEntry {
                    server,
                    ca: cluster_ca,
                    default_groups: Vec::new(),
                    max_ttl_seconds: 3600,
                    created_at: now,
                    server_ca_pem: String::new(),
                });
            Ok(())
        })
        .await?;
    // Which private keys left the daemon (paths only): the service-account
    // key among them forges any service-account token of the cluster.
    let keys_returned: Vec<&str> = out
        .files
        .iter()
        .filter(|f| f.private)
        .map(|f| f.path.as_str())
        .collect();
    let details = vec![
        ("issued", issued_count.to_string()),
        ("kept", kept_count.to_string()),
        ("serials", serials.join(",")),
        ("issued_by", issued_by.join(" ")),
        ("keys_returned", keys_returned.join(" ")),
        (
            "service_account_key_returned",
            keys_returned.contains(&"pki/sa.key").to_string(),
        ),
    ];
    Ok((
        v1::ClusterPkiResponse {
            files: out.files,
            certs,
            out_dir,
            generation,
        },
        details,
    ))
}

/// Admin.ListClusterCerts.
pub fn list(core: &Core, name: &str) -> Result<v1::ListClusterCertsResponse> {
    core.with_body(|b| {
        let entry = b.cluster_pki.get(name).ok_or_else(|| Error::NotFound {
            kind: "cluster PKI",
            name: name.to_owned(),
        })?;
        Ok(v1::ListClusterCertsResponse {
            certs: entry
                .certificates
                .iter()
                .map(|(id, c)| cert_info(id, c, "", ""))
                .collect(),
            out_dir: entry.out_dir.clone(),
            written: entry
                .written
                .iter()
                .map(|(p, h)| (p.clone(), h.clone()))
                .collect(),
        })
    })
}

/// The earliest expiry (Unix seconds) of each cluster's tracked
/// certificates, while the vault is open.
pub fn earliest_expiries(core: &Core) -> Vec<(String, u64)> {
    core.with_body(|b| {
        Ok(b.cluster_pki
            .iter()
            .filter_map(|(n, e)| {
                e.certificates
                    .values()
                    .map(|c| c.not_after)
                    .min()
                    .map(|t| (n.clone(), t))
            })
            .collect())
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            control_plane: vec![Host {
                name: "cp-1".into(),
                addresses: vec!["10.0.0.11".into()],
            }],
            workers: vec![Host {
                name: "w-1".into(),
                addresses: vec!["10.0.1.1".into()],
            }],
            etcd: vec![Host {
                name: "etcd-1".into(),
                addresses: vec!["10.0.0.21".into()],
            }],
            service_ip: "10.96.0.1".into(),
            ..Default::default()
        }
        .normalized("prod")
        .unwrap()
    }

    #[test]
    fn the_plan_names_every_component_with_kubeadm_s_names() {
        let s = spec();
        assert_eq!(s.server, "https://10.0.0.11:6443");
        assert_eq!(s.cluster_ca, "prod-ca");
        let items = plan(&s);
        let ids: Vec<_> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "apiserver",
                "apiserver-kubelet-client",
                "apiserver-etcd-client",
                "etcd-healthcheck-client",
                "front-proxy-client",
                "admin",
                "controller-manager",
                "scheduler",
                "kube-proxy",
                "kubelet/cp-1",
                "kubelet/w-1",
                "etcd-server/etcd-1",
                "etcd-peer/etcd-1"
            ]
        );
        let api = &items[0];
        assert!(
            api.dns
                .contains(&"kubernetes.default.svc.cluster.local".to_owned())
        );
        assert!(api.ips.contains(&"10.96.0.1".parse().unwrap()));
        assert!(api.ips.contains(&"10.0.0.11".parse().unwrap()));
        assert_eq!(items[9].subject(), "CN=system:node:cp-1,O=system:nodes");
        assert_eq!(api.ttl, DEFAULT_LIFETIME);
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let mut s = spec();
        s.workers[0].name = "../x".into();
        let e = s.normalized("prod").unwrap_err().to_string();
        assert!(e.starts_with("spec.workers"), "{e}");
        let mut s = spec();
        s.lifetimes.insert("kubelett".into(), 5);
        let e = s.normalized("prod").unwrap_err().to_string();
        assert!(e.starts_with("spec.lifetimes"), "{e}");
        let mut s = spec();
        s.service_ip = "10.96.0.0/12".into();
        assert!(s.normalized("prod").is_err());
        assert_eq!(server_host("https://[::1]:6443").as_deref(), Some("::1"));
        assert_eq!(server_host("https://k8s:6443/x").as_deref(), Some("k8s"));
        assert_eq!(server_host("http://k8s"), None);
    }
}

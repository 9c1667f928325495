//! HTTP clients for what the testnet asks of a hub: the operator API
//! (peers, record counts, watermarks, blocked peers) and the Discovery family
//! (registrations are the records scenarios write, count and check).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine;
use hubmesh_node::discovery::{hmac_message, sign_registration};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::TestnetError;

/// Per-request deadline of every testnet HTTP request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of an error answer kept in [`TestnetError::Status`].
const MAX_ERROR_BODY: usize = 512;

/// The shared HTTP client: loopback only, so proxies from the environment are ignored.
pub fn http_client() -> Result<reqwest::Client, TestnetError> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
        .pool_max_idle_per_host(128)
        .build()
        .map_err(|source| TestnetError::Http {
            url: "(client)".into(),
            source,
        })
}

/// One entry of a hub's registration listing: what must be equal on every
/// converged hub (the `active` flag is left out: it depends on the clock).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerEntry {
    /// Cluster.
    pub cluster_id: String,
    /// Server id.
    pub server_id: String,
    /// Last register/heartbeat (RFC 3339): differs between two versions of one registration.
    pub last_seen: String,
    /// Hub that wrote this version.
    pub hub: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerView {
    peer_id: String,
}

#[derive(Debug, Deserialize)]
struct SyncView {
    watermarks: BTreeMap<String, u64>,
}

/// What makes two hubs' registries equal, as the operator API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryState {
    /// Live records per namespace (`/admin/records`).
    pub counts: BTreeMap<String, u64>,
    /// Highest sequence number held per origin (`/admin/sync`).
    pub watermarks: BTreeMap<String, u64>,
    /// Every registration held (`/api/v1/admin/servers`).
    pub servers: BTreeSet<ServerEntry>,
}

/// A client of one hub's facade.
#[derive(Debug, Clone)]
pub struct HubClient {
    http: reqwest::Client,
    base: String,
}

impl HubClient {
    /// A client of the hub at `base` (`http://127.0.0.1:7000`).
    pub fn new(http: reqwest::Client, base: impl Into<String>) -> Self {
        HubClient {
            http,
            base: base.into().trim_end_matches('/').to_owned(),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn check(
        url: String,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, TestnetError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let mut body = resp.text().await.unwrap_or_default();
        if body.len() > MAX_ERROR_BODY {
            let mut cut = MAX_ERROR_BODY;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        Err(TestnetError::Status {
            url,
            status: status.as_u16(),
            body,
        })
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, TestnetError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| TestnetError::Http {
                url: url.clone(),
                source,
            })?;
        let resp = Self::check(url.clone(), resp).await?;
        resp.json()
            .await
            .map_err(|source| TestnetError::Http { url, source })
    }

    /// `GET /`: the hub's cheapest answer (the HTTP stack's ceiling).
    pub async fn root(&self) -> Result<(), TestnetError> {
        self.get_json::<serde_json::Value>("/").await.map(drop)
    }

    /// PeerIds of the hubs this hub is connected to.
    pub async fn peers(&self) -> Result<BTreeSet<String>, TestnetError> {
        let peers: Vec<PeerView> = self.get_json("/admin/peers").await?;
        Ok(peers.into_iter().map(|p| p.peer_id).collect())
    }

    /// Live records per namespace.
    pub async fn records(&self) -> Result<BTreeMap<String, u64>, TestnetError> {
        self.get_json("/admin/records").await
    }

    /// Highest sequence number held per origin hub.
    pub async fn watermarks(&self) -> Result<BTreeMap<String, u64>, TestnetError> {
        let s: SyncView = self.get_json("/admin/sync").await?;
        Ok(s.watermarks)
    }

    /// Every registration this hub holds (of one cluster, or all), from its
    /// own store: no DHT fallback, so it shows what has replicated here.
    pub async fn servers(
        &self,
        cluster: Option<&str>,
    ) -> Result<BTreeSet<ServerEntry>, TestnetError> {
        let path = match cluster {
            Some(c) => format!("/api/v1/admin/servers?cluster={c}"),
            None => "/api/v1/admin/servers".to_owned(),
        };
        let list: Vec<ServerEntry> = self.get_json(&path).await?;
        Ok(list.into_iter().collect())
    }

    /// The registry state compared by [`crate::Testnet::wait_converged`].
    pub async fn registry_state(&self) -> Result<RegistryState, TestnetError> {
        let (counts, watermarks, servers) =
            tokio::try_join!(self.records(), self.watermarks(), self.servers(None))?;
        Ok(RegistryState {
            counts,
            watermarks,
            servers,
        })
    }

    /// `GET /api/v1/cluster/{cluster}` with a server token; `Ok` for 2xx.
    pub async fn lookup_cluster(&self, cluster: &str, token: &str) -> Result<(), TestnetError> {
        let url = format!("{}/api/v1/cluster/{cluster}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|source| TestnetError::Http {
                url: url.clone(),
                source,
            })?;
        let resp = Self::check(url.clone(), resp).await?;
        // Read the whole answer, as a client would.
        resp.bytes()
            .await
            .map(drop)
            .map_err(|source| TestnetError::Http { url, source })
    }

    /// Makes the hub refuse and disconnect exactly these peers (`[]` heals).
    pub async fn set_blocked(&self, peers: &[String]) -> Result<(), TestnetError> {
        let url = format!("{}/admin/blocked", self.base);
        let resp = self
            .http
            .put(&url)
            .json(peers)
            .send()
            .await
            .map_err(|source| TestnetError::Http {
                url: url.clone(),
                source,
            })?;
        Self::check(url, resp).await.map(drop)
    }

    /// Registers a server; `Ok` (the server token) only for a 2xx answer,
    /// i.e. an acknowledged, durably stored write.
    pub async fn register(&self, reg: &Registration) -> Result<String, TestnetError> {
        let url = format!("{}/api/v1/servers/register", self.base);
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(reg.body.clone())
            .send()
            .await
            .map_err(|source| TestnetError::Http {
                url: url.clone(),
                source,
            })?;
        let resp = Self::check(url.clone(), resp).await?;
        #[derive(Deserialize)]
        struct Answer {
            token: String,
        }
        let a: Answer = resp
            .json()
            .await
            .map_err(|source| TestnetError::Http { url, source })?;
        Ok(a.token)
    }
}

/// A signed Discovery registration request (compat §A), ready to send.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Cluster id.
    pub cluster: String,
    /// Server id (UUID).
    pub server_id: String,
    body: String,
}

impl Registration {
    /// Builds the request body for server `n` of `cluster`, timestamped now,
    /// with the HMAC under `secret`. Server ids are UUIDs derived from `tag`
    /// and `n`, so each scenario writes its own, distinct keys.
    pub fn new(cluster: &str, secret: &str, tag: u32, n: u64) -> Result<Self, TestnetError> {
        let server_id = format!("{tag:08x}-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff);
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let url = format!("https://s{n}.testnet.invalid:9090");
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| TestnetError::Invalid(format!("formatting the timestamp: {e}")))?;
        let hmac = sign_registration(
            secret.as_bytes(),
            &hmac_message(&server_id, cluster, &url, &key, &ts),
        );
        let body = serde_json::json!({
            "serverId": server_id, "clusterId": cluster, "publicUrl": url, "version": "1.0.0",
            "publicKey": key, "timestamp": ts, "clusterSecretHmac": hmac,
        })
        .to_string();
        Ok(Registration {
            cluster: cluster.to_owned(),
            server_id,
            body,
        })
    }
}

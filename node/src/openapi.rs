//! The OpenAPI document of the facade's API families (Discovery so far),
//! generated from the handlers' `utoipa` annotations. `specs/openapi.json` is
//! this document, checked by a test to be current.

use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::discovery;
use crate::federation::{login, nodes, oauth, profile, revocation, signal};

/// The facade's OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "hubmesh facade",
        description = "REST API families served by every hubmesh hub. Errors are `{\"error\": code, \"message\": text}`; see specs/facade.md.",
        license(name = "Apache-2.0")
    ),
    paths(
        discovery::register,
        discovery::heartbeat,
        discovery::lookup_cluster,
        discovery::delete_server,
        discovery::admin_clusters,
        discovery::admin_servers,
        login::token,
        login::register,
        login::me,
        revocation::logout,
        oauth::login,
        oauth::callback,
        nodes::register_node_id,
        profile::get_own,
        profile::put_own,
        profile::delete_own,
        profile::get_other,
        profile::search,
        signal::ws_signal,
    ),
    components(schemas(
        discovery::RegisterRequest,
        discovery::RegisterResponse,
        discovery::HeartbeatResponse,
        discovery::ClusterResponse,
        discovery::ServerView,
        discovery::DeleteResponse,
        discovery::ErrorBody,
        discovery::AdminClusters,
        discovery::ClusterSummary,
        discovery::AdminServer,
        login::DetailBody,
        login::TokenForm,
        login::TokenResponse,
        login::SelfRegisterRequest,
        login::SelfRegisterResponse,
        login::UserMe,
        revocation::LogoutResponse,
        nodes::RegisterNodeRequest,
        nodes::RegisterNodeResponse,
        profile::Expertise,
        profile::ProfileUpdate,
        profile::ProfileView,
        profile::SearchResult,
        profile::DeleteAccountResponse,
    )),
    modifiers(&Security),
    tags(
        (name = "discovery", description = "compat §A: server rendezvous, federated"),
        (name = "federation", description = "compat §E: federation hub; errors are `{\"detail\": text}` (FastAPI); see specs/accounts.md and specs/federation.md"),
    )
)]
pub struct ApiDoc;

#[derive(Debug)]
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT (EdDSA)")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Admin-Token"))),
        );
    }
}

/// The document as pretty JSON with a trailing newline (the checked-in form).
pub fn json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

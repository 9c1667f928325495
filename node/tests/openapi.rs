//! `specs/openapi.json` must be the document the code generates.
//! Regenerate with `UPDATE_SPECS=1 cargo test -p hubmesh-node --test openapi`.

#[test]
fn checked_in_openapi_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/openapi.json");
    let generated = hubmesh_node::openapi::json();
    if std::env::var_os("UPDATE_SPECS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "specs/openapi.json is stale: run UPDATE_SPECS=1 cargo test -p hubmesh-node --test openapi"
    );
}

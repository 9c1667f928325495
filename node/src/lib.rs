//! `hubmesh-node`: the hub daemon (config, Axum facade, auth, glue). Not built yet (issue #4).

//! `hubmesh-testnet`: N hubs on one machine, fault injection and benchmarks. Not built yet (issue #6).

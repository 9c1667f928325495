//! `hubmesh-mesh`: the libp2p layer (QUIC, Kademlia, gossipsub, anti-entropy, signal relay). Being built (issue #3).

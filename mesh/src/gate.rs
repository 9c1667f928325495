//! The connection gate: a `NetworkBehaviour` that refuses connections, at
//! establishment, with peers that are not federation members (allowlist
//! policy), that an operator or test has blocked ([`crate::Mesh::set_blocked`]),
//! or that were banned for sending invalid records.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::config::Membership;

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("peer is not a federation member")]
    NotMember,
    #[error("peer is blocked")]
    Blocked,
    #[error("peer is banned for sending invalid records")]
    Banned,
}

/// Most peers banned at once; the oldest ban is lifted first when full.
const MAX_BANS: usize = 1024;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Gate {
    local: PeerId,
    membership: Membership,
    blocked: BTreeSet<PeerId>,
    banned: HashMap<PeerId, Instant>,
}

impl Gate {
    pub(crate) fn new(local: PeerId, membership: Membership) -> Self {
        Gate {
            local,
            membership,
            blocked: BTreeSet::new(),
            banned: HashMap::new(),
        }
    }

    pub(crate) fn check(&self, peer: &PeerId) -> Result<(), Refused> {
        if *peer != self.local && !self.membership.admits(peer) {
            return Err(Refused::NotMember);
        }
        if self.blocked.contains(peer) {
            return Err(Refused::Blocked);
        }
        if let Some(until) = self.banned.get(peer)
            && *until > Instant::now()
        {
            return Err(Refused::Banned);
        }
        Ok(())
    }

    pub(crate) fn allows(&self, peer: &PeerId) -> bool {
        self.check(peer).is_ok()
    }

    pub(crate) fn set_blocked(&mut self, peers: BTreeSet<PeerId>) {
        self.blocked = peers;
    }

    pub(crate) fn ban(&mut self, peer: PeerId, until: Instant) {
        let now = Instant::now();
        self.banned.retain(|_, t| *t > now);
        if self.banned.len() >= MAX_BANS
            && let Some(oldest) = self.banned.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p)
        {
            self.banned.remove(&oldest);
        }
        self.banned.insert(peer, until);
    }

    fn enforce(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        self.check(peer).map_err(ConnectionDenied::new)
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.enforce(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.enforce(&peer)?;
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.enforce(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _id: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

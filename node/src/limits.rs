//! Per-family, per-client-IP rate limits (governor's keyed GCRA limiters),
//! the client-IP rule (a trusted proxy's `X-Forwarded-For` is honoured), and
//! the middleware that answers 429 with `Retry-After`. Limits can be switched
//! off (`HUBMESH_RATE_LIMITS=off`) for loopback benchmarks.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;
use crate::error::ApiError;

/// Keys (client IPs) a limiter tracks before it refuses new ones until the
/// next cleanup: the state store is bounded even under an address flood.
pub const MAX_TRACKED_IPS: usize = 200_000;

/// The client IP of a request: the connection's peer, or, when the peer is a
/// trusted proxy, the right-most `X-Forwarded-For` entry that is not itself a
/// trusted proxy.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    let direct = peer.ip();
    if !trusted.contains(&direct) {
        return direct;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else { return direct };
        for part in s.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return direct,
            }
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(direct)
}

/// One family's limiter.
#[derive(Clone)]
pub struct FamilyLimiter {
    name: &'static str,
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    trusted: Arc<Vec<IpAddr>>,
}

impl std::fmt::Debug for FamilyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamilyLimiter")
            .field("name", &self.name)
            .field("enabled", &self.limiter.is_some())
            .finish()
    }
}

impl FamilyLimiter {
    /// A limiter of `per_minute` requests per client IP (burst = per_minute),
    /// or a no-op when limits are off.
    pub fn new(name: &'static str, per_minute: u32, config: &RateLimitConfig) -> Self {
        let limiter = (config.enabled)
            .then(|| NonZeroU32::new(per_minute))
            .flatten()
            .map(|n| Arc::new(DefaultKeyedRateLimiter::keyed(Quota::per_minute(n))));
        FamilyLimiter {
            name,
            limiter,
            trusted: Arc::new(config.trusted_proxies.clone()),
        }
    }

    /// Admits or refuses one request from `ip`; `Err` carries Retry-After seconds.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        if l.len() >= MAX_TRACKED_IPS {
            l.retain_recent();
            if l.len() >= MAX_TRACKED_IPS {
                return Err(1);
            }
        }
        l.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Forgets idle clients; run periodically.
    pub fn cleanup(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// The trusted proxies.
    pub fn trusted(&self) -> &[IpAddr] {
        &self.trusted
    }
}

/// Middleware: `axum::middleware::from_fn_with_state(limiter, rate_limit)`.
pub async fn rate_limit(
    State(limiter): State<FamilyLimiter>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = client_ip(peer, req.headers(), limiter.trusted());
    match limiter.check(ip) {
        Ok(()) => next.run(req).await,
        Err(secs) => {
            metrics::counter!("hubmesh_rate_limited_total", "family" => limiter.name).increment(1);
            ApiError::rate_limited(secs).into_response()
        }
    }
}

/// Period of the idle-client cleanup.
pub const CLEANUP_PERIOD: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 10.0.0.1".parse().unwrap());
        let via_proxy = SocketAddr::new(proxy, 1);
        assert_eq!(
            client_ip(via_proxy, &h, &[proxy]),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let direct: SocketAddr = "5.6.7.8:1".parse().unwrap();
        assert_eq!(client_ip(direct, &h, &[proxy]), direct.ip());
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_ip(via_proxy, &h, &[proxy]), proxy);
    }

    #[test]
    fn limit_then_retry_after() {
        let cfg = RateLimitConfig {
            enabled: true,
            discovery_per_minute: 3,
            trusted_proxies: vec![],
        };
        let l = FamilyLimiter::new("t", 3, &cfg);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(ip).is_ok());
        }
        let secs = l.check(ip).unwrap_err();
        assert!((1..=20).contains(&secs), "{secs}");
        assert!(l.check("127.0.0.2".parse().unwrap()).is_ok());
        let off = FamilyLimiter::new(
            "t",
            3,
            &RateLimitConfig {
                enabled: false,
                ..cfg
            },
        );
        for _ in 0..10 {
            assert!(off.check(ip).is_ok());
        }
    }
}

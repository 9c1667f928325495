//! Signal round trip, cross-hub vs same-hub, over the federation-hub family's
//! `WS /ws/signal`.

use serde::Serialize;

use crate::bench::Figure;
use crate::net::Testnet;

/// The signal scenario's outcome.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignalResult {
    /// Not measured, and why.
    NotAvailable {
        /// Why.
        reason: String,
    },
}

impl SignalResult {
    /// The report's figures.
    pub fn figures(&self) -> Vec<Figure> {
        match self {
            SignalResult::NotAvailable { reason } => vec![
                Figure::new("signal round trip, cross-hub / same-hub p50", None, "ratio")
                    .target("≤ 1.5 (issue 5)", None)
                    .note(format!("not available: {reason}")),
            ],
        }
    }

    /// One Markdown paragraph.
    pub fn summary(&self) -> String {
        match self {
            SignalResult::NotAvailable { reason } => format!("Not available: {reason}."),
        }
    }
}

/// Measures the round trips on `net`.
pub async fn run(_net: &Testnet) -> SignalResult {
    SignalResult::NotAvailable {
        reason: "WS /ws/signal is not in this build".into(),
    }
}

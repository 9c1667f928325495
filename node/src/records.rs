//! The replicated namespaces this hub understands, and the one validator the
//! mesh runs on every inbound record (architecture §3): each namespace's own
//! checks, and refusal of namespaces no module owns, so a peer cannot fill
//! the store with records nothing reads or expires.

use hubmesh_store::Record;

use crate::discovery;
use crate::federation;

/// Validates an inbound record by its namespace. Tombstones of a known
/// namespace pass (their body is empty); unknown namespaces are refused.
pub fn validate_record(r: &Record) -> Result<(), String> {
    match r.ns.as_str() {
        discovery::NS => discovery::validate_record(r),
        federation::revocation::NS => federation::revocation::validate_record(r),
        federation::nodes::NS => federation::nodes::validate_record(r),
        federation::profile::NS => federation::profile::validate_record(r),
        federation::presence::NS => federation::presence::validate_record(r),
        other => Err(format!("unknown namespace {other:?}")),
    }
}

//! Wire-level definitions shared by both ends (normative text in
//! `specs/mesh.md`): protocol and topic names derived from the federation,
//! size limits, the anti-entropy (sync) messages and their request-response
//! codec.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use hubmesh_store::{OriginId, codec};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

/// Largest signal payload one frame may carry.
pub const MAX_SIGNAL_BYTES: usize = 64 * 1024;
/// Most records in one sync page.
pub const MAX_PAGE_RECORDS: usize = 256;
/// Most encoded record bytes in one sync page (a single record may exceed the
/// budget only when it is alone: records are at most 64 KiB).
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Most origins one watermark exchange may list.
pub const MAX_SYNC_ORIGINS: usize = 4096;
/// Largest encoded sync request.
pub const MAX_SYNC_REQUEST_BYTES: usize = 256 * 1024;
/// Largest encoded sync response: a full page plus framing.
pub const MAX_SYNC_RESPONSE_BYTES: usize = MAX_PAGE_BYTES + hubmesh_store::MAX_RECORD_BYTES + 4096;
/// Largest gossip message on the wire (gossipsub's `max_transmit_size`): a
/// full record batch plus protobuf framing.
pub const MAX_GOSSIP_BYTES: usize = hubmesh_store::MAX_RECORD_BYTES + 1024;
/// Most records in one gossip message.
pub const MAX_GOSSIP_BATCH: usize = 256;
/// CBOR byte-string header of one record in a gossip message, at most.
pub const GOSSIP_ENTRY_OVERHEAD: usize = 5;
/// Most bytes of records (each with its header) one gossip message carries:
/// room for one record of the largest size, so every record fits alone.
/// With the format byte and the array header (4 bytes at most) a message
/// stays well inside [`MAX_GOSSIP_BYTES`].
pub const MAX_GOSSIP_BATCH_BYTES: usize = hubmesh_store::MAX_RECORD_BYTES + GOSSIP_ENTRY_OVERHEAD;
/// Largest Kademlia message: a record plus closer peers.
pub const MAX_KAD_PACKET_BYTES: usize = hubmesh_store::MAX_RECORD_BYTES + 16 * 1024;

/// The names one federation's protocols and topic use.
#[derive(Clone, Debug)]
pub struct Names {
    /// Gossipsub topic: `hubmesh/<federation>/records/2` (a message is a
    /// batch of records; version 1 carried one record per message).
    pub topic: String,
    /// Gossipsub protocol id prefix: `/hubmesh/<federation>/meshsub`.
    pub gossip_prefix: String,
    /// Kademlia: `/hubmesh/<federation>/kad/1.0.0`.
    pub kad: StreamProtocol,
    /// Anti-entropy: `/hubmesh/<federation>/sync/1.0.0`.
    pub sync: StreamProtocol,
    /// Signal relay: `/hubmesh/<federation>/signal/1.0.0`.
    pub signal: StreamProtocol,
    /// Identify protocol version: `/hubmesh/<federation>/1.0.0`.
    pub identify: String,
}

impl Names {
    /// The names of `federation` (assumed already checked).
    pub fn new(federation: &str) -> Result<Names, crate::MeshError> {
        let proto = |s: String| {
            StreamProtocol::try_from_owned(s)
                .map_err(|e| crate::MeshError::Config(format!("protocol name: {e}")))
        };
        Ok(Names {
            topic: format!("hubmesh/{federation}/records/2"),
            gossip_prefix: format!("/hubmesh/{federation}/meshsub"),
            kad: proto(format!("/hubmesh/{federation}/kad/1.0.0"))?,
            sync: proto(format!("/hubmesh/{federation}/sync/1.0.0"))?,
            signal: proto(format!("/hubmesh/{federation}/signal/1.0.0"))?,
            identify: format!("/hubmesh/{federation}/1.0.0"),
        })
    }
}

/// An anti-entropy request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "Here is what I hold": the requester's watermark per origin.
    Watermarks(Vec<(OriginId, u64)>),
    /// "Send me `origin`'s records with `seq > after`."
    Pull {
        /// Whose records.
        origin: OriginId,
        /// Exclusive lower bound on `seq`.
        after: u64,
    },
}

/// An anti-entropy response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// Answer to `Watermarks`: the origins the responder holds records of
    /// beyond the requester's watermark, with the responder's watermark.
    Behind(Vec<(OriginId, u64)>),
    /// Answer to `Pull`: one page of encoded records, ascending by `seq`.
    Page {
        /// Encoded records (`codec::encode_record`), re-served byte-exact.
        records: Vec<serde_bytes::ByteBuf>,
        /// `after` of the next page, if there is more.
        next_after: Option<u64>,
        /// The responder's watermark for the origin: once every page is
        /// read, the requester may raise its own watermark to this.
        watermark: u64,
    },
    /// The responder could not serve the request (reason for logs).
    Refused(String),
}

/// Request-response codec of the sync protocol: one CBOR value (with the
/// codec's format byte) per stream direction, read to EOF with a size cap so
/// that a peer cannot make us buffer more than the limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncCodec;

async fn read_capped<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("sync message exceeds {max} bytes"),
        ));
    }
    Ok(buf)
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

async fn write_value<T: AsyncWrite + Unpin + Send, V: Serialize>(
    io: &mut T,
    value: &V,
    max: usize,
) -> std::io::Result<()> {
    let bytes = codec::encode_value(value).map_err(invalid)?;
    if bytes.len() > max {
        return Err(invalid(format!("sync message exceeds {max} bytes")));
    }
    io.write_all(&bytes).await?;
    io.close().await
}

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, MAX_SYNC_REQUEST_BYTES).await?;
        let req: SyncRequest = codec::decode_value(&bytes, "sync request").map_err(invalid)?;
        if let SyncRequest::Watermarks(w) = &req
            && w.len() > MAX_SYNC_ORIGINS
        {
            return Err(invalid("too many origins"));
        }
        Ok(req)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, MAX_SYNC_RESPONSE_BYTES).await?;
        let resp: SyncResponse = codec::decode_value(&bytes, "sync response").map_err(invalid)?;
        match &resp {
            SyncResponse::Behind(w) if w.len() > MAX_SYNC_ORIGINS => {
                Err(invalid("too many origins"))
            }
            SyncResponse::Page { records, .. } if records.len() > MAX_PAGE_RECORDS => {
                Err(invalid("too many records in a page"))
            }
            _ => Ok(resp),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_value(io, &req, MAX_SYNC_REQUEST_BYTES).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: SyncResponse,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_value(io, &resp, MAX_SYNC_RESPONSE_BYTES).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    #[tokio::test]
    async fn codec_round_trips_and_caps() {
        let p = StreamProtocol::new("/x");
        let req = SyncRequest::Pull {
            origin: OriginId::new(vec![1, 2]),
            after: 7,
        };
        let mut buf = Vec::new();
        SyncCodec
            .write_request(&p, &mut buf, req.clone())
            .await
            .unwrap();
        let back = SyncCodec
            .read_request(&p, &mut buf.as_slice())
            .await
            .unwrap();
        assert_eq!(back, req);

        let huge = vec![1u8; MAX_SYNC_REQUEST_BYTES + 10];
        assert!(
            SyncCodec
                .read_request(&p, &mut huge.as_slice())
                .await
                .is_err()
        );
        let garbage = [codec::FORMAT_VERSION, 0xff, 0x13];
        assert!(
            SyncCodec
                .read_request(&p, &mut garbage.as_slice())
                .await
                .is_err()
        );
        assert!(
            SyncCodec
                .read_response(&p, &mut [].as_slice())
                .await
                .is_err()
        );
        assert_eq!(
            Names::new("fed").unwrap().kad.as_ref(),
            "/hubmesh/fed/kad/1.0.0"
        );
    }
}
/// The examples in `specs/mesh.md` are these exact bytes.
#[cfg(test)]
mod spec_examples {
    use super::*;
    use hubmesh_store::{Record, Version};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn encodings_match_the_spec() {
        let r = Record {
            ns: "s".into(),
            key: "k".into(),
            body: vec![1],
            origin: OriginId::new(vec![2]),
            version: Version {
                wall_ms: 3,
                counter: 4,
            },
            seq: 5,
            expires_ms: 6,
            deleted: false,
            terms: vec!["t".into()],
            sig: vec![7],
        };
        let enc = |v: &dyn Fn() -> Vec<u8>| hex(&v());
        assert_eq!(
            enc(&|| codec::encode_record(&r).unwrap()),
            "01aa00617301616b02410103410204a2000301040505060607f408816174094107"
        );
        // A gossip message carrying that one record (§4).
        assert_eq!(
            enc(&|| codec::encode_value(&vec![serde_bytes::ByteBuf::from(
                codec::encode_record(&r).unwrap()
            )])
            .unwrap()),
            "01815821\
             01aa00617301616b02410103410204a2000301040505060607f408816174094107"
        );
        assert_eq!(
            enc(&|| codec::encode_value(&SyncRequest::Watermarks(vec![(
                OriginId::new(vec![2]),
                9
            )]))
            .unwrap()),
            "01a16a57617465726d61726b738182410209"
        );
        assert_eq!(
            enc(&|| codec::encode_value(&SyncRequest::Pull {
                origin: OriginId::new(vec![2]),
                after: 9
            })
            .unwrap()),
            "01a101a20041020109"
        );
        assert_eq!(
            enc(
                &|| codec::encode_value(&SyncResponse::Behind(vec![(OriginId::new(vec![2]), 9)]))
                    .unwrap()
            ),
            "01a166426568696e648182410209"
        );
        assert_eq!(
            enc(&|| codec::encode_value(&SyncResponse::Page {
                records: vec![serde_bytes::ByteBuf::from(vec![1u8])],
                next_after: None,
                watermark: 3
            })
            .unwrap()),
            "01a101a30081410101f60203"
        );
        assert_eq!(
            enc(&|| codec::encode_value(&SyncResponse::Refused("x".into())).unwrap()),
            "01a167526566757365646178"
        );
    }
}

//! `WatchOperationsResponse`, written by hand so that a server can send events it encoded
//! once to every watcher.
//!
//! Its wire format is exactly the one `baremetal.proto` declares (`repeated OperationEvent
//! events = 1`), so clients decode it like any generated message; only its Rust type adds a
//! second, send-only way to fill the field: `encoded_events`, events already encoded as
//! `OperationEvent` messages. A thousand watchers then cost a thousand memory copies of an
//! event, not a thousand conversions and encodings.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};

use crate::v1::OperationEvent;

/// Response of `OperationService.WatchOperations`: one or more events, in revision order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WatchOperationsResponse {
    /// The events (what a client reads; what a server may fill).
    pub events: Vec<OperationEvent>,
    /// Events already encoded as `OperationEvent` messages, sent after `events` as more
    /// elements of the same field. Decoding never fills it.
    pub encoded_events: Vec<Bytes>,
}

/// The field number of `events`.
const EVENTS: u32 = 1;

impl prost::Message for WatchOperationsResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for e in &self.events {
            encoding::message::encode(EVENTS, e, buf);
        }
        for e in &self.encoded_events {
            encoding::encode_key(EVENTS, WireType::LengthDelimited, buf);
            encoding::encode_varint(e.len() as u64, buf);
            buf.put_slice(e);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == EVENTS {
            encoding::message::merge_repeated(wire_type, &mut self.events, buf, ctx)
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(EVENTS, &self.events)
            + self
                .encoded_events
                .iter()
                .map(|e| {
                    encoding::key_len(EVENTS)
                        + encoding::encoded_len_varint(e.len() as u64)
                        + e.len()
                })
                .sum::<usize>()
    }

    fn clear(&mut self) {
        self.events.clear();
        self.encoded_events.clear();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn event(revision: u64) -> OperationEvent {
        OperationEvent {
            revision,
            operation_id: format!("op-{revision}"),
            stage: "repave-image".into(),
            ..Default::default()
        }
    }

    #[test]
    fn pre_encoded_events_decode_as_events() {
        let sent = WatchOperationsResponse {
            events: vec![event(1)],
            encoded_events: vec![
                Bytes::from(event(2).encode_to_vec()),
                Bytes::from(event(3).encode_to_vec()),
            ],
        };
        let wire = sent.encode_to_vec();
        assert_eq!(wire.len(), sent.encoded_len());
        let got = WatchOperationsResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(got.events, vec![event(1), event(2), event(3)]);
        assert!(got.encoded_events.is_empty());
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut wire = WatchOperationsResponse {
            events: vec![event(7)],
            ..Default::default()
        }
        .encode_to_vec();
        // Field 9, a varint: what a newer server might add.
        wire.extend_from_slice(&[9 << 3, 42]);
        let got = WatchOperationsResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(got.events, vec![event(7)]);
    }
}

//! Events encoded once for every watcher.
//!
//! Every watch stream sends the events it gets from the engine; without this table, a
//! thousand watchers would convert and encode each event a thousand times. The first stream
//! to send an event encodes it and leaves the bytes in the slot of its revision; the others
//! copy a reference to them.

use std::sync::Mutex;

use bm_domain::OperationEvent;
use prost::Message;
use prost::bytes::Bytes;

use crate::convert;

/// One slot: the revision it holds and that event's bytes.
type Slot = Mutex<Option<(u64, Bytes)>>;

/// Encoded events by revision, in a fixed number of slots (the most recent revisions win).
pub(crate) struct EncodedEvents {
    slots: Box<[Slot]>,
}

impl EncodedEvents {
    /// A table of `slots` slots: as many as the engine keeps events in flight to watchers.
    pub(crate) fn new(slots: usize) -> Self {
        EncodedEvents {
            slots: (0..slots.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The event encoded as an `OperationEvent` message.
    pub(crate) fn get(&self, e: &OperationEvent) -> Bytes {
        let slot = &self.slots[(e.revision % self.slots.len() as u64) as usize];
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((revision, bytes)) = &*slot
            && *revision == e.revision
        {
            return bytes.clone();
        }
        let bytes = Bytes::from(convert::event(e).encode_to_vec());
        *slot = Some((e.revision, bytes.clone()));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bm_domain::{EventKind, MachineId, OperationId, OperationPhase, OperationType, Timestamp};

    fn event(revision: u64, stage: &str) -> OperationEvent {
        OperationEvent {
            revision,
            time: Timestamp::EPOCH,
            operation_id: OperationId::from_parts(1, 1),
            machine_id: MachineId::new("m-1").unwrap(),
            operation_type: OperationType::Reimage,
            kind: EventKind::StageStarted,
            phase: OperationPhase::Running,
            stage: stage.into(),
            attempt: 1,
            message: String::new(),
        }
    }

    #[test]
    fn encodes_once_and_never_mixes_revisions() {
        let table = EncodedEvents::new(4);
        let a = table.get(&event(1, "a"));
        let again = table.get(&event(1, "a"));
        assert_eq!(
            a.as_ptr(),
            again.as_ptr(),
            "the second watcher gets the same bytes"
        );
        // Revision 5 shares revision 1's slot: it is encoded anew, and so is 1 afterwards.
        let e5 = table.get(&event(5, "e"));
        assert_eq!(
            bm_proto::v1::OperationEvent::decode(e5).unwrap().revision,
            5
        );
        let a2 = table.get(&event(1, "a"));
        assert_eq!(bm_proto::v1::OperationEvent::decode(a2).unwrap().stage, "a");
    }
}

//! Events encoded once for every watcher.
//!
//! Every watch stream sends the events it gets from the engine; without this table, a
//! thousand watchers would convert and encode each event a thousand times. The first stream
//! to send an event encodes it (`convert::watch_response`) and leaves the bytes in the slot
//! of its revision; the others copy a reference to them. The table knows revisions and
//! bytes only, neither the wire nor the domain types.

use std::sync::Mutex;

use prost::bytes::Bytes;

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

    /// The bytes of the event of `revision`: from the table, or from `encode` (which the
    /// table then keeps).
    pub(crate) fn get(&self, revision: u64, encode: impl FnOnce() -> Bytes) -> Bytes {
        let slot = &self.slots[(revision % self.slots.len() as u64) as usize];
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((held, bytes)) = &*slot
            && *held == revision
        {
            return bytes.clone();
        }
        let bytes = encode();
        *slot = Some((revision, bytes.clone()));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn encodes_once_and_never_mixes_revisions() {
        let table = EncodedEvents::new(4);
        let encodings = &Cell::new(0);
        let encode = |what: &'static str| {
            move || {
                encodings.set(encodings.get() + 1);
                Bytes::from(what)
            }
        };
        let a = table.get(1, encode("a"));
        let again = table.get(1, encode("not used"));
        assert_eq!(
            a.as_ptr(),
            again.as_ptr(),
            "the second watcher gets the same bytes"
        );
        assert_eq!(encodings.get(), 1);
        // Revision 5 shares revision 1's slot: it is encoded anew, and so is 1 afterwards.
        assert_eq!(table.get(5, encode("e")), "e");
        assert_eq!(table.get(1, encode("a")), "a");
        assert_eq!(encodings.get(), 3);
    }
}

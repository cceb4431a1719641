//! `watch` and `logs`: one server stream each, printed as it comes, across restarts of the
//! server.

use crate::connect::Clients;
use crate::flags::WatchArgs;
use crate::render::{self, Palette};
use crate::stream::{self, read_to_end};

/// `bmctl watch`: every operation event the filters select, live (after `--since` if
/// given). After a reconnect it resumes after the last event it printed, or where the
/// server said it stopped, so nothing is missed or printed twice.
pub(super) async fn watch(
    c: &mut Clients,
    args: WatchArgs,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    let events = stream::events(
        &c.operations,
        args.machine.unwrap_or_default(),
        args.operation.unwrap_or_default(),
        args.since,
    );
    read_to_end(events, |batch| {
        for e in batch.events {
            if json {
                outln!("{}", serde_json::to_string(&e)?);
            } else {
                outln!("{}", render::watch_line(&e, pal));
            }
        }
        Ok(())
    })
    .await
}

/// `bmctl logs`: an operation's provider log after line `after`, to its end.
pub(super) async fn logs(
    c: &mut Clients,
    operation: String,
    after: u64,
    json: bool,
    pal: &Palette,
) -> anyhow::Result<u8> {
    read_to_end(stream::logs(&c.operations, operation, after), |batch| {
        for l in batch.lines {
            if json {
                outln!("{}", serde_json::to_string(&l)?);
            } else {
                outln!(
                    "{} {}",
                    render::clock(l.time.as_ref()),
                    render::log_line(&l, pal)
                );
            }
        }
        Ok(())
    })
    .await
}

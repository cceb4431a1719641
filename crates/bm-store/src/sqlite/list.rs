//! Listing machines: through the label index when the selector allows it, by id otherwise;
//! and stopping when the caller has gone away.
//!
//! A selector with at least one requirement a machine must *have* a label for (`k=v`,
//! `k in (...)`, `k`) takes its candidates from the `machine_labels` table in id order, one
//! requirement driving (an equality first, then the `in` with the fewest values, then an
//! existence), reads only those machines and applies the whole selector to each: a page costs
//! the matching rows up to the page, not the fleet. A selector with only negative requirements
//! (`!k`, `k!=v`, `k notin (...)`) cannot be served by the index and reads machines in id
//! order until the page is full.
//!
//! Reads run on the blocking pool. The async call holds a [`Cancel`] guard: when its future
//! is dropped (the client went away, its deadline passed), the guard sets the flag that the
//! loops here check at every row and SQLite checks while it runs a statement (a progress
//! handler), interrupting it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bm_domain::{KeyConstraint, LabelSelector, Machine};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use super::codec;
use crate::{MachineQuery, Page, Result, StoreError};

/// Set when the caller of a read went away.
#[derive(Clone, Debug, Default)]
pub(super) struct Cancel(Arc<AtomicBool>);

/// The read was abandoned by its caller; nobody sees this error.
#[derive(Debug, thiserror::Error)]
#[error("the caller went away before the read finished")]
struct Abandoned;

/// How many SQLite virtual machine instructions run between two looks at the flag.
const PROGRESS_OPS: i32 = 1000;

impl Cancel {
    /// True once the caller went away.
    pub(super) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// An error if the caller went away.
    pub(super) fn check(&self) -> Result<()> {
        if self.is_set() {
            Err(StoreError::backend(Abandoned))
        } else {
            Ok(())
        }
    }

    /// A guard that cancels the read when dropped.
    pub(super) fn guard(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }

    /// Runs `f` on `conn` with SQLite looking at the flag every [`PROGRESS_OPS`]
    /// instructions, so that a statement running (or starting) after the caller went away
    /// is interrupted too; the connection goes back to the pool without the check.
    pub(super) fn run<T>(
        &self,
        conn: &mut Connection,
        f: impl FnOnce(&Connection, &Cancel) -> Result<T>,
    ) -> Result<T> {
        let flag = self.0.clone();
        conn.progress_handler(PROGRESS_OPS, Some(move || flag.load(Ordering::Relaxed)))?;
        let result = self.check().and_then(|()| f(conn, self));
        conn.progress_handler(0, None::<fn() -> bool>)?;
        result
    }
}

/// Cancels its read when dropped (held by the async call; dropped with its future).
pub(super) struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.0.store(true, Ordering::Relaxed);
    }
}

/// A page of machines and how many machine rows were read for it.
#[derive(Debug)]
pub(super) struct Listing {
    pub(super) page: Page<Machine>,
    pub(super) rows_read: usize,
}

/// Values of an `in` up to which the index is read once per value and the results merged;
/// above, the key's entries are read in id order and filtered by value.
const MERGE_VALUES: usize = 16;

/// Lists machines (see the module documentation).
pub(super) fn machines(conn: &Connection, q: &MachineQuery, cancel: &Cancel) -> Result<Listing> {
    match driver(&q.selector) {
        Some(c) => by_label(conn, q, c, cancel),
        None => by_id(conn, q, cancel),
    }
}

/// The requirement whose index entries are read: the most selective kind first.
fn driver(selector: &LabelSelector) -> Option<KeyConstraint<'_>> {
    selector.positive_requirements().min_by_key(|c| match c {
        KeyConstraint::OneOf(_, vs) => vs.len(),
        KeyConstraint::Present(_) => usize::MAX,
    })
}

/// Machines in id order, filtered on the way (no usable index).
fn by_id(conn: &Connection, q: &MachineQuery, cancel: &Cancel) -> Result<Listing> {
    let mut sql = format!(
        "SELECT {} FROM machines WHERE id > ?1",
        codec::MACHINE_COLUMNS
    );
    let mut args: Vec<Value> = vec![Value::Text(String::new())];
    if let Some(p) = q.phase {
        args.push(Value::Text(p.as_str().into()));
        sql.push_str(&format!(" AND phase = ?{}", args.len()));
    }
    if let Some(s) = q.effective_state {
        args.push(Value::Text(s.as_str().into()));
        sql.push_str(&format!(" AND effective_state = ?{}", args.len()));
    }
    args.push(Value::Integer(0));
    sql.push_str(&format!(" ORDER BY id LIMIT ?{}", args.len()));
    let limit_arg = args.len() - 1;
    // The label selector is applied here, so a sparse selector reads in chunks until the
    // page (plus one, to know whether there is more) is full; without one, the page plus one
    // is all there is to read.
    let chunk = if q.selector.is_empty() {
        q.limit + 1
    } else {
        (q.limit + 1).max(256)
    };
    args[limit_arg] = Value::Integer(chunk as i64);
    let mut cursor = q
        .after
        .as_ref()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut items = Vec::new();
    let mut rows_read = 0;
    let mut stmt = conn.prepare_cached(&sql)?;
    loop {
        args[0] = Value::Text(cursor.clone());
        let mut rows = stmt.query(params_from_iter(args.iter()))?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            cancel.check()?;
            n += 1;
            rows_read += 1;
            cursor = row.get(0)?;
            let Some(m) = codec::skip_unreadable(codec::machine(row))? else {
                continue;
            };
            if keep(q, &mut items, m) {
                return Ok(Listing {
                    page: Page { items, more: true },
                    rows_read,
                });
            }
        }
        if n < chunk {
            return Ok(Listing {
                page: Page { items, more: false },
                rows_read,
            });
        }
    }
}

/// Machines named by the label index for `driver`, in id order.
fn by_label(
    conn: &Connection,
    q: &MachineQuery,
    driver: KeyConstraint<'_>,
    cancel: &Cancel,
) -> Result<Listing> {
    let chunk = (q.limit + 1).clamp(16, 1024);
    let mut cursor = q
        .after
        .as_ref()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut items = Vec::new();
    let mut rows_read = 0;
    let mut get = conn.prepare_cached(&format!(
        "SELECT {}, phase, effective_state FROM machines WHERE id = ?1",
        codec::MACHINE_COLUMNS
    ))?;
    loop {
        cancel.check()?;
        let batch = candidates(conn, driver, &cursor, chunk)?;
        for id in &batch.ids {
            cancel.check()?;
            let row = get
                .query_row([id], |r| {
                    let phase: String = r.get(3)?;
                    let state: String = r.get(4)?;
                    let wanted = q.phase.is_none_or(|p| p.as_str() == phase)
                        && q.effective_state.is_none_or(|s| s.as_str() == state);
                    Ok(if wanted {
                        Some(codec::machine(r)?)
                    } else {
                        None
                    })
                })
                .optional()?;
            rows_read += 1;
            // An index entry without its machine cannot happen (both are written in one
            // transaction); were it to, the machine is simply not listed.
            let Some(Some(row)) = row else { continue };
            let Some(m) = codec::skip_unreadable(Ok(row))? else {
                continue;
            };
            if keep(q, &mut items, m) {
                return Ok(Listing {
                    page: Page { items, more: true },
                    rows_read,
                });
            }
        }
        match batch.next {
            Some(next) => cursor = next,
            None => {
                return Ok(Listing {
                    page: Page { items, more: false },
                    rows_read,
                });
            }
        }
    }
}

/// Candidate machine ids from the label index, ascending.
struct Candidates {
    ids: Vec<String>,
    /// Where to go on from; `None` when the index has nothing more.
    next: Option<String>,
}

fn candidates(
    conn: &Connection,
    driver: KeyConstraint<'_>,
    after: &str,
    n: usize,
) -> Result<Candidates> {
    let limit = n as i64;
    match driver {
        KeyConstraint::OneOf(key, values) if values.len() <= MERGE_VALUES => {
            let mut stmt = conn.prepare_cached(
                "SELECT machine_id FROM machine_labels
                 WHERE key = ?1 AND value = ?2 AND machine_id > ?3
                 ORDER BY machine_id LIMIT ?4",
            )?;
            let mut ids = Vec::new();
            let mut any_full = false;
            for value in values {
                let found = stmt
                    .query_map(params![key, value, after, limit], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                any_full |= found.len() == n;
                ids.extend(found);
            }
            ids.sort_unstable();
            ids.dedup();
            // Every list's first `n` ids are here, so the first `n` of their union are the
            // first `n` overall; past the last of them some list may have more.
            let more = any_full || ids.len() > n;
            ids.truncate(n);
            let next = if more { ids.last().cloned() } else { None };
            Ok(Candidates { ids, next })
        }
        KeyConstraint::OneOf(key, values) => {
            let mut stmt = conn.prepare_cached(
                "SELECT machine_id, value FROM machine_labels INDEXED BY machine_labels_by_key
                 WHERE key = ?1 AND machine_id > ?2
                 ORDER BY machine_id LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![key, after, limit], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let next = (rows.len() == n).then(|| rows[n - 1].0.clone());
            let ids = rows
                .into_iter()
                .filter(|(_, v)| values.contains(v))
                .map(|(id, _)| id)
                .collect();
            Ok(Candidates { ids, next })
        }
        KeyConstraint::Present(key) => {
            let mut stmt = conn.prepare_cached(
                "SELECT machine_id FROM machine_labels INDEXED BY machine_labels_by_key
                 WHERE key = ?1 AND machine_id > ?2
                 ORDER BY machine_id LIMIT ?3",
            )?;
            let ids = stmt
                .query_map(params![key, after, limit], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let next = (ids.len() == n).then(|| ids[n - 1].clone());
            Ok(Candidates { ids, next })
        }
    }
}

/// Adds `m` to the page if the selector matches it; true once the page is full and one more
/// match proved that another page follows (that match is dropped).
fn keep(q: &MachineQuery, items: &mut Vec<Machine>, m: Machine) -> bool {
    if !q.selector.matches(&m.labels) {
        return false;
    }
    items.push(m);
    if items.len() > q.limit {
        items.truncate(q.limit);
        return true;
    }
    false
}

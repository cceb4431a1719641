//! End-to-end tests through the generated client and `bmctl`.
//!
//! The API tests (`api`, `streams`) run `bm_server::serve` in this process on an ephemeral
//! port (`inproc`); the CLI and restart tests run the real `bm-server` process with a
//! temporary data directory (`support::Server`), since they need a binary, signals or a
//! crash.

mod api;
mod cli;
mod hygiene;
mod inproc;
mod limits;
mod restart;
mod store;
mod streams;
mod support;

//! End-to-end tests through the generated client and `bmctl`; `tls` covers TLS and mTLS.
//!
//! The API tests (`api`, `streams`) run `bm_server::serve` in this process on an ephemeral
//! port (`inproc`); the CLI and restart tests run the real `bm-server` process with a
//! temporary data directory (`support::Server`), since they need a binary, signals or a
//! crash.

mod api;
mod auth;
mod boot;
mod cli;
mod dashboard;
mod fuzz_corpus;
mod gateway;
mod hygiene;
mod inproc;
mod limits;
mod metrics;
mod migrate;
mod pki;
mod quota;
mod random_requests;
mod replicas;
mod restart;
mod rollouts;
mod scopes;
mod store;
mod streams;
mod support;
mod tls;
mod traces;

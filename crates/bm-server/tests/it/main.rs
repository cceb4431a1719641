//! End-to-end tests: the real `bm-server` process on an ephemeral port with a temporary data
//! directory, driven through the generated client and through `bmctl` as a process.

mod api;
mod cli;
mod restart;
mod store;
mod streams;
mod support;

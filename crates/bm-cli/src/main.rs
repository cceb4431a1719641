//! `bmctl`: the command line of the bare-metal control plane.
//!
//! Every command talks to `bm-server` over gRPC (`--server`, `BM_SERVER`). Operation
//! commands follow the operation live by default; `--no-wait` returns at once. `-o json`
//! prints the canonical proto3 JSON of the resources instead of tables.
//!
//! The modules, as ripgrep splits its own: `flags` (the clap definitions), `connect`,
//! `commands` (one module per group of commands), `stream` (a server stream that survives a
//! restart of the server), `follow` (an operation live, both streams interleaved), `render`
//! (pure text rendering, snapshot-tested) and `inventory` (inventory files).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool prints"
)]

/// Writes to stdout; exits quietly when the reader went away (`bmctl ... | head`).
macro_rules! out {
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*), false) };
}

/// [`out!`] with a newline.
macro_rules! outln {
    () => { $crate::emit(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*), true) };
}

mod commands;
mod config;
mod connect;
mod flags;
mod follow;
mod inventory;
mod render;
mod stream;
#[cfg(test)]
mod testing;

use std::process::ExitCode;

use clap::Parser;

/// Writes to stdout (colour stripped unless it is a terminal). A closed pipe ends the
/// program with exit code 0: the reader has what it wanted. Any other write error (a full
/// disk) ends it with exit code 1, so that cut output is not taken for the whole.
fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = anstream::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            anstream::eprintln!("error: writing output: {e}");
            std::process::exit(1);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = flags::Cli::parse();
    match commands::run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => {
                    let msg = s.message().replace('\n', " ");
                    let hint = match s.code() {
                        tonic::Code::Unauthenticated => {
                            " (give a token: --token-file FILE, BM_TOKEN_FILE, or a context; see `bmctl config --help`)"
                        }
                        _ => "",
                    };
                    anstream::eprintln!("error: {}: {msg}{hint}", bm_proto::code_name(s.code()));
                }
                None => anstream::eprintln!("error: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

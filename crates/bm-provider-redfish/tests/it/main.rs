//! Integration tests of the Redfish provider against real peers that the tests start
//! themselves: the sushy-tools Redfish emulator (from PyPI, launched by `support/emulator.rs`),
//! an OpenSSH server (`sshd`) and small HTTP stubs, all on 127.0.0.1. The system packages they
//! need (`openssh-server`, `python3-venv`) are installed by `cargo xtask test`; without one, a
//! test fails with a line that names it.

mod credentials;
mod field;
mod notify;
mod redfish;
mod server;
mod ssh;
mod support;

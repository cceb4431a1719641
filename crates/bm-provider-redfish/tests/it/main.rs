//! Integration tests of the Redfish provider against real peers that the tests start
//! themselves: the sushy-tools Redfish emulator (`shared/tools/redfish-emulator`), an OpenSSH
//! server (`/usr/sbin/sshd`) and small HTTP stubs, all on 127.0.0.1.

mod field;
mod notify;
mod redfish;
mod server;
mod ssh;
mod support;

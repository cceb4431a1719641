//! The system programs the tests start (`sshd`, `python3`), found the same way on every
//! machine: the `PATH`, then the sbin directories a user's `PATH` often lacks. A missing one
//! fails the test with one line naming the Debian package that provides it; `cargo xtask
//! test` installs them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where daemons live, searched after the `PATH`.
const SBIN: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// The program `name`, or a panic with one line that names the Debian `package` to install.
pub(crate) fn find(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| missing(name, package))
}

/// Fails the test with one line: what is missing and how to get it.
pub(crate) fn missing(what: &str, package: &str) -> ! {
    panic!(
        "{what} is missing: install the Debian package {package} (apt-get install {package}), or run `cargo xtask test`, which installs it"
    )
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

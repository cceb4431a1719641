//! The web dashboard in a real browser: `tests/dashboard/dashboard.test.mjs`, run by Node's
//! test runner, drives Debian's chromium with playwright-core against real `bm-server`
//! processes it starts itself. `cargo xtask test` installs chromium, Node.js and
//! playwright-core (`npm ci` in `tests/dashboard`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A program on the `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard");
    let node = on_path("node").expect(
        "the dashboard's tests need Node.js: run the tests with `cargo xtask test`, which installs it",
    );
    let chromium = std::env::var_os("BM_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| on_path("chromium"))
        .expect("the dashboard's tests need chromium: run the tests with `cargo xtask test`, which installs Debian's");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "the dashboard's tests need playwright-core: run the tests with `cargo xtask test`, or `npm ci` in {}",
        dir.display()
    );
    let out = Command::new(node)
        .args(["--test", "dashboard.test.mjs"])
        .current_dir(&dir)
        .env("BM_SERVER_BIN", env!("CARGO_BIN_EXE_bm-server"))
        .env("BM_CHROMIUM", chromium)
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the dashboard's browser tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Node's runner passes when it found no test at all; four ran.
    assert!(stdout.contains("# pass 4"), "{stdout}");
}

//! The demo plays to completion (with instant fake hardware, to keep it quick).

#[test]
fn demo_runs_to_completion() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--fake-timing", "instant"])
        .env("NO_COLOR", "1")
        .output()
        .expect("running cargo xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for caption in ["Step 3:", "Step 5:", "Step 7:", "Step 9:", "Step 10:"] {
        assert!(stdout.contains(caption), "missing {caption}");
    }
    assert!(stdout.contains("Demo complete"), "{stdout}");
}

//! `ipc-mesh demo` runs end to end, as a new user would try it, and cleans up.

mod support;

#[test]
fn the_demo_shows_a_crash_survived_and_exits_cleanly() {
    let tmp = support::temp_home();
    let out = std::process::Command::new(support::BIN)
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("killed with SIGKILL"), "{stdout}");
    assert!(stdout.contains("in order, each once"), "{stdout}");
    assert!(stdout.contains("exactly once"), "{stdout}");
    // Everything it created under TMPDIR is gone.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

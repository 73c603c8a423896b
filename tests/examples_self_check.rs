//! The self-checking examples (the README's `cargo run --example demo` among them)
//! run as separate processes and exit 0.

use std::process::Command;

#[path = "common/items_contract.rs"]
mod items_contract;

/// Runs the built example `name` to completion; returns its stdout, failing the test
/// (with the example's output) unless it exits 0.
fn run_example(name: &str) -> String {
    let binary = items_contract::example_binary(name);
    let output = Command::new(&binary)
        .env_remove("SERVE")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} exited with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn demo_exits_0_with_one_winner() {
    let stdout = run_example("demo");
    assert!(
        stdout.contains("Alice's change is lost"),
        "act 1 ran:\n{stdout}"
    );
    assert!(
        stdout.contains("412 Precondition Failed"),
        "act 2 showed the 412:\n{stdout}"
    );
    assert!(
        stdout.contains("  1 × 200 OK"),
        "act 3 had one winner:\n{stdout}"
    );
    assert!(stdout.contains("All outcomes as expected."), "{stdout}");
}

#[test]
fn hyper_plain_self_check_exits_0() {
    let stdout = run_example("hyper_plain");
    assert!(stdout.contains("self-check passed"), "{stdout}");
}

#[test]
fn custom_store_example_exits_0() {
    let stdout = run_example("custom_store");
    assert!(stdout.contains("contract suite passed"), "{stdout}");
}

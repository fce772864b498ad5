//! `cargo xtask`: developer tasks that are more than one cargo command.

use std::process::{exit, Command};

const HELP: &str = "\
cargo xtask <TASK>

Tasks:
  lint    cargo fmt --check, then clippy on every target with -D warnings
  soak    run the long #[ignore] tests of the workspace in release mode
";

fn cargo(args: &[&str]) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    Command::new(cargo)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    let task = std::env::args().nth(1).unwrap_or_default();
    let ok = match task.as_str() {
        "lint" => {
            cargo(&["fmt", "--all", "--", "--check"])
                && cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
        }
        "soak" => cargo(&["test", "--workspace", "--release", "--", "--ignored"]),
        "" | "help" | "--help" | "-h" => {
            print!("{HELP}");
            true
        }
        other => {
            eprintln!("unknown task '{other}'\n\n{HELP}");
            false
        }
    };
    exit(if ok { 0 } else { 1 });
}

//! `cargo xtask`: comfyfleet's project automation (CI, architecture checks,
//! system setup, benches, demo).
//!
//! Run `cargo xtask help` for the list of subcommands. `cargo xtask ci` is
//! the project's single test command: `.ci/run` and the GitHub workflow both
//! call exactly that.
//!
//! Architecture rules live in `arch.rs` (a data table); system requirements
//! for the test suite live in `setup.rs` (also a data table).

mod arch;
mod setup;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <subcommand> [args...]

subcommands:
  ci              the whole check, in order, stopping at the first failure:
                    setup, fmt, arch, clippy, test, hygiene
  test            setup, then the test suite (nextest if installed, else
                  cargo test) and the doc tests
  arch            architecture checks on the workspace dependency graph
  setup           check for (and install / start) system services the tests
                  need; skipped when COMFYFLEET_SKIP_SETUP=1
  bench [--quick] the load harness against the real binary; writes BENCHMARKS.md
                  (runs setup first: its PostgreSQL figures use a private cluster)
  bench criterion [ARGS]
                  cargo bench -p comfyfleet-benches [ARGS] (per-part benches)
  demo [ARGS]     cargo run -p comfyfleet-cli -- demo [ARGS]
  fuzz [TARGET] [--seconds N]
                  run the cargo-fuzz targets in fuzz/ (all three, or TARGET:
                  workflow_parse, comfyui_decode, runninghub_classify) for N
                  seconds each (default 60); installs cargo-fuzz if missing,
                  builds with RUSTC_BOOTSTRAP=1 (see fuzz/README.md)
  chaos [--long] [--store sqlite|postgres|both]
                  the chaos run in release, counts printed: the real binary,
                  faulty simulators, random SIGKILLs (moderate: 150 jobs, 8
                  kills, as in the suite; --long: 1000 jobs, 100 kills)
  soak [--minutes N] [--rate R]
                  the soak run in release: steady load (R jobs/s, default 40)
                  with faults for N minutes (default 10); RSS, descriptors,
                  throughput and latency over time into soak.png and the Soak
                  section of BENCHMARKS.md
  help            this text
";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args.collect();

    let takes_no_args = ["ci", "test", "arch", "setup"];
    if takes_no_args.contains(&cmd.as_str()) && !rest.is_empty() {
        eprintln!(
            "xtask: `{cmd}` takes no arguments (got: {})",
            rest.join(" ")
        );
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }

    let result = match cmd.as_str() {
        "ci" => ci(),
        "test" => run_steps(&[("setup", setup::run), ("test", tests)]),
        "arch" => arch::run(),
        "setup" => setup::run(),
        "bench" => bench(&rest),
        "demo" => demo(&rest),
        "fuzz" => fuzz(&rest),
        "chaos" => chaos(&rest),
        "soak" => soak(&rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown subcommand `{other}`");
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };

    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A named CI step.
type Step = (&'static str, fn() -> Result<()>);

/// `cargo xtask ci`: every step in order, stopping at the first failure.
fn ci() -> Result<()> {
    run_steps(&[
        ("setup", setup::run),
        ("fmt", fmt),
        ("arch", arch::run),
        ("clippy", clippy),
        ("test", tests),
        ("hygiene", hygiene),
    ])
}

fn run_steps(steps: &[Step]) -> Result<()> {
    let total = steps.len();
    let all = Instant::now();
    for (i, (name, step)) in steps.iter().enumerate() {
        let n = i + 1;
        eprintln!("\n==> [{n}/{total}] {name}");
        let started = Instant::now();
        let result = step();
        let took = secs(started.elapsed());
        match result {
            Ok(()) => eprintln!("<== [{n}/{total}] {name}: ok ({took})"),
            Err(e) => {
                eprintln!("<== [{n}/{total}] {name}: FAILED ({took})");
                return Err(e.context(format!("step `{name}` failed")));
            }
        }
    }
    eprintln!(
        "\n==> all {total} step(s) passed in {}",
        secs(all.elapsed())
    );
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------
// steps

fn fmt() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])
}

fn clippy() -> Result<()> {
    let mut args = vec!["clippy", "--workspace", "--all-targets"];
    if workspace_root()?.join("Cargo.lock").is_file() {
        args.push("--locked");
    }
    args.extend(["--", "-D", "warnings"]);
    cargo(&args)
}

fn tests() -> Result<()> {
    if has_nextest() {
        cargo(&["nextest", "run", "--workspace", "--no-fail-fast"])?;
    } else {
        eprintln!("xtask: cargo-nextest not found, falling back to `cargo test`");
        cargo(&["test", "--workspace", "--no-fail-fast"])?;
    }
    cargo(&["test", "--workspace", "--doc"])
}

fn has_nextest() -> bool {
    Command::new(cargo_bin())
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Crates that must not appear anywhere in the workspace's dependency tree.
const BANNED_CRATES: &[&str] = &["aws-lc-rs", "openssl-sys"];

fn hygiene() -> Result<()> {
    let mut found = Vec::new();
    for krate in BANNED_CRATES {
        if !cargo_tree_is_empty(krate)? {
            found.push(*krate);
        }
    }
    if !found.is_empty() {
        bail!(
            "banned crate(s) in the dependency tree: {} (see the trees above; \
             pick rustls with the `ring` provider / no native-tls instead)",
            found.join(", ")
        );
    }
    Ok(())
}

/// `cargo tree -i <krate> --workspace`: `Ok(true)` when the crate is absent.
fn cargo_tree_is_empty(krate: &str) -> Result<bool> {
    let args = ["tree", "-i", krate, "--workspace"];
    eprintln!("$ cargo {}", args.join(" "));
    let out = Command::new(cargo_bin())
        .args(args)
        .current_dir(workspace_root()?)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `cargo {}`", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("did not match any packages") {
            eprintln!("  {krate}: not in the dependency tree (ok)");
            return Ok(true);
        }
        eprint!("{stderr}");
        bail!("`cargo {}` failed ({})", args.join(" "), out.status);
    }
    if stdout.trim().is_empty() {
        // In Cargo.lock but not reachable on this platform ("nothing to print").
        eprintln!("  {krate}: not in the dependency tree (ok)");
        return Ok(true);
    }
    eprintln!("  {krate}: FOUND in the dependency tree:");
    eprint!("{stdout}");
    Ok(false)
}

/// `bench [--quick] [--out FILE]`: the load harness (writes BENCHMARKS.md); `bench criterion
/// [ARGS]`: the per-part criterion benches (`cargo bench -p comfyfleet-benches ARGS`).
fn bench(extra: &[String]) -> Result<()> {
    // The harness and the benches that drive the real binary (postgres_scale) find it next
    // to their own executable in target/release.
    cargo(&["build", "--release", "-p", "comfyfleet-cli"])?;
    // Both use private PostgreSQL clusters (the server binaries), the SSH bench a real sshd.
    setup::run()?;
    if extra.first().map(String::as_str) == Some("criterion") {
        let mut args: Vec<&str> = vec!["bench", "-p", "comfyfleet-benches"];
        args.extend(extra[1..].iter().map(String::as_str));
        return cargo(&args);
    }
    let mut args: Vec<&str> = vec![
        "run",
        "--release",
        "-p",
        "comfyfleet-benches",
        "--bin",
        "load",
        "--",
    ];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// `soak [--minutes N] [--rate R]`: the soak run (`benches/src/bin/soak.rs`) in release; it
/// writes `soak.png` and the Soak section of `BENCHMARKS.md` at the workspace root.
fn soak(extra: &[String]) -> Result<()> {
    check_soak_args(extra)?;
    setup::soak()?;
    cargo(&["build", "--release", "-p", "comfyfleet-cli"])?;
    let mut args: Vec<&str> = vec![
        "run",
        "--release",
        "-p",
        "comfyfleet-benches",
        "--bin",
        "soak",
        "--",
    ];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// `--minutes N` and `--rate R`, each a positive number; nothing else.
fn check_soak_args(extra: &[String]) -> Result<()> {
    let mut i = 0;
    while i < extra.len() {
        match extra[i].as_str() {
            "--minutes" | "--rate" => {
                let value = extra.get(i + 1).map(String::as_str).unwrap_or("");
                if !value.parse::<f64>().is_ok_and(|v| v > 0.0) {
                    bail!("soak: {} needs a positive number (got `{value}`)", extra[i]);
                }
                i += 2;
            }
            other => bail!("soak: unknown argument `{other}`"),
        }
    }
    Ok(())
}

fn demo(extra: &[String]) -> Result<()> {
    let mut args: Vec<&str> = vec!["run", "-p", "comfyfleet-cli", "--", "demo"];
    // `cargo xtask demo -- --flag` and `cargo xtask demo --flag` mean the same.
    let extra = match extra.first() {
        Some(first) if first == "--" => &extra[1..],
        _ => extra,
    };
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

/// The cargo-fuzz targets in `fuzz/fuzz_targets/`.
const FUZZ_TARGETS: &[&str] = &["workflow_parse", "comfyui_decode", "runninghub_classify"];

/// `cargo xtask fuzz [TARGET] [--seconds N]`: each target in turn, for N seconds.
fn fuzz(args: &[String]) -> Result<()> {
    let (targets, seconds) = fuzz_args(args)?;
    if !succeeds(&cargo_bin(), &["fuzz", "--version"]) {
        cargo(&["install", "cargo-fuzz", "--locked"])?;
    }
    let root = workspace_root()?;
    let max_time = format!("-max_total_time={seconds}");
    for target in targets {
        // New inputs go to a git-ignored working corpus; the committed seeds in
        // fuzz/corpus/<target> are only read.
        let work = format!("fuzz/target/corpus/{target}");
        let seeds = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(root.join(&work)).with_context(|| format!("creating {work}"))?;
        // cargo-fuzz passes nightly-only flags (-Z sanitizer, -C passes); stable accepts them
        // with RUSTC_BOOTSTRAP=1.
        let args = [
            "fuzz",
            "run",
            target,
            &work,
            &seeds,
            "--",
            &max_time,
            "-print_final_stats=1",
        ];
        eprintln!("$ RUSTC_BOOTSTRAP=1 cargo {}", args.join(" "));
        let mut cmd = Command::new(cargo_bin());
        cmd.args(args).env("RUSTC_BOOTSTRAP", "1");
        // `cargo run` gave us xtask's CARGO_PKG_* / CARGO_MANIFEST_*; build scripts that watch
        // them (ring's) would otherwise rebuild whenever the fuzz crate is also built by hand.
        for (key, _) in env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&k.as_ref())
            {
                cmd.env_remove(&key);
            }
        }
        run_status(&mut cmd, "cargo", &args)?;
    }
    Ok(())
}

/// Parses `[TARGET] [--seconds N]`.
fn fuzz_args(args: &[String]) -> Result<(Vec<&'static str>, u64)> {
    let mut targets: Vec<&'static str> = FUZZ_TARGETS.to_vec();
    let mut seconds = 60;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--seconds" {
            let n = it.next().context("--seconds needs a number")?;
            seconds = n
                .parse()
                .with_context(|| format!("--seconds: `{n}` is not a number"))?;
        } else if let Some(t) = FUZZ_TARGETS.iter().find(|t| **t == arg.as_str()) {
            targets = vec![*t];
        } else {
            bail!(
                "fuzz: unknown argument `{arg}` (targets: {})",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    Ok((targets, seconds))
}

/// Whether `program <args>` runs and exits 0 (output discarded).
fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo xtask chaos [--long] [--store sqlite|postgres|both]`: the chaos test binary
/// (`crates/comfyfleet-cli/tests/chaos.rs`) in release, one store after the other, with its
/// counts printed. `COMFYFLEET_CHAOS_SEED` passes through to repeat a schedule.
fn chaos(args: &[String]) -> Result<()> {
    let (long, store) = chaos_args(args)?;
    let mut envs = vec![("COMFYFLEET_CHAOS_STORE", store)];
    if long {
        envs.extend([
            ("COMFYFLEET_CHAOS_JOBS", "1000"),
            ("COMFYFLEET_CHAOS_KILLS", "100"),
        ]);
    }
    let args = [
        "test",
        "--release",
        "-p",
        "comfyfleet-cli",
        "--test",
        "chaos",
        "--",
        "--nocapture",
        "--test-threads=1",
    ];
    run(&cargo_bin(), &args, &envs)
}

/// Parses `[--long] [--store sqlite|postgres|both]`.
fn chaos_args(args: &[String]) -> Result<(bool, &'static str)> {
    let mut long = false;
    let mut store = "both";
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--long" => long = true,
            "--store" => {
                let s = it
                    .next()
                    .context("--store needs sqlite, postgres or both")?;
                store = ["sqlite", "postgres", "both"]
                    .into_iter()
                    .find(|k| k == s)
                    .with_context(|| format!("--store: `{s}` is not sqlite, postgres or both"))?;
            }
            other => bail!("chaos: unknown argument `{other}`"),
        }
    }
    Ok((long, store))
}

// ---------------------------------------------------------------------------
// process helpers

/// The cargo that launched us (`cargo xtask` sets `$CARGO`), else `cargo`.
fn cargo_bin() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The workspace root (xtask lives at `<root>/xtask`).
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest dir has no parent")
}

/// Runs `cargo <args>` in the workspace root with inherited stdio.
fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    run_status(Command::new(cargo_bin()).args(args), "cargo", args)
}

/// Runs `program <args>` in the workspace root with inherited stdio.
fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let shown: Vec<String> = envs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(std::iter::once(program.to_owned()))
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect();
    eprintln!("$ {}", shown.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_status(&mut cmd, program, args)
}

fn run_status(cmd: &mut Command, program: &str, args: &[&str]) -> Result<()> {
    let status = cmd
        .current_dir(workspace_root()?)
        .status()
        .with_context(|| format!("could not start `{program}`"))?;
    if !status.success() {
        bail!("`{} {}` failed ({status})", program, args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RAN: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn steps_stop_at_the_first_failure() {
        let err = run_steps(&[
            ("one", || {
                RAN.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
            ("two", || bail!("boom")),
            ("three", || {
                RAN.fetch_add(100, Ordering::SeqCst);
                Ok(())
            }),
        ])
        .unwrap_err();
        assert_eq!(format!("{err:#}"), "step `two` failed: boom");
        assert_eq!(RAN.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn soak_args_are_positive_numbers() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(check_soak_args(&[]).is_ok());
        assert!(check_soak_args(&args(&["--minutes", "0.5", "--rate", "40"])).is_ok());
        assert!(check_soak_args(&args(&["--minutes", "0"])).is_err());
        assert!(check_soak_args(&args(&["--minutes", "ten"])).is_err());
        assert!(check_soak_args(&args(&["--rate"])).is_err());
        assert!(check_soak_args(&args(&["--seconds", "5"])).is_err());
    }

    #[test]
    fn chaos_args_pick_length_and_store() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(chaos_args(&[]).unwrap(), (false, "both"));
        assert_eq!(
            chaos_args(&args(&["--long", "--store", "postgres"])).unwrap(),
            (true, "postgres")
        );
        assert!(chaos_args(&args(&["--store", "mysql"])).is_err());
        assert!(chaos_args(&args(&["--store"])).is_err());
        assert!(chaos_args(&args(&["--fast"])).is_err());
    }

    #[test]
    fn fuzz_args_pick_targets_and_seconds() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(fuzz_args(&[]).unwrap(), (FUZZ_TARGETS.to_vec(), 60));
        assert_eq!(
            fuzz_args(&args(&["comfyui_decode", "--seconds", "5"])).unwrap(),
            (vec!["comfyui_decode"], 5)
        );
        assert!(fuzz_args(&args(&["nope"])).is_err());
        assert!(fuzz_args(&args(&["--seconds"])).is_err());
        assert!(fuzz_args(&args(&["--seconds", "x"])).is_err());
    }
}

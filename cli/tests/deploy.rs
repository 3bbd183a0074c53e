//! What hospital IT meets first: the systemd units pass `systemd-analyze verify` without a
//! warning and keep their hardening; every command's `--help` says what it does.

mod common;

use common::*;
use std::process::Command;

#[test]
fn systemd_units_verify_and_are_hardened() {
    let units = repo_root().join("deploy/systemd");
    let tmp = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_amicus");
    let mut copies = Vec::new();
    for name in ["amicus-registry.service", "amicus-station.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        for needed in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "KillSignal=SIGTERM",
            "UMask=0077",
        ] {
            assert!(text.contains(needed), "{name} lacks {needed:?}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("ReadWritePaths=/var/lib/amicus")),
            "{name}: the state directory must be the only writable path"
        );
        assert!(!text.contains("--db "), "{name}: a database URL in argv");
        // systemd-analyze checks that ExecStart's program exists: point it at a built one.
        let text = text
            .replace("/usr/local/bin/amicus-registry", exe)
            .replace("/usr/local/bin/amicus ", &format!("{exe} "));
        let copy = tmp.path().join(name);
        std::fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    let station = std::fs::read_to_string(units.join("amicus-station.service")).unwrap();
    assert!(
        station.contains("ReadOnlyPaths=/srv/dicom"),
        "the station's archive must be read-only"
    );
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is not installed"
        );
        eprintln!("SKIPPED (counted): systemd-analyze is not installed");
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify:\n{said}");
    // Unknown or misspelt directives are only warnings to systemd: none allowed here.
    assert!(said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

/// The subcommands listed in `amicus ARGS --help`, each with whether it has a description.
fn subcommands(args: &[String]) -> Vec<(String, bool)> {
    let mut full = args.to_vec();
    full.push("--help".into());
    let argv: Vec<&str> = full.iter().map(String::as_str).collect();
    let out = ok(&argv);
    let mut found = Vec::new();
    let mut inside = false;
    for line in out.stdout.lines() {
        if line.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside {
            if line.trim().is_empty() || !line.starts_with("  ") {
                break;
            }
            let mut words = line.split_whitespace();
            let name = words.next().unwrap_or("").to_string();
            if name != "help" {
                found.push((name, words.next().is_some()));
            }
        }
    }
    found
}

/// Every command and subcommand says in `--help` what it does (hospital IT reads these).
#[test]
fn every_command_says_what_it_does() {
    let mut queue: Vec<Vec<String>> = vec![Vec::new()];
    let mut missing = Vec::new();
    let mut seen = 0;
    while let Some(args) = queue.pop() {
        for (name, described) in subcommands(&args) {
            let mut next = args.clone();
            next.push(name);
            seen += 1;
            if !described {
                missing.push(next.join(" "));
            }
            queue.push(next);
        }
    }
    assert!(seen > 40, "only {seen} commands found");
    assert!(missing.is_empty(), "no description in --help: {missing:?}");
}

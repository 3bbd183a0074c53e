//! `amicus train build`: compile a train crate with cargo and pack the bundle.

use amicus_bundle::manifest::COMPONENT_PATH;
use amicus_bundle::{Bundle, Manifest};
use anyhow::{Context, Result, bail};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const TARGET: &str = "wasm32-wasip2";

pub fn build(crate_dir: &Path, out: &Path) -> Result<()> {
    let manifest_path = crate_dir.join("train.toml");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest =
        Manifest::parse_source(&text).with_context(|| format!("in {}", manifest_path.display()))?;
    let component = compile(crate_dir)?;
    let wasm =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    let mut files = vec![(COMPONENT_PATH.to_string(), wasm)];
    for m in &manifest.models {
        let path = crate_dir.join(&m.file);
        let data = std::fs::read(&path).with_context(|| format!("model {}", path.display()))?;
        files.push((m.file.clone(), data));
    }
    let bundle = Bundle::create(manifest, files)?;
    bundle.write(out)?;
    let size = std::fs::metadata(out)?.len();
    println!(
        "built {} → {} ({size} bytes)\ndigest {}",
        bundle.subject_name(),
        out.display(),
        bundle.digest()
    );
    Ok(())
}

/// `cargo build --release --target wasm32-wasip2` of the crate; returns the component's path.
fn compile(crate_dir: &Path) -> Result<PathBuf> {
    let cargo_toml = crate_dir
        .join("Cargo.toml")
        .canonicalize()
        .with_context(|| format!("{} has no Cargo.toml", crate_dir.display()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["build", "--release", "--lib", "--target", TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&cargo_toml)
        // Run where the crate is, so its own .cargo/config.toml (target dir, flags) applies.
        .current_dir(cargo_toml.parent().expect("a file has a parent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running cargo (is the Rust toolchain installed?)")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut artifact = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let same_crate = msg["manifest_path"]
            .as_str()
            .map(|p| Path::new(p) == cargo_toml)
            .unwrap_or(false);
        let is_cdylib = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if same_crate && is_cdylib {
            artifact = msg["filenames"]
                .as_array()
                .and_then(|f| {
                    f.iter()
                        .filter_map(|f| f.as_str())
                        .find(|f| f.ends_with(".wasm"))
                })
                .map(PathBuf::from);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "cargo build of {} failed (is the target installed? `rustup target add {TARGET}`)",
            crate_dir.display()
        );
    }
    artifact.with_context(|| {
        format!(
            "{} produced no .wasm: the train crate needs `[lib] crate-type = [\"cdylib\"]`",
            crate_dir.display()
        )
    })
}

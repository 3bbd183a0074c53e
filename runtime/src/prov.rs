//! Export of a verified audit log as W3C PROV-O (Turtle), for auditors and their tools.
//!
//! Runs are `prov:Activity`s that `prov:used` the train bundle (`prov:Entity`, named by its
//! digest) and were `prov:wasAssociatedWith` the station (`prov:SoftwareAgent`, named by its key
//! id); released outputs are entities `prov:wasGeneratedBy` their run; refusals, approvals and
//! the data owner's decisions on held outputs are activities too. Terms PROV-O has no word for (outcome class, coarsened fuel and sizes,
//! hashes, the local log's sequence numbers) live under the `urn:amicus:audit:` namespace.
//!
//! The export is made from the public chain (`audit-public.log`, see `crate::disclosure`): an
//! export may leave the hospital, so it holds what the registry may hold and no more — no
//! capability call, no text a run influenced, run figures coarsened. This module reads the
//! log; it never writes or verifies it.

use crate::audit::{AuditError, ShownEntry, read_public_entries};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const PREFIXES: &str = "\
@prefix prov: <http://www.w3.org/ns/prov#> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
@prefix xsd: <http://www.w3.org/2001/XMLSchema#> .
@prefix dcterms: <http://purl.org/dc/terms/> .
@prefix au: <urn:amicus:audit:> .
";

/// A Turtle string literal with every character that needs it escaped.
fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Only plain identifier characters survive into an IRI; anything else becomes '_'.
fn iri_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn time(e: &serde_json::Value) -> String {
    format!("{}^^xsd:dateTime", lit(e["time"].as_str().unwrap_or("")))
}

fn int(v: &serde_json::Value) -> String {
    format!("{}", v.as_u64().unwrap_or(0))
}

/// The Turtle document for the audit log in station directory `dir`. The caller must have
/// verified the log first (see [`crate::audit::verify`]).
pub fn export_turtle(dir: &Path, station_keyid: &str) -> Result<String, AuditError> {
    // Only what may leave the station: the public chain (no capability call, no run text).
    let entries: Vec<ShownEntry> = read_public_entries(dir)?;
    let station = format!("<urn:amicus:station:{}>", iri_part(station_keyid));
    let mut out = String::from(PREFIXES);
    let _ = writeln!(
        out,
        "\n{station} a prov:SoftwareAgent ;\n    rdfs:label {} .",
        lit("amicus station")
    );
    let bundle = |d: &serde_json::Value| {
        format!("<urn:amicus:train:{}>", iri_part(d.as_str().unwrap_or("")))
    };
    // Everything a station records is named under the station, so exports of several stations
    // can be merged without collisions.
    let key = iri_part(station_keyid);
    let scoped =
        |kind: &str, id: &str| format!("<urn:amicus:station:{key}:{kind}:{}>", iri_part(id));
    let run = |id: &serde_json::Value| scoped("run", id.as_str().unwrap_or(""));
    // The start time of each run, to give the finish entry its prov:startedAtTime.
    let mut started: BTreeMap<String, String> = BTreeMap::new();
    for ShownEntry { entry: e, .. } in &entries {
        // The local entry it projects: the data owner's log has the details.
        let seq = int(&e["local_seq"]);
        match e["event"].as_str().unwrap_or("") {
            "train-received" => {
                let _ = writeln!(
                    out,
                    "\n{} a prov:Entity ;\n    rdfs:label {} ;\n    au:digest {} .",
                    bundle(&e["digest"]),
                    lit(&format!(
                        "{}@{}",
                        e["train"].as_str().unwrap_or(""),
                        e["version"].as_str().unwrap_or("")
                    )),
                    lit(e["digest"].as_str().unwrap_or("")),
                );
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:Receipt ;\n    prov:used {} ;\n    prov:wasAssociatedWith {station} ;\n    prov:endedAtTime {} ;\n    au:bundleSha256 {} ;\n    au:auditSeq {seq} .",
                    scoped("receipt", &seq),
                    bundle(&e["digest"]),
                    time(e),
                    lit(e["bundle_sha256"].as_str().unwrap_or("")),
                );
            }
            "archive-indexed" => {
                let graph = e["graph_sha256"].as_str().unwrap_or("");
                let _ = writeln!(
                    out,
                    "\n{} a prov:Entity, au:IndexGraph ;\n    au:graphSha256 {} ;\n    prov:wasGeneratedBy {} .",
                    scoped("index-graph", graph),
                    lit(graph),
                    scoped("index-run", &seq),
                );
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:IndexRun ;\n    prov:wasAssociatedWith {station} ;\n    prov:endedAtTime {} ;\n    au:auditSeq {seq} .",
                    scoped("index-run", &seq),
                    time(e),
                );
            }
            "digest-approved" => {
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:Approval ;\n    prov:used {} ;\n    prov:wasAssociatedWith {station} ;\n    prov:endedAtTime {} ;\n    au:scope {} ;\n    au:auditSeq {seq} .",
                    scoped("approval", &seq),
                    bundle(&e["digest"]),
                    time(e),
                    lit(e["scope"].as_str().unwrap_or("any")),
                );
            }
            "held-outputs-decided" => {
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:ReleaseDecision ;\n    prov:used {} ;\n    prov:wasAssociatedWith {station} ;\n    prov:endedAtTime {} ;\n    au:decision {} ;\n    au:outputs {} ;\n    au:auditSeq {seq} .",
                    scoped("decision", &seq),
                    run(&e["run_id"]),
                    time(e),
                    lit(e["decision"].as_str().unwrap_or("")),
                    int(&e["outputs"]),
                );
            }
            "train-refused" => {
                let used = if e["digest"].is_string() {
                    format!("    prov:used {} ;\n", bundle(&e["digest"]))
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:Refusal ;\n{used}    prov:wasAssociatedWith {station} ;\n    prov:endedAtTime {} ;\n    au:stage {} ;\n    au:reason {} ;\n    au:bundleSha256 {} ;\n    au:auditSeq {seq} .",
                    scoped("refusal", &seq),
                    time(e),
                    lit(e["stage"].as_str().unwrap_or("")),
                    lit(e["reason"].as_str().unwrap_or("")),
                    lit(e["bundle_sha256"].as_str().unwrap_or("")),
                );
            }
            "run-started" => {
                started.insert(e["run_id"].as_str().unwrap_or("").to_string(), time(e));
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:Run ;\n    prov:used {} ;\n    prov:wasAssociatedWith {station} ;\n    prov:startedAtTime {} ;\n    au:paramsSha256 {} ;\n    au:fuelLimit {} ;\n    au:memoryLimitBytes {} ;\n    au:auditSeq {seq} .",
                    run(&e["run_id"]),
                    bundle(&e["digest"]),
                    time(e),
                    lit(e["params_sha256"].as_str().unwrap_or("")),
                    int(&e["fuel"]),
                    int(&e["memory_bytes"]),
                );
            }
            "output-released" => {
                let _ = writeln!(
                    out,
                    "\n{} a prov:Entity, au:Output ;\n    prov:wasGeneratedBy {} ;\n    rdfs:label {} ;\n    au:bytes {} ;\n    prov:generatedAtTime {} ;\n    au:auditSeq {seq} .",
                    scoped(
                        "output",
                        &format!(
                            "{}:{}",
                            e["run_id"].as_str().unwrap_or(""),
                            e["name"].as_str().unwrap_or("")
                        )
                    ),
                    run(&e["run_id"]),
                    lit(e["name"].as_str().unwrap_or("")),
                    int(&e["bytes"]),
                    time(e),
                );
            }
            "run-finished" => {
                let id = e["run_id"].as_str().unwrap_or("").to_string();
                let _ = writeln!(
                    out,
                    "\n{} a prov:Activity, au:Run ;\n    prov:wasAssociatedWith {station} ;{}\n    prov:endedAtTime {} ;\n    au:outcome {} ;\n    au:fuelUsedAtMost {} ;\n    au:peakMemoryBytesAtMost {} ;\n    au:wallSecondsAtMost {} ;\n    au:outputsReleased {} ;\n    au:finishedAuditSeq {seq} .",
                    run(&e["run_id"]),
                    started
                        .get(&id)
                        .map(|t| format!("\n    prov:startedAtTime {t} ;"))
                        .unwrap_or_default(),
                    time(e),
                    lit(e["outcome"].as_str().unwrap_or("")),
                    int(&e["fuel_used"]),
                    int(&e["peak_memory_bytes"]),
                    int(&e["wall_seconds"]),
                    int(&e["outputs_released"]),
                );
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_iris_are_escaped() {
        assert_eq!(lit("a\"b\\c\nd\u{1b}"), "\"a\\\"b\\\\c\\nd\\u001B\"");
        assert_eq!(iri_part("ab> <evil"), "ab___evil");
    }
}

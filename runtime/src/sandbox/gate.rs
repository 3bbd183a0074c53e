//! The output gate: the only way data leaves a run is `emit` of a name the manifest declares,
//! once, within its size and the run's total; anything else traps the guest at once. The
//! station applies the same gate again to what the run worker hands back.

use amicus_bundle::Manifest;
use std::collections::BTreeMap;

/// The output a federated round's update leaves as; only `federated.submit` writes it.
pub const UPDATE_OUTPUT: &str = "update";

/// Applies the output rules at the moment of `emit`.
pub struct OutputGate {
    declared: BTreeMap<String, u64>,
    max_total: u64,
    total: u64,
    pub emitted: Vec<(String, Vec<u8>)>,
    /// Outputs the station writes itself (counted, no data here).
    reserved: Vec<String>,
    pub(crate) violation: Option<String>,
}

impl OutputGate {
    pub fn new(manifest: &Manifest, policy_max: u64, max_total: u64) -> OutputGate {
        OutputGate {
            declared: manifest
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.max_bytes.min(policy_max)))
                .collect(),
            max_total,
            total: 0,
            emitted: Vec::new(),
            reserved: Vec::new(),
            violation: None,
        }
    }

    pub fn emit(&mut self, name: &str, data: Vec<u8>) -> Result<(), String> {
        if name == UPDATE_OUTPUT {
            return Err(format!(
                "output {UPDATE_OUTPUT:?} is written by the station (federated.submit), not by emit"
            ));
        }
        self.emit_checked(name, data)
    }

    /// Count `len` bytes of the station-written output `name` (the federated update, which the
    /// station writes after the run) under the same rules as an emitted output.
    pub(crate) fn reserve(&mut self, name: &str, len: u64) -> Result<(), String> {
        self.check(name, len)?;
        self.total += len;
        self.reserved.push(name.to_string());
        Ok(())
    }

    /// `emit` without the reserved-name rule: the station's own outputs.
    pub fn emit_checked(&mut self, name: &str, data: Vec<u8>) -> Result<(), String> {
        let declared = self.check(name, data.len() as u64)?;
        self.total += data.len() as u64;
        self.emitted.push((declared, data));
        Ok(())
    }

    /// The rules: declared, once, within its size and the run's total. Returns the declared name.
    fn check(&self, name: &str, len: u64) -> Result<String, String> {
        let shown: String = name.chars().take(128).collect();
        let Some((declared, max)) = self.declared.get_key_value(name) else {
            return Err(format!("output {shown:?} is not declared in the manifest"));
        };
        if self.emitted.iter().any(|(n, _)| n == name) || self.reserved.iter().any(|n| n == name) {
            return Err(format!("output {shown:?} emitted twice"));
        }
        if len > *max {
            return Err(format!(
                "output {shown:?} is {len} bytes, its limit is {max} bytes"
            ));
        }
        if self.total.saturating_add(len) > self.max_total {
            return Err(format!(
                "outputs total {} bytes, the station releases at most {} per run",
                self.total.saturating_add(len),
                self.max_total
            ));
        }
        Ok(declared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_gate_rules() {
        let manifest = Manifest::parse_source(
            r#"
[train]
name = "t"
version = "1"
[limits]
fuel = 1
memory_mib = 1
wall_seconds = 1
[[outputs]]
name = "a.json"
kind = "statistics"
max_bytes = 10
[[outputs]]
name = "b.json"
kind = "metrics"
max_bytes = 100
"#,
        )
        .unwrap();
        let mut g = OutputGate::new(&manifest, 50, 60);
        assert!(g.emit("a.json", vec![0; 10]).is_ok());
        assert!(g.emit("a.json", vec![0; 1]).unwrap_err().contains("twice"));
        assert!(
            g.emit("c.json", vec![0; 1])
                .unwrap_err()
                .contains("not declared")
        );
        // b.json is capped by the policy (50), not its declaration (100).
        assert!(
            g.emit("b.json", vec![0; 51])
                .unwrap_err()
                .contains("limit is 50")
        );
        let mut g = OutputGate::new(&manifest, 50, 55);
        assert!(g.emit("a.json", vec![0; 10]).is_ok());
        assert!(
            g.emit("b.json", vec![0; 50])
                .unwrap_err()
                .contains("at most 55")
        );
    }
}

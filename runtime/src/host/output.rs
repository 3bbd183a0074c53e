//! `amicus:train/output`: log lines and progress (guest text escaped and capped), and `emit`
//! through the output gate.

use super::HostState;
use super::bindings::amicus::train::output;
use crate::sandbox::guest_text;

impl output::Host for HostState {
    fn log(&mut self, level: output::Level, message: String) {
        let level = match level {
            output::Level::Trace => "trace",
            output::Level::Debug => "debug",
            output::Level::Info => "info",
            output::Level::Warn => "warn",
            output::Level::Error => "error",
        };
        self.log.push(level, &message);
    }

    fn progress(&mut self, fraction: f32, message: String) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let message: String = guest_text(&message).chars().take(200).collect();
        (self.progress)(fraction, &message);
    }

    fn emit(&mut self, name: String, data: Vec<u8>) -> wasmtime::Result<()> {
        if let Err(violation) = self.outputs.emit(&name, data) {
            self.outputs.violation = Some(violation.clone());
            return Err(wasmtime::Error::msg(violation));
        }
        Ok(())
    }
}

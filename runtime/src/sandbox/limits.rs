//! The run's memory budget inside the sandbox: linear memories plus host tensors against one
//! cap, with the peak. It is the first line; the run worker's operating-system limit is the
//! backstop for what the budget cannot see (ONNX Runtime, query evaluation, codecs).

use wasmtime::ResourceLimiter;

/// Linear memories plus host tensors, against one cap. Tracks the peak.
pub(crate) struct MemoryBudget {
    pub(crate) cap: usize,
    pub(crate) linear: usize,
    pub(crate) host: usize,
    pub(crate) peak: usize,
    pub(crate) refused: Option<String>,
}

impl MemoryBudget {
    pub(crate) fn new(cap: usize) -> MemoryBudget {
        MemoryBudget {
            cap,
            linear: 0,
            host: 0,
            peak: 0,
            refused: None,
        }
    }

    pub(crate) fn reserve_host(&mut self, bytes: usize) -> bool {
        if self.linear + self.host + bytes > self.cap {
            self.refused = Some(format!(
                "host tensor of {bytes} bytes would exceed the {} byte limit",
                self.cap
            ));
            return false;
        }
        self.host += bytes;
        self.peak = self.peak.max(self.linear + self.host);
        true
    }

    pub(crate) fn release_host(&mut self, bytes: usize) {
        self.host = self.host.saturating_sub(bytes);
    }
}

impl ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if self.linear + self.host + grow > self.cap {
            self.refused = Some(format!(
                "memory growth to {} bytes refused (limit {} bytes)",
                self.linear + self.host + grow,
                self.cap
            ));
            return Ok(false);
        }
        self.linear += grow;
        self.peak = self.peak.max(self.linear + self.host);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_budget_counts_host_and_linear() {
        let mut m = MemoryBudget::new(1000);
        assert!(m.memory_growing(0, 600, None).unwrap());
        assert!(m.reserve_host(300));
        assert!(!m.reserve_host(200));
        assert!(m.refused.is_some());
        m.release_host(300);
        assert!(m.memory_growing(600, 1000, None).unwrap());
        assert!(!m.memory_growing(1000, 1001, None).unwrap());
        assert_eq!(m.peak, 1000);
    }
}

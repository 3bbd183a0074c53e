//! `amicus:train/tensors`: host tensors, counted against the run's memory budget.

use super::bindings::amicus::train::{tensors, types};
use super::{HostState, HostTensor};
use amicus_bundle::Capability;
use wasmtime::component::Resource;

impl tensors::Host for HostState {}

impl tensors::HostTensor for HostState {
    fn create(
        &mut self,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<Resource<HostTensor>, types::Error> {
        if !(self.granted.contains(&Capability::Imaging)
            || self.granted.contains(&Capability::Kernels))
        {
            return Err(types::Error::Denied(
                "tensors need capability imaging or kernels".into(),
            ));
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
        if elements != Some(data.len()) || shape.len() > 8 {
            return Err(types::Error::InvalidArgument(format!(
                "shape {shape:?} does not hold {} elements",
                data.len()
            )));
        }
        let bytes = data.len() * 4;
        if !self.memory.reserve_host(bytes) {
            return Err(types::Error::LimitExceeded(format!(
                "a tensor of {bytes} bytes would exceed the run's memory limit"
            )));
        }
        self.table
            .push(HostTensor { shape, data })
            .map_err(|e| types::Error::Failed(e.to_string()))
    }

    fn shape(&mut self, t: Resource<HostTensor>) -> Vec<u32> {
        self.table
            .get(&t)
            .map(|t| t.shape.clone())
            .unwrap_or_default()
    }

    fn read(&mut self, t: Resource<HostTensor>) -> Vec<f32> {
        self.table
            .get(&t)
            .map(|t| t.data.clone())
            .unwrap_or_default()
    }

    fn drop(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<()> {
        let t = self.table.delete(t)?;
        self.memory.release_host(t.data.len() * 4);
        Ok(())
    }
}

//! Hostile test train: keeps ONNX Runtime busy with large training steps, forever. Wasm's
//! epoch checks never see the time limit pass while the station is inside ONNX Runtime, so
//! only the station's deadline on ONNX Runtime calls stops it on time. If a step ever fails it
//! emits what it saw (which the station must not release, the run being over its limit).
//!
//! `batch` (default 1024) patches of 32 × 32 per step.

use amicus_sdk::kernels::{Optimizer, Sgd, Trainer, TrainerOptions};
use amicus_sdk::tensors::Tensor;
use amicus_sdk::{Params, Train};

struct KernelHog;

impl Train for KernelHog {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let batch: u32 = params.get("batch")?.unwrap_or(1024);
        let trainer = Trainer::open(
            "models/unet.onnx",
            TrainerOptions {
                optimizer: Optimizer::Sgd(Sgd {
                    learning_rate: 0.01,
                    momentum: 0.0,
                    nesterov: false,
                    weight_decay: 0.0,
                }),
                clip_norm: None,
                seed: 1,
            },
        )?;
        let n = (batch * 32 * 32) as usize;
        let shape = vec![batch, 1, 32, 32];
        let x = Tensor::create(&shape, &vec![0.5; n])?;
        let y = Tensor::create(&shape, &vec![1.0; n])?;
        let mut steps = 0u64;
        loop {
            match trainer.step(&x, &y) {
                Ok(_) => steps += 1,
                Err(e) => {
                    // A train that carries on after the limit: nothing of this may leave.
                    let text = format!(
                        "{{\"steps\": {steps}, \"error\": {:?}}}",
                        amicus_sdk::describe(&e)
                    );
                    amicus_sdk::emit("result.json", text.as_bytes());
                    return Ok(());
                }
            }
        }
    }
}

amicus_sdk::export_train!(KernelHog);

//! Hostile test train: tries to get round the station's handling of a federated round.
//!
//! `do` = `emit-update` (writes the output `update` itself), `submit-without-load` (submits a
//! trainer the global weights were never loaded into), `submit-twice`, `current` (asks for the
//! round and reports it; outside a job that is `not-available`), or `honest` (loads the global
//! weights, changes nothing, submits 8 samples).

use amicus_sdk::federated;
use amicus_sdk::kernels::{Optimizer, Sgd, Trainer, TrainerOptions};
use amicus_sdk::{Params, Train};

fn trainer() -> amicus_sdk::Result<Trainer> {
    Ok(Trainer::open(
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
    )?)
}

struct FlCheat;

impl Train for FlCheat {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let what: String = params.get("do")?.unwrap_or_default();
        match what.as_str() {
            "emit-update" => amicus_sdk::emit("update", b"AMU\x01 my own bytes"),
            "submit-without-load" => federated::submit(&trainer()?, 8)?,
            "submit-twice" => {
                let t = trainer()?;
                federated::load_global(&t)?;
                federated::submit(&t, 8)?;
                federated::submit(&t, 8)?;
            }
            "current" => {
                let r = federated::current()?;
                let text = format!(
                    "{{\"job\": \"{}\", \"number\": {}, \"rounds\": {}}}",
                    r.job, r.number, r.rounds
                );
                amicus_sdk::emit("round.json", text.as_bytes());
            }
            "honest" => {
                let t = trainer()?;
                federated::load_global(&t)?;
                federated::submit(&t, 8)?;
            }
            other => return Err(format!("unknown do {other:?}").into()),
        }
        Ok(())
    }
}

amicus_sdk::export_train!(FlCheat);

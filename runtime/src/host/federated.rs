//! `amicus:train/federated`: the round, its global weights into a trainer, and the update
//! (clipped and noised by the station) out as the output `update`.

use super::bindings::amicus::train::{federated, types};
use super::{HostState, TrainerHandle};
use crate::sandbox::{FederatedRound, RawUpdate, UPDATE_OUTPUT, guest_text};
use amicus_bundle::Capability;
use wasmtime::component::Resource;

impl HostState {
    /// The run's round, for a `federated` call: the capability must be granted and the run
    /// must be part of a job.
    fn federated_round(&mut self, call: &str) -> Result<FederatedRound, types::Error> {
        self.require(Capability::Kernels, call)?;
        match &self.federated {
            Some(r) => Ok(r.clone()),
            None => Err(self.not_available(
                Capability::Kernels,
                call,
                String::new(),
                "this run is not part of a federated job",
            )),
        }
    }
}

impl federated::Host for HostState {
    fn current(&mut self) -> Result<federated::Round, types::Error> {
        let r = self.federated_round("federated.current")?;
        Ok(federated::Round {
            job: r.job,
            number: r.number,
            rounds: r.rounds,
            proximal_mu: r.proximal_mu,
        })
    }

    fn load_global(&mut self, t: Resource<TrainerHandle>) -> Result<(), types::Error> {
        const CALL: &str = "federated.load-global";
        let round = self.federated_round(CALL)?;
        let rep = t.rep();
        let handle = self
            .table
            .get_mut(&t)
            .map_err(|e| types::Error::Failed(e.to_string()))?;
        let detail = format!(
            "{} job {} round {}/{} ({} values)",
            handle.file,
            guest_text(&round.job),
            round.number,
            round.rounds,
            round.global.len()
        );
        let weights: Vec<amicus_kernels::trainer::NamedWeights> = round
            .global
            .tensors
            .iter()
            .map(|w| amicus_kernels::trainer::NamedWeights {
                name: w.name.clone(),
                shape: w.shape.clone(),
                data: w.data.clone(),
            })
            .collect();
        let result = handle
            .trainer
            .set_weights(&weights)
            .and_then(|()| handle.trainer.anchor_proximal(round.proximal_mu));
        let answer = self.kernels_call(CALL, detail, result);
        if answer.is_ok() {
            self.federated_trainer = Some(rep);
        }
        answer
    }

    fn submit(&mut self, t: Resource<TrainerHandle>, samples: u32) -> Result<(), types::Error> {
        const CALL: &str = "federated.submit";
        let round = self.federated_round(CALL)?;
        let detail = format!("samples {samples}");
        let refuse = |s: &mut HostState, e: types::Error| {
            s.record(
                Capability::Kernels,
                CALL,
                detail.clone(),
                None,
                Err::<(), _>(e),
            )
        };
        if self.submitted.is_some() {
            return refuse(
                self,
                types::Error::InvalidArgument("the update was already submitted".into()),
            );
        }
        if round.number > round.rounds {
            return refuse(
                self,
                types::Error::InvalidArgument(
                    "this is the job's evaluation round: it takes no update".into(),
                ),
            );
        }
        if self.federated_trainer != Some(t.rep()) {
            return refuse(
                self,
                types::Error::InvalidArgument(
                    "submit the trainer that load-global set to the round's global weights".into(),
                ),
            );
        }
        if samples == 0 {
            return refuse(
                self,
                types::Error::InvalidArgument("an update needs at least one sample".into()),
            );
        }
        let local = match self.table.get(&t) {
            Ok(h) => h.trainer.weights(),
            Err(e) => return refuse(self, types::Error::Failed(e.to_string())),
        };
        let mut delta = Vec::with_capacity(round.global.len());
        for g in &round.global.tensors {
            match local.iter().find(|w| w.name == g.name) {
                Some(w) if w.shape == g.shape => {
                    delta.extend(w.data.iter().zip(&g.data).map(|(l, g)| l - g));
                }
                _ => {
                    return refuse(
                        self,
                        types::Error::InvalidArgument(format!(
                            "the trainer has no weight {:?} of shape {:?}",
                            g.name, g.shape
                        )),
                    );
                }
            }
        }
        if delta.iter().any(|v| !v.is_finite()) {
            return refuse(
                self,
                types::Error::Failed("the update is not finite".into()),
            );
        }
        // The station clips, noises and encodes the update after the run; its size does not
        // depend on the noise, so the output rules are applied to it here, at once.
        let update = amicus_fl::wire::Update {
            samples: u64::from(samples),
            delta,
        };
        let bytes = match update.encode(round.encoding) {
            Ok(b) => b.len() as u64,
            Err(e) => return refuse(self, types::Error::Failed(format!("update: {e}"))),
        };
        if let Err(violation) = self.outputs.reserve(UPDATE_OUTPUT, bytes) {
            return refuse(self, types::Error::LimitExceeded(violation));
        }
        let detail = format!(
            "samples {samples}, {} values, {bytes} bytes ({:?})",
            update.delta.len(),
            round.encoding
        );
        self.submitted = Some(RawUpdate {
            samples: update.samples,
            delta: update.delta,
        });
        self.record(Capability::Kernels, CALL, detail, None, Ok(()))
    }
}

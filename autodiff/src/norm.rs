//! Normalisation layers in training mode, rewritten into ops that have gradient rules:
//! BatchNormalization over batch and spatial axes (the batch statistics normalise; the
//! running statistics are updated as ONNX specifies, `running = momentum · running + (1 −
//! momentum) · batch`, and returned so the host can keep them), InstanceNormalization over
//! the spatial axes of each sample and channel.

use crate::emit::Emitter;
use crate::onnx::NodeProto;

/// A running statistic of a BatchNormalization: the model's tensor, and the training graph's
/// output with its updated value.
pub(crate) struct RunningStat {
    pub input: String,
    pub updated: String,
}

/// Emit the training-mode decomposition of `node` (BatchNormalization or
/// InstanceNormalization on an input of rank `rank`) into `e.nodes`, writing the node's own
/// output name; returns the running statistics it updates.
pub(crate) fn decompose(
    e: &mut Emitter,
    node: &NodeProto,
    rank: usize,
) -> Result<Vec<RunningStat>, String> {
    let op = node.op();
    if rank < 3 {
        return Err(format!(
            "{op} on a rank-{rank} input (N, C and spatial axes expected)"
        ));
    }
    if node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()) {
        return Err(format!(
            "{op} with training-mode outputs in the forward model (export the model in evaluation mode, e.g. torch.onnx.export(..., training=torch.onnx.TrainingMode.EVAL), the default)"
        ));
    }
    let eps = node.attr_float("epsilon").unwrap_or(1e-5);
    let (x, scale, bias) = (&node.input[0], &node.input[1], &node.input[2]);
    let batch = op == "BatchNormalization";
    let axes: Vec<i64> = if batch {
        std::iter::once(0).chain(2..rank as i64).collect()
    } else {
        (2..rank as i64).collect()
    };
    let mean = e.reduce_mean(x, &axes, true);
    let centred = e.node("Sub", &[x, &mean], vec![]);
    let squared = e.mul(&centred, &centred);
    let var = e.reduce_mean(&squared, &axes, true);
    let eps_c = e.scalar(eps);
    let var_eps = e.node("Add", &[&var, &eps_c], vec![]);
    let std = e.node("Sqrt", &[&var_eps], vec![]);
    let normalised = e.node("Div", &[&centred, &std], vec![]);
    let mut per_channel = vec![1, -1];
    per_channel.extend(std::iter::repeat_n(1, rank - 2));
    let s = e.reshape(scale, &per_channel);
    let b = e.reshape(bias, &per_channel);
    let scaled = e.mul(&normalised, &s);
    e.node_into("Add", &[&scaled, &b], &node.output[0], vec![]);
    if !batch {
        return Ok(vec![]);
    }
    // Running statistics (not differentiated: nothing downstream of them reaches the loss).
    let momentum = node.attr_float("momentum").unwrap_or(0.9);
    let (m, one_minus) = (e.scalar(momentum), e.scalar(1.0 - momentum));
    let mut stats = Vec::new();
    for (running, batch_stat) in [(&node.input[3], &mean), (&node.input[4], &var)] {
        let flat = e.reshape(batch_stat, &[-1]);
        let old = e.mul(running, &m);
        let new = e.mul(&flat, &one_minus);
        let updated = e.fresh("running");
        e.node_into("Add", &[&old, &new], &updated, vec![]);
        stats.push(RunningStat {
            input: running.clone(),
            updated,
        });
    }
    Ok(stats)
}

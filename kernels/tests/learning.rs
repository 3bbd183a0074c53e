//! Training actually learns: the CNN of `amicus model new cnn` separates two synthetic classes
//! (bright disks vs bright squares in noise) and the U-Net of `amicus model new unet2d`
//! segments synthetic disks, both trained here with the station's training graphs, ONNX
//! Runtime and the host-side optimizer; and the trainer's refusals.

use amicus_autodiff::Loss;
use amicus_autodiff::zoo::{Cnn, Norm, Unet2d};
use amicus_kernels::optim::{Optimizer, Schedule};
use amicus_kernels::trainer::{NamedWeights, Trainer, TrainerOptions};
use amicus_kernels::{KernelError, Tensor};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
}

fn ready() -> bool {
    match amicus_kernels::available() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "{e}");
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// `n` images of `size`², each with one disk (class 0) or square (class 1) of radius 3-5 in
/// noise; returns images, one-hot classes and the shapes' masks.
fn shapes(rng: &mut Rng, n: usize, size: usize) -> (Tensor, Tensor, Tensor, Vec<usize>) {
    let mut images = vec![0f32; n * size * size];
    let mut masks = vec![0f32; n * size * size];
    let mut onehot = vec![0f32; n * 2];
    let mut classes = Vec::with_capacity(n);
    for i in 0..n {
        let class = (rng.next() % 2) as usize;
        let r = rng.range(3, 6);
        let (cy, cx) = (
            rng.range(r + 1, size as i64 - r - 1),
            rng.range(r + 1, size as i64 - r - 1),
        );
        for y in 0..size as i64 {
            for x in 0..size as i64 {
                let inside = if class == 0 {
                    (y - cy).pow(2) + (x - cx).pow(2) <= r * r
                } else {
                    (y - cy).abs() <= r && (x - cx).abs() <= r
                };
                let p = i * size * size + (y as usize) * size + x as usize;
                images[p] = 0.5 * (rng.uniform() - 0.5) + if inside { 1.0 } else { 0.0 };
                masks[p] = inside as u8 as f32;
            }
        }
        onehot[i * 2 + class] = 1.0;
        classes.push(class);
    }
    let s = vec![n, 1, size, size];
    (
        Tensor::new(s.clone(), images),
        Tensor::new(vec![n, 2], onehot),
        Tensor::new(s, masks),
        classes,
    )
}

fn adam(lr: f32) -> Optimizer {
    Optimizer::Adam {
        learning_rate: lr,
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.0,
        decoupled: true,
    }
}

fn options(loss: Loss, lr: f32) -> TrainerOptions {
    TrainerOptions {
        loss,
        trainable: None,
        optimizer: adam(lr),
        schedule: Schedule::Constant,
        clip_norm: Some(5.0),
        threads: 2,
        seed: 0,
        device: amicus_kernels::Device::Cpu,
    }
}

#[test]
fn the_cnn_learns_to_separate_two_classes() {
    if !ready() {
        return;
    }
    let model = Cnn {
        channels: 1,
        height: 16,
        width: 16,
        classes: 2,
        widths: vec![8, 16],
        seed: 1,
    }
    .build()
    .unwrap();
    let mut trainer = Trainer::new(&model, options(Loss::CrossEntropy, 0.01)).unwrap();
    let mut rng = Rng(7);
    let (test_x, _, _, test_classes) = shapes(&mut Rng(99), 64, 16);
    let accuracy = |trainer: &mut Trainer| {
        let logits = trainer.infer(&test_x).unwrap();
        let right = test_classes
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                let (a, b) = (logits.data[i * 2], logits.data[i * 2 + 1]);
                (b > a) as usize == **c
            })
            .count();
        right as f64 / test_classes.len() as f64
    };
    let before = accuracy(&mut trainer);
    let mut losses = Vec::new();
    for _ in 0..150 {
        let (x, y, _, _) = shapes(&mut rng, 16, 16);
        losses.push(trainer.step(&x, &y).unwrap());
    }
    let after = accuracy(&mut trainer);
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!("CNN: loss {first:.3} → {last:.3}, held-out accuracy {before:.2} → {after:.2}");
    assert!(last < 0.5 * first, "loss {first} → {last}");
    assert!(after >= 0.9, "accuracy {after}");
    assert_eq!(trainer.steps(), 150);
}

#[test]
fn the_unet_learns_to_segment() {
    if !ready() {
        return;
    }
    let model = Unet2d {
        channels: 1,
        height: 32,
        width: 32,
        classes: 1,
        base: 8,
        depth: 2,
        norm: Norm::None,
        seed: 2,
    }
    .build()
    .unwrap();
    let loss = Loss::Sum(vec![(0.5, Loss::BceWithLogits), (0.5, Loss::SoftDice)]);
    let mut trainer = Trainer::new(&model, options(loss, 0.01)).unwrap();
    let mut rng = Rng(11);
    let (test_x, _, test_masks, _) = shapes(&mut Rng(98), 16, 32);
    let dice = |trainer: &mut Trainer| {
        let logits = trainer.infer(&test_x).unwrap();
        let (mut inter, mut total) = (0.0, 0.0);
        for (l, m) in logits.data.iter().zip(&test_masks.data) {
            let p = (*l > 0.0) as u8 as f64;
            inter += p * f64::from(*m);
            total += p + f64::from(*m);
        }
        2.0 * inter / total.max(1.0)
    };
    let before = dice(&mut trainer);
    let mut losses = Vec::new();
    for _ in 0..120 {
        let (x, _, y, _) = shapes(&mut rng, 8, 32);
        losses.push(trainer.step(&x, &y).unwrap());
    }
    let after = dice(&mut trainer);
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    eprintln!("U-Net: loss {first:.3} → {last:.3}, held-out Dice {before:.2} → {after:.2}");
    assert!(last < 0.5 * first, "loss {first} → {last}");
    assert!(after >= 0.8, "Dice {after}");
}

#[test]
fn the_trainer_refuses_bad_batches_and_weights() {
    if !ready() {
        return;
    }
    let model = Cnn {
        channels: 1,
        height: 8,
        width: 8,
        classes: 2,
        widths: vec![4],
        seed: 3,
    }
    .build()
    .unwrap();
    let mut t = Trainer::new(&model, options(Loss::CrossEntropy, 0.01)).unwrap();
    let x = Tensor::new(vec![2, 1, 8, 8], vec![0.1; 128]);
    let y = Tensor::new(vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]);
    t.step(&x, &y).unwrap();
    let weights = t.weights();
    // Wrong image size, wrong label shape, NaN and infinity: refused before ONNX Runtime.
    let wrong = Tensor::new(vec![2, 1, 9, 8], vec![0.1; 144]);
    assert!(matches!(t.step(&wrong, &y), Err(KernelError::Input(_))));
    let wrong_y = Tensor::new(vec![2, 3], vec![0.0; 6]);
    assert!(matches!(t.step(&x, &wrong_y), Err(KernelError::Input(_))));
    let mut nan = x.clone();
    nan.data[5] = f32::NAN;
    assert!(matches!(t.step(&nan, &y), Err(KernelError::Input(m)) if m.contains("NaN")));
    let mut inf = y.clone();
    inf.data[0] = f32::INFINITY;
    assert!(matches!(t.evaluate(&x, &inf), Err(KernelError::Input(_))));
    // Nothing changed.
    assert_eq!(t.weights(), weights);
    assert_eq!(t.steps(), 1);
    // Weights: unknown names, wrong shapes and NaN are refused, all or nothing.
    let mut bad = weights.clone();
    bad[0].data[0] = f32::NAN;
    assert!(t.set_weights(&bad).is_err());
    let unknown = vec![NamedWeights {
        name: "nope".into(),
        shape: vec![1],
        data: vec![0.0],
    }];
    assert!(t.set_weights(&unknown).is_err());
    let mut reshaped = weights.clone();
    let matrix = reshaped.iter().position(|w| w.shape.len() > 1).unwrap();
    reshaped[matrix].shape = vec![reshaped[matrix].data.len()];
    assert!(t.set_weights(&reshaped).is_err());
    assert_eq!(t.weights(), weights);
    // Setting weights round-trips, and the same weights and batch give the same loss.
    let (l1, _) = t.evaluate(&x, &y).unwrap();
    t.set_weights(&weights).unwrap();
    let (l2, _) = t.evaluate(&x, &y).unwrap();
    assert_eq!(l1, l2);
}

#[test]
fn a_unet_with_batch_and_instance_normalisation_learns_and_keeps_running_statistics() {
    if !ready() {
        return;
    }
    for norm in [Norm::Batch, Norm::Instance] {
        let model = Unet2d {
            channels: 1,
            height: 32,
            width: 32,
            classes: 1,
            base: 8,
            depth: 2,
            norm,
            seed: 5,
        }
        .build()
        .unwrap();
        let loss = Loss::Sum(vec![(0.5, Loss::BceWithLogits), (0.5, Loss::SoftDice)]);
        let mut trainer = Trainer::new(&model, options(loss.clone(), 0.01)).unwrap();
        let before = trainer.running_statistics();
        assert_eq!(before.is_empty(), norm == Norm::Instance, "{norm:?}");
        let mut rng = Rng(12);
        let mut losses = Vec::new();
        for _ in 0..80 {
            let (x, _, y, _) = shapes(&mut rng, 8, 32);
            losses.push(trainer.step(&x, &y).unwrap());
        }
        let (test_x, _, test_masks, _) = shapes(&mut Rng(97), 16, 32);
        let logits = trainer.infer(&test_x).unwrap();
        let (mut inter, mut total) = (0.0, 0.0);
        for (l, m) in logits.data.iter().zip(&test_masks.data) {
            let p = (*l > 0.0) as u8 as f64;
            inter += p * f64::from(*m);
            total += p + f64::from(*m);
        }
        let dice = 2.0 * inter / total.max(1.0);
        let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
        let last: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
        eprintln!("U-Net {norm:?}: loss {first:.3} → {last:.3}, held-out Dice {dice:.2}");
        assert!(last < 0.5 * first, "{norm:?}: loss {first} → {last}");
        // Inference uses the running statistics for batch normalisation.
        assert!(dice >= 0.8, "{norm:?}: Dice {dice}");
        if norm == Norm::Batch {
            let after = trainer.running_statistics();
            assert_eq!(after.len(), before.len());
            assert!(after.iter().zip(&before).all(|(a, b)| a.data != b.data));
            // get-weights carries the running statistics (a federated average or a copy of
            // the model needs them), and set-weights takes them back: a fresh trainer given
            // these weights predicts exactly as this one.
            let all = trainer.weights();
            for st in &after {
                assert!(all.iter().any(|w| w.name == st.name && w.data == st.data));
            }
            let mut copy = Trainer::new(&model, options(loss.clone(), 0.01)).unwrap();
            copy.set_weights(&all).unwrap();
            assert_eq!(copy.running_statistics(), after);
            assert_eq!(
                copy.infer(&test_x).unwrap(),
                trainer.infer(&test_x).unwrap()
            );
            // Without the statistics the copy predicts differently.
            let mut partial = Trainer::new(&model, options(loss.clone(), 0.01)).unwrap();
            let trained: Vec<_> = all
                .iter()
                .filter(|w| !after.iter().any(|s| s.name == w.name))
                .cloned()
                .collect();
            partial.set_weights(&trained).unwrap();
            assert_ne!(
                partial.infer(&test_x).unwrap(),
                trainer.infer(&test_x).unwrap()
            );
        }
    }
}

/// FedProx: the proximal term keeps local training near the anchor (the round's global
/// weights). Same data, same optimizer (SGD, so the step is the gradient): with μ the
/// weights end measurably closer to where they started, and μ 0 is plain training.
#[test]
fn the_proximal_term_pulls_towards_the_anchor() {
    if !ready() {
        return;
    }
    let model = Cnn {
        channels: 1,
        height: 16,
        width: 16,
        classes: 2,
        widths: vec![4],
        seed: 3,
    }
    .build()
    .unwrap();
    let sgd = |mu: f32| {
        let mut t = Trainer::new(
            &model,
            TrainerOptions {
                optimizer: Optimizer::Sgd {
                    learning_rate: 0.05,
                    momentum: 0.0,
                    nesterov: false,
                    weight_decay: 0.0,
                },
                clip_norm: None,
                ..options(Loss::CrossEntropy, 0.0)
            },
        )
        .unwrap();
        t.anchor_proximal(mu).unwrap();
        t
    };
    let start: Vec<f32> = sgd(0.0)
        .weights()
        .iter()
        .flat_map(|w| w.data.clone())
        .collect();
    let drift = |mu: f32| {
        let mut t = sgd(mu);
        let mut rng = Rng(11);
        for _ in 0..30 {
            let (x, y, _, _) = shapes(&mut rng, 8, 16);
            t.step(&x, &y).unwrap();
        }
        let end: Vec<f32> = t.weights().iter().flat_map(|w| w.data.clone()).collect();
        end.iter()
            .zip(&start)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (free, held) = (drift(0.0), drift(5.0));
    eprintln!("drift from the anchor: μ 0 {free:.4}, μ 5 {held:.4}");
    assert!(free > 0.0);
    assert!(held < 0.8 * free, "μ 5 drifted {held}, μ 0 {free}");
    assert!(sgd(0.0).anchor_proximal(f32::NAN).is_err());
    assert!(sgd(0.0).anchor_proximal(-1.0).is_err());
}

/// The run's time limit reaches into ONNX Runtime: a call still running at the deadline is
/// stopped between nodes and reported as `Deadline`; nothing changes, and the trainer works
/// again without the limit.
#[test]
fn a_deadline_stops_onnx_runtime_calls_and_changes_nothing() {
    if !ready() {
        return;
    }
    let model = Unet2d {
        channels: 1,
        height: 128,
        width: 128,
        classes: 1,
        base: 16,
        depth: 3,
        norm: Norm::None,
        seed: 2,
    }
    .build()
    .unwrap();
    let loss = Loss::Sum(vec![(0.5, Loss::BceWithLogits), (0.5, Loss::SoftDice)]);
    let mut t = Trainer::new(&model, options(loss, 0.01)).unwrap();
    let (x, _, y, _) = shapes(&mut Rng(30), 16, 128);
    let before = t.weights();
    // Already past: refused before ONNX Runtime starts.
    t.set_deadline(Some(std::time::Instant::now()));
    assert!(matches!(t.step(&x, &y), Err(KernelError::Deadline)));
    // A few milliseconds ahead: a U-Net step on 16 images of 128 × 128 takes far longer on
    // any CPU, so ONNX Runtime is stopped mid-graph.
    t.set_deadline(Some(
        std::time::Instant::now() + std::time::Duration::from_millis(5),
    ));
    assert!(matches!(t.step(&x, &y), Err(KernelError::Deadline)));
    t.set_deadline(Some(
        std::time::Instant::now() + std::time::Duration::from_millis(5),
    ));
    assert!(matches!(t.infer(&x), Err(KernelError::Deadline)));
    assert_eq!(t.weights(), before);
    assert_eq!(t.steps(), 0);
    // Without the limit the same trainer steps as usual.
    t.set_deadline(None);
    t.step(&x, &y).unwrap();
    assert_eq!(t.steps(), 1);
    assert_ne!(t.weights(), before);
}

/// The station's policy picks the device. With the CPU build of ONNX Runtime (what setup
/// installs) `Cuda` is refused with what to do about it and `Auto` falls back to the CPU;
/// with the GPU build the CUDA session must give the CPU's answer.
#[test]
fn the_cuda_device_is_used_or_refused_clearly() {
    if !ready() {
        return;
    }
    use amicus_kernels::{Device, Session, cuda_available};
    let bytes = Cnn {
        channels: 1,
        height: 16,
        width: 16,
        classes: 2,
        widths: vec![4],
        seed: 1,
    }
    .build()
    .unwrap()
    .to_bytes();
    let x = Tensor::new(
        vec![2, 1, 16, 16],
        (0..512).map(|i| (i % 7) as f32 / 7.0).collect(),
    );
    let on_cpu = Session::from_bytes_on(&bytes, 1, Device::Cpu)
        .unwrap()
        .run(&[("image", &x)], &[])
        .unwrap();
    if cuda_available().unwrap() {
        let mut s = Session::from_bytes_on(&bytes, 1, Device::Cuda).unwrap();
        assert_eq!(s.device(), Device::Cuda);
        let on_gpu = s.run(&[("image", &x)], &[]).unwrap();
        for (a, b) in on_gpu[0].1.data.iter().zip(&on_cpu[0].1.data) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    } else {
        let e = Session::from_bytes_on(&bytes, 1, Device::Cuda)
            .err()
            .unwrap();
        assert!(
            matches!(&e, KernelError::DeviceUnavailable(m) if m.contains("onnxruntime-gpu")),
            "{e}"
        );
        let mut s = Session::from_bytes_on(&bytes, 1, Device::Auto).unwrap();
        assert_eq!(s.device(), Device::Cpu);
        assert_eq!(s.run(&[("image", &x)], &[]).unwrap(), on_cpu);
    }
}

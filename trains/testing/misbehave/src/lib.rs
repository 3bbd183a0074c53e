//! Hostile test train: misbehaves in the way the parameter `do` names.

use amicus_sdk::{Params, Train};

struct Misbehave;

impl Train for Misbehave {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let what: String = params.get("do")?.unwrap_or_default();
        amicus_sdk::log::info(&format!("misbehave: {what}"));
        match what.as_str() {
            "ok" => amicus_sdk::emit("result.json", b"{\"ok\":true}"),
            "loop" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                loop {
                    keep.push(vec![1u8; 4 << 20]);
                    std::hint::black_box(&keep);
                }
            }
            "undeclared" => amicus_sdk::emit("secret.bin", b"patient list"),
            "oversized" => amicus_sdk::emit("result.json", &vec![b'x'; 4096]),
            "twice" => {
                amicus_sdk::emit("result.json", b"{}");
                amicus_sdk::emit("result.json", b"{}");
            }
            "emit-then-fail" => {
                amicus_sdk::emit("result.json", b"{\"partial\":true}");
                return Err("failed after emitting".into());
            }
            "panic" => panic!("deliberate panic in a train"),
            "log-flood" => {
                for i in 0..100_000 {
                    amicus_sdk::log::info(&format!("line {i} {}", "y".repeat(100)));
                }
                amicus_sdk::emit("result.json", b"{}");
            }
            "stdout-flood" => {
                for i in 0..100_000 {
                    println!("line {i} {}", "z".repeat(100));
                }
                amicus_sdk::emit("result.json", b"{}");
            }
            "imaging" => {
                let size: Option<(u32, u32, u32)> = params.get("size")?;
                let options = amicus_sdk::imaging::LoadOptions {
                    spacing: None,
                    slices: None,
                    size,
                    centre: None,
                    window: None,
                    z_score: false,
                };
                let series: String = params.get("series")?.unwrap_or_else(|| "1.2.3".into());
                amicus_sdk::imaging::load_series(&series, &options)?;
            }
            "cohort" => {
                let query: String = params
                    .get("query")?
                    .unwrap_or_else(|| "SELECT * WHERE { ?s ?p ?o }".into());
                let solutions = amicus_sdk::cohort::select(&query)?;
                let rows = solutions.rows.len();
                amicus_sdk::emit("result.json", format!("{{\"rows\":{rows}}}").as_bytes());
            }
            "tensor-bomb" => {
                let mut keep = Vec::new();
                loop {
                    let t =
                        amicus_sdk::tensors::Tensor::create(&[1024, 1024], &vec![0.0; 1 << 20])?;
                    keep.push(t);
                }
            }
            other => return Err(format!("unknown behaviour {other:?}").into()),
        }
        Ok(())
    }
}

amicus_sdk::export_train!(Misbehave);

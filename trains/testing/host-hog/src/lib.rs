//! Hostile test train: holds the station in host code, where wasm's fuel and epochs do not
//! reach, and reaches for files that are not its own. The parameter `do` chooses:
//!
//! - `sleep`: a blocking WASI call (`std::thread::sleep`) of `seconds` (default an hour);
//! - `select` / `tally`: the SPARQL `query` (a cartesian product with ORDER BY, say);
//! - `open`: open the bundle's model `model` (ONNX Runtime session creation);
//! - `infer`: open `model` and run it on an input `input` of `shape` (ones);
//! - `load-series`: load the series `series` (a path, say, instead of a UID).
//!
//! Whatever it got back it emits, so a test can see that nothing of it was released when the
//! run went over a limit.

use amicus_sdk::kernels::Model;
use amicus_sdk::tensors::Tensor;
use amicus_sdk::{Params, Train};

struct HostHog;

impl Train for HostHog {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let what: String = params.get("do")?.unwrap_or_default();
        let result = match what.as_str() {
            "sleep" => {
                let seconds: u64 = params.get("seconds")?.unwrap_or(3600);
                std::thread::sleep(std::time::Duration::from_secs(seconds));
                "slept".to_string()
            }
            "select" => {
                let query: String = params.get("query")?.unwrap_or_default();
                let s = amicus_sdk::cohort::select(&query)?;
                format!("{} rows", s.rows.len())
            }
            "tally" => {
                let query: String = params.get("query")?.unwrap_or_default();
                let t = amicus_sdk::cohort::tally(&query)?;
                format!("{} cells", t.cells.len())
            }
            "open" => {
                let model: String = params.get("model")?.unwrap_or_default();
                Model::open(&model)?;
                "opened".to_string()
            }
            "infer" => {
                let model: String = params.get("model")?.unwrap_or_default();
                let input: String = params.get("input")?.unwrap_or_else(|| "x".into());
                let shape: Vec<u32> = params.get("shape")?.unwrap_or_else(|| vec![1]);
                let n = shape.iter().product::<u32>() as usize;
                let m = Model::open(&model)?;
                let x = Tensor::create(&shape, &vec![1.0; n])?;
                let out = m.infer(&[(input, &x)])?;
                let values: Vec<f32> = out
                    .iter()
                    .flat_map(|(_, t)| t.read().into_iter().take(16))
                    .collect();
                format!("{values:?}")
            }
            "load-series" => {
                let series: String = params.get("series")?.unwrap_or_default();
                let options = amicus_sdk::imaging::LoadOptions {
                    spacing: None,
                    slices: None,
                    size: None,
                    centre: None,
                    window: None,
                    z_score: false,
                };
                let v = amicus_sdk::imaging::load_series(&series, &options)?;
                format!("{:?}", v.data.shape())
            }
            other => return Err(format!("unknown behaviour {other:?}").into()),
        };
        amicus_sdk::emit(
            "result.json",
            format!("{{\"result\": {result:?}}}").as_bytes(),
        );
        Ok(())
    }
}

amicus_sdk::export_train!(HostHog);

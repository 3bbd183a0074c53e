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
//! run went over a limit. Each text parameter may instead be given hex-encoded (`query_hex`,
//! `series_hex`, `model_hex`): the train decodes it, so the text first exists at run time
//! (and a test can tell a leak of it from the parameters themselves).

use amicus_sdk::kernels::Model;
use amicus_sdk::tensors::Tensor;
use amicus_sdk::{Params, Train};

struct HostHog;

/// The text parameter `key`, or its hex-encoded form `key_hex`.
fn text(params: &Params, key: &str) -> amicus_sdk::Result<String> {
    if let Some(v) = params.get::<String>(key)? {
        return Ok(v);
    }
    let hex: String = params.get(&format!("{key}_hex"))?.unwrap_or_default();
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

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
                let query = text(&params, "query")?;
                let s = amicus_sdk::cohort::select(&query)?;
                format!("{} rows", s.rows.len())
            }
            "tally" => {
                let query: String = params.get("query")?.unwrap_or_default();
                let t = amicus_sdk::cohort::tally(&query)?;
                format!("{} cells", t.cells.len())
            }
            "open" => {
                let model = text(&params, "model")?;
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
                let series = text(&params, "series")?;
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

//! Test fixture: busy for `rounds` × 10⁷ (up to about 200 fit the fuel limit) iterations, reporting progress, then emits a checksum.

use amicus_sdk::{Params, Train};

struct Slow;

impl Train for Slow {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let rounds: u64 = params.get("rounds")?.unwrap_or(100);
        let mut x: u64 = 1;
        for r in 0..rounds {
            for _ in 0..10_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            amicus_sdk::progress((r + 1) as f32 / rounds as f32, "computing");
        }
        amicus_sdk::emit("result.json", format!("{{\"checksum\":{x}}}").as_bytes());
        Ok(())
    }
}

amicus_sdk::export_train!(Slow);

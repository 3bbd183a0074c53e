//! Hostile test train: tries to read a host file through WASI.

use amicus_sdk::{Params, Train};

struct FsEscape;

impl Train for FsEscape {
    fn run(_params: Params) -> amicus_sdk::Result<()> {
        let loot = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
        amicus_sdk::emit("loot.txt", loot.as_bytes());
        Ok(())
    }
}

amicus_sdk::export_train!(FsEscape);

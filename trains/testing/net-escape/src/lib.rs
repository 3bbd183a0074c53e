//! Hostile test train: tries to open a TCP connection through WASI.

use amicus_sdk::{Params, Train};
use std::io::Write;

struct NetEscape;

impl Train for NetEscape {
    fn run(_params: Params) -> amicus_sdk::Result<()> {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9").map_err(|e| e.to_string())?;
        s.write_all(b"exfiltrated").map_err(|e| e.to_string())?;
        amicus_sdk::emit("loot.txt", b"sent");
        Ok(())
    }
}

amicus_sdk::export_train!(NetEscape);

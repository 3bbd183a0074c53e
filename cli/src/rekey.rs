//! `amicus station rekey`: rotate the station's key (see `amicus_runtime::rekey`). Owns only
//! what the data owner is told; the rotation is the runtime's and announcing it to a registry
//! the station daemon's.

use amicus_runtime::station::Station;
use anyhow::Result;
use std::path::Path;

pub fn station_rekey(dir: &Path, no_registry: bool) -> Result<()> {
    let st = Station::open(dir)?;
    let r = st.rekey(!no_registry)?;
    println!(
        "station {:?}: key {} handed over to key {} (audit entry seq {}, signed by the old key with the new key's proof)",
        st.config().name,
        r.old.id(),
        r.new.id(),
        r.seq
    );
    println!(
        "  new public key  {}",
        dir.join(amicus_runtime::station::KEY_FILE)
            .with_extension("pub")
            .display()
    );
    if no_registry {
        println!("  the old secret key is deleted; its public half stays in retired/");
    } else {
        println!(
            "  the old secret key stays in retired/ until the station daemon has handed the registry the rotation (its next pass); then it is deleted"
        );
    }
    println!(
        "  tell researchers and auditors who pinned the old key: results and log entries from now on are signed by the new one"
    );
    Ok(())
}

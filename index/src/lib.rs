//! The station's FAIR index of its DICOM archive.
//!
//! Owns the index directory (`<station>/index/`): scanning an archive folder into
//! pseudonymised facts ([`scan`]), the RDF graph built from them with LinkedDicom's
//! DICOM-tag vocabulary ([`graph`]), the guarded queries trains and data owners may run
//! ([`query`]) and the public DCAT catalog ([`catalog`]). It reads the archive and never
//! writes to it; it never writes the station's audit log or policy (the runtime does, with
//! what this crate returns); direct identifiers never get past [`header`].

pub mod catalog;
pub mod graph;
pub mod header;
pub mod pseudonym;
pub mod query;
pub mod scan;
pub mod values;

pub use catalog::{CatalogInfo, catalog_turtle};
pub use graph::{GraphCounts, Index, LoadError};
pub use header::{HeaderError, InstanceFacts};
pub use query::{Cell, OwnerFormat, QueryError, QueryLimits, Solutions, Tally, TallyCell};
pub use scan::{IndexReport, Progress, Quarantined, ScanError, scan};

/// The index directory inside a station directory.
pub fn index_dir(station_dir: &std::path::Path) -> std::path::PathBuf {
    station_dir.join("index")
}

/// Load the station's index; an empty one if the archive was never indexed.
pub fn open(station_dir: &std::path::Path) -> Result<Index, LoadError> {
    let graph = index_dir(station_dir).join(scan::GRAPH_FILE);
    if graph.exists() {
        Index::load(&graph)
    } else {
        Ok(Index::empty())
    }
}

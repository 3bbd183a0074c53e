//! Example train: series counts per modality from the station's FAIR index.
//!
//! Parameters (JSON, all optional):
//! - `min_cell` (default 5): counts below this are reported as suppressed, never as numbers;
//! - `query`: a SPARQL SELECT with variables `?modality` and `?n` replacing the default.
//!
//! On a station without a FAIR index the `cohort` capability answers "not available"; the train
//! then says so in its summary instead of inventing numbers.

use amicus_sdk::cohort::Term;
use amicus_sdk::{HostError, Params, Train};
use serde::Serialize;

/// Series per modality, written against the LinkedDicom vocabulary (DICOM tag (0008,0060)
/// Modality). The station's index mapping is defined by the FAIR index work; align this query
/// with its documented mapping when that lands.
const DEFAULT_QUERY: &str = "\
PREFIX ldcm: <https://johanvansoest.nl/ontologies/LinkedDicom/>
SELECT ?modality (COUNT(DISTINCT ?series) AS ?n)
WHERE { ?series a ldcm:Series ; ldcm:T00080060 ?modality . }
GROUP BY ?modality
ORDER BY ?modality";

#[derive(Serialize)]
struct Summary {
    train: &'static str,
    min_cell: u64,
    index: IndexState,
    modalities: Vec<Count>,
}

#[derive(Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
enum IndexState {
    Queried { rows: usize },
    Unavailable { reason: String },
}

#[derive(Serialize)]
struct Count {
    modality: String,
    /// `None` when suppressed.
    series: Option<u64>,
    suppressed: bool,
}

struct CohortStats;

impl Train for CohortStats {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let min_cell: u64 = params.get("min_cell")?.unwrap_or(5);
        if min_cell == 0 {
            return Err("min_cell must be at least 1".into());
        }
        let query: String = params
            .get("query")?
            .unwrap_or_else(|| DEFAULT_QUERY.to_string());
        amicus_sdk::log::info(&format!("cohort-stats: min_cell={min_cell}"));
        amicus_sdk::progress(0.1, "querying the FAIR index");

        let (index, modalities) = match amicus_sdk::cohort::select(&query) {
            Ok(solutions) => {
                let m = solutions.variables.iter().position(|v| v == "modality");
                let n = solutions.variables.iter().position(|v| v == "n");
                let (Some(m), Some(n)) = (m, n) else {
                    return Err("query must bind ?modality and ?n".into());
                };
                let mut counts = Vec::new();
                for row in &solutions.rows {
                    let modality = row.get(m).and_then(|c| c.as_ref()).map(term_text);
                    let count = row
                        .get(n)
                        .and_then(|c| c.as_ref())
                        .and_then(|t| term_text(t).parse::<u64>().ok());
                    let (Some(modality), Some(count)) = (modality, count) else {
                        return Err("query returned a row without modality or count".into());
                    };
                    let suppressed = count < min_cell;
                    counts.push(Count {
                        modality,
                        series: (!suppressed).then_some(count),
                        suppressed,
                    });
                }
                let rows = solutions.rows.len();
                (IndexState::Queried { rows }, counts)
            }
            Err(HostError::NotAvailable(reason)) => {
                amicus_sdk::log::warn(&format!("no FAIR index: {reason}"));
                (IndexState::Unavailable { reason }, Vec::new())
            }
            Err(other) => return Err(other.into()),
        };

        amicus_sdk::progress(0.9, "writing summary");
        amicus_sdk::emit_json(
            "summary.json",
            &Summary {
                train: "cohort-stats",
                min_cell,
                index,
                modalities,
            },
        )?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

fn term_text(t: &Term) -> String {
    match t {
        Term::Iri(s) | Term::BlankNode(s) => s.clone(),
        Term::Literal(l) => l.value.clone(),
    }
}

amicus_sdk::export_train!(CohortStats);

//! Example train: what a station's archive holds, as counts of distinct patients and series per
//! modality, body part and structure (RTSTRUCT ROI / SEG segment) name. The station does the
//! small-cell suppression (`cohort::tally`): cells under its minimum cohort never reach the train.
//!
//! Parameters (JSON, all optional):
//! - `tables`: which tables to compute, any of `modality`, `body_part`, `roi`, `segment`
//!   (default: all four).
//!
//! On a station without an index the `cohort` capability answers "not available"; the train
//! then says so in its summary instead of inventing numbers.

use amicus_sdk::cohort::{LDCM, TallyResult};
use amicus_sdk::{HostError, Params, Train};
use serde::Serialize;

/// One table: a SELECT whose rows hold a series IRI and the value to group by. Written against
/// the station index's LinkedDicom mapping (docs/fair-index.md).
fn table_query(table: &str) -> Option<String> {
    let pattern = match table {
        // (0008,0060) Modality
        "modality" => "?series ldcm:T00080060 ?value .",
        // (0018,0015) Body Part Examined
        "body_part" => "?series ldcm:T00180015 ?value .",
        // (3006,0026) ROI Name, on RTSTRUCT series
        "roi" => "?series ldcm:T30060026 ?value .",
        // (0062,0005) Segment Label, on SEG series
        "segment" => "?series ldcm:T00620005 ?value .",
        _ => return None,
    };
    Some(format!(
        "PREFIX ldcm: <{LDCM}>\nSELECT ?series ?value WHERE {{ ?series a ldcm:Series . {pattern} }}"
    ))
}

const TABLES: [&str; 4] = ["modality", "body_part", "roi", "segment"];

#[derive(Serialize)]
struct Summary {
    train: &'static str,
    /// The tables asked for.
    requested: Vec<String>,
    index: IndexState,
    /// The station's minimum cohort (cells below it were suppressed by the station).
    min_patients: Option<u32>,
    tables: Vec<Table>,
}

#[derive(Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
enum IndexState {
    Queried,
    Unavailable { reason: String },
}

#[derive(Serialize)]
struct Table {
    name: String,
    cells: Vec<Cell>,
    /// Cells the station suppressed (fewer patients than its minimum cohort).
    suppressed: u32,
}

#[derive(Serialize)]
struct Cell {
    value: String,
    patients: u32,
    series: u32,
}

struct CohortStats;

impl Train for CohortStats {
    fn run(params: Params) -> amicus_sdk::Result<()> {
        let tables: Vec<String> = params
            .get("tables")?
            .unwrap_or_else(|| TABLES.iter().map(|t| t.to_string()).collect());
        for t in &tables {
            if table_query(t).is_none() {
                return Err(format!("unknown table {t:?} (known: {})", TABLES.join(", ")).into());
            }
        }
        let mut summary = Summary {
            train: "cohort-stats",
            requested: tables.clone(),
            index: IndexState::Queried,
            min_patients: None,
            tables: Vec::new(),
        };
        for (i, name) in tables.iter().enumerate() {
            amicus_sdk::progress(i as f32 / tables.len() as f32, &format!("counting {name}"));
            let query = table_query(name).expect("checked above");
            let tally: TallyResult = match amicus_sdk::cohort::tally(&query) {
                Ok(t) => t,
                Err(HostError::NotAvailable(reason)) => {
                    amicus_sdk::log::warn(&format!("no FAIR index: {reason}"));
                    summary.index = IndexState::Unavailable { reason };
                    break;
                }
                Err(other) => return Err(other.into()),
            };
            summary.min_patients = Some(tally.min_patients);
            let value_column = tally.columns.iter().position(|c| c == "value");
            let cells = tally
                .cells
                .iter()
                .map(|c| Cell {
                    value: value_column
                        .and_then(|i| c.key.get(i).cloned().flatten())
                        .unwrap_or_default(),
                    patients: c.patients,
                    series: c.items,
                })
                .collect();
            summary.tables.push(Table {
                name: name.clone(),
                cells,
                suppressed: tally.suppressed,
            });
        }
        amicus_sdk::progress(0.95, "writing summary");
        amicus_sdk::emit_json("summary.json", &summary)?;
        amicus_sdk::progress(1.0, "done");
        Ok(())
    }
}

amicus_sdk::export_train!(CohortStats);

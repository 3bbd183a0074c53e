//! `amicus:train/cohort`: guarded SPARQL over the station's index (`select`, `tally`), each
//! query recorded with its hash, text (capped), rows and outcome.

use super::HostState;
use super::bindings::amicus::train::{cohort, types};
use crate::sandbox::guest_text;
use amicus_bundle::{Capability, sha256};

impl HostState {
    /// Run a guarded index query for the guest, and record it for the audit log: the query's
    /// hash and text (capped), the row count, and the outcome with its reason.
    fn cohort_query<T>(
        &mut self,
        call: &str,
        sparql: String,
        query: impl FnOnce(
            &amicus_index::Index,
            &str,
            &amicus_index::QueryLimits,
        ) -> Result<T, amicus_index::QueryError>,
        rows: impl FnOnce(&T) -> u64,
    ) -> Result<T, types::Error> {
        self.require(Capability::Cohort, call)?;
        let mut detail = format!("sha256:{} ", sha256(sparql.as_bytes()));
        detail.extend(guest_text(&sparql).chars().take(4096));
        let Some(access) = self.cohort.clone() else {
            return Err(self.not_available(
                Capability::Cohort,
                call,
                detail,
                "this station has not indexed its archive (amicus station index)",
            ));
        };
        self.begin(Capability::Cohort, call, &detail);
        // The station's query budget for this train, and its privacy budget for noisy tallies.
        if let Some(c) = self.cohort.as_mut() {
            if c.queries_left == 0 {
                let e = types::Error::LimitExceeded(
                    "the station's budget of cohort queries for this train is spent".into(),
                );
                return self.record(Capability::Cohort, call, detail, None, Err(e));
            }
            c.queries_left -= 1;
            if call == "tally" && c.limits.tally_noise.is_some() {
                if c.noisy_tallies_left == 0 {
                    let e = types::Error::LimitExceeded(
                        "this train's privacy budget on the station allows no more tallies".into(),
                    );
                    return self.record(Capability::Cohort, call, detail, None, Err(e));
                }
                c.noisy_tallies_left -= 1;
            }
        }
        let result = query(&access.index, &sparql, &access.limits);
        let rows_seen = result.as_ref().ok().map(rows);
        let answer = result.map_err(|e| {
            use amicus_index::QueryError as Q;
            let reason = e.to_string();
            match e {
                Q::TooLong { .. }
                | Q::TooManyRows(_)
                | Q::Timeout(_)
                | Q::TooManyIntermediate(..) => types::Error::LimitExceeded(reason),
                Q::Syntax(_) => types::Error::InvalidArgument(reason),
                Q::Evaluation(_) => types::Error::Failed(reason),
                Q::Update
                | Q::Service
                | Q::NotSelect(_)
                | Q::NotAttributable(_)
                | Q::NamesIndividual
                | Q::BelowMinimum(_) => types::Error::Denied(reason),
            }
        });
        self.record(Capability::Cohort, call, detail, rows_seen, answer)
    }
}

fn wit_term(cell: amicus_index::Cell) -> cohort::Term {
    match cell {
        amicus_index::Cell::Iri { value } => cohort::Term::Iri(value),
        amicus_index::Cell::BlankNode { value } => cohort::Term::BlankNode(value),
        amicus_index::Cell::Literal {
            value,
            datatype,
            language,
        } => cohort::Term::Literal(cohort::Literal {
            value,
            datatype,
            language,
        }),
    }
}

impl cohort::Host for HostState {
    fn select(&mut self, sparql: String) -> Result<cohort::Solutions, types::Error> {
        let solutions = self.cohort_query("select", sparql, amicus_index::query::select, |s| {
            s.rows.len() as u64
        })?;
        Ok(cohort::Solutions {
            variables: solutions.variables,
            rows: solutions
                .rows
                .into_iter()
                .map(|row| row.into_iter().map(|c| c.map(wit_term)).collect())
                .collect(),
        })
    }

    fn tally(&mut self, sparql: String) -> Result<cohort::TallyResult, types::Error> {
        let tally = self.cohort_query("tally", sparql, amicus_index::query::tally, |t| {
            t.cells.len() as u64
        })?;
        Ok(cohort::TallyResult {
            columns: tally.columns,
            cells: tally
                .cells
                .into_iter()
                .map(|c| cohort::TallyCell {
                    key: c.key,
                    patients: c.patients,
                    items: c.items,
                })
                .collect(),
            suppressed: tally.suppressed,
            min_patients: tally.min_patients,
        })
    }
}

//! Guarded SPARQL over the index: what trains may ask (`select`, `tally`) and what the data
//! owner may ask (`owner_query`).
//!
//! Owns the checks between a query text and the store: length limit, SPARQL updates and
//! SERVICE refused before evaluation, SELECT only for trains, a wall-clock limit enforced by
//! cancellation, a row limit, and the minimum cohort: every row of a train's result must be
//! attributable to patients (through the patient, study or series IRIs it holds) and the whole
//! result must cover at least the station's minimum number of distinct patients. `tally`
//! counts distinct patients per cell and suppresses small cells on the station. Never writes.

use crate::graph::Index;
use oxigraph::model::Term;
use oxigraph::sparql::{CancellationToken, QueryResults, SparqlEvaluator};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The station's limits on one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    pub max_query_bytes: usize,
    pub max_rows: usize,
    pub timeout: Duration,
    /// Smallest number of distinct patients a train's result may cover.
    pub min_patients: u32,
    /// Most solutions any part of a train's query that oxigraph materialises (sorts, groups,
    /// distinct sets, the built side of joins, MINUS, OPTIONAL, property paths) may produce.
    pub max_intermediate: usize,
    /// Noise on `tally` counts: two-sided geometric noise of privacy ε per query, each patient
    /// counted in at most `cells_per_patient` cells of one tally (`None`: exact counts).
    pub tally_noise: Option<TallyNoise>,
}

/// Differential privacy of `tally`: each call is ε-DP (Laplace-like two-sided geometric noise
/// of scale `cells_per_patient / epsilon` on every cell, contributions bounded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TallyNoise {
    pub epsilon: f64,
    pub cells_per_patient: u32,
}

impl Eq for TallyNoise {}

/// The default of [`QueryLimits::max_intermediate`].
pub const DEFAULT_MAX_INTERMEDIATE: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the query is {len} bytes; the station allows at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("SPARQL updates are not allowed: the index is read-only")]
    Update,
    #[error("not a valid SPARQL query: {0}")]
    Syntax(String),
    #[error("only SELECT queries are allowed here, not {0}")]
    NotSelect(&'static str),
    #[error("SERVICE (federated query) is not allowed: queries stay inside the station")]
    Service,
    #[error("the result has more than {0} rows (station limit)")]
    TooManyRows(usize),
    #[error("the query ran longer than {0} ms (station limit)")]
    Timeout(u128),
    #[error(
        "part of the query ({0}) would hold more than {1} solutions in memory (station limit); \
         narrow it before sorting, grouping or joining"
    )]
    TooManyIntermediate(&'static str, usize),
    #[error(
        "row {0} cannot be attributed to a patient: select the series, study or patient IRIs \
         the rows are about, so the station can check the minimum cohort"
    )]
    NotAttributable(usize),
    #[error("the result covers fewer distinct patients than the station's minimum cohort ({0})")]
    BelowMinimum(u32),
    #[error(
        "the query names an individual (a patient, study or series of the index, by IRI or \
         identifier): trains ask about cohorts, not about one person"
    )]
    NamesIndividual,
    #[error("query evaluation failed: {0}")]
    Evaluation(String),
}

/// An RDF term as plain data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cell {
    Iri {
        value: String,
    },
    Literal {
        value: String,
        datatype: String,
        language: Option<String>,
    },
    BlankNode {
        value: String,
    },
}

impl Cell {
    /// The RDF term back (blank nodes have none outside their result).
    pub fn to_term(&self) -> Option<Term> {
        use oxigraph::model::{Literal, NamedNode};
        Some(match self {
            Cell::Iri { value } => NamedNode::new(value.as_str()).ok()?.into(),
            Cell::BlankNode { .. } => return None,
            Cell::Literal {
                value,
                datatype,
                language,
            } => match language {
                Some(lang) => Literal::new_language_tagged_literal(value.as_str(), lang.as_str())
                    .ok()?
                    .into(),
                None => Literal::new_typed_literal(
                    value.as_str(),
                    NamedNode::new(datatype.as_str()).ok()?,
                )
                .into(),
            },
        })
    }

    fn of(term: &Term) -> Cell {
        match term {
            Term::NamedNode(n) => Cell::Iri {
                value: n.as_str().to_string(),
            },
            Term::BlankNode(b) => Cell::BlankNode {
                value: b.as_str().to_string(),
            },
            Term::Literal(l) => Cell::Literal {
                value: l.value().to_string(),
                datatype: l.datatype().as_str().to_string(),
                language: l.language().map(str::to_string),
            },
        }
    }

    /// The lexical value (IRI, literal value or blank node label).
    pub fn value(&self) -> &str {
        match self {
            Cell::Iri { value } | Cell::Literal { value, .. } | Cell::BlankNode { value } => value,
        }
    }
}

/// A train's SELECT result that passed every check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Solutions {
    pub variables: Vec<String>,
    pub rows: Vec<Vec<Option<Cell>>>,
}

/// Counts per cell, small cells suppressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// The key columns: projected variables never bound to a patient-attributable IRI.
    pub columns: Vec<String>,
    pub cells: Vec<TallyCell>,
    /// Cells left out because they cover fewer patients than the minimum (keys not shown).
    pub suppressed: u32,
    pub min_patients: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TallyCell {
    pub key: Vec<Option<String>>,
    /// Distinct patients in the cell.
    pub patients: u32,
    /// Distinct attributable items in the cell (e.g. series, when the query selects series).
    pub items: u32,
}

/// Parse and refuse what no one may run. Returns the parsed query.
fn parse(sparql: &str, max_bytes: usize) -> Result<spargebra::Query, QueryError> {
    if sparql.len() > max_bytes {
        return Err(QueryError::TooLong {
            len: sparql.len(),
            max: max_bytes,
        });
    }
    let query = match spargebra::SparqlParser::new().parse_query(sparql) {
        Ok(q) => q,
        Err(e) => {
            if spargebra::SparqlParser::new().parse_update(sparql).is_ok() {
                return Err(QueryError::Update);
            }
            return Err(QueryError::Syntax(e.to_string().replace('\n', " ")));
        }
    };
    // SERVICE may hide anywhere (also inside EXISTS); the S-expression form names every one.
    // A string literal containing "(service " is refused too: safe, and unlikely.
    if query.to_sse().contains("(service ") {
        return Err(QueryError::Service);
    }
    Ok(query)
}

fn kind(query: &spargebra::Query) -> &'static str {
    match query {
        spargebra::Query::Select { .. } => "SELECT",
        spargebra::Query::Construct { .. } => "CONSTRUCT",
        spargebra::Query::Describe { .. } => "DESCRIBE",
        spargebra::Query::Ask { .. } => "ASK",
    }
}

/// Cancels the token when the deadline passes; stops when dropped.
struct Watchdog {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(token: CancellationToken, timeout: Duration) -> Watchdog {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                let now = Instant::now();
                if now >= deadline {
                    token.cancel();
                    return;
                }
                std::thread::park_timeout(deadline - now);
            }
        });
        Watchdog {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Evaluate a parsed query with the time limit; `each` sees results as they come. With
/// `max_intermediate`, every part of the query that oxigraph materialises is first counted,
/// streaming and under the same deadline, and the query is refused when one would exceed it.
fn evaluate<T>(
    index: &Index,
    query: spargebra::Query,
    timeout: Duration,
    max_intermediate: Option<usize>,
    each: impl FnOnce(QueryResults<'_>) -> Result<T, QueryError>,
) -> Result<T, QueryError> {
    let token = CancellationToken::new();
    let started = Instant::now();
    let _watchdog = Watchdog::start(token.clone(), timeout);
    let timed_out = |e: String| {
        if token.is_cancelled() || started.elapsed() >= timeout {
            QueryError::Timeout(timeout.as_millis())
        } else {
            QueryError::Evaluation(e)
        }
    };
    if let (Some(cap), spargebra::Query::Select { pattern, .. }) = (max_intermediate, &query) {
        match bound_materialisation(index, pattern, cap, &token) {
            Err(QueryError::Evaluation(e)) => return Err(timed_out(e)),
            other => other?,
        }
    }
    // oxigraph is built without `http-client`: it has no SERVICE handler at all, so even a
    // SERVICE that slipped past `parse` could not reach the network.
    let results = SparqlEvaluator::new()
        .with_cancellation_token(token.clone())
        .for_query(query)
        .on_store(&index.store)
        .execute()
        .map_err(|e| timed_out(e.to_string()))?;
    match each(results) {
        Err(QueryError::Evaluation(e)) => Err(timed_out(e)),
        other => other,
    }
}

/// oxigraph (spareval 0.2) collects some parts of a query before it yields anything: the input
/// of ORDER BY, GROUP BY and DISTINCT, the side of a hash join it builds, the right side of
/// OPTIONAL and MINUS, the closure of a property path. While collecting it records each error
/// and goes on, so a cancelled query can go on for minutes and gigabytes. Each such part is
/// therefore evaluated first on its own, streaming (where cancellation stops it at once), up
/// to `cap + 1` solutions, innermost first, so the real evaluation never materialises more than
/// `cap` solutions in one place.
fn bound_materialisation(
    index: &Index,
    pattern: &spargebra::algebra::GraphPattern,
    cap: usize,
    token: &CancellationToken,
) -> Result<(), QueryError> {
    use spargebra::algebra::GraphPattern as P;
    let (children, materialised): (Vec<&P>, Vec<(&P, &'static str)>) = match pattern {
        P::Bgp { .. } | P::Values { .. } => (vec![], vec![]),
        P::Path { path, .. } => {
            let closure = matches!(
                path,
                spargebra::algebra::PropertyPathExpression::ZeroOrMore(_)
                    | spargebra::algebra::PropertyPathExpression::OneOrMore(_)
                    | spargebra::algebra::PropertyPathExpression::ZeroOrOne(_)
            ) || format!("{path}").contains(['*', '+', '?']);
            (
                vec![],
                if closure {
                    vec![(pattern, "a property path")]
                } else {
                    vec![]
                },
            )
        }
        P::Join { left, right } | P::Lateral { left, right } => (
            vec![left, right],
            vec![(left.as_ref(), "a join"), (right.as_ref(), "a join")],
        ),
        P::LeftJoin { left, right, .. } => (vec![left, right], vec![(right.as_ref(), "OPTIONAL")]),
        P::Minus { left, right } => (vec![left, right], vec![(right.as_ref(), "MINUS")]),
        P::Union { left, right } => (vec![left, right], vec![]),
        P::OrderBy { inner, .. } => (vec![inner], vec![(inner.as_ref(), "ORDER BY")]),
        P::Group { inner, .. } => (vec![inner], vec![(inner.as_ref(), "GROUP BY")]),
        P::Distinct { inner } | P::Reduced { inner } => {
            (vec![inner], vec![(inner.as_ref(), "DISTINCT")])
        }
        P::Filter { inner, .. }
        | P::Graph { inner, .. }
        | P::Extend { inner, .. }
        | P::Project { inner, .. }
        | P::Slice { inner, .. }
        | P::Service { inner, .. } => (vec![inner], vec![]),
    };
    for child in children {
        bound_materialisation(index, child, cap, token)?;
    }
    for (part, what) in materialised {
        let count = spargebra::Query::Select {
            dataset: None,
            pattern: P::Slice {
                inner: Box::new(part.clone()),
                start: 0,
                length: Some(cap.saturating_add(1)),
            },
            base_iri: None,
        };
        let results = SparqlEvaluator::new()
            .with_cancellation_token(token.clone())
            .for_query(count)
            .on_store(&index.store)
            .execute()
            .map_err(|e| QueryError::Evaluation(e.to_string()))?;
        let QueryResults::Solutions(solutions) = results else {
            continue;
        };
        let mut n = 0usize;
        for solution in solutions {
            // oxigraph checks the token only when it reads the store; a product of parts it
            // already holds yields rows without reading, so the count checks it too.
            if token.is_cancelled() {
                return Err(QueryError::Evaluation("cancelled".into()));
            }
            solution.map_err(|e| QueryError::Evaluation(e.to_string()))?;
            n += 1;
            if n > cap {
                return Err(QueryError::TooManyIntermediate(what, cap));
            }
        }
    }
    Ok(())
}

/// Refuse a query that names an individual: an IRI of a patient, study or series of the index,
/// or a literal that is a pseudonym or UID. (A train that learned them from an earlier `select`
/// could otherwise ask about one person, or difference all patients against all but one.)
/// Read from the query's normalised form, where IRIs are `<…>` and literals `"…"`.
fn names_individual(index: &Index, query: &spargebra::Query) -> bool {
    let sse = query.to_sse();
    let bytes = sse.as_bytes();
    let mut i = 0usize;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'<' => {
                // An IRI has no space; the less-than operator is followed by one.
                let rest = sse.get(i + 1..).unwrap_or("");
                if let Some(end) = rest.find(|c: char| c == '>' || c.is_whitespace())
                    && rest.as_bytes().get(end) == Some(&b'>')
                {
                    let iri = rest.get(..end).unwrap_or("");
                    if index.patient_of(iri).is_some() {
                        return true;
                    }
                    i += end + 2;
                    continue;
                }
                i += 1;
            }
            b'"' => {
                let mut value = String::new();
                let mut j = i + 1;
                let mut escaped = false;
                let mut chars = sse.get(j..).unwrap_or("").chars();
                for c in chars.by_ref() {
                    j += c.len_utf8();
                    if escaped {
                        value.push(c);
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    } else {
                        value.push(c);
                    }
                }
                if index.is_identifier(&value) {
                    return true;
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    false
}

/// Run a train's SELECT and collect at most `max_rows` rows.
fn select_rows(index: &Index, sparql: &str, limits: &QueryLimits) -> Result<Solutions, QueryError> {
    let query = parse(sparql, limits.max_query_bytes)?;
    if !matches!(query, spargebra::Query::Select { .. }) {
        return Err(QueryError::NotSelect(kind(&query)));
    }
    if names_individual(index, &query) {
        return Err(QueryError::NamesIndividual);
    }
    evaluate(
        index,
        query,
        limits.timeout,
        Some(limits.max_intermediate),
        |results| {
            let QueryResults::Solutions(solutions) = results else {
                return Err(QueryError::NotSelect("a non-SELECT form"));
            };
            let variables: Vec<String> = solutions
                .variables()
                .iter()
                .map(|v| v.as_str().to_string())
                .collect();
            let mut rows = Vec::new();
            for solution in solutions {
                let solution = solution.map_err(|e| QueryError::Evaluation(e.to_string()))?;
                if rows.len() == limits.max_rows {
                    return Err(QueryError::TooManyRows(limits.max_rows));
                }
                rows.push(
                    solution
                        .values()
                        .iter()
                        .map(|t| t.as_ref().map(Cell::of))
                        .collect(),
                );
            }
            Ok(Solutions { variables, rows })
        },
    )
}

fn row_patients(index: &Index, row: &[Option<Cell>]) -> BTreeSet<u32> {
    row.iter()
        .flatten()
        .filter_map(|c| match c {
            Cell::Iri { value } => index.patient_of(value),
            _ => None,
        })
        .collect()
}

/// A train's SELECT: every check, including the minimum cohort over the whole result.
pub fn select(index: &Index, sparql: &str, limits: &QueryLimits) -> Result<Solutions, QueryError> {
    let solutions = select_rows(index, sparql, limits)?;
    let mut patients = BTreeSet::new();
    for (i, row) in solutions.rows.iter().enumerate() {
        let these = row_patients(index, row);
        if these.is_empty() {
            return Err(QueryError::NotAttributable(i + 1));
        }
        patients.extend(these);
    }
    if (patients.len() as u64) < u64::from(limits.min_patients) {
        return Err(QueryError::BelowMinimum(limits.min_patients));
    }
    Ok(solutions)
}

/// A train's counting query: rows grouped by their non-attributable values, distinct
/// patients counted per group, groups under the minimum cohort suppressed (key hidden too).
pub fn tally(index: &Index, sparql: &str, limits: &QueryLimits) -> Result<Tally, QueryError> {
    let solutions = select_rows(index, sparql, limits)?;
    let n = solutions.variables.len();
    // A column is an item column if any row binds it to an attributable IRI.
    let mut item_column = vec![false; n];
    for row in &solutions.rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(Cell::Iri { value }) = cell
                && index.patient_of(value).is_some()
            {
                item_column[i] = true;
            }
        }
    }
    type Group = (BTreeSet<u32>, BTreeSet<Vec<Option<Cell>>>);
    let mut groups: BTreeMap<Vec<Option<String>>, Group> = BTreeMap::new();
    // A patient counts for a cell only if the cell's key values are the patient's own (values
    // of its own patient, study or series nodes): a row that pairs one patient's attributes
    // with every patient's IRI counts only the patients who share them.
    let mut owned: HashMap<(u32, Cell), bool> = HashMap::new();
    let mut cells_of: HashMap<u32, u32> = HashMap::new();
    let cap = limits.tally_noise.map(|n| n.cells_per_patient.max(1));
    for (r, row) in solutions.rows.iter().enumerate() {
        let patients = row_patients(index, row);
        if patients.is_empty() {
            return Err(QueryError::NotAttributable(r + 1));
        }
        let key: Vec<Option<String>> = (0..n)
            .filter(|i| !item_column[*i])
            .map(|i| row[i].as_ref().map(|c| c.value().to_string()))
            .collect();
        let key_cells: Vec<&Cell> = (0..n)
            .filter(|i| !item_column[*i])
            .filter_map(|i| row[i].as_ref())
            .collect();
        let owners: Vec<u32> = patients
            .into_iter()
            .filter(|p| {
                key_cells.iter().all(|c| {
                    *owned
                        .entry((*p, (*c).clone()))
                        .or_insert_with(|| c.to_term().is_some_and(|t| index.owns(*p, &t)))
                })
            })
            .collect();
        if owners.is_empty() {
            continue;
        }
        let item = (0..n)
            .filter(|i| item_column[*i])
            .map(|i| row[i].clone())
            .collect();
        let group = groups.entry(key).or_default();
        for p in owners {
            // With noise, each patient counts in at most `cap` cells (bounded contribution).
            if group.0.contains(&p) {
                continue;
            }
            let used = cells_of.entry(p).or_insert(0);
            if cap.is_some_and(|c| *used >= c) {
                continue;
            }
            *used += 1;
            group.0.insert(p);
        }
        group.1.insert(item);
    }
    let mut cells = Vec::new();
    let mut suppressed = 0;
    for (key, (patients, items)) in groups {
        let count = match limits.tally_noise {
            Some(noise) => noisy(patients.len() as u64, noise)?,
            None => patients.len() as u64,
        };
        if count < u64::from(limits.min_patients) {
            suppressed += 1;
        } else {
            cells.push(TallyCell {
                key,
                patients: u32::try_from(count).unwrap_or(u32::MAX),
                items: if limits.tally_noise.is_some() {
                    // Items per cell would be an exact count beside the noisy one.
                    u32::try_from(count).unwrap_or(u32::MAX)
                } else {
                    items.len() as u32
                },
            });
        }
    }
    Ok(Tally {
        columns: (0..n)
            .filter(|i| !item_column[*i])
            .map(|i| solutions.variables[i].clone())
            .collect(),
        cells,
        suppressed,
        min_patients: limits.min_patients,
    })
}

/// How the data owner wants results printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerFormat {
    /// SPARQL 1.1 Query Results JSON (SELECT/ASK) or N-Triples (CONSTRUCT/DESCRIBE).
    Json,
    /// Tab-separated values (SELECT), `true`/`false` (ASK), N-Triples (CONSTRUCT/DESCRIBE).
    Text,
}

/// `count` plus two-sided geometric noise of scale `cells_per_patient / epsilon` (the discrete
/// Laplace mechanism), from the operating system's randomness, at least 0.
fn noisy(count: u64, noise: TallyNoise) -> Result<u64, QueryError> {
    let scale = f64::from(noise.cells_per_patient.max(1)) / noise.epsilon;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(QueryError::Evaluation(
            "the tally noise is not configured".into(),
        ));
    }
    // P(X = k) ∝ exp(-|k| / scale): the difference of two geometric draws of q = exp(-1/scale).
    let q = (-1.0 / scale).exp();
    let draw = || -> Result<u64, QueryError> {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| QueryError::Evaluation(format!("randomness: {e}")))?;
        // Uniform in (0, 1].
        let u = ((u64::from_le_bytes(b) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        Ok((u.ln() / q.ln()).floor().clamp(0.0, 1e12) as u64)
    };
    let (a, b) = (draw()?, draw()?);
    Ok((count + a).saturating_sub(b))
}

/// The data owner's read-only query: any query form, no SERVICE, no updates, time-limited,
/// no row limit and no minimum cohort (it is the owner's own data, it stays on the station).
pub fn owner_query(
    index: &Index,
    sparql: &str,
    timeout: Duration,
    format: OwnerFormat,
) -> Result<Vec<u8>, QueryError> {
    use oxigraph::io::{RdfFormat, RdfSerializer};
    use oxigraph::sparql::results::{QueryResultsFormat, QueryResultsSerializer};
    let query = parse(sparql, 1 << 20)?;
    let io = |e: std::io::Error| QueryError::Evaluation(e.to_string());
    evaluate(index, query, timeout, None, |results| {
        let mut out = Vec::new();
        let results_format = match format {
            OwnerFormat::Json => QueryResultsFormat::Json,
            OwnerFormat::Text => QueryResultsFormat::Tsv,
        };
        match results {
            QueryResults::Solutions(solutions) => {
                let mut w = QueryResultsSerializer::from_format(results_format)
                    .serialize_solutions_to_writer(&mut out, solutions.variables().to_vec())
                    .map_err(io)?;
                for solution in solutions {
                    let solution = solution.map_err(|e| QueryError::Evaluation(e.to_string()))?;
                    w.serialize(solution.iter()).map_err(io)?;
                }
                w.finish().map_err(io)?;
            }
            QueryResults::Boolean(b) => match format {
                OwnerFormat::Json => {
                    QueryResultsSerializer::from_format(results_format)
                        .serialize_boolean_to_writer(&mut out, b)
                        .map_err(io)?;
                }
                OwnerFormat::Text => out.extend_from_slice(if b { b"true\n" } else { b"false\n" }),
            },
            QueryResults::Graph(triples) => {
                let mut w = RdfSerializer::from_format(RdfFormat::NTriples).for_writer(&mut out);
                for t in triples {
                    let t = t.map_err(|e| QueryError::Evaluation(e.to_string()))?;
                    w.serialize_triple(&t).map_err(io)?;
                }
                w.finish().map_err(io)?;
            }
        }
        Ok(out)
    })
}

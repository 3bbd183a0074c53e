//! The station's public description: a DCAT catalog (FAIR Data Point style) with
//! HealthDCAT-AP counts, written as Turtle.
//!
//! Owns what a station publishes about its archive, and nothing else: aggregate counts only.
//! Counts that cover fewer patients than the minimum cohort are left out; the others are
//! rounded to the nearest ten. No UID, pseudonym or free text from the archive appears.

use crate::graph::{Index, LDCM};
use crate::scan::IndexReport;
use oxigraph::io::{RdfFormat, RdfSerializer};
use oxigraph::model::vocab::{rdf, xsd};
use oxigraph::model::{Literal, NamedNode, NamedOrBlankNode, Term, Triple};
use oxigraph::sparql::{QueryResults, SparqlEvaluator};

const DCAT: &str = "http://www.w3.org/ns/dcat#";
const DCT: &str = "http://purl.org/dc/terms/";
const FOAF: &str = "http://xmlns.com/foaf/0.1/";
const PROV: &str = "http://www.w3.org/ns/prov#";
const FDP: &str = "https://w3id.org/fdp/fdp-o#";
/// HealthDCAT-AP namespace, as used by the HealthDCAT-AP examples.
const HEALTHDCATAP: &str = "http://healthdataportal.eu/ns/health#";
const ACCESS_NON_PUBLIC: &str =
    "http://publications.europa.eu/resource/authority/access-right/NON_PUBLIC";
const DICOM_STANDARD: &str = "https://www.dicomstandard.org/current";

/// What the data owner says about the station (from the policy's `[catalog]` section).
#[derive(Debug, Clone)]
pub struct CatalogInfo<'a> {
    /// Base of the station's IRIs, e.g. `urn:amicus:station:<keyid>`.
    pub base: &'a str,
    pub title: &'a str,
    pub publisher: &'a str,
    pub license: &'a str,
    pub min_patients: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog query failed: {0}")]
    Query(String),
    #[error("{0} is not a valid IRI: {1}")]
    Iri(String, String),
    #[error("writing the catalog failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Round a count for publication: `None` (suppressed) under the minimum, else to the nearest
/// ten (never below the minimum, so a published count never hints at a smaller one).
pub fn publishable(count: u64, min: u32) -> Option<u64> {
    if count < u64::from(min.max(1)) {
        return None;
    }
    let floor = u64::from(min.max(1)).next_multiple_of(10);
    Some(((count + 5) / 10 * 10).max(floor))
}

fn nn(iri: String) -> Result<NamedNode, CatalogError> {
    NamedNode::new(iri.clone()).map_err(|e| CatalogError::Iri(iri, e.to_string()))
}

fn count(v: u64) -> Term {
    Literal::new_typed_literal(v.to_string(), xsd::NON_NEGATIVE_INTEGER).into()
}

/// Counts the catalog publishes (before rounding and suppression).
struct Aggregates {
    /// (modality, series, patients)
    modalities: Vec<(String, u64, u64)>,
    patients: u64,
    series: u64,
}

fn aggregates(index: &Index) -> Result<Aggregates, CatalogError> {
    let run = |q: &str| -> Result<Vec<Vec<String>>, CatalogError> {
        let err = |e: &dyn std::fmt::Display| CatalogError::Query(e.to_string());
        let QueryResults::Solutions(solutions) = SparqlEvaluator::new()
            .parse_query(q)
            .map_err(|e| err(&e))?
            .on_store(&index.store)
            .execute()
            .map_err(|e| err(&e))?
        else {
            return Ok(Vec::new());
        };
        let mut rows = Vec::new();
        for s in solutions {
            let s = s.map_err(|e| err(&e))?;
            rows.push(
                s.values()
                    .iter()
                    .map(|t| match t {
                        Some(Term::Literal(l)) => l.value().to_string(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    })
                    .collect(),
            );
        }
        Ok(rows)
    };
    let per_modality = run(&format!(
        "PREFIX ldcm: <{LDCM}>
         SELECT ?m (COUNT(DISTINCT ?s) AS ?series) (COUNT(DISTINCT ?p) AS ?patients) WHERE {{
           ?p ldcm:has_study ?st . ?st ldcm:has_series ?s . ?s ldcm:T00080060 ?m }}
         GROUP BY ?m ORDER BY ?m"
    ))?;
    let totals = run(&format!(
        "PREFIX ldcm: <{LDCM}>
         SELECT (COUNT(DISTINCT ?p) AS ?patients) (COUNT(DISTINCT ?st) AS ?studies) (COUNT(DISTINCT ?s) AS ?series)
         WHERE {{ ?p ldcm:has_study ?st . ?st ldcm:has_series ?s }}"
    ))?;
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    let modalities = per_modality
        .iter()
        .map(|r| (r[0].clone(), num(&r[1]), num(&r[2])))
        .collect();
    let t = totals
        .first()
        .cloned()
        .unwrap_or_else(|| vec!["0".into(); 3]);
    Ok(Aggregates {
        modalities,
        patients: num(&t[0]),
        series: num(&t[2]),
    })
}

/// The catalog as Turtle.
pub fn catalog_turtle(
    index: &Index,
    info: &CatalogInfo<'_>,
    report: Option<&IndexReport>,
) -> Result<String, CatalogError> {
    let Aggregates {
        modalities,
        patients,
        series,
    } = aggregates(index)?;
    let p = |ns: &str, local: &str| NamedNode::new_unchecked(format!("{ns}{local}"));
    let text = |s: &str| Term::from(Literal::new_simple_literal(s));
    let catalog = nn(format!("{}:catalog", info.base))?;
    let dataset = nn(format!("{}:dataset:imaging", info.base))?;
    let publisher = nn(format!("{}:publisher", info.base))?;
    let mut triples: Vec<Triple> = Vec::new();
    let mut add = |s: &NamedNode, pr: NamedNode, o: Term| {
        triples.push(Triple::new(NamedOrBlankNode::from(s.clone()), pr, o))
    };

    add(&catalog, rdf::TYPE.into(), p(DCAT, "Catalog").into());
    add(&catalog, rdf::TYPE.into(), p(FDP, "FAIRDataPoint").into());
    add(&catalog, p(DCT, "title"), text(info.title));
    add(&catalog, p(DCT, "publisher"), publisher.clone().into());
    add(
        &catalog,
        p(DCT, "license"),
        nn(info.license.to_string())?.into(),
    );
    add(&catalog, p(DCT, "conformsTo"), p(FDP, "").into());
    add(&catalog, p(DCAT, "dataset"), dataset.clone().into());
    add(&publisher, rdf::TYPE.into(), p(FOAF, "Agent").into());
    add(&publisher, p(FOAF, "name"), text(info.publisher));

    add(&dataset, rdf::TYPE.into(), p(DCAT, "Dataset").into());
    add(
        &dataset,
        p(DCT, "title"),
        text(&format!("{} (DICOM imaging)", info.title)),
    );
    add(
        &dataset,
        p(DCT, "description"),
        text(
            "Imaging archive indexed at the station. Data never leaves the station: signed trains \
             run on it under the data owner's policy. Counts below the minimum cohort are \
             suppressed; the others are rounded to the nearest ten.",
        ),
    );
    add(&dataset, p(DCT, "publisher"), publisher.clone().into());
    add(
        &dataset,
        p(DCT, "license"),
        nn(info.license.to_string())?.into(),
    );
    add(
        &dataset,
        p(DCT, "accessRights"),
        p(ACCESS_NON_PUBLIC, "").into(),
    );
    add(&dataset, p(DCT, "conformsTo"), p(LDCM, "").into());
    add(&dataset, p(DCT, "conformsTo"), p(DICOM_STANDARD, "").into());
    if let Some(n) = publishable(patients, info.min_patients) {
        add(
            &dataset,
            p(HEALTHDCATAP, "numberOfUniqueIndividuals"),
            count(n),
        );
        if let Some(s) = publishable(series, info.min_patients) {
            add(&dataset, p(HEALTHDCATAP, "numberOfRecords"), count(s));
        }
    }
    for (modality, n_series, n_patients) in &modalities {
        let Some(rounded_patients) = publishable(*n_patients, info.min_patients) else {
            continue;
        };
        let safe: String = modality
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        if safe.is_empty() {
            continue;
        }
        let part = nn(format!("{}:dataset:imaging:{safe}", info.base))?;
        add(&dataset, p(DCAT, "keyword"), text(&safe));
        add(&part, rdf::TYPE.into(), p(DCAT, "Dataset").into());
        add(&part, p(DCT, "isPartOf"), dataset.clone().into());
        add(&part, p(DCT, "title"), text(&format!("{safe} series")));
        add(&part, p(DCAT, "keyword"), text(&safe));
        add(
            &part,
            p(HEALTHDCATAP, "numberOfUniqueIndividuals"),
            count(rounded_patients),
        );
        if let Some(s) = publishable(*n_series, info.min_patients) {
            add(&part, p(HEALTHDCATAP, "numberOfRecords"), count(s));
        }
    }
    if let Some(report) = report {
        let run = nn(format!(
            "{}:index-run:{}",
            info.base,
            &report.graph_sha256[..16.min(report.graph_sha256.len())]
        ))?;
        add(&dataset, p(PROV, "wasGeneratedBy"), run.clone().into());
        add(&run, rdf::TYPE.into(), p(PROV, "Activity").into());
        add(
            &run,
            p(PROV, "wasAssociatedWith"),
            nn(info.base.to_string())?.into(),
        );
        if let Some(ended) = unix_to_xsd(report.finished_unix) {
            add(
                &run,
                p(PROV, "endedAtTime"),
                Literal::new_typed_literal(ended.clone(), xsd::DATE_TIME).into(),
            );
            add(
                &dataset,
                p(DCT, "modified"),
                Literal::new_typed_literal(ended, xsd::DATE_TIME).into(),
            );
        }
        add(
            &run,
            p(DCT, "description"),
            text("amicus station index (DICOM headers to LinkedDicom RDF)"),
        );
    }

    let mut serializer = RdfSerializer::from_format(RdfFormat::Turtle);
    for (prefix, ns) in [
        ("dcat", DCAT),
        ("dct", DCT),
        ("foaf", FOAF),
        ("prov", PROV),
        ("fdp", FDP),
        ("healthdcatap", HEALTHDCATAP),
        ("ldcm", LDCM),
        ("xsd", "http://www.w3.org/2001/XMLSchema#"),
    ] {
        serializer = serializer
            .with_prefix(prefix, ns)
            .map_err(|e| CatalogError::Iri(ns.into(), e.to_string()))?;
    }
    // Grouped by subject (stable: each subject's triples keep their order) for readable Turtle.
    triples.sort_by_key(|t| t.subject.to_string());
    let mut w = serializer.for_writer(Vec::new());
    for t in &triples {
        w.serialize_triple(t)?;
    }
    Ok(String::from_utf8_lossy(&w.finish()?).into_owned())
}

/// Seconds since the epoch → `YYYY-MM-DDThh:mm:ssZ` (proleptic Gregorian, UTC).
fn unix_to_xsd(secs: u64) -> Option<String> {
    let days = i64::try_from(secs / 86_400).ok()?;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_suppression() {
        assert_eq!(publishable(0, 5), None);
        assert_eq!(publishable(4, 5), None);
        assert_eq!(publishable(5, 5), Some(10));
        assert_eq!(publishable(14, 5), Some(10));
        assert_eq!(publishable(15, 5), Some(20));
        assert_eq!(publishable(1234, 10), Some(1230));
        assert_eq!(publishable(3, 0), Some(10));
    }

    #[test]
    fn xsd_dates() {
        assert_eq!(unix_to_xsd(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_xsd(1_709_251_199).unwrap(), "2024-02-29T23:59:59Z");
    }
}

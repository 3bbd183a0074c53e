//! Instance facts → the RDF graph of the index, and the loaded, queryable [`Index`].
//!
//! Owns the mapping to vocabularies (documented in `docs/fair-index.md`): LinkedDicom's
//! DICOM-tag vocabulary (`ldcm:T<gggg><eeee>` for attribute values, `ldcm:R<tag>` for
//! references, classes `ldcm:Patient`/`Study`/`Series`, links `has_study`/`has_series`),
//! `urn:oid:` IRIs for UIDs, XSD-typed literals. Facts are aggregated per series; sequence
//! attributes that matter for cohorts (ROI names, segment labels, referenced series) are
//! attached to the series directly. Reads facts only, so nothing identifying can reach the
//! graph that the header module did not keep.

use crate::header::InstanceFacts;
use oxigraph::io::{RdfFormat, RdfSerializer};
use oxigraph::model::vocab::{rdf, xsd};
use oxigraph::model::{GraphName, Literal, NamedNode, Quad, Term};
use oxigraph::store::Store;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

/// LinkedDicom namespace (https://github.com/MaastrichtU-CDS/LinkedDicom, `ontology/LinkedDicom.owl`).
pub const LDCM: &str = "https://johanvansoest.nl/ontologies/LinkedDicom/";
pub const PATIENT_IRI_PREFIX: &str = "urn:amicus:patient:";

/// A LinkedDicom term, e.g. `ldcm("T00080060")` for Modality.
pub fn ldcm(local: &str) -> NamedNode {
    NamedNode::new_unchecked(format!("{LDCM}{local}"))
}

/// `urn:oid:` IRI of a DICOM UID (checked by the header module to be digits and dots).
pub fn oid(uid: &str) -> NamedNode {
    NamedNode::new_unchecked(format!("urn:oid:{uid}"))
}

pub fn patient_iri(pseudonym: &str) -> NamedNode {
    NamedNode::new_unchecked(format!("{PATIENT_IRI_PREFIX}{pseudonym}"))
}

/// Per-series aggregate of its instances.
#[derive(Debug)]
struct Series<'a> {
    first: &'a InstanceFacts,
    instances: u32,
    frames: u32,
    roi_names: BTreeSet<&'a str>,
    segment_labels: BTreeSet<&'a str>,
    referenced: BTreeSet<&'a str>,
    sop_classes: BTreeSet<&'a str>,
}

/// Counts of what a graph holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GraphCounts {
    pub patients: u64,
    pub studies: u64,
    pub series: u64,
    pub instances: u64,
    pub triples: u64,
}

/// Things in the archive that do not add up (kept, reported).
#[derive(Debug, Default)]
pub struct Inconsistencies(pub Vec<String>);

/// Build the graph of `facts` (any order; output is deterministic) and stream it as N-Quads.
pub fn write_graph<'a, W: Write>(
    facts: impl IntoIterator<Item = &'a InstanceFacts>,
    out: W,
) -> std::io::Result<(GraphCounts, Inconsistencies)> {
    let mut series: BTreeMap<&str, Series<'a>> = BTreeMap::new();
    let mut instances = 0u64;
    let mut issues = Inconsistencies::default();
    for f in facts {
        instances += 1;
        let s = series.entry(&f.series_uid).or_insert_with(|| Series {
            first: f,
            instances: 0,
            frames: 0,
            roi_names: BTreeSet::new(),
            segment_labels: BTreeSet::new(),
            referenced: BTreeSet::new(),
            sop_classes: BTreeSet::new(),
        });
        // Keep the facts of the smallest SOP Instance UID so the result is order-independent.
        if f.sop_instance_uid < s.first.sop_instance_uid {
            s.first = f;
        }
        s.instances += 1;
        s.frames += f.frames.unwrap_or(1);
        s.roi_names.extend(f.roi_names.iter().map(String::as_str));
        s.segment_labels
            .extend(f.segment_labels.iter().map(String::as_str));
        s.referenced
            .extend(f.referenced_series.iter().map(String::as_str));
        s.sop_classes.insert(&f.sop_class_uid);
    }

    // study → (patient, year, age), series → study; the first claim wins, conflicts reported.
    let mut studies: BTreeMap<&str, (&str, Option<i32>, Option<u32>)> = BTreeMap::new();
    let mut patients: BTreeMap<&str, (Option<&str>, BTreeSet<&str>)> = BTreeMap::new();
    for (uid, s) in &series {
        let f = s.first;
        let study = studies
            .entry(&f.study_uid)
            .or_insert((&f.patient, f.study_year, f.age_years));
        if study.0 != f.patient {
            issues.0.push(format!(
                "study {} holds series of more than one patient (series {uid} kept under the first)",
                f.study_uid
            ));
        }
        let owner = study.0;
        let p = patients.entry(owner).or_insert((None, BTreeSet::new()));
        p.0 = p.0.or(f.patient_sex.as_deref());
        p.1.insert(&f.study_uid);
    }

    let mut w = RdfSerializer::from_format(RdfFormat::NQuads).for_writer(out);
    let mut triples = 0u64;
    let mut put = |s: &NamedNode, p: NamedNode, o: Term| -> std::io::Result<()> {
        triples += 1;
        w.serialize_quad(&Quad::new(s.clone(), p, o, GraphName::DefaultGraph))
    };
    let string = |v: &str| Term::from(Literal::new_simple_literal(v));
    let integer = |v: u64| Term::from(Literal::new_typed_literal(v.to_string(), xsd::INTEGER));
    let decimal = |v: f64| Term::from(Literal::new_typed_literal(decimal_lexical(v), xsd::DECIMAL));

    for (pseudonym, (sex, study_uids)) in &patients {
        let p = patient_iri(pseudonym);
        put(&p, rdf::TYPE.into(), ldcm("Patient").into())?;
        put(&p, ldcm("T00100020"), string(pseudonym))?;
        if let Some(sex) = sex {
            put(&p, ldcm("T00100040"), string(sex))?;
        }
        for study in study_uids {
            put(&p, ldcm("has_study"), oid(study).into())?;
        }
    }
    for (uid, (_, year, age)) in &studies {
        let st = oid(uid);
        put(&st, rdf::TYPE.into(), ldcm("Study").into())?;
        put(&st, ldcm("T0020000D"), string(uid))?;
        if let Some(year) = year {
            put(
                &st,
                ldcm("T00080020"),
                Literal::new_typed_literal(format!("{year:04}"), xsd::G_YEAR).into(),
            )?;
        }
        if let Some(age) = age {
            put(&st, ldcm("T00101010"), integer(u64::from(*age)))?;
        }
    }
    for (uid, s) in &series {
        let f = s.first;
        let se = oid(uid);
        put(&oid(&f.study_uid), ldcm("has_series"), se.clone().into())?;
        put(&se, rdf::TYPE.into(), ldcm("Series").into())?;
        put(&se, ldcm("T0020000E"), string(uid))?;
        put(&se, ldcm("T00080060"), string(&f.modality))?;
        for class in &s.sop_classes {
            put(&se, ldcm("T00080016"), oid(class).into())?;
        }
        put(&se, ldcm("T00201209"), integer(u64::from(s.instances)))?;
        if f.frames.is_some() {
            put(&se, ldcm("T00280008"), integer(u64::from(s.frames)))?;
        }
        if let Some(v) = &f.body_part {
            put(&se, ldcm("T00180015"), string(v))?;
        }
        if let Some(v) = f.slice_thickness_mm {
            put(&se, ldcm("T00180050"), decimal(v))?;
        }
        let spacing: BTreeSet<String> = f
            .pixel_spacing_mm
            .iter()
            .map(|v| decimal_lexical(*v))
            .collect();
        for v in spacing {
            put(
                &se,
                ldcm("T00280030"),
                Literal::new_typed_literal(v, xsd::DECIMAL).into(),
            )?;
        }
        if let Some(v) = f.rows {
            put(&se, ldcm("T00280010"), integer(u64::from(v)))?;
        }
        if let Some(v) = f.columns {
            put(&se, ldcm("T00280011"), integer(u64::from(v)))?;
        }
        if let Some(v) = &f.manufacturer {
            put(&se, ldcm("T00080070"), string(v))?;
        }
        if let Some(v) = &f.model {
            put(&se, ldcm("T00081090"), string(v))?;
        }
        if let Some(v) = &f.kernel {
            put(&se, ldcm("T00181210"), string(v))?;
        }
        for v in &s.roi_names {
            put(&se, ldcm("T30060026"), string(v))?;
        }
        for v in &s.segment_labels {
            put(&se, ldcm("T00620005"), string(v))?;
        }
        for v in &s.referenced {
            if !series.contains_key(v) {
                issues.0.push(format!(
                    "series {uid} references series {v}, which is not in the archive"
                ));
            }
            put(&se, ldcm("R0020000E"), oid(v).into())?;
        }
    }
    w.finish()?;
    Ok((
        GraphCounts {
            patients: patients.len() as u64,
            studies: studies.len() as u64,
            series: series.len() as u64,
            instances,
            triples,
        },
        issues,
    ))
}

/// xsd:decimal lexical form with at most 6 fractional digits and no exponent.
fn decimal_lexical(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0');
    let s = s
        .strip_suffix('.')
        .map(|t| format!("{t}.0"))
        .unwrap_or_else(|| s.to_string());
    if s == "-0.0" { "0.0".into() } else { s }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the index graph is damaged: {0}")]
    Damaged(String),
}

/// The index graph loaded in an oxigraph store, with what the query guard needs: which
/// patient each patient, study and series IRI belongs to.
pub struct Index {
    pub store: Store,
    patient_of: HashMap<String, u32>,
    /// Each patient's own nodes (patient, studies, series), by patient number.
    nodes_of: Vec<Vec<NamedNode>>,
    patients: u32,
}

impl Index {
    /// Load an N-Quads graph with oxigraph's bulk loader.
    pub fn load(path: &Path) -> Result<Index, LoadError> {
        let file = std::fs::File::open(path).map_err(|source| LoadError::Io {
            path: path.into(),
            source,
        })?;
        Index::from_reader(std::io::BufReader::new(file))
    }

    pub fn from_reader(reader: impl std::io::Read) -> Result<Index, LoadError> {
        let store = Store::new().map_err(|e| LoadError::Damaged(e.to_string()))?;
        let mut loader = store.bulk_loader();
        loader
            .load_from_reader(RdfFormat::NQuads, reader)
            .map_err(|e| LoadError::Damaged(e.to_string()))?;
        loader
            .commit()
            .map_err(|e| LoadError::Damaged(e.to_string()))?;
        Index::from_store(store)
    }

    /// An index with nothing in it (a station that has not indexed its archive yet).
    pub fn empty() -> Index {
        Index {
            store: Store::new().expect("in-memory store"),
            patient_of: HashMap::new(),
            nodes_of: Vec::new(),
            patients: 0,
        }
    }

    fn from_store(store: Store) -> Result<Index, LoadError> {
        let damaged = |e: oxigraph::store::StorageError| LoadError::Damaged(e.to_string());
        let mut patient_of = HashMap::new();
        let mut patients = 0u32;
        let has_study = ldcm("has_study");
        let has_series = ldcm("has_series");
        let mut study_owner: HashMap<String, u32> = HashMap::new();
        for q in store.quads_for_pattern(None, Some(has_study.as_ref()), None, None) {
            let q = q.map_err(damaged)?;
            let (oxigraph::model::NamedOrBlankNode::NamedNode(p), Term::NamedNode(study)) =
                (&q.subject, &q.object)
            else {
                continue;
            };
            let id = *patient_of.entry(p.as_str().to_string()).or_insert_with(|| {
                patients += 1;
                patients - 1
            });
            study_owner.insert(study.as_str().to_string(), id);
        }
        for q in store.quads_for_pattern(None, Some(has_series.as_ref()), None, None) {
            let q = q.map_err(damaged)?;
            let (oxigraph::model::NamedOrBlankNode::NamedNode(study), Term::NamedNode(series)) =
                (&q.subject, &q.object)
            else {
                continue;
            };
            if let Some(id) = study_owner.get(study.as_str()) {
                patient_of.insert(series.as_str().to_string(), *id);
            }
        }
        patient_of.extend(study_owner);
        let mut nodes_of: Vec<Vec<NamedNode>> = vec![Vec::new(); patients as usize];
        for (iri, id) in &patient_of {
            if let (Some(nodes), Ok(node)) =
                (nodes_of.get_mut(*id as usize), NamedNode::new(iri.as_str()))
            {
                nodes.push(node);
            }
        }
        Ok(Index {
            store,
            patient_of,
            nodes_of,
            patients,
        })
    }

    /// Whether `term` is a value of one of patient `patient`'s own nodes (a triple
    /// `node ?p term` with the node the patient's, one of its studies or series): the query
    /// guard counts a patient for a tally cell only when the cell's key is the patient's own.
    pub fn owns(&self, patient: u32, term: &Term) -> bool {
        let Some(nodes) = self.nodes_of.get(patient as usize) else {
            return false;
        };
        nodes.iter().any(|n| {
            self.store
                .quads_for_pattern(Some(n.as_ref().into()), None, Some(term.as_ref()), None)
                .next()
                .is_some_and(|q| q.is_ok())
        })
    }

    /// Whether `value` is the text of an individual's identifier in the index: a patient's
    /// pseudonym, a study's or a series' UID.
    pub fn is_identifier(&self, value: &str) -> bool {
        let literal = Term::from(Literal::new_simple_literal(value));
        ["T00100020", "T0020000D", "T0020000E"].iter().any(|tag| {
            self.store
                .quads_for_pattern(None, Some(ldcm(tag).as_ref()), Some(literal.as_ref()), None)
                .next()
                .is_some_and(|q| q.is_ok())
        })
    }

    /// The patient (an opaque number) a patient, study or series IRI belongs to.
    pub fn patient_of(&self, iri: &str) -> Option<u32> {
        self.patient_of.get(iri).copied()
    }

    pub fn patients(&self) -> u32 {
        self.patients
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_plain() {
        assert_eq!(decimal_lexical(0.7), "0.7");
        assert_eq!(decimal_lexical(2.5), "2.5");
        assert_eq!(decimal_lexical(3.0), "3.0");
        assert_eq!(decimal_lexical(0.30000000000000004), "0.3");
        assert_eq!(decimal_lexical(-0.0), "0.0");
        assert_eq!(decimal_lexical(1e-9), "0.0");
    }
}

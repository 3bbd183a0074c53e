//! Fake but realistic direct identifiers, so that pseudonymisation is actually exercised.
//! Every value is synthetic; none belongs to a real person.

use crate::rng::Rng;
use serde::Serialize;

const FAMILY: &[&str] = &[
    "Jansen",
    "de Vries",
    "van den Berg",
    "Bakker",
    "Visser",
    "Smit",
    "Meijer",
    "Mulder",
    "Schmidt",
    "Müller",
    "Dubois",
    "Rossi",
    "García",
    "Kowalski",
    "Novak",
    "Andersen",
    "Nielsen",
    "Okafor",
    "Haddad",
    "Yilmaz",
    "Nguyen",
    "Tanaka",
    "O'Brien",
    "Fischer",
];
const GIVEN_F: &[&str] = &[
    "Anna", "Sophie", "Eva", "Marta", "Lucia", "Ingrid", "Amina", "Yuki", "Chloé", "Zofia",
];
const GIVEN_M: &[&str] = &[
    "Jan", "Pieter", "Lukas", "Marco", "Tomasz", "Henrik", "Emeka", "Omar", "Kenji", "Liam",
];
const STREETS: &[&str] = &[
    "Kerkstraat",
    "Hauptstraße",
    "Rue de la Paix",
    "Via Roma",
    "Main Street",
    "Ringweg",
];
const CITIES: &[&str] = &[
    "Utrecht", "Leiden", "Köln", "Lyon", "Bologna", "Aarhus", "Gent",
];

#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// DICOM PN: `Family^Given`.
    pub name: String,
    /// YYYYMMDD.
    pub birth_date: String,
    pub sex: &'static str,
    pub patient_id: String,
    pub other_id: String,
    pub address: String,
    pub phone: String,
}

impl Identity {
    pub fn new(site: &str, rng: &mut Rng) -> Identity {
        let female = rng.unit() < 0.5;
        let given = if female {
            rng.pick(GIVEN_F)
        } else {
            rng.pick(GIVEN_M)
        };
        let family = rng.pick(FAMILY);
        let year = rng.int(1938, 1992);
        let month = rng.int(1, 12);
        let day = rng.int(1, 28);
        let site_code: String = site
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(3)
            .collect::<String>()
            .to_uppercase();
        Identity {
            name: format!("{family}^{given}"),
            birth_date: format!("{year:04}{month:02}{day:02}"),
            sex: if female { "F" } else { "M" },
            patient_id: format!("{site_code}{:07}", rng.int(0, 9_999_999)),
            other_id: format!("NL{:09}", rng.int(0, 999_999_999)),
            address: format!(
                "{} {}^^{}",
                rng.pick(STREETS),
                rng.int(1, 250),
                rng.pick(CITIES)
            ),
            phone: format!("+31 6 {:08}", rng.int(0, 99_999_999)),
        }
    }
}

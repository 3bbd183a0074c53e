//! Test support shared by the workspace's tests, and only by tests (a dev-dependency): a test
//! certificate authority that issues loopback server certificates, an HTTP proxy on loopback
//! that speaks CONNECT and plain forwarding, as a hospital's proxy would, and a TCP load
//! balancer in front of registry replicas.
//!
//! Owns nothing the product uses. Must not be a dependency of anything but tests.

pub mod balancer;
pub mod proxy;

use std::path::{Path, PathBuf};

/// A certificate authority made for one test: its certificate (PEM) and a server certificate
/// with key for `localhost` and `127.0.0.1`, written into `dir`.
pub struct TestCa {
    /// The CA certificate (what a client pins with `--ca-file`).
    pub ca_pem: PathBuf,
    /// The registry's certificate chain (leaf, then the CA).
    pub cert_pem: PathBuf,
    /// The registry's private key.
    pub key_pem: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, and a server certificate it signed, in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(ca, ca_key).expect("CA certificate");
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        leaf.distinguished_name
            .push(DnType::CommonName, format!("{name} registry"));
        let leaf_key = KeyPair::generate().expect("server key");
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .expect("server certificate");
        std::fs::create_dir_all(dir).expect("test CA directory");
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        let cert_pem = dir.join(format!("{name}-cert.pem"));
        let key_pem = dir.join(format!("{name}-key.pem"));
        std::fs::write(&ca_pem, issuer.pem()).expect("write CA");
        std::fs::write(&cert_pem, format!("{}{}", leaf_cert.pem(), issuer.pem()))
            .expect("write certificate");
        std::fs::write(&key_pem, leaf_key.serialize_pem()).expect("write key");
        TestCa {
            ca_pem,
            cert_pem,
            key_pem,
        }
    }
}

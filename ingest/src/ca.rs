//! The operator's certificate authority for the uplink.
//!
//! # Files (`<data>/tls/`, created by `guantong-ingest ca init` or at the
//! first `serve`)
//! | file          | what                                                     |
//! |---------------|----------------------------------------------------------|
//! | `ca.pem`      | the CA certificate: gateways trust it (`uplink.ca_file`)  |
//! | `ca.key`      | the CA's private key, mode 0600; never leaves this host   |
//! | `server.pem`  | ingest's certificate, issued from the CA at each start    |
//! | `server.key`  | its key, mode 0600                                        |
//! | `issued.tsv`  | one line per gateway certificate: serial, gateway, expiry |
//! | `revoked.tsv` | one line per revoked certificate: serial, gateway, when   |
//!
//! # Invariants
//! - Keys are ECDSA P-256, generated with ring; every key file is created with
//!   mode 0600 before any byte is written.
//! - A gateway certificate's common name is the gateway id; ingest refuses a
//!   stream whose certificate names another gateway.
//! - Serial numbers are 16 random bytes with a first byte in 1..=0x7f, so the
//!   hex of the DER serial is the hex of these bytes (no sign padding).
//! - Revocation is a line in `revoked.tsv` or, with `--database`, a row of
//!   the database's `revoked_certificates` table, which every replica reads
//!   ([`Revocations`]); ingest looks at both at every new stream, so a revoked
//!   certificate is refused at its next connection without a restart.

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::ops::StoreArgs;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("revocations in the database: {0}")]
    Database(#[from] crate::store::StoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |error| CaError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The CA directory of a data directory.
pub fn dir(data: &Path) -> PathBuf {
    data.join("tls")
}

/// A certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Lowercase hex of the serial number.
    pub serial: String,
    pub not_after: SystemTime,
}

/// The CA, loaded from its directory.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// Creates a new CA in `dir`; fails when one exists there.
    pub fn create(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.pem");
        if cert_path.exists() {
            return Err(CaError::Invalid(format!(
                "{} exists: this data directory already has a CA",
                cert_path.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Guantong operator CA");
        name.push(DnType::OrganizationName, "Guantong");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial().0);
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(20 * 365);
        let cert = params.self_signed(&key)?;
        write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() {
            return Err(CaError::Invalid(format!(
                "no CA in {}: create one with `guantong-ingest ca init`",
                dir.display()
            )));
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Invalid(format!("{}: {e}", key_path.display())))?;
        // Fails early on a certificate that does not parse.
        Issuer::from_ca_cert_pem(&cert_pem, &key)
            .map_err(|e| CaError::Invalid(format!("{}: {e}", cert_path.display())))?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem,
            key,
        })
    }

    /// Loads the CA in `dir`, creating it when there is none. Returns the CA
    /// and whether it was created now.
    pub fn open_or_create(dir: &Path) -> Result<(Ca, bool), CaError> {
        if dir.join("ca.pem").exists() {
            Ok((Ca::open(dir)?, false))
        } else {
            Ok((Ca::create(dir)?, true))
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(&self, mut params: CertificateParams, valid_for: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let (serial, serial_hex) = random_serial();
        let now = OffsetDateTime::now_utc();
        params.serial_number = Some(serial);
        // An hour of slack for clocks behind ours.
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now
            + time::Duration::try_from(valid_for)
                .map_err(|_| CaError::Invalid("validity period too long".into()))?;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial_hex,
            not_after: SystemTime::now() + valid_for,
        })
    }

    /// A client certificate for `gateway` (its common name), recorded in
    /// `issued.tsv`.
    pub fn issue_gateway(&self, gateway: &str, valid_for: Duration) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, gateway);
        params.distinguished_name = name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let issued = self.issue(params, valid_for)?;
        let line = format!(
            "{}\t{gateway}\t{}\n",
            issued.serial,
            humantime::format_rfc3339_seconds(issued.not_after)
        );
        append(&self.dir.join("issued.tsv"), &line)?;
        Ok(issued)
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[String], valid_for: Duration) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            names.first().map_or("guantong-ingest", String::as_str),
        );
        params.distinguished_name = name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for n in names {
            params.subject_alt_names.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e| CaError::Invalid(format!("server name `{n}`: {e}")))?,
                ),
            });
        }
        self.issue(params, valid_for)
    }

    /// The gateway the certificate with `serial` (hex, any case, colons
    /// allowed) was issued to, and the serial as recorded.
    pub fn issued_to(&self, serial: &str) -> Result<(String, String), CaError> {
        let serial = serial.trim().to_ascii_lowercase().replace(':', "");
        let gateway = self
            .issued()
            .into_iter()
            .find(|(s, _, _)| *s == serial)
            .map(|(_, gateway, _)| gateway)
            .ok_or_else(|| {
                CaError::Invalid(format!(
                    "no certificate with serial {serial} was issued by this CA (see `ca list`)"
                ))
            })?;
        Ok((serial, gateway))
    }

    /// The lines of `issued.tsv`: (serial, gateway, not after).
    fn issued(&self) -> Vec<(String, String, String)> {
        let issued = std::fs::read_to_string(self.dir.join("issued.tsv")).unwrap_or_default();
        issued
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let serial = f.next()?.to_string();
                let gateway = f.next()?.to_string();
                Some((serial, gateway, f.next().unwrap_or_default().to_string()))
            })
            .collect()
    }

    /// Records `serial` as revoked in `revocations`. Returns the gateway it
    /// was issued to.
    pub async fn revoke(&self, serial: &str, revocations: &Revocations) -> Result<String, CaError> {
        let (serial, gateway) = self.issued_to(serial)?;
        revocations.record(&serial, &gateway).await?;
        Ok(gateway)
    }

    /// Issued certificates: (serial, gateway, not after, revoked?).
    pub fn list(
        &self,
        revoked: &HashSet<String>,
    ) -> Result<Vec<(String, String, String, bool)>, CaError> {
        Ok(self
            .issued()
            .into_iter()
            .map(|(serial, gateway, not_after)| {
                let is_revoked = revoked.contains(&serial);
                (serial, gateway, not_after, is_revoked)
            })
            .collect())
    }
}

/// Where revoked certificates are recorded and read: the CA directory's
/// `revoked.tsv`, and with a database its `revoked_certificates` table,
/// which every replica reads. A serial listed in either is revoked; new
/// revocations go to the database when there is one.
#[derive(Clone)]
pub struct Revocations {
    dir: PathBuf,
    database: Option<deadpool_postgres::Pool>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("dir", &self.dir)
            .field("database", &self.database.is_some())
            .finish()
    }
}

impl Revocations {
    /// Revocations of the CA directory `dir`, and of the database `pool`
    /// reaches.
    pub fn new(dir: &Path, database: Option<deadpool_postgres::Pool>) -> Revocations {
        Revocations {
            dir: dir.to_path_buf(),
            database,
        }
    }

    /// Where new revocations are written, for messages.
    pub fn place(&self) -> String {
        match self.database {
            Some(_) => "the database (every replica reads it)".into(),
            None => self.dir.join("revoked.tsv").display().to_string(),
        }
    }

    pub async fn record(&self, serial: &str, gateway: &str) -> Result<(), CaError> {
        match &self.database {
            Some(pool) => {
                Ok(crate::store::postgres::revoke_certificate(pool, serial, gateway).await?)
            }
            None => {
                let line = format!(
                    "{serial}\t{gateway}\t{}\n",
                    humantime::format_rfc3339_seconds(SystemTime::now())
                );
                append(&self.dir.join("revoked.tsv"), &line)
            }
        }
    }

    pub async fn is_revoked(&self, serial: &str) -> Result<bool, CaError> {
        if revoked_serials(&self.dir)?.contains(serial) {
            return Ok(true);
        }
        match &self.database {
            Some(pool) => Ok(crate::store::postgres::is_revoked(pool, serial).await?),
            None => Ok(false),
        }
    }

    /// Every revoked serial.
    pub async fn serials(&self) -> Result<HashSet<String>, CaError> {
        let mut all = revoked_serials(&self.dir)?;
        if let Some(pool) = &self.database {
            all.extend(crate::store::postgres::revoked_certificates(pool).await?);
        }
        Ok(all)
    }
}

/// Serial numbers listed in `<dir>/revoked.tsv` (none when it is missing).
fn revoked_serials(dir: &Path) -> Result<HashSet<String>, CaError> {
    let path = dir.join("revoked.tsv");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| l.split('\t').next())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(io(&path)(e)),
    }
}

/// The serial (lowercase hex) and common name of a DER certificate.
pub fn identity_of(der: &[u8]) -> Result<(String, String), CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::Invalid(format!("certificate does not parse: {e}")))?;
    let serial = hex::encode(cert.raw_serial());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((serial, cn))
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = bytes[0].clamp(1, 0x7f);
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

/// Writes `contents` to a new file at `path` with mode 0600 (replacing any
/// file there): the mode is set at creation, before any byte is written.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn append(path: &Path, line: &str) -> Result<(), CaError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(line.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// `guantong-ingest ca ...`: the operator CA's commands. They work on files
/// only, so they may run while ingest serves.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create the operator CA in `<data>/tls/` (`serve` also does at first start).
    Init {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
    },
    /// Issue a client certificate for a gateway: writes `<out>/<id>.pem`,
    /// `<out>/<id>.key` (mode 0600) and `<out>/ca.pem`.
    Issue {
        #[arg(long, env = "GUANTONG_DATA", default_value = "./guantong-data")]
        data: PathBuf,
        /// The gateway id (`[gateway] id` in its config).
        id: String,
        /// Directory to write the files to.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// How long the certificate is valid, e.g. `365d`.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// Revoke a gateway certificate by its serial number (from `ca list`);
    /// ingest refuses it from the next connection on. With `--database` the
    /// revocation is stored there, so every replica refuses it.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        serial: String,
    },
    /// List issued gateway certificates.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl CaCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            CaCommand::Init { data } => {
                let ca = Ca::create(&dir(&data))?;
                eprintln!("created the operator CA; gateways trust this file (uplink.ca_file):");
                println!("{}", ca.cert_path().display());
            }
            CaCommand::Issue {
                data,
                id,
                out,
                valid_for,
            } => {
                if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == '/')
                {
                    anyhow::bail!("gateway id `{id}`: expected 1 to 128 characters without `/`");
                }
                let ca = Ca::open(&dir(&data))?;
                let issued = ca.issue_gateway(&id, valid_for)?;
                std::fs::create_dir_all(&out).map_err(io(&out))?;
                let (cert, key, ca_copy) = (
                    out.join(format!("{id}.pem")),
                    out.join(format!("{id}.key")),
                    out.join("ca.pem"),
                );
                write_private(&key, issued.key_pem.as_bytes())?;
                std::fs::write(&cert, &issued.cert_pem).map_err(io(&cert))?;
                std::fs::write(&ca_copy, ca.cert_pem()).map_err(io(&ca_copy))?;
                eprintln!(
                    "issued certificate {} for gateway `{id}`, valid until {}; in its config under [uplink]:",
                    issued.serial,
                    humantime::format_rfc3339_seconds(issued.not_after)
                );
                println!(
                    "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
                    ca_copy.display(),
                    cert.display(),
                    key.display()
                );
            }
            CaCommand::Revoke { store, serial } => {
                let ca = Ca::open(&dir(&store.data))?;
                let revocations = store.revocations()?;
                let gateway = ca.revoke(&serial, &revocations).await?;
                eprintln!(
                    "revoked certificate {serial} of gateway `{gateway}` in {}; ingest refuses it from its next connection",
                    revocations.place()
                );
            }
            CaCommand::List { store } => {
                let ca = Ca::open(&dir(&store.data))?;
                let revoked = store.revocations()?.serials().await?;
                for (serial, gateway, not_after, revoked) in ca.list(&revoked)? {
                    let state = if revoked { "revoked" } else { "valid" };
                    println!("{serial}\t{gateway}\t{not_after}\t{state}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issues_gateway_certificates_that_name_the_gateway_and_can_be_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, created) = Ca::open_or_create(dir.path()).expect("create");
        assert!(created);
        let (_, created) = Ca::open_or_create(dir.path()).expect("open");
        assert!(!created);
        let issued = ca
            .issue_gateway("gw-1", Duration::from_secs(3600))
            .expect("issue");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .expect("pem");
        let (serial, cn) = identity_of(&der).expect("parse");
        assert_eq!(serial, issued.serial);
        assert_eq!(cn, "gw-1");
        let revocations = Revocations::new(dir.path(), None);
        assert!(!revocations.is_revoked(&serial).await.expect("read"));
        let colons = serial.to_ascii_uppercase();
        assert_eq!(
            ca.revoke(&colons, &revocations).await.expect("revoke"),
            "gw-1"
        );
        assert!(revocations.is_revoked(&serial).await.expect("read"));
        assert!(revocations.serials().await.expect("read").contains(&serial));
        assert!(
            ca.list(&revocations.serials().await.expect("read"))
                .expect("list")[0]
                .3
        );
        assert!(
            ca.revoke("00ff", &revocations).await.is_err(),
            "unknown serials are refused"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

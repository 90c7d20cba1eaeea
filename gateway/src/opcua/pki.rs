//! The gateway's OPC UA PKI directory and the certificate trust workflow.
//!
//! Layout (as async-opcua and most OPC UA tools lay it out):
//!
//! ```text
//! <pki_dir>/own/cert.der          this gateway's application instance certificate
//! <pki_dir>/private/private.pem   its private key (owner-only permissions)
//! <pki_dir>/trusted/*.der         server certificates trusted
//! <pki_dir>/rejected/*.der        server certificates seen and not trusted
//! <pki_dir>/tofu/<device id>      thumbprint trusted on first use, per device
//! ```
//!
//! Certificate files are named `<common name> [<thumbprint>].der`, the
//! thumbprint being the SHA-1 of the DER in lower-case hex (what OPC UA
//! tools show). The own certificate is created on first run: RSA 2048,
//! valid 10 years, subject `CN=Guantong gateway <id>, O=Guantong`, the
//! application URI as the first SAN entry, then
//! `localhost`, 127.0.0.1, ::1, the host name and its addresses (servers
//! check the URI against the session's ApplicationDescription).
//!
//! Trust: a server whose certificate is in neither list is refused by the
//! OPC UA stack and its certificate written to rejected/; the collector logs
//! the thumbprint, `guantong-gateway opcua status` lists it and
//! `guantong-gateway opcua trust THUMBPRINT` moves it to trusted/. The next
//! reconnect attempt then succeeds without a restart.

use std::path::{Path, PathBuf};

use async_opcua::crypto::{CertificateStore, X509, X509Data};
use async_opcua::types::{ApplicationDescription, LocalizedText};

/// Years the gateway's own certificate is valid.
const OWN_CERT_DAYS: u32 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {error}")]
    Io { path: String, error: String },
    #[error("{0}")]
    Cert(String),
    #[error("no certificate with thumbprint {0} in {1}")]
    NotFound(String, String),
    #[error("thumbprint {0} matches {1} certificates; give more digits")]
    Ambiguous(String, usize),
}

/// One certificate file in trusted/ or rejected/.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub thumbprint: String,
    pub subject: String,
    pub path: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> PkiError {
    PkiError::Io {
        path: path.display().to_string(),
        error: e.to_string(),
    }
}

pub fn own_cert_path(pki: &Path) -> PathBuf {
    pki.join("own/cert.der")
}

/// The ApplicationUri in the own certificate's SAN, when there is one.
pub fn own_application_uri(pki: &Path) -> Option<String> {
    let der = std::fs::read(own_cert_path(pki)).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    })
}

/// The DNS names and IP addresses a certificate names (its SAN), for
/// messages about a host name mismatch.
pub fn host_names(cert: &X509) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(der) = cert.to_der() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Creates the PKI layout and the own certificate if missing; returns the
/// own certificate's thumbprint and whether it was created now.
pub fn ensure_own_certificate(
    pki: &Path,
    application_uri: &str,
) -> Result<(String, bool), PkiError> {
    for d in ["own", "private", "trusted", "rejected"] {
        let p = pki.join(d);
        std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    let cert_path = own_cert_path(pki);
    let key_path = pki.join("private/private.pem");
    if cert_path.exists() && key_path.exists() {
        let cert = CertificateStore::read_cert(&cert_path).map_err(PkiError::Cert)?;
        return Ok((thumbprint(&cert), false));
    }
    let description = ApplicationDescription {
        application_uri: application_uri.into(),
        application_name: LocalizedText::new("", "Guantong gateway"),
        ..Default::default()
    };
    let mut data = X509Data::from((description, None));
    // The subject names this gateway, not the library's placeholder place
    // (`C=IE, ST=Dublin`).
    data.common_name = subject_name(application_uri);
    data.organization = "Guantong".into();
    data.organizational_unit = String::new();
    data.country = String::new();
    data.state = String::new();
    data.certificate_duration_days = OWN_CERT_DAYS;
    data.key_size = 2048;
    let (cert, _) =
        CertificateStore::create_certificate_and_key(&data, true, &cert_path, &key_path)
            .map_err(PkiError::Cert)?;
    restrict(&key_path)?;
    Ok((thumbprint(&cert), true))
}

/// The own certificate's common name: `Guantong gateway <gateway id>`, the
/// id taken from the ApplicationUri (`urn:guantong:gateway:<id>` by default,
/// else the whole URI), kept to characters a subject name holds unescaped.
fn subject_name(application_uri: &str) -> String {
    let id = application_uri
        .strip_prefix("urn:guantong:gateway:")
        .unwrap_or(application_uri);
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.:".contains(*c))
        .collect();
    if id.is_empty() {
        "Guantong gateway".into()
    } else {
        format!("Guantong gateway {id}")
    }
}

fn restrict(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| io(path, e))
}

pub fn thumbprint(cert: &X509) -> String {
    cert.thumbprint().as_hex_string()
}

/// The certificates in `<pki>/<dir>` (`trusted` or `rejected`).
pub fn list(pki: &Path, dir: &str) -> Vec<CertInfo> {
    let dir = pki.join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<CertInfo> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|path| {
            let cert = CertificateStore::read_cert(&path).ok()?;
            Some(CertInfo {
                thumbprint: thumbprint(&cert),
                subject: cert.subject_name(),
                path,
            })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Moves the rejected certificate whose thumbprint starts with `prefix`
/// (hex, any case, `:` ignored) to trusted/; returns its new path.
pub fn trust(pki: &Path, prefix: &str) -> Result<CertInfo, PkiError> {
    let wanted: String = prefix
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let rejected = pki.join("rejected");
    if wanted.is_empty() {
        return Err(PkiError::NotFound(
            prefix.into(),
            rejected.display().to_string(),
        ));
    }
    let matches: Vec<CertInfo> = list(pki, "rejected")
        .into_iter()
        .filter(|c| c.thumbprint.starts_with(&wanted))
        .collect();
    let mut found = match matches.len() {
        0 => {
            return Err(PkiError::NotFound(
                prefix.into(),
                rejected.display().to_string(),
            ));
        }
        1 => matches.into_iter().next().expect("one match"),
        n => return Err(PkiError::Ambiguous(prefix.into(), n)),
    };
    let trusted_dir = pki.join("trusted");
    std::fs::create_dir_all(&trusted_dir).map_err(|e| io(&trusted_dir, e))?;
    let name = found
        .path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| format!("{}.der", found.thumbprint).into());
    let to = trusted_dir.join(name);
    std::fs::rename(&found.path, &to).map_err(|e| io(&found.path, e))?;
    found.path = to;
    Ok(found)
}

/// Trust on first use: when this device has no recorded thumbprint yet,
/// stores `cert` in trusted/ and records its thumbprint; returns it. A
/// device that already has one gets None (its certificate goes through the
/// normal check, so a changed certificate is rejected).
pub fn trust_on_first_use(
    pki: &Path,
    device_id: &str,
    cert: &X509,
) -> Result<Option<String>, PkiError> {
    let record_dir = pki.join("tofu");
    let record = record_dir.join(device_id);
    if record.exists() {
        return Ok(None);
    }
    let thumb = thumbprint(cert);
    let trusted = pki.join("trusted");
    std::fs::create_dir_all(&trusted).map_err(|e| io(&trusted, e))?;
    let path = trusted.join(CertificateStore::cert_file_name(cert));
    let der = cert.to_der().map_err(|e| PkiError::Cert(e.to_string()))?;
    std::fs::write(&path, der).map_err(|e| io(&path, e))?;
    std::fs::create_dir_all(&record_dir).map_err(|e| io(&record_dir, e))?;
    std::fs::write(&record, format!("{thumb}\n")).map_err(|e| io(&record, e))?;
    Ok(Some(thumb))
}

/// The thumbprints trusted on first use, as (device id, thumbprint).
pub fn tofu_records(pki: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(pki.join("tofu")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let thumb = std::fs::read_to_string(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                thumb.trim().to_string(),
            ))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_layout_and_a_certificate_with_the_application_uri() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let (thumb, created) =
            ensure_own_certificate(&pki, "urn:guantong:gateway:gw-1").expect("created");
        assert!(created);
        for d in ["own", "private", "trusted", "rejected"] {
            assert!(pki.join(d).is_dir(), "{d}");
        }
        let cert = CertificateStore::read_cert(&own_cert_path(&pki)).expect("readable");
        let subject = cert.subject_name();
        assert!(
            subject.contains("CN=Guantong gateway gw-1") && subject.contains("O=Guantong"),
            "{subject}"
        );
        assert!(
            !subject.contains("Dublin") && !subject.contains("C="),
            "{subject}"
        );
        assert!(!host_names(&cert).is_empty());
        assert!(
            cert.is_application_uri_valid("urn:guantong:gateway:gw-1")
                .is_ok()
        );
        let (again, created) =
            ensure_own_certificate(&pki, "urn:guantong:gateway:gw-1").expect("read");
        assert!(!created);
        assert_eq!(thumb, again);

        // A rejected certificate moves to trusted/ by a thumbprint prefix.
        std::fs::copy(own_cert_path(&pki), pki.join("rejected/x.der")).expect("copy");
        assert!(matches!(trust(&pki, "zz"), Err(PkiError::NotFound(..))));
        let moved = trust(&pki, &thumb[..8].to_ascii_uppercase()).expect("trusted");
        assert_eq!(moved.path, pki.join("trusted/x.der"));
        assert!(list(&pki, "rejected").is_empty());
        assert_eq!(list(&pki, "trusted")[0].thumbprint, thumb);
    }
}

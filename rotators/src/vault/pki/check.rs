//! What `vault_pki_certificate`'s verify proves about an issued certificate, offline: the
//! private key belongs to it, its chain validates to the trusted CA for the configured names,
//! and its validity window is the one asked for.
//!
//! Invariant: no message carries key material; they name certificates by subject and serial.

use std::time::{Duration, SystemTime};

use ring::signature::{self, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use x509_cert::der::Decode;
use x509_cert::Certificate;

/// How far the clocks of keyrotd and Vault may disagree.
pub(super) const SKEW: Duration = Duration::from_secs(60);

/// A certificate as PEM, DER and parsed.
pub(super) struct Cert {
    pub der: CertificateDer<'static>,
    pub parsed: Certificate,
}

impl Cert {
    /// The certificate of a PEM text holding exactly one.
    pub fn from_pem(what: &str, pem: &str) -> Result<Self, String> {
        let mut all = certs(what, pem)?;
        match all.len() {
            1 => Ok(all.remove(0)),
            n => Err(format!("{what} holds {n} certificates, not one")),
        }
    }

    pub fn not_before(&self) -> SystemTime {
        self.parsed
            .tbs_certificate
            .validity
            .not_before
            .to_system_time()
    }

    pub fn not_after(&self) -> SystemTime {
        self.parsed
            .tbs_certificate
            .validity
            .not_after
            .to_system_time()
    }

    /// The serial number as Vault writes it (`5e:19:e8:...`).
    pub fn serial(&self) -> String {
        let bytes = self.parsed.tbs_certificate.serial_number.as_bytes();
        let bytes = match bytes {
            [0, rest @ ..] if !rest.is_empty() => rest,
            all => all,
        };
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Every certificate in a PEM text (other blocks are skipped).
pub(super) fn certs(what: &str, pem: &str) -> Result<Vec<Cert>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|der| {
            let der = der.map_err(|e| format!("{what} is not PEM ({e})"))?;
            let parsed = Certificate::from_der(&der)
                .map_err(|e| format!("{what} holds a certificate that does not parse ({e})"))?;
            Ok(Cert { der, parsed })
        })
        .collect()
}

/// Checks that the PKCS#8 private key `key_pem` is the key of `cert`, by deriving its public
/// key and comparing it with the certificate's.
pub(super) fn key_matches(key_pem: &str, cert: &Cert) -> Result<(), String> {
    let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| "the private key is not a PKCS#8 PEM block".to_owned())?;
    let key = key.secret_pkcs8_der();
    let spki = &cert.parsed.tbs_certificate.subject_public_key_info;
    let in_cert = spki.subject_public_key.raw_bytes();
    let rejected = |e: ring::error::KeyRejected| format!("the private key is not usable ({e})");
    let oid = spki.algorithm.oid.to_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok())
        .map(|c| c.to_string());
    let derived: Vec<u8> = match (oid.as_str(), curve.as_deref()) {
        ("1.2.840.113549.1.1.1", _) => signature::RsaKeyPair::from_pkcs8(key)
            .map_err(rejected)?
            .public_key()
            .as_ref()
            .to_vec(),
        ("1.2.840.10045.2.1", Some(curve)) => {
            let alg = match curve {
                "1.2.840.10045.3.1.7" => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                "1.3.132.0.34" => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                other => return Err(format!("unsupported elliptic curve {other}")),
            };
            let rng = ring::rand::SystemRandom::new();
            signature::EcdsaKeyPair::from_pkcs8(alg, key, &rng)
                .map_err(rejected)?
                .public_key()
                .as_ref()
                .to_vec()
        }
        ("1.3.101.112", _) => signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key)
            .map_err(rejected)?
            .public_key()
            .as_ref()
            .to_vec(),
        (other, _) => return Err(format!("unsupported public key algorithm {other}")),
    };
    if derived == in_cert {
        Ok(())
    } else {
        Err(format!(
            "the private key does not belong to the certificate (serial {})",
            cert.serial()
        ))
    }
}

/// Checks that `leaf` chains through `chain` to one of `anchors` at `now`, for TLS server or
/// client authentication, and is valid for each of `names` (DNS names and IP addresses).
pub(super) fn chain_validates(
    leaf: &Cert,
    chain: &[Cert],
    anchors: &[Cert],
    names: &[&str],
    now: SystemTime,
) -> Result<(), String> {
    let anchors: Vec<_> = anchors
        .iter()
        .map(|a| webpki::anchor_from_trusted_cert(&a.der).map_err(|e| format!("a trusted CA: {e}")))
        .collect::<Result<_, _>>()?;
    let intermediates: Vec<CertificateDer<'_>> = chain.iter().map(|c| c.der.clone()).collect();
    let end = webpki::EndEntityCert::try_from(&leaf.der)
        .map_err(|e| format!("the certificate is not usable as an end entity ({e})"))?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let verify = |usage| {
        end.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            time,
            usage,
            None,
            None,
        )
        .map(drop)
    };
    verify(webpki::KeyUsage::server_auth())
        .or_else(|_| verify(webpki::KeyUsage::client_auth()))
        .map_err(|e| {
            format!(
                "the certificate (serial {}) does not validate to the trusted CA ({e})",
                leaf.serial()
            )
        })?;
    for name in names {
        // A wildcard is checked with a name it covers; a common name that is neither a DNS
        // name nor an address (a role with allow_any_name) names no TLS peer and is skipped.
        let reference = match name.strip_prefix("*.") {
            Some(parent) => format!("keyrotd-check.{parent}"),
            None => (*name).to_owned(),
        };
        let Ok(server_name) = ServerName::try_from(reference.as_str()) else {
            continue;
        };
        end.verify_is_valid_for_subject_name(&server_name)
            .map_err(|e| format!("the certificate is not valid for `{name}` ({e})"))?;
    }
    Ok(())
}

/// Checks the validity window at `now`: already valid (notBefore at most [`SKEW`] ahead), not
/// expired, and, when a `ttl` was asked for, ending neither later than `now + ttl` nor sooner
/// than `issued_after + ttl` (Vault shortens a certificate past the role's `max_ttl` or the
/// CA's own expiry, which deserves an error rather than an early surprise).
pub(super) fn validity(
    cert: &Cert,
    now: SystemTime,
    ttl: Option<Duration>,
    issued_after: SystemTime,
) -> Result<(), String> {
    let (not_before, not_after) = (cert.not_before(), cert.not_after());
    let show = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if not_before > now + SKEW {
        return Err(format!(
            "the certificate is not valid before {} (later than now, {}: check the clocks)",
            show(not_before),
            show(now)
        ));
    }
    if not_after <= now {
        return Err(format!("the certificate expired at {}", show(not_after)));
    }
    if let Some(ttl) = ttl {
        if not_after > now + ttl + SKEW {
            return Err(format!(
                "the certificate is valid until {}, longer than the ttl asked for",
                show(not_after)
            ));
        }
        if not_after + SKEW < issued_after + ttl {
            return Err(format!(
                "the certificate ends at {}, sooner than the ttl asked for: Vault capped it (the \
                 role's max_ttl, the mount's max lease TTL or the issuer's own expiry)",
                show(not_after)
            ));
        }
    }
    Ok(())
}

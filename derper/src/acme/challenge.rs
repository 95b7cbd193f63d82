//! The answers the CA checks while validating an order: HTTP-01 key authorizations served on
//! `-http-port` under `/.well-known/acme-challenge/`, and TLS-ALPN-01 certificates (RFC 8737)
//! presented on the TLS port to handshakes that offer only `acme-tls/1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, CustomExtension, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::certs::AlpnChallenges;

/// The path prefix of HTTP-01 requests.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Answers being validated right now; each is removed when its order ends.
#[derive(Debug, Default)]
pub struct Challenges {
    http: Mutex<HashMap<String, String>>,
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization for an HTTP-01 token, if one is being validated.
    pub fn http_response(&self, token: &str) -> Option<String> {
        self.http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    fn put_http(&self, token: &str, key_authorization: &str) {
        self.http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), key_authorization.to_string());
    }

    fn put_alpn(&self, name: &str, cert: Arc<CertifiedKey>) {
        self.alpn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_ascii_lowercase(), cert);
    }

    /// Publishes an HTTP-01 answer until the returned guard is dropped.
    pub fn publish_http(self: &Arc<Self>, token: &str, key_authorization: &str) -> Published {
        self.put_http(token, key_authorization);
        Published {
            store: self.clone(),
            what: Answer::Http(token.to_string()),
        }
    }

    /// Publishes a TLS-ALPN-01 certificate for `name` (a DNS name) until the guard is dropped.
    pub fn publish_alpn(
        self: &Arc<Self>,
        name: &str,
        key_authorization_digest: &[u8],
    ) -> Result<Published, rcgen::Error> {
        self.put_alpn(name, Arc::new(alpn_cert(name, key_authorization_digest)?));
        Ok(Published {
            store: self.clone(),
            what: Answer::Alpn(name.to_ascii_lowercase()),
        })
    }
}

impl AlpnChallenges for Challenges {
    fn challenge_cert(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sni.to_ascii_lowercase())
            .cloned()
    }
}

enum Answer {
    Http(String),
    Alpn(String),
}

/// Removes its answer when dropped, also when the order is abandoned (shutdown, error).
pub struct Published {
    store: Arc<Challenges>,
    what: Answer,
}

impl Drop for Published {
    fn drop(&mut self) {
        match &self.what {
            Answer::Http(t) => {
                self.store
                    .http
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(t);
            }
            Answer::Alpn(n) => {
                self.store
                    .alpn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(n);
            }
        }
    }
}

/// RFC 8737 §3: a self-signed certificate for the name, carrying the SHA-256 of the key
/// authorization in a critical acmeIdentifier extension.
fn alpn_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, rcgen::Error> {
    // rcgen asserts the length; never let a malformed digest panic the server.
    if digest.len() != 32 {
        return Err(rcgen::Error::RingUnspecified);
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_live_as_long_as_their_guard() {
        let c = Arc::new(Challenges::default());
        let g = c.publish_http("tok", "tok.thumb");
        assert_eq!(c.http_response("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(c.http_response("other"), None);
        drop(g);
        assert_eq!(c.http_response("tok"), None);

        let g = c.publish_alpn("Derp.Example.com", &[7u8; 32]).unwrap();
        let cert = c.challenge_cert("derp.example.COM").unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&cert.cert[0]).unwrap();
        let ext = x
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);
        // OCTET STRING (0x04) of 32 bytes.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        assert_eq!(&ext.value[2..], &[7u8; 32]);
        drop(g);
        assert!(c.challenge_cert("derp.example.com").is_none());
    }
}

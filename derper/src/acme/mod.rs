//! `-certmode letsencrypt` / `gcp`: the derper orders its own certificate over ACME, renews it
//! when a third of its lifetime is left (Go's autocert rule), keeps it in `-certdir` so a
//! restart does not order again, and serves the new one to new handshakes only, so connected
//! clients never notice. The protocol is `instant-acme`; this module decides when to order,
//! answers the challenges (TLS-ALPN-01 on the TLS port first, then HTTP-01 on `-http-port`, as
//! Go's autocert; HTTP-01 alone for an IP, as Go's `-acme-ip-certs`), and backs off on errors
//! while the current certificate stays in use.

pub mod cache;
pub mod challenge;
pub mod problem;

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::certs::{self, CertResolver, LoadedCert, SniPolicy};
use crate::config::AcmeConfig;
use crate::metrics::{Metrics, ReasonLabel};
pub use cache::Ident;
pub use challenge::Challenges;
pub use problem::AcmeError;

/// Let's Encrypt's profile for IP certificates (about six days), as Go asks for it.
const SHORTLIVED_PROFILE: &str = "shortlived";
/// First retry after a failed order; doubles up to `MAX_BACKOFF` (Go's IP manager: 1 min, 30 min).
const MIN_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);
/// With a certificate still valid, a retry never waits past this share of its remaining life.
const RETRY_SHARE_OF_REMAINING: u32 = 4;
/// One order (validation and issuance included) may take this long.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

/// Orders and renews the certificate for `-hostname` and installs it in the resolver.
pub struct AcmeManager {
    cfg: AcmeConfig,
    ident: Ident,
    http01: bool,
    resolver: Arc<CertResolver>,
    challenges: Arc<Challenges>,
    meta: CertificateDer<'static>,
    metrics: Arc<Metrics>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// TLS to the directory: checked at start, so a bad --acme-ca-file stops the derper there.
    directory_tls: rustls::ClientConfig,
}

/// What stops the derper at start under ACME.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("--acme-ca-file {path}: {detail}")]
    CaFile { path: String, detail: String },
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("ident", &self.ident)
            .field("directory", &self.cfg.directory_url)
            .finish_non_exhaustive()
    }
}

impl AcmeManager {
    /// Reads the cache (no network) and builds the resolver: with a cached certificate the
    /// server serves at once; without one, handshakes fail until the first order completes.
    pub fn prepare(
        cfg: AcmeConfig,
        hostname: &str,
        http01: bool,
        meta: CertificateDer<'static>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PrepareError> {
        let directory_tls = directory_tls(cfg.ca_file.as_deref())?;
        cache::ensure_dir(&cfg.certdir)?;
        let ident = Ident::parse(hostname);
        let cached = match cache::load(&cfg.certdir, &ident, &meta) {
            Ok(c) => {
                info!(
                    host = %ident.name(),
                    not_after = %c.not_after,
                    dir = %cfg.certdir.display(),
                    "ACME: using the cached certificate (no new order)"
                );
                metrics.cert_not_after.set(c.not_after.unix_timestamp());
                Some(c)
            }
            Err(cache::CacheMiss::Absent) => None,
            Err(e) => {
                warn!(host = %ident.name(), "ACME: not using the cached certificate: {e}; ordering a new one");
                None
            }
        };
        let challenges = Arc::new(Challenges::default());
        let resolver = Arc::new(CertResolver::for_acme(
            cached,
            SniPolicy::for_hostname(hostname),
            challenges.clone(),
        ));
        Ok(AcmeManager {
            cfg,
            ident,
            http01,
            resolver,
            challenges,
            meta,
            metrics,
            account: tokio::sync::Mutex::new(None),
            directory_tls,
        })
    }

    pub fn resolver(&self) -> Arc<CertResolver> {
        self.resolver.clone()
    }

    /// The HTTP-01 answers for the plain-HTTP listener.
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// Orders when there is no certificate, renews when a third of its life is left, retries
    /// failures with backoff; returns at shutdown (an order under way is abandoned).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let wait = match (retry_at, self.resolver.current()) {
                (Some(at), _) => at.saturating_duration_since(tokio::time::Instant::now()),
                (None, Some(c)) => renew_wait(c.not_before, c.not_after, OffsetDateTime::now_utc()),
                (None, None) => Duration::ZERO,
            };
            if !wait.is_zero() {
                if retry_at.is_none() {
                    info!(host = %self.ident.name(), "ACME: next renewal in {}", human(wait));
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(ORDER_TIMEOUT, self.obtain()) => r.unwrap_or_else(|_| {
                    Err(AcmeError::Local(format!(
                        "the order did not complete within {}", human(ORDER_TIMEOUT)
                    )))
                }),
            };
            match result {
                Ok(cert) => {
                    failures = 0;
                    retry_at = None;
                    info!(
                        host = %self.ident.name(),
                        not_after = %cert.not_after,
                        took_ms = started.elapsed().as_millis() as u64,
                        "ACME: new certificate installed; new connections get it, connected clients keep theirs"
                    );
                    self.metrics
                        .cert_not_after
                        .set(cert.not_after.unix_timestamp());
                    self.metrics
                        .acme_orders
                        .get_or_create(&ReasonLabel { reason: "ok" })
                        .inc();
                    self.resolver.replace(cert);
                }
                Err(e) => {
                    if e.kind() == "account_gone" {
                        // Deactivated or deleted at the CA: forget it, register anew.
                        *self.account.lock().await = None;
                        let _ = std::fs::remove_file(cache::account_path(
                            &self.cfg.certdir,
                            &self.cfg.directory_url,
                        ));
                    }
                    failures = failures.saturating_add(1);
                    let current = self.resolver.current();
                    let delay = retry_delay(
                        failures,
                        &e,
                        current.as_ref().map(|c| c.not_after),
                        OffsetDateTime::now_utc(),
                    );
                    retry_at = Some(tokio::time::Instant::now() + delay);
                    self.metrics
                        .acme_orders
                        .get_or_create(&ReasonLabel { reason: e.kind() })
                        .inc();
                    let serving = match &current {
                        Some(c) => format!(
                            "still serving the current certificate (expires {})",
                            c.not_after
                        ),
                        None => {
                            "no certificate yet: TLS handshakes fail until one is issued".into()
                        }
                    };
                    warn!(
                        host = %self.ident.name(),
                        kind = e.kind(),
                        attempt = failures,
                        "ACME order failed: {e}; retrying in {}; {serving}",
                        human(delay)
                    );
                }
            }
        }
    }

    /// One issuance: the preferred challenge type, then the next on a validation failure, each
    /// with a new order (Go's autocert does the same).
    async fn obtain(&self) -> Result<LoadedCert, AcmeError> {
        let account = self.account().await?;
        let types: Vec<ChallengeType> = match &self.ident {
            Ident::Dns(_) if self.http01 => vec![ChallengeType::TlsAlpn01, ChallengeType::Http01],
            Ident::Dns(_) => vec![ChallengeType::TlsAlpn01],
            Ident::Ip(_) => vec![ChallengeType::Http01],
        };
        let mut last = None;
        for ty in types {
            match self.order(&account, ty.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if e.is_validation_failure() => {
                    warn!(host = %self.ident.name(), challenge = ?ty, "ACME validation failed: {e}");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| AcmeError::Local("no challenge type to try".into())))
    }

    fn ca_error(&self, e: instant_acme::Error) -> AcmeError {
        match e {
            instant_acme::Error::Api(problem) => AcmeError::Ca {
                problem,
                host: self.ident.name(),
            },
            other => AcmeError::Client {
                directory: self.cfg.directory_url.clone(),
                detail: other.to_string(),
                ca: if self.cfg.ca_file.is_some() {
                    " and that --acme-ca-file is the CA of its HTTPS certificate"
                } else {
                    "; a private CA needs --acme-ca-file"
                },
            },
        }
    }

    async fn order(&self, account: &Account, ty: ChallengeType) -> Result<LoadedCert, AcmeError> {
        let id = match &self.ident {
            Ident::Dns(d) => Identifier::Dns(d.clone()),
            Ident::Ip(ip) => Identifier::Ip(*ip),
        };
        let ids = [id];
        let mut new = NewOrder::new(&ids);
        if matches!(self.ident, Ident::Ip(_)) {
            new = new.profile(SHORTLIVED_PROFILE);
        }
        let mut order = account
            .new_order(&new)
            .await
            .map_err(|e| self.ca_error(e))?;
        // Answers stay published until this order is done, whatever way it ends.
        let mut published = Vec::new();
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(|e| self.ca_error(e))?;
                match a.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Local(format!(
                            "the CA's authorization for {} is {other:?}",
                            self.ident.name()
                        )));
                    }
                }
                let mut ch = a.challenge(ty.clone()).ok_or_else(|| {
                    AcmeError::Local(format!("the CA offers no {ty:?} challenge"))
                })?;
                let ka = ch.key_authorization();
                info!(host = %self.ident.name(), challenge = ?ty, "ACME: answering the CA's challenge");
                published.push(match ty {
                    ChallengeType::TlsAlpn01 => self
                        .challenges
                        .publish_alpn(&self.ident.name(), ka.digest().as_ref())
                        .map_err(|e| AcmeError::Local(format!("TLS-ALPN-01 certificate: {e}")))?,
                    _ => self.challenges.publish_http(&ch.token, ka.as_str()),
                });
                ch.set_ready().await.map_err(|e| self.ca_error(e))?;
            }
        }
        let polling = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(90));
        let status = order
            .poll_ready(&polling)
            .await
            .map_err(|e| self.ca_error(e))?;
        if status != OrderStatus::Ready {
            return Err(self.validation_error(&mut order, status).await);
        }
        drop(published);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AcmeError::Local(format!("generating the certificate key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![match &self.ident {
            Ident::Dns(d) => SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|e| AcmeError::Local(format!("{d:?} is not a DNS name: {e}")))?,
            ),
            Ident::Ip(ip) => SanType::IpAddress(*ip),
        }];
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Local(format!("building the CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| self.ca_error(e))?;
        let chain = order
            .poll_certificate(&polling)
            .await
            .map_err(|e| self.ca_error(e))?;
        let key_pem = key.serialize_pem();
        let (crt, keyp) = cache::cert_paths(&self.cfg.certdir, &self.ident);
        let loaded = certs::from_pem(
            chain.as_bytes(),
            &crt,
            key_pem.as_bytes(),
            &keyp,
            &self.ident.name(),
            &self.meta,
        )
        .map_err(|e| AcmeError::Local(format!("the issued certificate is unusable: {e}")))?;
        if let Err(e) = cache::store(&self.cfg.certdir, &self.ident, &chain, &key_pem) {
            // Serve it anyway; only a restart would order again.
            warn!(
                "ACME: could not cache the new certificate ({e}); a restart will order a new one"
            );
        }
        Ok(loaded)
    }

    /// The CA's reason an order went invalid: the failed challenge's problem.
    async fn validation_error(
        &self,
        order: &mut instant_acme::Order,
        status: OrderStatus,
    ) -> AcmeError {
        let mut authzs = order.authorizations();
        while let Some(Ok(mut a)) = authzs.next().await {
            if let Ok(state) = a.refresh().await
                && let Some(p) = state.challenges.iter().find_map(|c| c.error.clone())
            {
                return AcmeError::Ca {
                    problem: p,
                    host: self.ident.name(),
                };
            }
        }
        AcmeError::Local(format!(
            "the order ended {status:?} without a reason from the CA"
        ))
    }

    /// The account: from its credentials file, or registered now (with the email and EAB).
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let path = cache::account_path(&self.cfg.certdir, &self.cfg.directory_url);
        if let Ok(bytes) = std::fs::read(&path) {
            match serde_json::from_slice::<AccountCredentials>(&bytes) {
                Ok(creds) => match Account::builder_with_http(self.http_client()?)
                    .from_credentials(creds)
                    .await
                {
                    Ok(a) => {
                        *slot = Some(a.clone());
                        return Ok(a);
                    }
                    Err(e) => return Err(self.ca_error(e)),
                },
                Err(e) => warn!(
                    path = %path.display(),
                    "ACME: unreadable account file ({e}); registering a new account"
                ),
            }
        }
        let contact: Vec<String> = self
            .cfg
            .email
            .iter()
            .map(|e| format!("mailto:{e}"))
            .collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = self
            .cfg
            .eab
            .as_ref()
            .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.key));
        let (account, creds) = Account::builder_with_http(self.http_client()?)
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.cfg.directory_url.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| self.ca_error(e))?;
        info!(directory = %self.cfg.directory_url, id = account.id(), "ACME: registered an account");
        match serde_json::to_vec(&creds) {
            Ok(b) => {
                if let Err(e) = certs::write_with_mode(&path, &b, 0o600) {
                    warn!(path = %path.display(), "ACME: could not save the account ({e})");
                }
            }
            Err(e) => warn!("ACME: could not serialize the account ({e})"),
        }
        *slot = Some(account.clone());
        Ok(account)
    }

    /// HTTPS to the directory.
    fn http_client(&self) -> Result<Box<dyn instant_acme::HttpClient>, AcmeError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.directory_tls.clone())
            .https_only()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, instant_acme::BodyWrapper<bytes::Bytes>>(https);
        Ok(Box::new(client))
    }
}

/// The derper's rustls (ring) for the directory: system roots, Mozilla's roots, and
/// `--acme-ca-file`.
fn directory_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, PrepareError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(p) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let err = |detail: String| PrepareError::CaFile {
            path: p.display().to_string(),
            detail,
        };
        let certs: Vec<_> = CertificateDer::pem_file_iter(p)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(err("no usable CA certificate in it".into()));
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| PrepareError::CaFile {
            path: String::new(),
            detail: format!("TLS setup: {e}"),
        })
}

/// How long until a certificate valid `[not_before, not_after]` should be renewed at `now`:
/// a third of its lifetime before it expires (at most 30 days before), less a jitter of up to a
/// tenth of that (at most an hour), as Go's autocert.
pub fn renew_wait(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Duration {
    let lifetime = (not_after - not_before).max(time::Duration::ZERO);
    let threshold = (lifetime / 3_i32).min(time::Duration::days(30));
    let max_jitter = (threshold / 10_i32).min(time::Duration::hours(1));
    let jitter = max_jitter * rand::random::<f64>();
    let renew_at = not_after - threshold + jitter;
    Duration::try_from(renew_at - now).unwrap_or(Duration::ZERO)
}

/// The wait after the `failures`-th failure in a row.
pub fn retry_delay(
    failures: u32,
    err: &AcmeError,
    current_not_after: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Duration {
    let mut d = MIN_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(MAX_BACKOFF);
    if let Some(na) = current_not_after {
        // Retry more often as the certificate in use nears its end.
        let left = Duration::try_from(na - now).unwrap_or(Duration::ZERO);
        d = d.min((left / RETRY_SHARE_OF_REMAINING).max(Duration::from_secs(5)));
    }
    d.max(err.min_retry())
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{}s", s.max(1)),
        120..7200 => format!("{}m", s / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        let nb = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        // 90 days: renew 30 days before, minus up to an hour of jitter.
        let na = nb + time::Duration::days(90);
        let w = renew_wait(nb, na, nb);
        assert!(
            w >= Duration::from_secs(60 * 86400) && w <= Duration::from_secs(60 * 86400 + 3600)
        );
        // 60 s: renew after 40 s, jitter at most 2 s.
        let na = nb + time::Duration::seconds(60);
        let w = renew_wait(nb, na, nb);
        assert!(
            w >= Duration::from_secs(40) && w <= Duration::from_secs(42),
            "{w:?}"
        );
        // Already past: now.
        assert_eq!(renew_wait(nb, na, na), Duration::ZERO);
    }

    #[test]
    fn a_bad_ca_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("ca.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = directory_tls(Some(&junk)).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("no usable CA"), "{e}");
        let e = directory_tls(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--acme-ca-file"), "{e}");
        let (ca, _) = certs::self_signed_for_ip("127.0.0.1".parse().unwrap()).unwrap();
        std::fs::write(&junk, ca).unwrap();
        assert!(directory_tls(Some(&junk)).is_ok());
        assert!(directory_tls(None).is_ok());
    }

    #[test]
    fn backoff_doubles_caps_and_hurries_near_expiry() {
        let now = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let e = AcmeError::Local("x".into());
        assert_eq!(retry_delay(1, &e, None, now), Duration::from_secs(60));
        assert_eq!(retry_delay(3, &e, None, now), Duration::from_secs(240));
        assert_eq!(retry_delay(30, &e, None, now), MAX_BACKOFF);
        let soon = now + time::Duration::seconds(40);
        assert_eq!(retry_delay(3, &e, Some(soon), now), Duration::from_secs(10));
        assert_eq!(retry_delay(3, &e, Some(now), now), Duration::from_secs(5));
    }
}

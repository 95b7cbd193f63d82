//! What ACME keeps in `-certdir`, in the Go derper's layouts so either derper reuses the
//! other's certificates: a DNS name's certificate is one file named after the host (Go's
//! autocert cache: the private key, then the chain, PEM), an IP's is `<ip>.crt` + `<ip>.key`
//! (Go's `-acme-ip-certs` names, `:` written as `.`). The account is ours alone: its
//! credentials, per directory URL, in `acme-account-<hash>.json`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::certs::{self, CertError, LoadedCert};

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ident {
    Dns(String),
    Ip(IpAddr),
}

impl Ident {
    pub fn parse(hostname: &str) -> Ident {
        match hostname.parse::<IpAddr>() {
            Ok(ip) => Ident::Ip(ip),
            Err(_) => Ident::Dns(hostname.trim_end_matches('.').to_ascii_lowercase()),
        }
    }

    /// The name the leaf must carry (what `certs::from_pem` checks).
    pub fn name(&self) -> String {
        match self {
            Ident::Dns(d) => d.clone(),
            Ident::Ip(ip) => ip.to_string(),
        }
    }
}

/// Where a certificate is cached: (certificate file, key file); one file for a DNS name.
pub fn cert_paths(certdir: &Path, ident: &Ident) -> (PathBuf, PathBuf) {
    match ident {
        Ident::Dns(d) => {
            let p = certdir.join(certs::sanitize_hostname(d));
            (p.clone(), p)
        }
        Ident::Ip(ip) => {
            let base = ip.to_string().replace(':', ".");
            (
                certdir.join(format!("{base}.crt")),
                certdir.join(format!("{base}.key")),
            )
        }
    }
}

/// The account credentials' file for a directory (an account belongs to one CA).
pub fn account_path(certdir: &Path, directory_url: &str) -> PathBuf {
    let h = Sha256::digest(directory_url.as_bytes());
    certdir.join(format!("acme-account-{}.json", hex::encode(&h[..6])))
}

/// Why a cached certificate is not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheMiss {
    #[error("no cached certificate")]
    Absent,
    #[error(transparent)]
    Unusable(#[from] CertError),
    #[error("the cached certificate expired at {0}")]
    Expired(time::OffsetDateTime),
    #[error("the cached certificate is self-signed (left by -certmode manual)")]
    SelfSigned,
}

/// Loads the cached certificate if it is for `ident`, CA-issued and not expired.
pub fn load(
    certdir: &Path,
    ident: &Ident,
    meta: &rustls_pki_types::CertificateDer<'static>,
) -> Result<LoadedCert, CacheMiss> {
    let (crt, key) = cert_paths(certdir, ident);
    let read = |p: &Path| match std::fs::read(p) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CacheMiss::Absent),
        Err(error) => Err(CacheMiss::Unusable(CertError::Read {
            path: p.to_path_buf(),
            error,
        })),
    };
    let cert_pem = read(&crt)?;
    let key_pem = if key == crt {
        cert_pem.clone()
    } else {
        read(&key)?
    };
    let loaded = certs::from_pem(&cert_pem, &crt, &key_pem, &key, &ident.name(), meta)?;
    if loaded.self_signed {
        return Err(CacheMiss::SelfSigned);
    }
    if loaded.not_after <= time::OffsetDateTime::now_utc() {
        return Err(CacheMiss::Expired(loaded.not_after));
    }
    Ok(loaded)
}

/// Writes a new certificate (chain PEM) and its key (PEM) atomically, key first and 0600.
pub fn store(
    certdir: &Path,
    ident: &Ident,
    chain_pem: &str,
    key_pem: &str,
) -> Result<(), CertError> {
    let (crt, key) = cert_paths(certdir, ident);
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CertError::Write { path, error }
    };
    ensure_dir(certdir)?;
    if crt == key {
        let both = format!("{key_pem}{chain_pem}");
        certs::write_with_mode(&crt, both.as_bytes(), 0o600).map_err(werr(&crt))
    } else {
        certs::write_with_mode(&key, key_pem.as_bytes(), 0o600).map_err(werr(&key))?;
        certs::write_with_mode(&crt, chain_pem.as_bytes(), 0o644).map_err(werr(&crt))
    }
}

/// Creates the directory (0700, as Go) if it does not exist.
pub fn ensure_dir(certdir: &Path) -> Result<(), CertError> {
    if certdir.is_dir() {
        return Ok(());
    }
    let werr = |error| CertError::Write {
        path: certdir.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(certdir).map_err(werr)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(certdir, std::fs::Permissions::from_mode(0o700)).map_err(werr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_layouts() {
        let d = Path::new("/c");
        let dns = Ident::parse("Derp.Example.com.");
        assert_eq!(dns, Ident::Dns("derp.example.com".into()));
        assert_eq!(
            cert_paths(d, &dns),
            (
                PathBuf::from("/c/derp.example.com"),
                PathBuf::from("/c/derp.example.com")
            )
        );
        let v6 = Ident::parse("2001:db8::1");
        assert_eq!(
            cert_paths(d, &v6).0,
            PathBuf::from("/c/2001.db8..1.crt"),
            "Go writes IPv6 colons as dots"
        );
        assert_ne!(
            account_path(d, "https://a/dir"),
            account_path(d, "https://b/dir")
        );
    }

    #[test]
    fn self_signed_and_missing_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let meta = certs::meta_cert(&derp_proto::key::NodePublic([1; 32])).unwrap();
        let ip = Ident::parse("127.0.0.1");
        assert!(matches!(
            load(dir.path(), &ip, &meta),
            Err(CacheMiss::Absent)
        ));
        certs::create_self_signed(dir.path(), "127.0.0.1".parse().unwrap()).unwrap();
        assert!(matches!(
            load(dir.path(), &ip, &meta),
            Err(CacheMiss::SelfSigned)
        ));
    }
}

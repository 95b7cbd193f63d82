//! Node, server and mesh keys and their text forms (`nodekey:`, `privkey:`, bare hex), plus the
//! server key file that Go's `derper -c` reads and writes, so an existing server keeps its identity.

use std::fmt;

use crypto_box::{PublicKey, SecretKey};
use subtle::ConstantTimeEq;

/// Length of every Curve25519 key on the wire.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key text must start with {expected:?}")]
    MissingPrefix { expected: &'static str },
    #[error("key must be exactly 64 hex digits, got {0} characters")]
    BadLength(usize),
    #[error("key is not valid hex")]
    BadHex,
    #[error("key file is not valid JSON: {0}")]
    FileJson(String),
    #[error("key file has no PrivateKey value")]
    FileMissingKey,
    #[error("the private key is all zeros")]
    Zero,
}

fn decode_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if s.len() != 2 * KEY_LEN {
        return Err(KeyError::BadLength(s.len()));
    }
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::BadHex)?;
    Ok(out)
}

/// A node's (or server's) public key: what packets are addressed to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodePublic(pub [u8; KEY_LEN]);

impl NodePublic {
    pub const ZERO: NodePublic = NodePublic([0; KEY_LEN]);

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; KEY_LEN]>::try_from(b).ok().map(NodePublic)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Bare lowercase hex, as in the `Derp-Public-Key` header and the meta certificate.
    pub fn untyped_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `nodekey:<64 hex>` (either case).
    pub fn parse_typed(s: &str) -> Result<Self, KeyError> {
        let rest = s.strip_prefix("nodekey:").ok_or(KeyError::MissingPrefix {
            expected: "nodekey:",
        })?;
        decode_hex32(rest).map(NodePublic)
    }

    /// Parses 64 hex digits without a prefix.
    pub fn parse_untyped(s: &str) -> Result<Self, KeyError> {
        decode_hex32(s).map(NodePublic)
    }

    /// A short form for logs, like Go's `ShortString`: `[abcde]`.
    pub fn short(&self) -> String {
        let h = hex::encode(&self.0[..3]);
        format!("[{}]", &h[..5])
    }

    pub(crate) fn to_box_key(self) -> PublicKey {
        PublicKey::from(self.0)
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nodekey:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublic({})", self.short())
    }
}

/// A private Curve25519 key. Debug output never shows the secret.
#[derive(Clone)]
pub struct NodePrivate(SecretKey);

impl NodePrivate {
    pub fn generate() -> Self {
        NodePrivate(SecretKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn from_bytes(b: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        if b == [0; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(NodePrivate(SecretKey::from(b)))
    }

    pub fn public(&self) -> NodePublic {
        NodePublic(*self.0.public_key().as_bytes())
    }

    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    /// `privkey:<64 lowercase hex>`.
    pub fn to_typed(&self) -> String {
        format!("privkey:{}", hex::encode(self.0.to_bytes()))
    }

    pub fn parse_typed(s: &str) -> Result<Self, KeyError> {
        let rest = s.strip_prefix("privkey:").ok_or(KeyError::MissingPrefix {
            expected: "privkey:",
        })?;
        Self::from_bytes(decode_hex32(rest)?)
    }

    pub(crate) fn box_key(&self) -> &SecretKey {
        &self.0
    }
}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePrivate(public={})", self.public().short())
    }
}

/// The region's mesh pre-shared key. Holders can see and steer every client, so it is compared
/// in constant time (Tailscale security bulletin TS-2025-003) and never printed.
#[derive(Clone, Copy)]
pub struct MeshKey([u8; KEY_LEN]);

impl MeshKey {
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        MeshKey(b)
    }

    /// Parses exactly 64 hex digits (either case), as the JSON `meshKey` value: no trimming.
    pub fn parse_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex32(s).map(MeshKey)
    }

    /// Parses the contents of a `--mesh-psk-file`: surrounding whitespace is trimmed.
    /// An empty file means "no mesh key", as in Go.
    pub fn parse_file_contents(s: &str) -> Result<Option<Self>, KeyError> {
        if s.is_empty() {
            return Ok(None);
        }
        decode_hex32(s.trim()).map(|k| Some(MeshKey(k)))
    }

    pub fn is_zero(&self) -> bool {
        bool::from(self.0.ct_eq(&[0u8; KEY_LEN]))
    }

    pub fn ct_eq(&self, other: &MeshKey) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

/// Parses Go's derper key file: a JSON object whose `PrivateKey` (matched case-insensitively,
/// as Go's encoding/json does; the last match wins) holds `privkey:<hex>`.
pub fn parse_key_file(contents: &[u8]) -> Result<NodePrivate, KeyError> {
    let v: serde_json::Value =
        serde_json::from_slice(contents).map_err(|e| KeyError::FileJson(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| KeyError::FileJson("expected a JSON object".into()))?;
    let mut found = None;
    for (k, val) in obj {
        if k.eq_ignore_ascii_case("PrivateKey") {
            found = Some(val);
        }
    }
    match found {
        None | Some(serde_json::Value::Null) => Err(KeyError::FileMissingKey),
        Some(serde_json::Value::String(s)) if s.is_empty() => Err(KeyError::FileMissingKey),
        Some(serde_json::Value::String(s)) => NodePrivate::parse_typed(s),
        Some(_) => Err(KeyError::FileJson("PrivateKey must be a string".into())),
    }
}

/// Renders the key file exactly as Go writes it: tab-indented JSON, no trailing newline.
pub fn render_key_file(key: &NodePrivate) -> String {
    format!("{{\n\t\"PrivateKey\": \"{}\"\n}}", key.to_typed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_is_case_insensitive() {
        let k = NodePrivate::generate();
        let text = render_key_file(&k);
        assert!(text.starts_with("{\n\t\"PrivateKey\": \"privkey:"));
        assert!(!text.ends_with('\n'));
        let back = parse_key_file(text.as_bytes()).unwrap();
        assert_eq!(back.public(), k.public());
        let lower = text.replace("PrivateKey", "privatekey");
        assert_eq!(
            parse_key_file(lower.as_bytes()).unwrap().public(),
            k.public()
        );
    }

    #[test]
    fn key_file_errors_are_clear() {
        assert_eq!(parse_key_file(b"{}").unwrap_err(), KeyError::FileMissingKey);
        assert!(matches!(
            parse_key_file(b"nope"),
            Err(KeyError::FileJson(_))
        ));
        let zero = format!("{{\"PrivateKey\":\"privkey:{}\"}}", "0".repeat(64));
        assert_eq!(parse_key_file(zero.as_bytes()).unwrap_err(), KeyError::Zero);
        assert!(matches!(
            parse_key_file(br#"{"PrivateKey":"nodekey:00"}"#),
            Err(KeyError::MissingPrefix { .. })
        ));
    }

    #[test]
    fn mesh_key_rules() {
        let hex64 = "ab".repeat(32);
        assert!(MeshKey::parse_hex(&hex64).is_ok());
        assert!(MeshKey::parse_hex(&format!(" {hex64}")).is_err());
        assert!(
            MeshKey::parse_file_contents(&format!("  {}\n", hex64.to_uppercase()))
                .unwrap()
                .is_some()
        );
        assert!(MeshKey::parse_file_contents("").unwrap().is_none());
        assert!(MeshKey::parse_file_contents("  \n").is_err());
        let a = MeshKey::parse_hex(&hex64).unwrap();
        let b = MeshKey::parse_hex(&format!("{}cd", "ab".repeat(31))).unwrap();
        assert!(a.ct_eq(&a));
        assert!(!a.ct_eq(&b));
        assert!(MeshKey::from_bytes([0; 32]).is_zero());
        assert_eq!(format!("{a:?}"), "MeshKey(<redacted>)");
    }
}

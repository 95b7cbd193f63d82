//! ClientInfo and ServerInfo: the two boxed JSON messages of the handshake. Sealed with NaCl
//! `crypto_box` (X25519, XSalsa20-Poly1305) as `nonce(24) || tag(16) || ciphertext`, exactly as
//! Go's `golang.org/x/crypto/nacl/box.Seal` lays it out.

use crypto_box::{
    SalsaBox,
    aead::{Aead, AeadCore, generic_array::GenericArray},
};
use serde_json::{Map, Value};

use crate::key::{MeshKey, NodePrivate, NodePublic};

pub const NONCE_LEN: usize = 24;
/// Poly1305 tag that precedes the ciphertext.
pub const BOX_OVERHEAD: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InfoError {
    #[error("sealed message of {0} bytes is shorter than nonce and tag")]
    TooShort(usize),
    #[error("box did not open (wrong key or corrupted)")]
    BoxOpen,
    #[error("info JSON is invalid: {0}")]
    Json(String),
    #[error("sealing failed")]
    Seal,
}

/// Seals `plaintext` from `ours` to `theirs`: `nonce || tag || ciphertext`.
pub fn seal(
    ours: &NodePrivate,
    theirs: &NodePublic,
    plaintext: &[u8],
) -> Result<Vec<u8>, InfoError> {
    let b = SalsaBox::new(&theirs.to_box_key(), ours.box_key());
    let nonce = SalsaBox::generate_nonce(&mut rand::rngs::OsRng);
    let ct = b.encrypt(&nonce, plaintext).map_err(|_| InfoError::Seal)?;
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens `nonce || tag || ciphertext` sent by `theirs` to `ours`.
pub fn open(ours: &NodePrivate, theirs: &NodePublic, sealed: &[u8]) -> Result<Vec<u8>, InfoError> {
    if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
        return Err(InfoError::TooShort(sealed.len()));
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let b = SalsaBox::new(&theirs.to_box_key(), ours.box_key());
    b.decrypt(GenericArray::from_slice(nonce), ct)
        .map_err(|_| InfoError::BoxOpen)
}

/// What a client tells the server about itself.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// Mesh pre-shared key; an all-zero key counts as none.
    pub mesh_key: Option<MeshKey>,
    pub version: i64,
    pub can_ack_pings: bool,
    pub is_prober: bool,
    pub app_name: String,
}

fn json_err(msg: impl Into<String>) -> InfoError {
    InfoError::Json(msg.into())
}

fn object(plaintext: &[u8]) -> Result<Map<String, Value>, InfoError> {
    match serde_json::from_slice::<Value>(plaintext).map_err(|e| json_err(e.to_string()))? {
        Value::Object(m) => Ok(m),
        // Go decodes JSON null into a struct as a no-op.
        Value::Null => Ok(Map::new()),
        _ => Err(json_err("expected a JSON object")),
    }
}

fn as_bool(field: &str, v: &Value, slot: &mut bool) -> Result<(), InfoError> {
    match v {
        Value::Bool(b) => *slot = *b,
        Value::Null => {}
        _ => return Err(json_err(format!("{field} must be a boolean"))),
    }
    Ok(())
}

fn as_int(field: &str, v: &Value, slot: &mut i64) -> Result<(), InfoError> {
    match v {
        Value::Number(n) => {
            *slot = n
                .as_i64()
                .ok_or_else(|| json_err(format!("{field} must be an integer")))?
        }
        Value::Null => {}
        _ => return Err(json_err(format!("{field} must be a number"))),
    }
    Ok(())
}

impl ClientInfo {
    /// Parses the plaintext with Go's encoding/json rules: keys match case-insensitively (the
    /// last one wins), unknown keys are ignored, a wrongly typed known key is an error, and a
    /// `meshKey` that is not exactly 64 hex digits (even empty or null) rejects the client.
    pub fn from_json(plaintext: &[u8]) -> Result<Self, InfoError> {
        let mut ci = ClientInfo::default();
        for (k, v) in object(plaintext)? {
            if k.eq_ignore_ascii_case("meshKey") {
                let Value::String(s) = v else {
                    return Err(json_err("meshKey must be a 64-digit hex string"));
                };
                let key = MeshKey::parse_hex(&s).map_err(|e| json_err(format!("meshKey: {e}")))?;
                ci.mesh_key = if key.is_zero() { None } else { Some(key) };
            } else if k.eq_ignore_ascii_case("version") {
                as_int("version", &v, &mut ci.version)?;
            } else if k.eq_ignore_ascii_case("CanAckPings") {
                as_bool("CanAckPings", &v, &mut ci.can_ack_pings)?;
            } else if k.eq_ignore_ascii_case("IsProber") {
                as_bool("IsProber", &v, &mut ci.is_prober)?;
            } else if k.eq_ignore_ascii_case("AppName") {
                match v {
                    Value::String(s) => ci.app_name = s,
                    Value::Null => {}
                    _ => return Err(json_err("AppName must be a string")),
                }
            }
        }
        Ok(ci)
    }

    /// The JSON a Go client writes (field order and omissions as Go's).
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        if let Some(k) = &self.mesh_key {
            m.insert("meshKey".into(), Value::String(k.to_hex()));
        }
        if self.version != 0 {
            m.insert("version".into(), Value::from(self.version));
        }
        m.insert("CanAckPings".into(), Value::Bool(self.can_ack_pings));
        if self.is_prober {
            m.insert("IsProber".into(), Value::Bool(true));
        }
        if !self.app_name.is_empty() {
            m.insert("AppName".into(), Value::String(self.app_name.clone()));
        }
        Value::Object(m).to_string()
    }
}

/// What the server tells the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: i64,
    /// If non-zero, Go clients rate-limit their own sends to this many bytes per second.
    pub token_bucket_bytes_per_second: i64,
    pub token_bucket_bytes_burst: i64,
}

impl ServerInfo {
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        if self.version != 0 {
            m.insert("version".into(), Value::from(self.version));
        }
        if self.token_bucket_bytes_per_second != 0 {
            m.insert(
                "TokenBucketBytesPerSecond".into(),
                Value::from(self.token_bucket_bytes_per_second),
            );
        }
        if self.token_bucket_bytes_burst != 0 {
            m.insert(
                "TokenBucketBytesBurst".into(),
                Value::from(self.token_bucket_bytes_burst),
            );
        }
        Value::Object(m).to_string()
    }

    pub fn from_json(plaintext: &[u8]) -> Result<Self, InfoError> {
        let mut si = ServerInfo::default();
        for (k, v) in object(plaintext)? {
            if k.eq_ignore_ascii_case("version") {
                as_int("version", &v, &mut si.version)?;
            } else if k.eq_ignore_ascii_case("TokenBucketBytesPerSecond") {
                as_int(&k, &v, &mut si.token_bucket_bytes_per_second)?;
            } else if k.eq_ignore_ascii_case("TokenBucketBytesBurst") {
                as_int(&k, &v, &mut si.token_bucket_bytes_burst)?;
            }
        }
        Ok(si)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip() {
        let a = NodePrivate::generate();
        let b = NodePrivate::generate();
        let sealed = seal(&a, &b.public(), b"{\"version\":2}").unwrap();
        assert_eq!(sealed.len(), NONCE_LEN + BOX_OVERHEAD + 13);
        assert_eq!(open(&b, &a.public(), &sealed).unwrap(), b"{\"version\":2}");
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert_eq!(open(&b, &a.public(), &bad), Err(InfoError::BoxOpen));
        assert_eq!(
            open(&b, &a.public(), &sealed[..39]),
            Err(InfoError::TooShort(39))
        );
    }

    #[test]
    fn client_info_go_rules() {
        let ci = ClientInfo::from_json(br#"{"version":2,"CanAckPings":true}"#).unwrap();
        assert_eq!(ci.version, 2);
        assert!(ci.can_ack_pings && ci.mesh_key.is_none());
        let hex64 = "0f".repeat(32);
        let ci = ClientInfo::from_json(
            format!(r#"{{"MeshKey":"{hex64}","Version":2,"x":[1]}}"#).as_bytes(),
        )
        .unwrap();
        assert!(ci.mesh_key.is_some());
        let zero = "0".repeat(64);
        let ci = ClientInfo::from_json(format!(r#"{{"meshKey":"{zero}"}}"#).as_bytes()).unwrap();
        assert!(ci.mesh_key.is_none());
        for bad in [
            r#"{"meshKey":"abc"}"#,
            r#"{"meshKey":""}"#,
            r#"{"meshKey":null}"#,
            r#"{"meshKey":5}"#,
            r#"{"version":"2"}"#,
            r#"{"CanAckPings":1}"#,
            r#"[1]"#,
            r#"{"#,
        ] {
            assert!(
                ClientInfo::from_json(bad.as_bytes()).is_err(),
                "{bad} must be refused"
            );
        }
        assert!(ClientInfo::from_json(b"null").is_ok());
        assert!(ClientInfo::from_json(br#"{"version":null}"#).is_ok());
    }

    #[test]
    fn json_matches_go_output() {
        let ci = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        assert_eq!(ci.to_json(), r#"{"version":2,"CanAckPings":true}"#);
        let prober = ClientInfo {
            version: 2,
            is_prober: true,
            ..Default::default()
        };
        assert_eq!(
            prober.to_json(),
            r#"{"version":2,"CanAckPings":false,"IsProber":true}"#
        );
        let si = ServerInfo {
            version: 2,
            ..Default::default()
        };
        assert_eq!(si.to_json(), r#"{"version":2}"#);
    }
}

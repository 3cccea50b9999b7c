//! lymph RPC frames (`lymph/core/messages.py`).
//!
//! A message is 5 ZeroMQ frames `[id, type, subject, headers, body]`; the receiving ROUTER socket prepends the
//! sender's routing id (= the sender's advertised endpoint), so a received message has 6 frames and replies go to
//! that first frame. `id` is a fresh `uuid4().hex` per message; `subject` is `"Interface.method"` for a REQ and
//! the request's id for a reply; `headers` is a msgpack map (`trace_id`, `version`); `body` is msgpack.

use std::fmt;

use super::value::{self, DecodeError, Value};

/// Message type frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A request.
    Req,
    /// A successful reply.
    Rep,
    /// An acknowledgement without a result (raw RPC).
    Ack,
    /// "I won't handle this": unknown method, bad arguments, version mismatch.
    Nack,
    /// A declared exception: body `{"type": …, "message": …}`.
    Error,
}

impl Kind {
    /// The frame bytes.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Kind::Req => b"REQ",
            Kind::Rep => b"REP",
            Kind::Ack => b"ACK",
            Kind::Nack => b"NACK",
            Kind::Error => b"ERROR",
        }
    }

    fn parse(frame: &[u8]) -> Option<Kind> {
        Some(match frame {
            b"REQ" => Kind::Req,
            b"REP" => Kind::Rep,
            b"ACK" => Kind::Ack,
            b"NACK" => Kind::Nack,
            b"ERROR" => Kind::Error,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(self.as_bytes()).expect("ascii"))
    }
}

/// Why a received multipart message was dropped (lymph logs and drops these too: there is no one to answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not `[source, id, type, subject, headers, body]`.
    #[error("expected 6 frames (source + 5), got {0}")]
    FrameCount(usize),
    /// A frame that must be text is not UTF-8.
    #[error("frame `{0}` is not valid UTF-8")]
    NonUtf8(&'static str),
    /// The type frame is none of REQ/REP/ACK/NACK/ERROR.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A frame is larger than any lymph peer sends.
    #[error("frame `{0}` is {1} bytes, above its limit")]
    TooLarge(&'static str, usize),
}

/// Largest source (routing id = reply endpoint), id, type and subject frames accepted.
pub const MAX_TEXT_FRAME: usize = 512;
/// Largest headers frame accepted.
pub const MAX_HEADERS: usize = 64 << 10;

/// Headers of a message. Unknown keys are ignored, as lymph does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Headers {
    /// Trace id (32 hex chars from the lymph CLI; may be absent).
    pub trace_id: Option<String>,
    /// Interface version the client selected; `None` when unversioned.
    pub version: Option<String>,
}

impl Headers {
    fn decode(bytes: &[u8]) -> Result<Headers, DecodeError> {
        let mut headers = Headers::default();
        if let Value::Map(entries) = value::decode(bytes)? {
            for (k, v) in entries {
                match (k.as_str(), v) {
                    (Some("trace_id"), Value::Str(s)) => headers.trace_id = Some(s),
                    (Some("version"), Value::Str(s)) => headers.version = Some(s),
                    _ => {}
                }
            }
        }
        Ok(headers)
    }

    /// Encodes as lymph does: both keys always present, nil when unset.
    pub fn encode(&self) -> Vec<u8> {
        let opt = |s: &Option<String>| s.clone().map_or(Value::Nil, Value::Str);
        value::encode(&Value::Map(vec![
            (Value::Str("trace_id".into()), opt(&self.trace_id)),
            (Value::Str("version".into()), opt(&self.version)),
        ]))
    }
}

/// A received message with its envelope checked; headers and body are still raw.
#[derive(Clone, Debug, PartialEq)]
pub struct Incoming {
    /// The sender's endpoint (its routing id): where replies go.
    pub source: String,
    /// Message id.
    pub id: String,
    /// Message type.
    pub kind: Kind,
    /// `Interface.method` (REQ) or the id of the request (replies).
    pub subject: String,
    /// Raw msgpack headers.
    pub headers: Vec<u8>,
    /// Raw msgpack body.
    pub body: Vec<u8>,
}

impl Incoming {
    /// Checks the envelope of a received multipart message.
    ///
    /// # Errors
    /// [`FrameError`] when the frame count, text frames or type are wrong.
    pub fn from_frames(mut frames: Vec<Vec<u8>>) -> Result<Incoming, FrameError> {
        if frames.len() != 6 {
            return Err(FrameError::FrameCount(frames.len()));
        }
        for (i, name) in ["source", "id", "type", "subject", "headers"].into_iter().enumerate() {
            let max = if name == "headers" { MAX_HEADERS } else { MAX_TEXT_FRAME };
            if frames[i].len() > max {
                return Err(FrameError::TooLarge(name, frames[i].len()));
            }
        }
        let body = frames.pop().expect("6 frames");
        let headers = frames.pop().expect("6 frames");
        let text = |bytes: Vec<u8>, name: &'static str| String::from_utf8(bytes).map_err(|_| FrameError::NonUtf8(name));
        let subject = text(frames.pop().expect("6 frames"), "subject")?;
        let kind_frame = frames.pop().expect("6 frames");
        let id = text(frames.pop().expect("6 frames"), "id")?;
        let source = text(frames.pop().expect("6 frames"), "source")?;
        let kind = Kind::parse(&kind_frame)
            .ok_or_else(|| FrameError::UnknownType(String::from_utf8_lossy(&kind_frame).chars().take(32).collect()))?;
        Ok(Incoming { source, id, kind, subject, headers, body })
    }

    /// Decodes the headers.
    ///
    /// # Errors
    /// When the headers frame is not msgpack.
    pub fn headers(&self) -> Result<Headers, DecodeError> {
        Headers::decode(&self.headers)
    }
}

/// Builds the 5 frames of an outgoing message (the caller prepends the destination routing id).
pub fn frames(id: &str, kind: Kind, subject: &str, headers: &Headers, body: Vec<u8>) -> [Vec<u8>; 5] {
    [id.as_bytes().to_vec(), kind.as_bytes().to_vec(), subject.as_bytes().to_vec(), headers.encode(), body]
}

/// A fresh message id: 32 lowercase hex characters, like `uuid4().hex`.
pub fn new_id() -> String {
    let bits: u128 = rand::random();
    // Set the UUID version (4) and variant bits so the id is a real uuid4.
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    format!("{bits:032x}")
}

/// Body of an ERROR reply: `{"type": <exception class name>, "message": <text>}`.
pub fn error_body(type_name: &str, message: &str) -> Vec<u8> {
    value::encode(&Value::Map(vec![
        (Value::Str("type".into()), Value::Str(type_name.into())),
        (Value::Str("message".into()), Value::Str(message.into())),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified_request() -> Vec<Vec<u8>> {
        // Captured from the real `lymph request Raw.hello '{"a":1,"dt":null}'` (lymph-protocol.md §2.2).
        vec![
            b"tcp://127.0.0.1:44405".to_vec(),
            b"30e540baebe94807bdc8bd07b94aed16".to_vec(),
            b"REQ".to_vec(),
            b"Raw.hello".to_vec(),
            b"\x82\xa7version\xc0\xa8trace_id\xd9 59b3aa2d3a9c4122a63ff494ff7f7594".to_vec(),
            b"\x82\xa1a\x01\xa2dt\xc0".to_vec(),
        ]
    }

    #[test]
    fn parses_a_real_lymph_request() {
        let msg = Incoming::from_frames(verified_request()).unwrap();
        assert_eq!(msg.source, "tcp://127.0.0.1:44405");
        assert_eq!(msg.kind, Kind::Req);
        assert_eq!(msg.subject, "Raw.hello");
        let headers = msg.headers().unwrap();
        assert_eq!(headers.trace_id.as_deref(), Some("59b3aa2d3a9c4122a63ff494ff7f7594"));
        assert_eq!(headers.version, None);
    }

    #[test]
    fn rejects_bad_envelopes() {
        let mut short = verified_request();
        short.pop();
        assert_eq!(Incoming::from_frames(short), Err(FrameError::FrameCount(5)));
        let mut bad_subject = verified_request();
        bad_subject[3] = vec![0xff, 0xfe];
        assert_eq!(Incoming::from_frames(bad_subject), Err(FrameError::NonUtf8("subject")));
        let mut bad_type = verified_request();
        bad_type[2] = b"HELLO".to_vec();
        assert!(matches!(Incoming::from_frames(bad_type), Err(FrameError::UnknownType(_))));
    }

    #[test]
    fn builds_reply_frames_like_lymph() {
        let headers = Headers { trace_id: Some("abc".into()), version: None };
        let f = frames("id1", Kind::Rep, "req1", &headers, value::encode(&Value::Str("RAW".into())));
        assert_eq!(f[1], b"REP");
        assert_eq!(f[2], b"req1");
        // lymph's own reply header map for the same values, key order aside.
        assert_eq!(Headers::decode(&f[3]).unwrap(), headers);
        assert_eq!(f[4], b"\xa3RAW");
    }

    #[test]
    fn ids_are_uuid4_hex() {
        let id = new_id();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(&id[12..13], "4");
        assert_ne!(new_id(), id);
    }
}

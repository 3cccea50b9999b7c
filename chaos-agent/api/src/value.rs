//! lymph's msgpack dialect: a bounded decoder and an encoder for [`Value`].
//!
//! lymph (`lymph/serializers/base.py`) encodes with `use_bin_type=True` (text → msgpack str, bytes → bin) and
//! represents a few Python types as maps `{"__type__": <name>, "_": <payload>}` (datetime, date, time, Decimal,
//! UUID, set, UndefinedType). Ext type 101 is "embedded msgpack": its data is itself a lymph-msgpack document.
//! Those become [`Value::Special`] here, and are written back the same way.
//!
//! The decoder never trusts lengths: every length is checked against the bytes that remain before anything is
//! allocated, nesting is limited to [`MAX_DEPTH`], and trailing bytes are an error. So a hostile frame costs at
//! most its own size.

use std::fmt;

use serde_json::Number;

/// Deepest nesting accepted (maps/arrays/embedded documents).
pub const MAX_DEPTH: usize = 64;
/// Ext code lymph uses for an embedded msgpack document.
pub const EXT_EMBEDDED: i8 = 101;

/// A decoded lymph msgpack value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// nil / Python None.
    Nil,
    /// Boolean.
    Bool(bool),
    /// Any integer that fits in i64.
    Int(i64),
    /// Integers above `i64::MAX`.
    UInt(u64),
    /// float32/float64.
    Float(f64),
    /// msgpack str (UTF-8 text).
    Str(String),
    /// msgpack bin (Python bytes).
    Bin(Vec<u8>),
    /// Array.
    Array(Vec<Value>),
    /// Map, in wire order.
    Map(Vec<(Value, Value)>),
    /// An ext type other than 101 (kept as is).
    Ext(i8, Vec<u8>),
    /// A lymph special type (`{"__type__": …, "_": …}`).
    Special(Special),
}

/// lymph's tagged types.
#[derive(Clone, Debug, PartialEq)]
pub enum Special {
    /// `datetime`, ISO 8601 text as lymph writes it (`%Y-%m-%dT%H:%M:%S%z`).
    Datetime(String),
    /// `date`, `YYYY-MM-DD`.
    Date(String),
    /// `time`, e.g. `14:42:01Z`.
    Time(String),
    /// `Decimal`, as text.
    Decimal(String),
    /// `UUID`, as text.
    Uuid(String),
    /// `set`, as a list.
    Set(Vec<Value>),
    /// `lymph.utils.Undefined`.
    Undefined,
    /// A `__type__` lymph does not define; kept verbatim.
    Other {
        /// The `__type__` name.
        type_name: String,
        /// The `_` payload.
        payload: Box<Value>,
    },
}

/// Why bytes are not a lymph msgpack document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("truncated msgpack: needed {needed} more bytes at offset {offset}")]
    Truncated {
        /// Offset where the value started.
        offset: usize,
        /// Bytes missing.
        needed: usize,
    },
    /// A marker byte msgpack reserves (0xc1).
    #[error("invalid msgpack marker 0x{marker:02x} at offset {offset}")]
    InvalidMarker {
        /// Offset of the marker.
        offset: usize,
        /// The byte.
        marker: u8,
    },
    /// A str that is not UTF-8.
    #[error("msgpack str at offset {offset} is not valid UTF-8")]
    NonUtf8 {
        /// Offset of the string data.
        offset: usize,
    },
    /// More nesting than [`MAX_DEPTH`].
    #[error("msgpack nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// Bytes after the top-level value.
    #[error("{extra} trailing bytes after the msgpack value")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A lymph special type whose payload has the wrong shape.
    #[error("lymph special type `{type_name}` has a malformed payload")]
    BadSpecial {
        /// The `__type__` value.
        type_name: String,
    },
}

/// Decodes one complete document (no trailing bytes).
///
/// # Errors
/// [`DecodeError`] for anything that is not exactly one well-formed value.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let value = r.value(0)?;
    if r.pos != bytes.len() {
        return Err(DecodeError::Trailing { extra: bytes.len() - r.pos });
    }
    Ok(value)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            return Err(DecodeError::Truncated { offset: self.pos, needed: n - remaining });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len(&mut self, width: usize) -> Result<usize, DecodeError> {
        Ok(match width {
            1 => usize::from(self.byte()?),
            2 => usize::from(u16::from_be_bytes(self.be()?)),
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn str(&mut self, n: usize) -> Result<String, DecodeError> {
        let offset = self.pos;
        let raw = self.take(n)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| DecodeError::NonUtf8 { offset })
    }

    /// Checks that `count` elements of at least `min_size` bytes each can still follow, before allocating.
    fn room_for(&self, count: usize, min_size: usize) -> Result<(), DecodeError> {
        let remaining = self.bytes.len() - self.pos;
        let needed = count.saturating_mul(min_size);
        if needed > remaining {
            return Err(DecodeError::Truncated { offset: self.pos, needed: needed - remaining });
        }
        Ok(())
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value, DecodeError> {
        self.room_for(n, 1)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, DecodeError> {
        self.room_for(n, 2)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            entries.push((k, v));
        }
        special_from_map(entries)
    }

    fn ext(&mut self, n: usize, depth: usize) -> Result<Value, DecodeError> {
        let code = self.byte()? as i8;
        let data = self.take(n)?;
        if code == EXT_EMBEDDED {
            let mut inner = Reader { bytes: data, pos: 0 };
            let value = inner.value(depth + 1)?;
            if inner.pos != data.len() {
                return Err(DecodeError::Trailing { extra: data.len() - inner.pos });
            }
            return Ok(value);
        }
        Ok(Value::Ext(code, data.to_vec()))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let offset = self.pos;
        let marker = self.byte()?;
        Ok(match marker {
            0x00..=0x7f => Value::Int(i64::from(marker)),
            0x80..=0x8f => return self.map(usize::from(marker & 0x0f), depth),
            0x90..=0x9f => return self.array(usize::from(marker & 0x0f), depth),
            0xa0..=0xbf => Value::Str(self.str(usize::from(marker & 0x1f))?),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (marker - 0xc4))?;
                Value::Bin(self.take(n)?.to_vec())
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (marker - 0xc7))?;
                return self.ext(n, depth);
            }
            0xca => Value::Float(f64::from(f32::from_be_bytes(self.be()?))),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Int(i64::from(self.byte()?)),
            0xcd => Value::Int(i64::from(u16::from_be_bytes(self.be()?))),
            0xce => Value::Int(i64::from(u32::from_be_bytes(self.be()?))),
            0xcf => {
                let v = u64::from_be_bytes(self.be()?);
                i64::try_from(v).map_or(Value::UInt(v), Value::Int)
            }
            0xd0 => Value::Int(i64::from(self.byte()? as i8)),
            0xd1 => Value::Int(i64::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Value::Int(i64::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?)),
            0xd4..=0xd8 => return self.ext(1 << (marker - 0xd4), depth),
            0xd9..=0xdb => {
                let n = self.len(1 << (marker - 0xd9))?;
                Value::Str(self.str(n)?)
            }
            0xdc | 0xdd => {
                let n = self.len(if marker == 0xdc { 2 } else { 4 })?;
                return self.array(n, depth);
            }
            0xde | 0xdf => {
                let n = self.len(if marker == 0xde { 2 } else { 4 })?;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::Int(i64::from(marker as i8)),
            0xc1 => return Err(DecodeError::InvalidMarker { offset, marker }),
        })
    }
}

/// Turns `{"__type__": name, "_": payload}` into [`Value::Special`] (lymph's `load_object`: any map with a truthy
/// `__type__`); other maps stay maps.
fn special_from_map(entries: Vec<(Value, Value)>) -> Result<Value, DecodeError> {
    let type_name = entries.iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Str(name)) if k == "__type__" && !name.is_empty() => Some(name.clone()),
        _ => None,
    });
    let Some(type_name) = type_name else {
        return Ok(Value::Map(entries));
    };
    let payload = entries
        .into_iter()
        .find_map(|(k, v)| matches!(&k, Value::Str(k) if k == "_").then_some(v))
        .unwrap_or(Value::Nil);
    let text = |payload: Value| match payload {
        Value::Str(s) => Ok(s),
        _ => Err(DecodeError::BadSpecial { type_name: type_name.clone() }),
    };
    let special = match type_name.as_str() {
        "datetime" => Special::Datetime(text(payload)?),
        "date" => Special::Date(text(payload)?),
        "time" => Special::Time(text(payload)?),
        "Decimal" => Special::Decimal(text(payload)?),
        "UUID" => Special::Uuid(text(payload)?),
        "set" => match payload {
            Value::Array(items) => Special::Set(items),
            _ => return Err(DecodeError::BadSpecial { type_name }),
        },
        "UndefinedType" => Special::Undefined,
        _ => Special::Other { type_name, payload: Box::new(payload) },
    };
    Ok(Value::Special(special))
}

/// Encodes a value the way lymph does (str for text, bin for bytes, smallest integer form, tagged specials).
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    write(&mut out, value);
    out
}

fn write(out: &mut Vec<u8>, value: &Value) {
    use rmp::encode as e;
    // Writing into a Vec cannot fail.
    match value {
        Value::Nil => e::write_nil(out).expect("vec write"),
        Value::Bool(b) => e::write_bool(out, *b).expect("vec write"),
        Value::Int(i) => {
            e::write_sint(out, *i).expect("vec write");
        }
        Value::UInt(u) => {
            e::write_uint(out, *u).expect("vec write");
        }
        Value::Float(f) => e::write_f64(out, *f).expect("vec write"),
        Value::Str(s) => e::write_str(out, s).expect("vec write"),
        Value::Bin(b) => e::write_bin(out, b).expect("vec write"),
        Value::Array(items) => {
            e::write_array_len(out, len32(items.len())).expect("vec write");
            for item in items {
                write(out, item);
            }
        }
        Value::Map(entries) => {
            e::write_map_len(out, len32(entries.len())).expect("vec write");
            for (k, v) in entries {
                write(out, k);
                write(out, v);
            }
        }
        Value::Ext(code, data) => {
            e::write_ext_meta(out, len32(data.len()), *code).expect("vec write");
            out.extend_from_slice(data);
        }
        Value::Special(special) => {
            let (name, payload) = match special {
                Special::Datetime(s) => ("datetime", Value::Str(s.clone())),
                Special::Date(s) => ("date", Value::Str(s.clone())),
                Special::Time(s) => ("time", Value::Str(s.clone())),
                Special::Decimal(s) => ("Decimal", Value::Str(s.clone())),
                Special::Uuid(s) => ("UUID", Value::Str(s.clone())),
                Special::Set(items) => ("set", Value::Array(items.clone())),
                Special::Undefined => ("UndefinedType", Value::Str(String::new())),
                Special::Other { type_name, payload } => (type_name.as_str(), (**payload).clone()),
            };
            e::write_map_len(out, 2).expect("vec write");
            e::write_str(out, "__type__").expect("vec write");
            e::write_str(out, name).expect("vec write");
            e::write_str(out, "_").expect("vec write");
            write(out, &payload);
        }
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("msgpack containers are limited to u32::MAX entries")
}

impl Value {
    /// The type name used in error messages ("map", "str", …).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::UInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bin(_) => "bytes",
            Value::Array(_) => "list",
            Value::Map(_) => "map",
            Value::Ext(..) => "ext",
            Value::Special(_) => "special",
        }
    }

    /// The string, if this is a str.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Converts to JSON for typed parameter decoding: specials become their natural JSON (Decimal → number when
    /// it parses, datetime → text, set → list), bytes → text when UTF-8, else a list of numbers.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Nil => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::Number((*i).into()),
            Value::UInt(u) => J::Number((*u).into()),
            Value::Float(f) => Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Bin(b) => match std::str::from_utf8(b) {
                Ok(s) => J::String(s.to_owned()),
                Err(_) => J::Array(b.iter().map(|x| J::Number((*x).into())).collect()),
            },
            Value::Array(items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Value::Str(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (key, v.to_json())
                    })
                    .collect(),
            ),
            Value::Ext(code, data) => serde_json::json!({"ext": code, "data": data}),
            Value::Special(s) => match s {
                Special::Decimal(d) => {
                    d.parse::<f64>().ok().and_then(Number::from_f64).map_or_else(|| J::String(d.clone()), J::Number)
                }
                Special::Datetime(t) | Special::Date(t) | Special::Time(t) | Special::Uuid(t) => J::String(t.clone()),
                Special::Set(items) => J::Array(items.iter().map(Value::to_json).collect()),
                Special::Undefined => J::Null,
                Special::Other { payload, .. } => payload.to_json(),
            },
        }
    }

    /// Converts JSON (e.g. from `serde_json::to_value` of a reply struct) to a value; integers stay integers.
    pub fn from_json(json: &serde_json::Value) -> Value {
        use serde_json::Value as J;
        match json {
            J::Null => Value::Nil,
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Value::UInt(u)
                } else {
                    Value::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            J::String(s) => Value::Str(s.clone()),
            J::Array(items) => Value::Array(items.iter().map(Value::from_json).collect()),
            J::Object(map) => {
                Value::Map(map.iter().map(|(k, v)| (Value::Str(k.clone()), Value::from_json(v))).collect())
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests of the frame + msgpack decoder (run in CI with a bounded number of cases; raise
    //! `PROPTEST_CASES` to fuzz longer): arbitrary bytes never panic and never allocate beyond their size, and every
    //! value survives an encode/decode round trip.
    use proptest::prelude::*;

    use super::*;
    use crate::wire::Incoming;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            (i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::UInt),
            any::<f64>().prop_filter("NaN never equals itself", |f| !f.is_nan()).prop_map(Value::Float),
            ".{0,40}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bin),
            (
                any::<i8>().prop_filter("101 is embedded msgpack", |c| *c != EXT_EMBEDDED),
                proptest::collection::vec(any::<u8>(), 0..20)
            )
                .prop_map(|(c, d)| Value::Ext(c, d)),
            "[0-9]{1,5}\\.[0-9]{2}".prop_map(|d| Value::Special(Special::Decimal(d))),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec(("[a-z_]{1,8}".prop_map(Value::Str), inner.clone()), 0..8)
                    .prop_filter("`__type__` keys are lymph specials", |kv| !kv
                        .iter()
                        .any(|(k, _)| k.as_str() == Some("__type__")))
                    .prop_map(Value::Map),
                proptest::collection::vec(inner, 0..4).prop_map(|items| Value::Special(Special::Set(items))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_valid_documents_never_panic(v in arb_value(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
            let mut bytes = encode(&v);
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            let _ = decode(&bytes);
        }

        #[test]
        fn values_round_trip(v in arb_value()) {
            prop_assert_eq!(decode(&encode(&v)).unwrap(), v);
        }

        #[test]
        fn arbitrary_frames_never_panic(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..9)) {
            if let Ok(msg) = Incoming::from_frames(frames) {
                let _ = msg.headers();
                let _ = decode(&msg.body);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_verified_lymph_request_body() {
        // `lymph request Raw.hello '{"a":1,"dt":null}'`, captured from the real 0.15 CLI (see lymph-protocol.md).
        let v = decode(b"\x82\xa1a\x01\xa2dt\xc0").unwrap();
        assert_eq!(v, Value::Map(vec![(Value::Str("a".into()), Value::Int(1)), (Value::Str("dt".into()), Value::Nil)]));
    }

    #[test]
    fn decodes_and_reencodes_a_decimal_special() {
        let bytes = b"\x82\xa8__type__\xa7Decimal\xa1_\xa41.50";
        let v = decode(bytes).unwrap();
        assert_eq!(v, Value::Special(Special::Decimal("1.50".into())));
        assert_eq!(encode(&v), bytes.to_vec());
        assert_eq!(v.to_json(), serde_json::json!(1.5));
    }

    #[test]
    fn ext_101_is_an_embedded_document() {
        // ext8, 3 bytes, code 101, containing the str "hi".
        let v = decode(b"\xc7\x03\x65\xa2hi").unwrap();
        assert_eq!(v, Value::Str("hi".into()));
        let other = decode(b"\xd4\x05\x07").unwrap();
        assert_eq!(other, Value::Ext(5, vec![7]));
    }

    #[test]
    fn round_trips_every_kind() {
        let v = Value::Map(vec![
            (Value::Str("n".into()), Value::Nil),
            (Value::Str("b".into()), Value::Bool(true)),
            (Value::Str("neg".into()), Value::Int(-70000)),
            (Value::Str("big".into()), Value::UInt(u64::MAX)),
            (Value::Str("f".into()), Value::Float(1.25)),
            (Value::Str("bin".into()), Value::Bin(vec![0, 255])),
            (Value::Str("set".into()), Value::Special(Special::Set(vec![Value::Int(1)]))),
            (Value::Str("arr".into()), Value::Array(vec![Value::Str("x".repeat(300))])),
        ]);
        assert_eq!(decode(&encode(&v)).unwrap(), v);
    }

    #[test]
    fn rejects_malformed_input_without_allocating_its_claims() {
        assert!(matches!(decode(b""), Err(DecodeError::Truncated { .. })));
        assert!(matches!(decode(b"\xc1"), Err(DecodeError::InvalidMarker { .. })));
        // An array header claiming 4 billion elements in a 5-byte document.
        assert!(matches!(decode(b"\xdd\xff\xff\xff\xff"), Err(DecodeError::Truncated { .. })));
        assert!(matches!(decode(b"\xa2\xff\xfe"), Err(DecodeError::NonUtf8 { .. })));
        assert!(matches!(decode(b"\x01\x02"), Err(DecodeError::Trailing { extra: 1 })));
        let deep = [vec![0x91u8; MAX_DEPTH + 2], vec![0xc0]].concat();
        assert_eq!(decode(&deep), Err(DecodeError::TooDeep));
        let bad_special = b"\x82\xa8__type__\xa3set\xa1_\x01";
        assert!(matches!(decode(bad_special), Err(DecodeError::BadSpecial { .. })));
    }
}

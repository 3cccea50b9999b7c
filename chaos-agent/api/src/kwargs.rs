//! Keyword arguments: a request body as lymph sends it (`method(**body)`), and replies encoded back.

use serde::de::DeserializeOwned;

use crate::{error::RpcError, value::Value};

/// Keyword arguments of a request, in wire order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kwargs(pub Vec<(String, Value)>);

impl Kwargs {
    /// Builds kwargs from a decoded body, which must be a map with text keys.
    ///
    /// # Errors
    /// A `BadRequest` ERROR when the body is not a map of keyword arguments.
    pub fn from_body(body: Value) -> Result<Kwargs, RpcError> {
        match body {
            Value::Map(entries) => entries
                .into_iter()
                .map(|(k, v)| match k {
                    Value::Str(k) => Ok((k, v)),
                    other => Err(RpcError::error(
                        crate::error::ErrorCode::BadRequest,
                        format!("keyword argument names must be strings, got {} {other}", other.kind()),
                    )),
                })
                .collect::<Result<_, _>>()
                .map(Kwargs),
            // lymph calls `method(**None)` for a nil body, which only works for methods without parameters.
            Value::Nil => Ok(Kwargs::default()),
            other => Err(RpcError::error(
                crate::error::ErrorCode::BadRequest,
                format!("the request body must be a map of keyword arguments, got {}", other.kind()),
            )),
        }
    }

    /// Decodes the kwargs into a parameter struct (use `#[serde(deny_unknown_fields)]` on it so unexpected
    /// arguments are refused, as Python refuses them).
    ///
    /// # Errors
    /// A `TypeError` ERROR naming the missing, unexpected or mistyped argument.
    pub fn parse<T: DeserializeOwned>(&self, method: &str) -> Result<T, RpcError> {
        let json = serde_json::Value::Object(self.0.iter().map(|(k, v)| (k.clone(), v.to_json())).collect());
        serde_json::from_value(json).map_err(|err| RpcError::bad_arguments(format!("{method}(): {err}")))
    }

    /// Whether there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Serializes a reply value through JSON (keeps integers as integers, maps with string keys).
///
/// # Errors
/// An `InternalError` ERROR if the value cannot be represented (never for plain data types).
pub fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, RpcError> {
    serde_json::to_value(value).map(|json| Value::from_json(&json)).map_err(|err| {
        RpcError::error(crate::error::ErrorCode::InternalError, format!("cannot encode the reply: {err}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct KillParams {
        name: String,
        #[serde(default)]
        count: Option<u32>,
    }

    #[test]
    fn kwargs_parse_reports_missing_extra_and_mistyped_arguments() {
        let ok = Kwargs(vec![("name".into(), Value::Str("Echo".into()))]);
        assert_eq!(ok.parse::<KillParams>("kill").unwrap(), KillParams { name: "Echo".into(), count: None });

        let missing = Kwargs::default().parse::<KillParams>("kill").unwrap_err();
        assert!(missing.to_string().contains("missing field `name`"), "{missing}");

        let extra = Kwargs(vec![("name".into(), Value::Str("x".into())), ("bogus".into(), Value::Int(1))]);
        assert!(extra.parse::<KillParams>("kill").unwrap_err().to_string().contains("unknown field `bogus`"));

        let mistyped = Kwargs(vec![("name".into(), Value::Int(3))]);
        let err = mistyped.parse::<KillParams>("kill").unwrap_err();
        assert!(matches!(&err, RpcError::Error { type_name, .. } if type_name == "TypeError"), "{err}");
    }

    #[test]
    fn body_must_be_a_map_with_text_keys() {
        assert!(Kwargs::from_body(Value::Array(vec![])).is_err());
        assert!(Kwargs::from_body(Value::Map(vec![(Value::Int(1), Value::Nil)])).is_err());
        assert!(Kwargs::from_body(Value::Nil).unwrap().is_empty());
    }
}

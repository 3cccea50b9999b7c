//! A machine-readable description of the API: methods with their parameters, fault kinds, error codes and the
//! version. It is checked in as `chaos-agent/python/src/lymph_chaos/api.json`, where the Python client checks
//! itself against it; a test here fails when the file and the crate disagree.

use serde_json::{Value as Json, json};

use crate::{
    error::ErrorCode,
    fault::FaultKind,
    method::{COMMON, Method, TARGETING, param_doc},
};

/// Where the description is checked in, relative to the API crate's directory.
pub const API_JSON: &str = "../python/src/lymph_chaos/api.json";

fn param(name: &str, required: bool) -> Json {
    let doc = param_doc(name).expect("every parameter is documented");
    let default = doc.default.map(|d| serde_json::from_str::<Json>(d).expect("defaults are JSON"));
    json!({"name": name, "type": doc.ty, "default": default, "required": required, "help": doc.help})
}

/// The description of the API as JSON (stable key order, so it diffs well).
pub fn describe() -> Json {
    let methods: Vec<Json> = Method::ALL
        .iter()
        .map(|m| {
            let required: &[&str] = match m {
                Method::Revert => &["id"],
                Method::Inject => &["kind"],
                _ => &[],
            };
            json!({
                "name": m.name(),
                "subject": m.subject(),
                "help": m.help(),
                "params": m.params().iter().map(|p| param(p, required.contains(p))).collect::<Vec<_>>(),
            })
        })
        .collect();
    let kinds: Vec<Json> = FaultKind::ALL
        .iter()
        .map(|k| {
            json!({
                "name": k.name(),
                "help": k.help(),
                "network": k.is_network(),
                "lasting": k.is_lasting(),
                "params": k.params(),
                "required": k.required(),
            })
        })
        .collect();
    let errors: Vec<Json> = ErrorCode::ALL.iter().map(|c| json!({"name": c.name(), "help": c.meaning()})).collect();
    json!({
        "service": crate::SERVICE_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "targeting": TARGETING,
        "common": COMMON,
        "methods": methods,
        "fault_kinds": kinds,
        "kind_aliases": {"delay": "latency"},
        "errors": errors,
    })
}

/// The description as the checked-in file holds it (pretty JSON with a final newline).
pub fn describe_text() -> String {
    let mut text = serde_json::to_string_pretty(&describe()).expect("plain JSON");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn checked_in_api_json_matches_the_crate() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(API_JSON);
        let expected = describe_text();
        if std::env::var_os("UPDATE").is_some_and(|v| v == "1") {
            std::fs::write(&path, &expected).expect("writing api.json");
            return;
        }
        let found = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            found == expected,
            "{} is not what chaos-api describes; regenerate it with\n    \
             cargo run -p chaos-api --example write-api-json\n(or UPDATE=1 cargo test -p chaos-api api_json)",
            path.display()
        );
    }
}

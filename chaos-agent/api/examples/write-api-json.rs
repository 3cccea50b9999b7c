//! Writes the API description (`chaos_api::describe`) to `chaos-agent/python/src/lymph_chaos/api.json`.
//!
//! Run after changing a method, a parameter, a fault kind or an error code:
//! `cargo run -p chaos-api --example write-api-json`

fn main() -> std::io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(chaos_api::describe::API_JSON);
    std::fs::write(&path, chaos_api::describe::describe_text())?;
    println!("wrote {}", path.display());
    Ok(())
}

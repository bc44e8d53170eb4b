//! Checking a document against a CRD's schema the way an API server with strict field
//! validation (kubectl's default) does: schema violations (types, enums, ranges, patterns,
//! CEL-free structural rules) and unknown fields, which the API server would otherwise prune
//! silently. `apitree local` reads manifests from files with no API server in between, so it
//! applies the same check before a spec reaches the gate.

use kube::CustomResourceExt;
use serde_json::Value;

use super::ApiGateway;

/// The openAPIV3Schema of a CRD as plain JSON.
pub fn schema_of(
    def: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    def.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| serde_json::to_value(&s.open_api_v3_schema).ok())
        .unwrap_or(Value::Null)
}

/// Problems an API server would report for `doc` against `schema`, each as `path: message`.
pub fn validate(schema: &Value, doc: &Value) -> Vec<String> {
    let mut out = match jsonschema::validator_for(schema) {
        Ok(validator) => validator
            .iter_errors(doc)
            .map(|e| format!("{}: {}", e.instance_path, e))
            .collect(),
        Err(e) => vec![format!("the CRD schema does not compile: {e}")],
    };
    unknown_fields(schema, doc, String::new(), &mut out);
    out
}

/// [`validate`] against the `ApiGateway` CRD generated from the Rust types.
pub fn api_gateway(doc: &Value) -> Vec<String> {
    validate(&schema_of(&ApiGateway::crd()), doc)
}

/// Only the unknown fields of `doc` against `schema`, as `.path.to.field: unknown field`.
pub fn unknown_fields_in(schema: &Value, doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    unknown_fields(schema, doc, String::new(), &mut out);
    out
}

fn unknown_fields(schema: &Value, doc: &Value, path: String, out: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match doc {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            for (k, v) in map {
                let here = format!("{path}.{k}");
                if path.is_empty() && (k == "metadata" || k == "apiVersion" || k == "kind") {
                    continue;
                }
                match (props.and_then(|p| p.get(k)), extra) {
                    (Some(sub), _) => unknown_fields(sub, v, here, out),
                    (None, Some(sub)) if sub.is_object() => unknown_fields(sub, v, here, out),
                    (None, _) => out.push(format!("{here}: unknown field")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    unknown_fields(sub, v, format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

//! Validating documents against a CRD's schema the way an API server with strict field
//! validation would.

use serde_json::Value;

/// The openAPIV3Schema of a CRD as plain JSON.
pub fn schema_of(
    def: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        &def.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema,
    )
    .unwrap()
}

/// Problems an API server would report for `doc`: schema violations, plus unknown fields (which
/// kubectl's default strict field validation refuses and the API server would otherwise prune).
pub fn validate(schema: &Value, doc: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).expect("schema compiles");
    let mut out: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{}: {}", e.instance_path, e))
        .collect();
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

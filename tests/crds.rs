//! The committed CRD files and examples stay true to the Rust types.

use std::path::{Path, PathBuf};

mod common;
use apitree::crd::validate::{schema_of, validate};

use apitree::crd::{self, ApiGateway, CredentialPolicy};
use kube::CustomResourceExt;
use serde_json::Value;

const REGENERATE: &str =
    "run `cargo run -- crds --out crds --out charts/apitree/crds` and commit the result";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crds_match_the_rust_types() {
    for dir in ["crds", "charts/apitree/crds"] {
        for def in crd::all_crds() {
            let path = repo().join(dir).join(crd::crd_file_name(&def));
            let expected = crd::render_crd(&def).unwrap();
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{} is missing; {REGENERATE}", path.display()));
            assert!(
                committed == expected,
                "{} is stale; {REGENERATE}",
                path.display()
            );
        }
    }
}

#[test]
fn crds_are_listed_by_kubectl_get_apitree_with_short_names_and_status() {
    for (def, short) in [
        (ApiGateway::crd(), "agw"),
        (CredentialPolicy::crd(), "credpol"),
    ] {
        let names = &def.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["apitree".to_string()][..])
        );
        assert_eq!(names.short_names.as_deref(), Some(&[short.to_string()][..]));
        let v = &def.spec.versions[0];
        assert!(v
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
    }
    let gw = ApiGateway::crd();
    let cols: Vec<&str> = gw.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["Phase", "Active", "Gate", "Incidents", "Age"]);
}

fn examples() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let dirs = [
        repo().join("examples"),
        repo().join("examples/local"),
        repo().join("examples/agent"),
    ];
    let files = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path());
    for path in files {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in docs {
            if doc.get("apiVersion").and_then(Value::as_str) == Some("apitree.io/v1alpha1") {
                out.push((path.clone(), doc));
            }
        }
    }
    out
}

#[test]
fn every_example_validates_against_the_schema_and_deserializes() {
    let gw_schema = schema_of(&ApiGateway::crd());
    let cp_schema = schema_of(&CredentialPolicy::crd());
    let found = examples();
    let kinds: Vec<&str> = found
        .iter()
        .filter_map(|(_, d)| d["kind"].as_str())
        .collect();
    assert!(
        kinds.iter().filter(|k| **k == "ApiGateway").count() >= 2,
        "want a minimal and a complete ApiGateway"
    );
    assert!(kinds.contains(&"CredentialPolicy"));
    for (path, doc) in found {
        let where_ = path.display();
        match doc["kind"].as_str() {
            Some("ApiGateway") => {
                let problems = validate(&gw_schema, &doc);
                assert!(problems.is_empty(), "{where_}: {problems:#?}");
                let gw: ApiGateway =
                    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{where_}: {e}"));
                assert_eq!(gw.spec.problems(), vec![], "{where_}");
            }
            Some("CredentialPolicy") => {
                let problems = validate(&cp_schema, &doc);
                assert!(problems.is_empty(), "{where_}: {problems:#?}");
                let cp: CredentialPolicy =
                    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{where_}: {e}"));
                assert_eq!(cp.spec.problems(), vec![], "{where_}");
            }
            other => panic!("{where_}: unexpected kind {other:?}"),
        }
    }
}

fn minimal_gateway() -> Value {
    let text = std::fs::read_to_string(Path::new(&repo()).join("examples/apigateway-minimal.yaml"))
        .unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Breaks a valid document in one place.
type Mutation = fn(&mut Value);

#[test]
fn schema_refuses_typos_bad_enums_ranges_and_durations() {
    let schema = schema_of(&ApiGateway::crd());
    let cases: Vec<(&str, Mutation)> = vec![
        ("/spec/proxy/routes/0/pii", |d| {
            d["spec"]["proxy"]["routes"][0]["pii"] = "redact".into()
        }),
        ("/spec/replicas", |d| d["spec"]["replicas"] = 0.into()),
        ("/spec/gate/observationWindow", |d| {
            d["spec"]["gate"] = serde_json::json!({"observationWindow": "5 minutes"})
        }),
        ("/spec/proxy/routes/0/pathPrefix", |d| {
            d["spec"]["proxy"]["routes"][0]["pathPrefix"] = "forecast".into()
        }),
        (".spec.proxy.routes[0].upstreamUrl: unknown field", |d| {
            d["spec"]["proxy"]["routes"][0]["upstreamUrl"] = "http://x/".into()
        }),
        ("/spec/proxy/routes/0/probe/expectStatus", |d| {
            d["spec"]["proxy"]["routes"][0]["probe"] =
                serde_json::json!({"path": "/health", "expectStatus": 99})
        }),
        ("/spec/proxy/routes/0/probe/path", |d| {
            d["spec"]["proxy"]["routes"][0]["probe"] = serde_json::json!({"path": ""})
        }),
    ];
    for (want, mutate) in cases {
        let mut doc = minimal_gateway();
        mutate(&mut doc);
        let problems = validate(&schema, &doc);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "expected a problem at {want}, got {problems:#?}"
        );
    }
}

#[test]
fn cross_field_rules_are_in_the_schema_and_in_rust() {
    let text = serde_json::to_string(&ApiGateway::crd()).unwrap();
    assert!(text.contains("self.thresholds.warning < self.thresholds.high"));
    let mut doc = minimal_gateway();
    doc["spec"]["detection"] =
        serde_json::json!({"thresholds": {"warning": 5, "high": 5, "critical": 10}});
    doc["spec"]["proxy"]["routes"][0]["tier"] = "gold".into();
    let gw: ApiGateway = serde_json::from_value(doc).unwrap();
    let paths: Vec<String> = gw.spec.problems().into_iter().map(|p| p.path).collect();
    assert_eq!(
        paths,
        ["spec.detection.thresholds", "spec.proxy.routes[0].tier"]
    );
}

/// A route's probe stays on its upstream: a path (below the upstream's path, or from its host),
/// never a URL elsewhere; anything else is a spec problem naming the field.
#[test]
fn a_probe_path_that_leaves_its_upstream_is_a_spec_problem() {
    let cases = [
        ("health", None),
        ("/health", None),
        ("../status?deep=1", None),
        (
            "http://elsewhere.example/health",
            Some("leaves the upstream"),
        ),
        ("//elsewhere.example/health", Some("leaves the upstream")),
        (
            "https://upstream.example/health",
            Some("leaves the upstream"),
        ),
        (
            "http://upstream.example:8080/health",
            Some("leaves the upstream"),
        ),
    ];
    for (path, want) in cases {
        let mut doc = minimal_gateway();
        doc["spec"]["proxy"]["routes"][0]["upstream"] = "http://upstream.example/v1/".into();
        doc["spec"]["proxy"]["routes"][0]["probe"] = serde_json::json!({"path": path});
        let gw: ApiGateway = serde_json::from_value(doc).unwrap();
        let problems = gw.spec.problems();
        match want {
            None => assert_eq!(problems, vec![], "{path}"),
            Some(text) => {
                assert_eq!(problems.len(), 1, "{path}: {problems:?}");
                assert_eq!(problems[0].path, "spec.proxy.routes[0].probe.path");
                assert!(problems[0].message.contains(text), "{path}: {problems:?}");
            }
        }
    }
}

/// A probe waits between 1 ms and 60 s: a longer one would hold the sweep of its gateway (and a
/// zero one would make the upstream look down for ever).
#[test]
fn a_probe_timeout_outside_one_millisecond_to_a_minute_is_a_spec_problem() {
    for (timeout, ok) in [
        ("1ms", true),
        ("5s", true),
        ("60s", true),
        ("0s", false),
        ("61s", false),
        ("24h", false),
    ] {
        let mut doc = minimal_gateway();
        doc["spec"]["proxy"]["routes"][0]["probe"] =
            serde_json::json!({"path": "/health", "timeout": timeout});
        let gw: ApiGateway = serde_json::from_value(doc).unwrap();
        let paths: Vec<String> = gw.spec.problems().into_iter().map(|p| p.path).collect();
        let want: Vec<String> = if ok {
            vec![]
        } else {
            vec!["spec.proxy.routes[0].probe.timeout".into()]
        };
        assert_eq!(paths, want, "{timeout}");
    }
}

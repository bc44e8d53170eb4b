//! The operator's Prometheus metrics (`apitree_operator_*`). Labels come from closed sets:
//! results, error categories, gate outcomes, phases.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct OperatorMetrics {
    pub registry: Registry,
    /// Reconcile passes by result (`ok`, `error`, `invalid_spec`).
    pub reconciles: IntCounterVec,
    /// Failed operations by category (the Event reason).
    pub errors: IntCounterVec,
    /// Finished gate runs by outcome (`promoted`, `rejected`, `rolled_back`).
    pub gate_results: IntCounterVec,
    /// Gateways per phase.
    pub phases: IntGaugeVec,
    /// Open incidents by severity, over all gateways.
    pub open_incidents: IntGaugeVec,
    /// Tracked credentials by state (due, overdue, in_grace), over all CredentialPolicies.
    pub credentials: IntGaugeVec,
    pub reconcile_duration: Histogram,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let reconciles = counter(
            "apitree_operator_reconciles_total",
            "Reconcile passes by result.",
            "result",
        );
        let errors = counter(
            "apitree_operator_errors_total",
            "Failed operations by category.",
            "category",
        );
        let gate_results = counter(
            "apitree_operator_gate_results_total",
            "Finished gate runs by outcome.",
            "outcome",
        );
        let phases = IntGaugeVec::new(
            Opts::new("apitree_operator_gateways", "Gateways per phase."),
            &["phase"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(phases.clone()))
            .expect("unique metric");
        let open_incidents = IntGaugeVec::new(
            Opts::new(
                "apitree_operator_open_incidents",
                "Open incidents by severity (warning, high, critical), over all gateways.",
            ),
            &["severity"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(open_incidents.clone()))
            .expect("unique metric");
        for s in ["warning", "high", "critical"] {
            open_incidents.with_label_values(&[s]).set(0);
        }
        let credentials = IntGaugeVec::new(
            Opts::new(
                "apitree_operator_credentials",
                "Tracked credentials by state (due, overdue, in_grace), over all CredentialPolicies.",
            ),
            &["state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(credentials.clone()))
            .expect("unique metric");
        for s in ["due", "overdue", "in_grace"] {
            credentials.with_label_values(&[s]).set(0);
        }
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "apitree_operator_reconcile_duration_seconds",
                "Time one reconcile pass of one gateway took.",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(reconcile_duration.clone()))
            .expect("unique metric");
        Self {
            registry,
            reconciles,
            errors,
            gate_results,
            phases,
            open_incidents,
            credentials,
            reconcile_duration,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

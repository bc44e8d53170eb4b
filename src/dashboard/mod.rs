//! The status page the operator and `apitree local` serve on `/`: every gateway with its phase,
//! revisions, gate checks with their values, open incidents and an error-rate sparkline. The page
//! is static HTML that reads `/api/gateways` every 10 seconds and redraws in place. The view
//! types here are what the page reads; the operator fills them (`Managed::view`).

use serde::Serialize;

use crate::crd::gateway::{GateCheckStatus, IncidentSummary};
use crate::gate::GateRun;

/// One gateway as the page shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    pub name: String,
    pub phase: String,
    pub active_color: Option<String>,
    pub active_revision: Option<String>,
    pub preview_revision: Option<String>,
    pub previous_revision: Option<String>,
    pub gate_revision: Option<String>,
    pub gate_progress: Option<String>,
    pub checks: Vec<GateCheckStatus>,
    pub rejected: Option<String>,
    pub incidents: Vec<IncidentSummary>,
    /// Gateway-wide error ratio per detection window, oldest first.
    pub error_ratios: Vec<f64>,
    pub runs: Vec<GateRun>,
    pub events: Vec<EventView>,
    pub url: Option<String>,
    /// Connector Agents of the gateway's pools (`status.connectors`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connectors: Vec<crate::crd::gateway::ConnectorStatus>,
}

/// One Event as the page lists it, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub at: String,
    pub reason: String,
    pub message: String,
    pub warning: bool,
}

/// The page. Everything dynamic is filled in by its script from `/api/gateways`; values are
/// inserted as text nodes, never as HTML, so nothing in a spec or an event can inject markup.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>apitree status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2733; background: #f6f8fa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  .muted { color: #667; }
  .gw { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 1rem; margin: 1rem 0; }
  .gw h2 { font-size: 1.1rem; margin: 0 0 .5rem; display: flex; gap: .6rem; align-items: center; }
  .phase { font-size: .8rem; padding: .1rem .5rem; border-radius: 999px; background: #e7edf3; }
  .phase.Stable { background: #dcf5e3; } .phase.Rejected, .phase.RolledBack, .phase.Degraded { background: #fde2e1; }
  .phase.Gating, .phase.Promoting, .phase.AwaitingApproval, .phase.Progressing { background: #fff3cd; }
  table { border-collapse: collapse; width: 100%; margin: .4rem 0; }
  th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #eef1f4; vertical-align: top; }
  th { font-weight: 600; color: #445; }
  .Passed { color: #1a7f37; } .Failed { color: #cf222e; } .Inconclusive { color: #9a6700; }
  .Running { color: #0969da; } .Skipped, .Pending, .Cancelled { color: #667; }
  .sev-critical { color: #cf222e; font-weight: 600; } .sev-high { color: #bc4c00; } .sev-warning { color: #9a6700; }
  svg.spark { vertical-align: middle; }
  code { font-size: .9em; }
</style>
</head>
<body>
<h1>apitree</h1>
<div class="muted">Gateways, their gates and incidents. Refreshes every 10 s. <span id="updated"></span></div>
<div id="gateways"><p class="muted">Loading…</p></div>
<script>
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
function spark(values) {
  const ns = "http://www.w3.org/2000/svg", w = 180, h = 28;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("width", w); svg.setAttribute("height", h);
  svg.setAttribute("aria-label", "error ratio per window");
  if (values.length > 1) {
    const max = Math.max(0.01, ...values);
    const pts = values.map((v, i) => (i * w / (values.length - 1)).toFixed(1) + "," + (h - 2 - v / max * (h - 4)).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#0969da"); line.setAttribute("stroke-width", "1.5");
    svg.append(line);
  }
  return svg;
}
function pct(v) { return (v * 100).toFixed(2) + "%"; }
function render(gws) {
  const root = document.getElementById("gateways");
  root.replaceChildren();
  if (!gws.length) root.append(el("p", {class: "muted"}, "No gateways yet."));
  for (const g of gws) {
    const card = el("section", {class: "gw", "data-gateway": g.name});
    const last = g.errorRatios.length ? pct(g.errorRatios[g.errorRatios.length - 1]) : "–";
    card.append(el("h2", {}, g.name, el("span", {class: "phase " + g.phase}, g.phase),
      spark(g.errorRatios), el("span", {class: "muted"}, "errors " + last)));
    card.append(el("div", {}, "active ", el("code", {}, g.activeRevision || "–"),
      g.activeColor ? " on " + g.activeColor : "",
      g.previewRevision ? " · preview " : "", g.previewRevision ? el("code", {}, g.previewRevision) : "",
      g.previousRevision ? " · warm " : "", g.previousRevision ? el("code", {}, g.previousRevision) : "",
      g.url ? " · " : "", g.url ? el("a", {href: g.url}, g.url) : ""));
    if (g.rejected) card.append(el("div", {class: "Failed"}, "rejected " + g.rejected));
    if (g.checks.length) {
      const t = el("table", {class: "checks"}, el("tr", {}, el("th", {}, "check"), el("th", {}, "phase"),
        el("th", {}, "observed"), el("th", {}, "threshold"), el("th", {}, "reason")));
      for (const c of g.checks) t.append(el("tr", {}, el("td", {}, c.name), el("td", {class: c.phase}, c.phase),
        el("td", {}, c.observed || ""), el("td", {}, c.threshold || ""), el("td", {}, c.reason || "")));
      card.append(el("div", {class: "muted"}, "gate " + (g.gateProgress || "") + " for ", el("code", {}, g.gateRevision || "")), t);
    }
    if (g.incidents.length) {
      const t = el("table", {class: "incidents"}, el("tr", {}, el("th", {}, "incident"), el("th", {}, "route"),
        el("th", {}, "severity"), el("th", {}, "score"), el("th", {}, "since"), el("th", {}, "acknowledged")));
      for (const i of g.incidents) t.append(el("tr", {}, el("td", {}, i.signal), el("td", {}, i.route || "all"),
        el("td", {class: "sev-" + i.severity}, i.severity), el("td", {}, i.ratio == null ? "" : i.ratio.toFixed(1) + "x"),
        el("td", {}, i.openedAt), el("td", {}, i.acknowledgedBy ? "by " + i.acknowledgedBy : "no")));
      card.append(t);
    } else card.append(el("div", {class: "muted"}, "no open incidents"));
    if (g.events.length) {
      const ul = el("ul", {class: "events"});
      for (const e of g.events.slice(0, 6)) ul.append(el("li", {class: e.warning ? "Failed" : ""}, e.at + " " + e.reason + ": " + e.message));
      card.append(ul);
    }
    root.append(card);
  }
  document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
}
async function refresh() {
  try {
    const token = sessionStorage.getItem("apitree.token");
    const r = await fetch("api/gateways", token ? {headers: {Authorization: "Bearer " + token}} : {});
    const data = await r.json();
    if (!r.ok) {
      document.getElementById("updated").textContent = data.error + " (" + data.code + ")";
      if (r.status === 401 && !window.askedForToken) {
        window.askedForToken = true;
        const t = window.prompt("Console session token (from POST /api/v1/session)");
        if (t) { sessionStorage.setItem("apitree.token", t.trim()); refresh(); }
      }
      return;
    }
    render(data);
  }
  catch (e) { document.getElementById("updated").textContent = "Cannot reach the operator: " + e; }
}
refresh();
setInterval(refresh, 10000);
</script>
</body>
</html>
"##;

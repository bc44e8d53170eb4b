// The console's page: plain JavaScript, no build step, no third-party origin. Every value from
// the server is written with textContent, never as HTML. The session token lives in
// sessionStorage (gone with the tab) and is sent as a Bearer header.
"use strict";

const PAGES = [
  ["keys", "Keys", "keys.create"],
  ["apis", "APIs", "apis.write"],
  ["credentials", "Credentials", "credentials.byok"],
  ["users", "Users", "users.list"],
  ["credits", "Credits", "credits.adjust"],
  ["audit", "Audit", "audit.read"],
  ["ops", "Customer operations", "personal_data.erase"],
];

let me = null;
// Where each API sends a BYOK secret, as last shown to this person: a write expects it.
let shownOrigins = {};

const $ = (id) => document.getElementById(id);

function showError(text) {
  const e = $("error");
  e.textContent = text || "";
  e.hidden = !text;
}

async function call(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem("apitree.token");
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch("/api/v1/" + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401 && path !== "session") signOut();
  if (!resp.ok) throw new Error((data.error || resp.statusText) + " (" + (data.code || resp.status) + ", request " + (data.request_id || "?") + ")");
  return data;
}

function row(tbody, cells, extra) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  if (extra) { const td = document.createElement("td"); td.appendChild(extra); tr.appendChild(td); }
  tbody.appendChild(tr);
}

function clear(id) { const b = document.querySelector("#" + id + " tbody"); b.replaceChildren(); return b; }

function signOut() {
  sessionStorage.removeItem("apitree.token");
  me = null;
  $("signin").hidden = false;
  $("tabs").hidden = true;
  $("signout").hidden = true;
  $("mydata").hidden = true;
  $("who").textContent = "";
  for (const p of document.querySelectorAll(".page")) p.hidden = true;
}

async function start() {
  try {
    me = await call("GET", "me");
  } catch (e) { signOut(); return; }
  $("signin").hidden = true;
  $("signout").hidden = false;
  $("mydata").hidden = false;
  $("who").textContent = me.user.email + " (" + me.user.role + ")";
  const tabs = $("tabs");
  tabs.replaceChildren();
  const allowed = PAGES.filter(([, , action]) => me.actions.includes(action));
  for (const [id, label] of allowed) {
    const b = document.createElement("button");
    b.textContent = label;
    b.id = "tab-" + id;
    b.addEventListener("click", () => open(id));
    tabs.appendChild(b);
  }
  tabs.hidden = false;
  if (allowed.length) open(allowed[0][0]);
}

async function orgsInto(select) {
  const { orgs } = await call("GET", "orgs");
  select.replaceChildren();
  for (const o of orgs) {
    const opt = document.createElement("option");
    opt.value = o.id; opt.textContent = o.name;
    select.appendChild(opt);
  }
}

const LOAD = {
  async keys() {
    const { keys } = await call("GET", "orgs/" + me.user.org + "/keys");
    const body = clear("keys");
    for (const k of keys) {
      const state = k.revoked_at ? "revoked" : k.grace_until ? "rotated" : "active";
      let button = null;
      if (state === "active") {
        button = document.createElement("button");
        button.textContent = "Revoke";
        button.addEventListener("click", () => act(async () => {
          await call("POST", "orgs/" + me.user.org + "/keys/" + k.id + "/revoke");
          await LOAD.keys();
        }));
      }
      const today = k.daily_quota ? k.today + " of " + k.daily_quota + " (" + k.quota_left + " left)" : String(k.today);
      row(body, [k.prefix, k.name, k.scope, k.created_at, today, state], button);
    }
  },
  async apis() {
    const { apis } = await call("GET", "orgs/" + me.user.org + "/apis");
    const body = clear("apis");
    for (const a of apis) row(body, [a.name, a.path_prefix, a.upstream_url, a.updated_at]);
  },
  async credentials() {
    const { credentials } = await call("GET", "orgs/" + me.user.org + "/credentials");
    const body = clear("creds");
    // A BYOK credential is sent only to the server it was written for: after the API moves,
    // the gateway holds it back until it is written again.
    for (const c of credentials) {
      if (c.kind === "byok" && c.api_goes_to) shownOrigins[c.api] = c.api_goes_to;
      const state = !c.upstream_changed ? "in use"
        : "held back: the API now sends to " + (c.api_goes_to || "an unusable upstream") + "; write it again to send it there";
      row(body, [c.name, c.api || "", c.kind, c.key_version, c.updated_at, c.sent_to || "", state]);
    }
  },
  async users() {
    await orgsInto($("invite-org"));
    const { users } = await call("GET", "users");
    const body = clear("users");
    for (const u of users) row(body, [u.email, u.role, u.org, u.disabled ? "disabled" : u.invited ? "invited" : "active"]);
  },
  async credits() {
    const sel = $("credit-org");
    if (!sel.options.length) await orgsInto(sel);
    if (!sel.value) return;
    const c = await call("GET", "orgs/" + sel.value + "/credits");
    $("balance").textContent = String(c.balance);
    const body = clear("ledger");
    for (const e of c.ledger) row(body, [e.at, e.amount, e.reason, e.actor]);
  },
  async ops() {
    const { requests } = await call("GET", "dsar/requests");
    const body = clear("dsar");
    for (const r of requests) {
      const outcome = Object.entries(r.outcome.sections || r.outcome)
        .filter(([k]) => k !== "user_id").map(([k, v]) => k + " " + v).join(", ");
      row(body, [r.at, r.kind, r.state, r.email || r.subject, r.actor_name || r.actor,
        r.done_at || "", r.done_by_name || r.done_by || "", r.reason || "", outcome]);
    }
  },
  async audit() {
    const { entries } = await call("GET", "audit?limit=100");
    const body = clear("audit");
    for (const e of entries) row(body, [e.id, e.at, e.actor_email || e.actor_name || e.actor, e.action, e.target]);
  },
};

async function act(fn) {
  showError("");
  try { await fn(); } catch (e) { showError(e.message); }
}

function open(id) {
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-" + id;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.id === "tab-" + id);
  act(() => LOAD[id]());
}

// Saves `doc` as a JSON file the browser downloads (a data subject export).
function download(name, doc) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" }));
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

// The person the Customer operations form names: their id (from the user list) and the other
// identities given for them.
async function opsPerson() {
  const email = $("ops-email").value.trim().toLowerCase();
  const { users } = await call("GET", "users");
  const u = users.find((x) => x.email.toLowerCase() === email);
  if (!u) throw new Error("there is no user with the email " + email);
  const ids = $("ops-identities").value.split(/[\s,]+/).filter(Boolean);
  const query = ids.map((h) => "identity=" + encodeURIComponent(h)).join("&");
  return { u, query: query ? "?" + query : "" };
}

// The footer: where security reports and data protection requests go.
async function contacts() {
  const c = await call("GET", "contacts").catch(() => ({}));
  const footer = $("contacts");
  footer.replaceChildren();
  for (const [label, addr] of [["Security reports", c.security], ["Data protection requests", c.privacy]]) {
    const span = document.createElement("span");
    span.append(label + ": ");
    if (addr) {
      const a = document.createElement("a");
      a.href = addr.startsWith("https://") ? addr : "mailto:" + addr;
      a.textContent = addr;
      span.appendChild(a);
    } else {
      span.append("ask your administrator");
    }
    footer.appendChild(span);
  }
}

function onSubmit(id, fn) {
  $(id).addEventListener("submit", (ev) => { ev.preventDefault(); act(fn); });
}

document.addEventListener("DOMContentLoaded", () => {
  onSubmit("signin-form", async () => {
    const s = await call("POST", "session", { email: $("email").value, password: $("password").value });
    $("password").value = "";
    sessionStorage.setItem("apitree.token", s.token);
    await start();
  });
  $("signout").addEventListener("click", signOut);
  onSubmit("key-form", async () => {
    const k = await call("POST", "orgs/" + me.user.org + "/keys", { name: $("key-name").value, scope: $("key-scope").value });
    const shown = $("key-shown");
    shown.textContent = "New key (shown once): " + k.key;
    shown.hidden = false;
    await LOAD.keys();
  });
  onSubmit("api-form", async () => {
    await call("POST", "orgs/" + me.user.org + "/apis", { name: $("api-name").value, path_prefix: $("api-path").value, upstream_url: $("api-url").value });
    await LOAD.apis();
  });
  onSubmit("cred-form", async () => {
    const api = $("cred-api").value, kind = $("cred-kind").value;
    const shown = $("cred-shown");
    const body = { api, name: $("cred-name").value, value: $("cred-value").value, kind };
    if (kind === "byok") {
      // A secret goes to the API's server: say which before the first write.
      if (!shownOrigins[api]) {
        const { origin } = await call("GET", "orgs/" + me.user.org + "/credentials/origin?api=" + encodeURIComponent(api));
        if (!origin) throw new Error("API " + api + " has no upstream the gateway can use now; try again later");
        shownOrigins[api] = origin;
        shown.textContent = "Your secret for " + api + " will be sent to " + origin + ". Press Store credential again to store it.";
        shown.hidden = false;
        return;
      }
      body.expect_origin = shownOrigins[api];
    }
    let stored;
    try {
      stored = await call("POST", "orgs/" + me.user.org + "/credentials", body);
    } catch (e) {
      delete shownOrigins[api];  // moved: the next press shows where it goes now
      throw e;
    }
    $("cred-value").value = "";
    shown.textContent = stored.sent_to ? "Stored: sent only to " + stored.sent_to : "Stored.";
    shown.hidden = false;
    await LOAD.credentials();
  });
  onSubmit("invite-form", async () => {
    const role = $("invite-role").value;
    const body = { email: $("invite-email").value, role };
    if (role === "buyer" || role === "seller") body.org = $("invite-org").value;
    const i = await call("POST", "users", body);
    const shown = $("invite-shown");
    shown.textContent = "Invitation (shown once): " + i.invitation;
    shown.hidden = false;
    await LOAD.users();
  });
  $("credit-org").addEventListener("change", () => act(LOAD.credits));
  onSubmit("credit-form", async () => {
    await call("POST", "orgs/" + $("credit-org").value + "/credits", { amount: Number($("credit-amount").value), reason: $("credit-reason").value });
    await LOAD.credits();
  });
  $("mydata").addEventListener("click", () => act(async () => {
    const doc = await call("GET", "users/" + me.user.id + "/export");
    download("apitree-my-data.json", doc);
  }));
  // A request as it arrives (an email, a ticket): open in the queue until carried out.
  onSubmit("ops-log-form", async () => {
    const { u } = await opsPerson();
    await call("POST", "dsar/requests", { user: u.id, kind: $("ops-log-kind").value, note: $("ops-log-note").value });
    $("ops-log-note").value = "";
    await LOAD.ops();
  });
  onSubmit("ops-form", async () => {
    const { u, query } = await opsPerson();
    const doc = await call("GET", "users/" + u.id + "/export" + query);
    download("apitree-export-" + u.id + ".json", doc);
    const shown = $("ops-shown");
    shown.textContent = "Exported " + u.email + " (" + doc.audit.length + " audit rows, " + doc.api_keys.length + " keys).";
    shown.hidden = false;
    await LOAD.ops();
  });
  // Erasure takes two steps: the first names what will happen, the second needs the email
  // typed again.
  $("ops-erase").addEventListener("click", () => act(async () => {
    const { u } = await opsPerson();
    $("ops-confirm-what").textContent = "Erase " + u.email + " (" + u.role + ")? Their keys are revoked, their BYOK credentials removed, their profile overwritten. This cannot be undone: export first.";
    $("ops-confirm").hidden = false;
  }));
  onSubmit("ops-confirm-form", async () => {
    const { u, query } = await opsPerson();
    if ($("ops-confirm-email").value.trim().toLowerCase() !== u.email.toLowerCase()) {
      throw new Error("type the email of the person to erase to confirm");
    }
    const done = await call("POST", "users/" + u.id + "/erase" + query, { reason: $("ops-reason").value, confirm: u.id });
    $("ops-confirm").hidden = true;
    $("ops-confirm-email").value = "";
    const shown = $("ops-shown");
    shown.textContent = "Erased: " + Object.entries(done.report).map(([k, v]) => k + " " + v).join(", ");
    shown.hidden = false;
    await LOAD.ops();
  });
  contacts();
  if (sessionStorage.getItem("apitree.token")) start(); else signOut();
});

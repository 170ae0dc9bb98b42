// Slicer's web console: one page, hash routes, the daemon's own API (same origin, session cookie).
import { Shell, copyText } from "./terminal.js";

const $ = (id) => document.getElementById(id);
const VM_REFRESH_MS = 3000;
const STATS_EVERY = 2;  // stats (which ask every agent) on every second VM refresh
const LONG_WAIT = "180s";

// -- small helpers --------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setText(node, text) {
  const value = text === undefined || text === null ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function fmtBytes(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n), i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

function fmtDate(s) {
  if (!s) return "—";
  const d = new Date(s);
  if (Number.isNaN(d.getTime())) return String(s);
  const p = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function splitTags(text) {
  return text.split(",").map((t) => t.trim()).filter(Boolean);
}

function b64(bytes) {
  let out = "";
  for (let i = 0; i < bytes.length; i += 0x8000) out += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(out);
}

function statusClass(status) {
  return `badge status-${String(status || "unknown").toLowerCase()}`;
}

const enc = encodeURIComponent;

// -- the API --------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim(), code = "";
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      message = body.error || (typeof body.detail === "string" ? body.detail : message);
      code = body.code || "";
    } catch {
      if (text) message = text.slice(0, 500);
    }
  } catch { /* no body */ }
  return new ApiError(response.status, message, code);
}

async function api(path, { method = "GET", json, body, headers = {}, raw = false, signal } = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin", cache: "no-store", signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "the daemon does not answer", "network");
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && !path.startsWith("/ui/session")) sessionLost(error.message);
    throw error;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// -- messages and progress --------------------------------------------------------------------------
const tasks = new Map();
let taskSeq = 0, lastNote = "", noteTimer = 0;

function renderStatus() {
  const box = $("status");
  box.replaceChildren();
  const now = Date.now();
  for (const t of tasks.values()) {
    const secs = Math.floor((now - t.start) / 1000);
    box.append(el("div", { class: "task" }, el("span", { class: "spinner", "aria-hidden": "true" }),
      `${t.text}…${secs >= 1 ? ` ${secs}s` : ""}`));
  }
  if (lastNote) box.append(el("div", { class: "note" }, lastNote));
  box.hidden = !tasks.size && !lastNote;
}

setInterval(() => { if (tasks.size) renderStatus(); }, 1000);

function note(text) {
  lastNote = text;
  clearTimeout(noteTimer);
  noteTimer = setTimeout(() => { lastNote = ""; renderStatus(); }, 8000);
  renderStatus();
}

function startTask(text) {
  const id = ++taskSeq;
  const task = { text, start: Date.now() };
  tasks.set(id, task);
  renderStatus();
  const end = () => { tasks.delete(id); renderStatus(); };
  end.update = (more) => { task.text = more; renderStatus(); };
  return end;
}

function showError(context, error) {
  const message = error instanceof Error ? error.message : String(error);
  setText($("alert-text"), context ? `${context}: ${message}` : message);
  $("alert").hidden = false;
}

function clearError() {
  $("alert").hidden = true;
}

$("alert-close").addEventListener("click", clearError);

// Runs fn with the button marked busy and a progress line; errors go to the alert with the API's words.
async function run(button, progressText, fn, { done, context } = {}) {
  const buttons = Array.isArray(button) ? button : [button].filter(Boolean);
  for (const b of buttons) { b.disabled = true; b.setAttribute("aria-busy", "true"); b.classList.add("busy"); }
  const end = startTask(progressText);
  try {
    const result = await fn(end.update);
    clearError();
    if (done) note(typeof done === "function" ? done(result) : done);
    return result;
  } catch (e) {
    if (e.name !== "AbortError") showError(context || progressText, e);
    return undefined;
  } finally {
    end();
    for (const b of buttons) { b.disabled = false; b.removeAttribute("aria-busy"); b.classList.remove("busy"); }
  }
}

// A destructive button asks once more: the first click turns it into "Confirm …" for a few seconds.
function confirmButton(label, accessible, action) {
  const button = el("button", { type: "button", class: "btn small danger-outline", "aria-label": accessible, text: label });
  let armed = 0;
  button.addEventListener("click", () => {
    if (!armed) {
      button.textContent = `Confirm ${label.toLowerCase()}`;
      button.setAttribute("aria-label", `Confirm ${accessible.charAt(0).toLowerCase()}${accessible.slice(1)}`);
      button.classList.add("armed");
      armed = setTimeout(() => {
        armed = 0;
        button.textContent = label;
        button.setAttribute("aria-label", accessible);
        button.classList.remove("armed");
      }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = 0;
    button.textContent = label;
    button.setAttribute("aria-label", accessible);
    button.classList.remove("armed");
    action(button);
  });
  return button;
}

// -- session ----------------------------------------------------------------------------------------
const session = { auth: true, signedIn: false };

function showView(id) {
  for (const v of document.querySelectorAll("main > .view")) v.hidden = v.id !== id;
}

function setSignedIn(on) {
  session.signedIn = on;
  document.body.classList.toggle("signed-in", on);
  $("nav").hidden = !on;
  $("menu-toggle").hidden = !on;
  $("sign-out").hidden = !on || !session.auth;
}

function showSignIn(message) {
  stopAll();
  setSignedIn(false);
  showView("view-signin");
  const err = $("signin-error");
  err.hidden = !message;
  setText(err, message || "");
  $("token").focus();
}

function sessionLost(message) {
  if (!session.signedIn || !session.auth) return;
  showSignIn(`Signed out: ${message}`);
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = $("signin-button");
  const token = $("token").value.trim();
  $("signin-error").hidden = true;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await api("/ui/session", { method: "POST", json: { token } });
    $("token").value = "";
    setSignedIn(true);
    route();
  } catch (error) {
    $("token").select();
    setText($("signin-error"), error.message);
    $("signin-error").hidden = false;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
});

$("sign-out").addEventListener("click", async () => {
  try {
    await api("/ui/session", { method: "DELETE" });
  } catch (e) {
    showError("Sign out", e);
  }
  clearError();
  showSignIn("");
});

$("menu-toggle").addEventListener("click", () => {
  const open = !document.body.classList.contains("nav-open");
  document.body.classList.toggle("nav-open", open);
  $("menu-toggle").setAttribute("aria-expanded", String(open));
});

function setConn(ok) {
  const c = $("conn");
  c.className = `conn ${ok ? "ok" : "down"}`;
  setText(c, ok ? "live" : "offline");
}

// -- routing ----------------------------------------------------------------------------------------
let current = null;  // {leave()} of the view shown

function stopAll() {
  if (current && current.leave) current.leave();
  current = null;
  vmView.close();
}

function route() {
  if (!session.signedIn) return;
  document.body.classList.remove("nav-open");
  clearError();
  $("menu-toggle").setAttribute("aria-expanded", "false");
  const hash = location.hash.replace(/^#\/?/, "");
  const parts = hash.split("/").map((p) => decodeURIComponent(p));
  const section = parts[0] || "vms";
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.section === (section === "vm" ? "vms" : section)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const views = { vms: vmsView, secrets: secretsView, groups: groupsView, storage: storageView, info: infoView };
  let next = views[section];
  if (section === "vm" && parts[1]) next = vmView;
  if (current && current !== next && current.leave) current.leave();
  if (next !== vmView) vmView.close();
  if (!next) {
    current = null;
    showView("view-notfound");
    return;
  }
  current = next;
  next.enter(parts.slice(1));
}

window.addEventListener("hashchange", route);

// -- VM actions: which the node's state allows ------------------------------------------------------
const ACTIONS = {
  pause: { label: "Pause", states: ["Running"], progress: "Pausing", done: "paused" },
  resume: { label: "Resume", states: ["Paused"], progress: "Resuming", done: "resumed" },
  suspend: { label: "Suspend", states: ["Running", "Paused"], progress: "Suspending", done: "suspended" },
  restore: { label: "Restore", states: ["Suspended"], progress: "Restoring", done: "restored", query: `?wait=agent&timeout=${LONG_WAIT}` },
  relaunch: { label: "Relaunch", states: ["Stopped", "Crashed", "Suspended", "Stopping"], progress: "Relaunching",
    done: "relaunched", query: `?wait=agent&timeout=${LONG_WAIT}` },
  fork: { label: "Fork", states: ["Running", "Paused"], progress: "Forking", query: `?wait=agent&timeout=${LONG_WAIT}`,
    json: { count: 1 } },
  shutdown: { label: "Shutdown", states: ["Starting", "Running", "Paused"], progress: "Shutting down", done: "shut down",
    query: "?action=shutdown", confirm: true },
};

function vmActionButtons(node, { includeTerminal = true } = {}) {
  const host = node.hostname;
  const items = [];
  if (includeTerminal) {
    items.push(el("a", { class: "btn small", href: `#/vm/${enc(host)}/terminal`, "aria-label": `Terminal ${host}`, text: "Terminal" }));
  }
  for (const [name, spec] of Object.entries(ACTIONS)) {
    if (!spec.states.includes(node.status)) continue;
    const accessible = `${spec.label} ${host}`;
    const act = (button) => vmAction(node, name, button);
    if (spec.confirm) items.push(confirmButton(spec.label, accessible, act));
    else items.push(el("button", { type: "button", class: "btn small", "aria-label": accessible, text: spec.label, onclick: (e) => act(e.currentTarget) }));
  }
  if (!["Deleting", "Deleted"].includes(node.status)) {
    items.push(confirmButton("Delete", `Delete ${host}`, (button) => deleteVM(node, button)));
  }
  return items;
}

const busyHosts = new Set();

async function vmAction(node, name, button) {
  const spec = ACTIONS[name];
  const host = node.hostname;
  busyHosts.add(host);
  const result = await run(button, `${spec.progress} ${host}`, () => api(`/vm/${enc(host)}/${name}${spec.query || ""}`,
    { method: "POST", json: spec.json }), {
    context: `${spec.label} ${host}`,
    done: (res) => name === "fork" && Array.isArray(res) ? `Forked ${host}: ${res.map((c) => c.hostname).join(", ")}` : `${host} ${spec.done}`,
  });
  busyHosts.delete(host);
  refreshSoon();
  return result;
}

async function deleteVM(node, button) {
  const host = node.hostname;
  busyHosts.add(host);
  await run(button, `Deleting ${host}`, () => api(`/hostgroup/${enc(node.hostgroup)}/nodes/${enc(host)}`, { method: "DELETE" }),
    { context: `Delete ${host}`, done: `${host} deleted` });
  busyHosts.delete(host);
  refreshSoon();
}

let refreshSoon = () => {};

// -- the VM table -----------------------------------------------------------------------------------
const vmsView = (() => {
  const rows = new Map();  // hostname → {tr, cells, sig}
  const stats = new Map();  // hostname → snapshot or {error}
  let timer = 0, tick = 0, active = false, groups = [], groupsAt = 0, inflight = false;

  function meter(cell) {
    const fill = el("span", { class: "meter-fill" });
    const bar = el("span", { class: "meter", "aria-hidden": "true" }, fill);
    const text = el("span", { class: "meter-text" });
    cell.append(bar, text);
    return { fill, text };
  }

  function makeRow(host) {
    const tr = el("tr", { dataset: { host } });
    const labels = ["Hostname", "Group", "Status", "IP", "vCPUs", "Memory", "Tags", "CPU", "Mem use", "Actions"];
    const tds = labels.map((label) => el("td", { dataset: { label } }));
    tds[4].className = "num";
    tds[5].className = "num";
    tds[9].className = "actions-cell";
    const link = el("a", { href: `#/vm/${enc(host)}`, class: "host-link", text: host });
    const kind = el("span", { class: "kind" });
    tds[0].append(link, kind);
    const badge = el("span", { class: "badge" });
    tds[2].append(badge);
    tds[3].classList.add("mono");
    const actions = el("div", { class: "row-actions" });
    tds[9].append(actions);
    tr.append(...tds);
    return { tr, td: tds, kind, badge, cpu: meter(tds[7]), mem: meter(tds[8]), actions, sig: {} };
  }

  function update(row, node) {
    const s = row.sig;
    const kindText = [node.kind, node.persistent ? "persistent" : ""].filter(Boolean).join(" · ");
    setText(row.kind, kindText);
    setText(row.td[1], node.hostgroup);
    if (s.status !== node.status) {
      row.badge.className = statusClass(node.status);
      setText(row.badge, node.status);
      row.tr.dataset.status = node.status;
    }
    setText(row.td[3], node.ip || "—");
    setText(row.td[4], node.cpus);
    setText(row.td[5], fmtBytes(node.ram_bytes));
    const tags = (node.tags || []).join("\u0000");
    if (s.tags !== tags) {
      row.td[6].replaceChildren(...(node.tags || []).map((t) => el("span", { class: "chip", text: t })));
      row.td[6].title = (node.tags || []).join(", ");
      s.tags = tags;
    }
    const snap = stats.get(node.hostname);
    if (node.status !== "Running" || !snap || snap.error) {
      row.cpu.fill.style.width = "0%";
      row.mem.fill.style.width = "0%";
      const why = node.status !== "Running" ? "—" : snap && snap.error ? "no agent" : "…";
      setText(row.cpu.text, why);
      setText(row.mem.text, why);
      row.tr.classList.toggle("no-stats", true);
    } else {
      const cpus = snap.totalCpus || node.cpus || 1;
      const load = Number(snap.loadAvg1 || 0);
      const cpuPct = Math.min(100, (load / cpus) * 100);
      row.cpu.fill.style.width = `${cpuPct.toFixed(0)}%`;
      setText(row.cpu.text, `${cpuPct.toFixed(0)}% · load ${load.toFixed(2)}`);
      const memPct = Number(snap.memoryUsedPercent || 0);
      row.mem.fill.style.width = `${memPct.toFixed(0)}%`;
      setText(row.mem.text, `${memPct.toFixed(0)}% · ${fmtBytes(snap.memoryUsed)}`);
      row.tr.classList.toggle("no-stats", false);
      row.cpu.fill.classList.toggle("hot", cpuPct > 85);
      row.mem.fill.classList.toggle("hot", memPct > 85);
    }
    const actionSig = `${node.status}|${node.hostgroup}`;
    if (s.actions !== actionSig && !busyHosts.has(node.hostname) && !row.actions.querySelector(".armed")) {
      row.actions.replaceChildren(...vmActionButtons(node));
      s.actions = actionSig;
    }
    s.status = node.status;
  }

  async function loadGroups(force = false) {
    if (!force && Date.now() - groupsAt < 30000 && groups.length) return;
    groups = await api("/hostgroup");
    groupsAt = Date.now();
    const select = $("create-group");
    const chosen = select.value;
    const options = groups.map((g) => el("option", { value: g.name, text: `${g.name} (${g.cpus} vCPU, ${fmtBytes(g.ram_bytes)})` }));
    const sig = groups.map((g) => `${g.name}/${g.cpus}/${g.ram_bytes}`).join(",");
    if (select.dataset.sig !== sig) {
      select.replaceChildren(...options);
      select.dataset.sig = sig;
      const pick = groups.find((g) => g.name === chosen) || groups.find((g) => g.count === 0) || groups[0];
      if (pick) select.value = pick.name;
      placeholders();
    }
  }

  function placeholders() {
    const g = groups.find((x) => x.name === $("create-group").value);
    $("create-cpus").placeholder = g ? `${g.cpus} (group's)` : "group's";
    $("create-ram").placeholder = g ? `${Math.round(g.ram_bytes / 1048576)} (group's)` : "group's";
  }
  $("create-group").addEventListener("change", placeholders);

  let lastNodes = [], statsInflight = false;

  async function refreshStats() {
    if (statsInflight) return;
    statsInflight = true;
    try {
      const list = await api("/nodes/stats");
      stats.clear();
      for (const s of list) stats.set(s.hostname, s.error ? { error: s.error } : s.snapshot || { error: "no snapshot" });
      if (active) render(lastNodes);
    } catch { /* the table shows what it has */ } finally {
      statsInflight = false;
    }
  }

  async function refresh() {
    if (inflight) return;
    inflight = true;
    try {
      // Stats ask every agent (slower): they never hold up the table.
      if (tick++ % STATS_EVERY === 0) refreshStats();
      const nodes = await api("/nodes");
      lastNodes = nodes;
      render(nodes);
      setConn(true);
      setText($("vms-updated"), `updated ${fmtDate(new Date().toISOString()).slice(11)}`);
      loadGroups().catch(() => {});
    } catch (e) {
      setConn(false);
      if (e.status !== 401) showError("Loading VMs", e);
    } finally {
      inflight = false;
    }
  }

  function render(nodes) {
    const body = $("vms-body");
    const seen = new Set();
    const rank = (n) => (n.kind === "service" ? 0 : 1);
    nodes = [...nodes].sort((a, b) => rank(a) - rank(b) || a.hostgroup.localeCompare(b.hostgroup)
      || a.hostname.localeCompare(b.hostname, undefined, { numeric: true }));
    let prev = null;
    for (const node of nodes) {
      seen.add(node.hostname);
      let row = rows.get(node.hostname);
      if (!row) {
        row = makeRow(node.hostname);
        rows.set(node.hostname, row);
      }
      update(row, node);
      const want = prev ? prev.nextSibling : body.firstChild;
      if (want !== row.tr) body.insertBefore(row.tr, want);
      prev = row.tr;
    }
    for (const [host, row] of rows) {
      if (!seen.has(host)) {
        row.tr.remove();
        rows.delete(host);
      }
    }
    $("vms-empty").hidden = nodes.length > 0;
  }

  function schedule() {
    clearTimeout(timer);
    if (!active) return;
    timer = setTimeout(async () => {
      if (!document.hidden) await refresh();
      schedule();
    }, VM_REFRESH_MS);
  }

  $("create-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const group = $("create-group").value;
    if (!group) return;
    const body = { tags: splitTags($("create-tags").value), persistent: $("create-persistent").checked };
    const cpus = $("create-cpus").value, ram = $("create-ram").value;
    if (cpus) body.cpus = Number(cpus);
    if (ram) body.ram_bytes = Number(ram) * 1048576;
    const made = await run($("create-button"), `Creating a sandbox in ${group}`, async () => {
      // the node shows up in the table while it boots
      setTimeout(refreshSoon, 700);
      return api(`/hostgroup/${enc(group)}/nodes?wait=agent&timeout=${LONG_WAIT}`, { method: "POST", json: body });
    }, { context: `Create sandbox in ${group}`, done: (r) => `Created ${r.hostname} (${r.ip})` });
    if (made) $("create-tags").value = "";
    refreshSoon();
  });

  return {
    async enter() {
      showView("view-vms");
      active = true;
      tick = 0;
      loadGroups(true).catch((e) => { if (e.status !== 401) showError("Loading host groups", e); });
      await refresh();
      schedule();
    },
    leave() {
      active = false;
      clearTimeout(timer);
    },
    refresh,
    get active() { return active; },
  };
})();

refreshSoon = () => {
  if (vmsView.active) vmsView.refresh();
  if (vmView.active) vmView.refresh();
};

// -- one VM: facts, terminal, console log, files, background execs, fork ------------------------------
const vmView = (() => {
  let host = null, tab = "terminal", timer = 0, active = false, shell = null, node = null, factsSig = "", actionsSig = "";
  let logTimer = 0, logSig = "", execTimer = 0, execStream = null;
  const TABS = ["terminal", "log", "files", "execs", "fork"];

  function fact(name, value) {
    return [el("div", { class: "fact" }, el("dt", { text: name }), el("dd", {}, value))];
  }

  async function refresh() {
    if (!host) return;
    const me = host;
    try {
      const n = await api(`/vm/${enc(me)}`);
      if (me !== host) return;
      node = n;
      setConn(true);
      renderNode();
    } catch (e) {
      if (me !== host) return;
      if (e.status === 404) {
        node = null;
        setText($("vm-status"), "gone");
        $("vm-status").className = "badge status-deleted";
        $("vm-actions").replaceChildren();
        actionsSig = "";
      } else if (e.status !== 401) {
        setConn(e.status !== 0);
      }
    }
  }

  function renderNode() {
    const n = node;
    $("vm-status").className = statusClass(n.status);
    setText($("vm-status"), n.status);
    const sig = JSON.stringify([n.hostgroup, n.kind, n.ip, n.cpus, n.ram_bytes, n.boot, n.persistent, n.created_at, n.tags, n.image,
      n.warnings, n.channel_fault, n.vmm && n.vmm.pid]);
    if (sig !== factsSig) {
      factsSig = sig;
      const tags = (n.tags || []).length ? (n.tags || []).map((t) => el("span", { class: "chip", text: t })) : "—";
      $("vm-facts").replaceChildren(
        ...fact("Group", n.hostgroup), ...fact("Kind", `${n.kind || "—"}${n.persistent ? " · persistent" : ""}`),
        ...fact("IP", el("span", { class: "mono", text: n.ip || "—" })), ...fact("vCPUs", String(n.cpus)),
        ...fact("Memory", fmtBytes(n.ram_bytes)), ...fact("Started by", n.boot || "—"),
        ...fact("Created", fmtDate(n.created_at)), ...fact("Image", n.image || "—"),
        ...fact("Tags", el("span", {}, tags)),
        ...(n.vmm ? fact("QEMU pid", String(n.vmm.pid)) : []),
        ...(n.warnings && n.warnings.length ? fact("Warnings", n.warnings.join("; ")) : []),
        ...(n.channel_fault ? fact("Channel fault", n.channel_fault) : []),
      );
    }
    const aSig = `${n.status}|${n.hostgroup}`;
    if (aSig !== actionsSig && !busyHosts.has(n.hostname) && !$("vm-actions").querySelector(".armed")) {
      actionsSig = aSig;
      $("vm-actions").replaceChildren(...vmActionButtons(n, { includeTerminal: false }));
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (!active) return;
    timer = setTimeout(async () => {
      if (!document.hidden) await refresh();
      schedule();
    }, VM_REFRESH_MS);
  }

  // terminal
  function termState(state, detail) {
    const badge = $("term-state");
    badge.className = `badge term-${state}`;
    setText(badge, state === "ended" ? `ended${detail ? ` (exit ${detail})` : ""}` : state);
    $("term-reconnect").hidden = !(state === "closed" || state === "ended");
  }

  function openShell() {
    if (shell && shell.hostname === host) {
      shell.refit();
      if (shell.state === "closed" && !shell.ws) shell.connect();
      return;
    }
    closeShell();
    try {
      shell = new Shell($("terminal"), host, {
        onState: termState,
        onError: (reason) => showError(`Terminal ${host}`, reason),
        onRefused: () => {
          const me = host;
          api(`/vm/${enc(me)}/health`)
            .then(() => showError(`Terminal ${me}`, "the daemon refused the shell; try Reconnect"))
            .catch((e) => { if (e.status !== 401) showError(`Terminal ${me}`, e); });
        },
      });
      shell.connect();
    } catch (e) {
      showError("Terminal", e);
    }
  }

  function closeShell() {
    if (shell) {
      shell.dispose();
      shell = null;
      $("terminal").replaceChildren();
      termState("closed");
      $("term-reconnect").hidden = true;
    }
  }

  $("term-reconnect").addEventListener("click", () => {
    if (!shell) return;
    shell.term.write("\r\n\x1b[36m[reconnecting]\x1b[0m\r\n");
    shell.connect();
  });
  $("term-copy").addEventListener("click", async () => {
    if (!shell) return;
    const r = await shell.copySelection();
    note(r === "copied" ? "Copied the selection" : r === "empty" ? "Select text in the terminal first" : "The browser refused to copy");
  });
  $("term-paste").addEventListener("click", async () => {
    if (!shell) return;
    try {
      if (!navigator.clipboard || !navigator.clipboard.readText) throw new Error("no clipboard");
      shell.paste(await navigator.clipboard.readText());
    } catch {
      note("The browser keeps the clipboard from the page: paste with Ctrl+Shift+V (or Ctrl+V) in the terminal");
      shell.term.focus();
    }
  });

  // console log
  async function loadLog() {
    if (!host) return;
    const me = host;
    const pre = $("log-content");
    try {
      const res = await api(`/vm/${enc(me)}/logs?lines=${enc($("log-lines").value)}`);
      if (me !== host) return;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      if (res.content !== logSig) {
        logSig = res.content;
        pre.textContent = res.content || "(the console log is empty)";
        if ($("log-follow").checked || atBottom) pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) {
      if (me !== host) return;
      if (e.code === "log_not_found") {
        setText(pre, "(no console log yet)");
        logSig = "";
      } else if (e.status !== 401) {
        showError(`Console log of ${me}`, e);
      }
    }
  }

  function scheduleLog() {
    clearTimeout(logTimer);
    if (!active || tab !== "log" || !$("log-follow").checked) return;
    logTimer = setTimeout(async () => {
      if (!document.hidden) await loadLog();
      scheduleLog();
    }, 2000);
  }

  $("log-refresh").addEventListener("click", (e) => run(e.currentTarget, "Reading the console log", loadLog));
  $("log-lines").addEventListener("change", () => { logSig = ""; loadLog(); });
  $("log-follow").addEventListener("change", () => { if ($("log-follow").checked) loadLog(); scheduleLog(); });

  // files
  function uploadXHR(url, file, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); });
      xhr.addEventListener("load", () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch { body = {}; }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else {
          if (xhr.status === 401) sessionLost(body.error || "unauthorized");
          reject(new ApiError(xhr.status, body.error || `${xhr.status} ${xhr.statusText}`, body.code || ""));
        }
      });
      xhr.addEventListener("error", () => reject(new ApiError(0, "the daemon does not answer", "network")));
      xhr.send(file);
    });
  }

  $("upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = $("upload-file").files[0];
    if (!file) return;
    let dest = $("upload-path").value.trim();
    if (dest.endsWith("/")) dest += file.name;
    const me = host;
    let lastPct = -1;
    const what = `Uploading ${file.name} to ${me}:${dest}`;
    await run($("upload-button"), what, (progress) =>
      uploadXHR(`/vm/${enc(me)}/cp?path=${enc(dest)}`, file, (done, total) => {
        const pct = Math.floor((done / total) * 100);
        if (pct !== lastPct) { lastPct = pct; progress(`${what} · ${pct}%`); }
      }), { context: `Upload to ${me}:${dest}`, done: (r) => `Uploaded ${r.path || dest} (${fmtBytes(r.size ?? file.size)})` });
  });

  async function download(path, tar, button) {
    const me = host;
    const base = path.replace(/\/+$/, "").split("/").pop() || "root";
    await run(button, `Downloading ${me}:${path}`, async (progress) => {
      const res = await api(`/vm/${enc(me)}/cp?path=${enc(path)}${tar ? "&mode=tar" : ""}`, { raw: true });
      const total = Number(res.headers.get("content-length") || 0);
      const reader = res.body.getReader();
      const parts = [];
      let got = 0;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parts.push(value);
        got += value.length;
        progress(`Downloading ${me}:${path} · ${total ? `${Math.floor((got / total) * 100)}%` : fmtBytes(got)}`);
      }
      const blob = new Blob(parts, { type: tar ? "application/x-tar" : "application/octet-stream" });
      const url = URL.createObjectURL(blob);
      const a = el("a", { href: url, download: tar ? `${base}.tar` : base, class: "offscreen" });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 30000);
      return got;
    }, { context: `Download ${me}:${path}`, done: (n) => `Downloaded ${path} (${fmtBytes(n)})` });
  }

  $("download-form").addEventListener("submit", (e) => {
    e.preventDefault();
    download($("download-path").value.trim(), $("download-tar").checked, $("download-button"));
  });

  async function browse(path) {
    const me = host;
    $("browse-path").value = path;
    await run($("browse-button"), `Listing ${me}:${path}`, async () => {
      const entries = await api(`/vm/${enc(me)}/fs/readdir?path=${enc(path)}`);
      entries.sort((a, b) => (a.type === "directory" ? 0 : 1) - (b.type === "directory" ? 0 : 1) || a.name.localeCompare(b.name));
      const join = (name) => `${path.replace(/\/+$/, "")}/${name}`;
      const up = path.replace(/\/+$/, "").split("/").slice(0, -1).join("/") || "/";
      const rowsOut = [];
      if (path !== "/") {
        rowsOut.push(el("tr", {}, el("td", { dataset: { label: "Name" } },
          el("button", { type: "button", class: "linklike", "aria-label": "Parent directory", text: "..", onclick: () => browse(up) })),
        el("td", { dataset: { label: "Type" }, text: "directory" }), el("td"), el("td"), el("td"), el("td")));
      }
      for (const entry of entries) {
        const full = join(entry.name);
        const name = entry.type === "directory"
          ? el("button", { type: "button", class: "linklike", "aria-label": `Open ${entry.name}`, text: `${entry.name}/`, onclick: () => browse(full) })
          : el("span", { class: "mono", text: entry.name });
        const actions = el("td", { class: "actions-cell", dataset: { label: "Actions" } });
        if (entry.type === "file") {
          actions.append(el("button", { type: "button", class: "btn small", "aria-label": `Download ${entry.name}`, text: "Download",
            onclick: (ev) => download(full, false, ev.currentTarget) }));
        } else if (entry.type === "directory") {
          actions.append(el("button", { type: "button", class: "btn small", "aria-label": `Download ${entry.name} as tar`, text: "Download tar",
            onclick: (ev) => download(full, true, ev.currentTarget) }));
        }
        rowsOut.push(el("tr", {}, el("td", { dataset: { label: "Name" } }, name), el("td", { dataset: { label: "Type" }, text: entry.type }),
          el("td", { class: "num", dataset: { label: "Size" }, text: entry.type === "file" ? fmtBytes(entry.size) : "" }),
          el("td", { dataset: { label: "Modified" }, text: fmtDate(entry.mtime) }),
          el("td", { class: "mono", dataset: { label: "Mode" }, text: entry.mode }), actions));
      }
      $("browse-body").replaceChildren(...rowsOut);
    }, { context: `List ${me}:${path}` });
  }

  $("browse-form").addEventListener("submit", (e) => {
    e.preventDefault();
    browse($("browse-path").value.trim() || "/");
  });

  // background execs
  async function loadExecs() {
    const me = host;
    let list;
    try {
      list = await api(`/vm/${enc(me)}/exec`);
    } catch (e) {
      if (me === host && e.status !== 401 && e.status !== 409) showError(`Background execs of ${me}`, e);
      return;
    }
    if (me !== host) return;
    list.sort((a, b) => String(b.started_at).localeCompare(String(a.started_at)));
    const body = $("execs-body");
    const sig = JSON.stringify(list.map((x) => [x.exec_id, x.running, x.exit_code, x.signal]));
    if (body.dataset.sig === sig) return;
    body.dataset.sig = sig;
    body.replaceChildren(...list.map((x) => {
      const cmd = [x.command, ...(x.args || [])].join(" ");
      const state = x.running ? "running" : `exited ${x.signal ? `(${x.signal})` : x.exit_code ?? ""}`;
      return el("tr", { dataset: { exec: x.exec_id } },
        el("td", { class: "mono", dataset: { label: "Exec" }, text: x.exec_id }),
        el("td", { class: "mono cmd", dataset: { label: "Command" }, text: cmd, title: cmd }),
        el("td", { class: "num", dataset: { label: "PID" }, text: x.pid }),
        el("td", { dataset: { label: "State" } }, el("span", { class: `badge ${x.running ? "status-running" : "status-stopped"}`, text: state })),
        el("td", { dataset: { label: "Started" }, text: fmtDate(x.started_at) }),
        el("td", { class: "actions-cell", dataset: { label: "Actions" } }, el("div", { class: "row-actions" },
          el("button", { type: "button", class: "btn small", "aria-label": `Logs ${x.exec_id}`, text: "Logs", onclick: () => showExecLog(x.exec_id, cmd) }),
          x.running ? el("button", { type: "button", class: "btn small", "aria-label": `Kill ${x.exec_id}`, text: "Kill",
            onclick: (ev) => run(ev.currentTarget, `Killing ${x.exec_id}`, () => api(`/vm/${enc(me)}/exec/${enc(x.exec_id)}/kill`, { method: "POST", json: {} }),
              { done: `Signalled ${x.exec_id}` }).then(loadExecs) }) : null,
          el("button", { type: "button", class: "btn small", "aria-label": `Remove ${x.exec_id}`, text: "Remove",
            onclick: (ev) => run(ev.currentTarget, `Removing ${x.exec_id}`, () => api(`/vm/${enc(me)}/exec/${enc(x.exec_id)}`, { method: "DELETE" }),
              { done: `Removed ${x.exec_id}` }).then(loadExecs) }))));
    }));
    $("execs-empty").hidden = list.length > 0;
  }

  async function showExecLog(id, cmd) {
    if (execStream) execStream.abort();
    const controller = new AbortController();
    execStream = controller;
    const me = host;
    const pre = $("exec-log");
    $("exec-log-card").hidden = false;
    setText($("exec-log-title"), `${id} · ${cmd}`);
    pre.replaceChildren();
    try {
      const res = await api(`/vm/${enc(me)}/exec/${enc(id)}/logs?follow=true`, { raw: true, signal: controller.signal });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buf += value;
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (!line.trim()) continue;
          let f;
          try { f = JSON.parse(line); } catch { continue; }
          const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
          if (f.type === "stdout" || f.type === "stderr") pre.append(el("span", { class: f.type, text: f.data || "" }));
          else if (f.type === "exit") pre.append(el("span", { class: "meta", text: `\n[exited ${f.signal ? `by ${f.signal}` : f.exit_code}]\n` }));
          else if (f.type === "gap") pre.append(el("span", { class: "meta", text: `\n[${f.message || "output dropped"}]\n` }));
          else if (f.error) pre.append(el("span", { class: "stderr", text: `\n[${f.error}]\n` }));
          if (atBottom) pre.scrollTop = pre.scrollHeight;
        }
      }
      loadExecs();
    } catch (e) {
      if (e.name !== "AbortError") showError(`Log of ${id}`, e);
    } finally {
      if (execStream === controller) execStream = null;
    }
  }

  function scheduleExecs() {
    clearTimeout(execTimer);
    if (!active || tab !== "execs") return;
    execTimer = setTimeout(async () => {
      if (!document.hidden) await loadExecs();
      scheduleExecs();
    }, 3000);
  }

  $("exec-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const me = host;
    const cmd = $("exec-cmd").value.trim();
    if (!cmd) return;
    const r = await run($("exec-button"), `Starting “${cmd}” in ${me}`, () =>
      api(`/vm/${enc(me)}/exec?cmd=${enc(cmd)}&background=true`, { method: "POST" }),
    { context: `Exec in ${me}`, done: (x) => `Started ${x.exec_id}${x.pid ? ` (pid ${x.pid})` : ""}` });
    if (r && r.exec_id) {
      $("exec-cmd").value = "";
      await loadExecs();
      showExecLog(r.exec_id, cmd);
    }
  });

  // fork
  $("fork-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const me = host;
    const count = Number($("fork-count").value || 1);
    const copies = await run($("fork-button"), `Forking ${me} into ${count} cop${count === 1 ? "y" : "ies"}`, () =>
      api(`/vm/${enc(me)}/fork?wait=agent&timeout=${LONG_WAIT}`, { method: "POST", json: { count, tags: splitTags($("fork-tags").value) } }),
    { context: `Fork ${me}`, done: (list) => `Forked ${me}: ${list.map((c) => c.hostname).join(", ")}` });
    if (copies) {
      $("fork-results").replaceChildren(...copies.map((c) => el("li", {},
        el("a", { href: `#/vm/${enc(c.hostname)}`, text: c.hostname }), ` ${c.ip} · ${c.child_status || c.status}`)));
    }
  });

  function showTab(name) {
    tab = TABS.includes(name) ? name : "terminal";
    for (const t of TABS) $(`tab-${t}`).hidden = t !== tab;
    for (const a of document.querySelectorAll("#vm-tabs a")) {
      a.href = `#/vm/${enc(host)}/${a.dataset.tab}`;
      if (a.dataset.tab === tab) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    clearTimeout(logTimer);
    clearTimeout(execTimer);
    if (tab === "terminal") openShell();
    if (tab === "log") { loadLog(); scheduleLog(); }
    if (tab === "execs") { loadExecs(); scheduleExecs(); }
    if (tab === "files" && !$("browse-body").children.length) browse($("browse-path").value || "/root");
  }

  return {
    async enter(parts) {
      const name = parts[0];
      showView("view-vm");
      if (name !== host) {
        this.close();
        host = name;
        setText($("vm-title"), name);
        setText($("vm-status"), "…");
        $("vm-status").className = "badge";
        $("vm-facts").replaceChildren();
        $("vm-actions").replaceChildren();
        $("log-content").textContent = "";
        $("browse-body").replaceChildren();
        $("execs-body").replaceChildren();
        $("execs-body").dataset.sig = "";
        $("exec-log-card").hidden = true;
        $("fork-results").replaceChildren();
        factsSig = actionsSig = logSig = "";
      }
      active = true;
      showTab(parts[1] || "log");
      await refresh();
      schedule();
    },
    leave() {
      active = false;
      clearTimeout(timer);
      clearTimeout(logTimer);
      clearTimeout(execTimer);
      if (execStream) execStream.abort();
    },
    close() {
      this.leave();
      closeShell();
      host = null;
      node = null;
    },
    refresh,
    get active() { return active; },
  };
})();

// -- secrets ------------------------------------------------------------------------------------------
const secretsView = (() => {
  let replacing = null;

  function formMode(name) {
    replacing = name;
    $("secret-name").value = name || "";
    $("secret-name").readOnly = !!name;
    setText($("secret-button"), name ? "Replace secret" : "Add secret");
    $("secret-cancel").hidden = !name;
    $("secret-value").value = "";
    $("secret-file").value = "";
    if (name) $("secret-value").focus();
  }

  async function load() {
    try {
      const list = await api("/secrets");
      list.sort((a, b) => a.name.localeCompare(b.name));
      $("secrets-body").replaceChildren(...list.map((s) => el("tr", { dataset: { secret: s.name } },
        el("td", { class: "mono", dataset: { label: "Name" }, text: s.name }),
        el("td", { class: "num", dataset: { label: "Size" }, text: fmtBytes(s.size) }),
        el("td", { class: "mono", dataset: { label: "Permissions" }, text: s.permissions }),
        el("td", { dataset: { label: "Owner" }, text: `${s.uid}:${s.gid}` }),
        el("td", { dataset: { label: "Modified" }, text: fmtDate(s.mod_time || s.modified_at) }),
        el("td", { class: "actions-cell", dataset: { label: "Actions" } }, el("div", { class: "row-actions" },
          el("button", { type: "button", class: "btn small", "aria-label": `Replace ${s.name}`, text: "Replace", onclick: () => formMode(s.name) }),
          confirmButton("Delete", `Delete ${s.name}`, (b) => run(b, `Deleting secret ${s.name}`, () =>
            api(`/secrets/${enc(s.name)}`, { method: "DELETE" }), { done: `Deleted secret ${s.name}` }).then(load)))))));
      $("secrets-empty").hidden = list.length > 0;
      setConn(true);
    } catch (e) {
      if (e.status !== 401) showError("Loading secrets", e);
    }
  }

  $("secret-cancel").addEventListener("click", () => formMode(null));
  $("secret-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = $("secret-name").value.trim();
    const file = $("secret-file").files[0];
    const bytes = file ? new Uint8Array(await file.arrayBuffer()) : new TextEncoder().encode($("secret-value").value);
    const body = { data: b64(bytes) };
    const perms = $("secret-perms").value.trim();
    if (perms) body.permissions = perms;
    const replace = replacing;
    const ok = await run($("secret-button"), `${replace ? "Replacing" : "Adding"} secret ${name}`, () => replace
      ? api(`/secrets/${enc(replace)}`, { method: "PATCH", json: body })
      : api("/secrets", { method: "POST", json: { name, ...body } }),
    { done: `${replace ? "Replaced" : "Added"} secret ${name}` });
    $("secret-value").value = "";
    $("secret-file").value = "";
    if (ok) formMode(null);
    load();
  });

  return {
    enter() {
      showView("view-secrets");
      load();
    },
  };
})();

// -- host groups, storage, daemon ----------------------------------------------------------------------
function dataTable(label, columns, items) {
  return el("div", { class: "table-wrap" }, el("table", { class: "data", "aria-label": label },
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col", class: c.num ? "num" : null, text: c.title })))),
    el("tbody", {}, items.map((item) => el("tr", {}, columns.map((c) => {
      const value = c.value(item);
      return el("td", { class: [c.num ? "num" : "", c.mono ? "mono" : ""].join(" ").trim() || null, dataset: { label: c.title } },
        value instanceof Node ? value : String(value ?? "—"));
    }))))));
}

// A page of its own: show it, fill it, and say what failed (a 401 has already sent the user to sign in).
function pageView(id, what, fill) {
  return {
    async enter() {
      showView(id);
      try {
        await fill();
        setConn(true);
      } catch (e) {
        if (e.status !== 401) showError(what, e);
      }
    },
  };
}

const groupsView = pageView("view-groups", "Loading host groups", async () => {
  const [groups, nodes] = await Promise.all([api("/hostgroup"), api("/nodes")]);
  const count = (g) => nodes.filter((n) => n.hostgroup === g).length;
  $("groups-body").replaceChildren(...groups.map((g) => el("tr", {},
    el("td", { class: "mono", dataset: { label: "Name" }, text: g.name }),
    el("td", { class: "num", dataset: { label: "Services" }, text: g.count }),
    el("td", { class: "num", dataset: { label: "VMs now" }, text: count(g.name) }),
    el("td", { class: "num", dataset: { label: "vCPUs" }, text: g.cpus }),
    el("td", { class: "num", dataset: { label: "Memory" }, text: fmtBytes(g.ram_bytes) }),
    el("td", { dataset: { label: "Arch" }, text: g.arch }),
    el("td", { class: "actions-cell", dataset: { label: "Actions" } }, el("div", { class: "row-actions" },
      el("a", { class: "btn small", href: "#/vms", text: "VMs" }),
      el("button", { type: "button", class: "btn small", "aria-label": `Build template ${g.name}`, text: "Build template",
        onclick: (ev) => run(ev.currentTarget, `Building the template of ${g.name}`, () =>
          api(`/hostgroup/${enc(g.name)}/template`, { method: "POST" }),
        { context: `Build template of ${g.name}`, done: (t) => `Template ${t.name} ready` }) }))))));
});

const storageView = pageView("view-storage", "Loading storage", async () => {
  const s = await api("/storage");
  setText($("storage-total"), `${fmtBytes(s.total_bytes)} in use`);
  const sections = [];
  const section = (title, table) => sections.push(el("section", { class: "sub" }, el("h2", { text: title }), table));
  section("VM disks", dataTable("VM disks", [
    { title: "Hostname", value: (n) => el("a", { href: `#/vm/${enc(n.hostname)}`, text: n.hostname }) },
    { title: "Group", value: (n) => n.hostgroup },
    { title: "Status", value: (n) => el("span", { class: statusClass(n.status), text: n.status || "—" }) },
    { title: "Template", value: (n) => n.template || "—", mono: true },
    { title: "Disk", value: (n) => fmtBytes(n.disk_bytes), num: true },
    { title: "Saved state", value: (n) => (n.state_bytes ? fmtBytes(n.state_bytes) : "—"), num: true },
  ], s.nodes || []));
  section("Templates", dataTable("Templates", [
    { title: "Name", value: (t) => t.name, mono: true },
    { title: "Group", value: (t) => t.hostgroup },
    { title: "Size", value: (t) => `${t.cpus} vCPU · ${fmtBytes(t.ram_bytes)}` },
    { title: "Clones", value: (t) => t.clones, num: true },
    { title: "Memory + state", value: (t) => fmtBytes(t.state_bytes), num: true },
    { title: "Disk", value: (t) => fmtBytes(t.disk_bytes), num: true },
    { title: "Created", value: (t) => `${fmtDate(t.created_at)}${t.retired ? " · retired" : ""}` },
  ], s.templates || []));
  if ((s.commits || []).length) {
    section("Commits", dataTable("Commits", [
      { title: "Commit", value: (c) => c.commit_id, mono: true },
      { title: "Source", value: (c) => c.source_hostname },
      { title: "Disk", value: (c) => fmtBytes(c.disk_bytes), num: true },
    ], s.commits));
  }
  if ((s.kept_disks || []).length) {
    section("Kept disks", dataTable("Kept disks", [
      { title: "Disk", value: (d) => d.disk, mono: true },
      { title: "Size", value: (d) => fmtBytes(d.disk_bytes), num: true },
    ], s.kept_disks));
  }
  $("storage-content").replaceChildren(...sections);
});

const infoView = pageView("view-info", "Loading daemon info", async () => {
  const info = await api("/info");
  const facts = [], more = [];
  for (const [key, value] of Object.entries(info)) {
    const title = key.replace(/_/g, " ");
    if (value !== null && typeof value === "object") {
      if (Object.keys(value).length) {
        more.push(el("section", { class: "sub" }, el("h2", { text: title }),
          el("pre", { class: "log json", tabindex: "0", text: JSON.stringify(value, null, 2) })));
      }
    } else {
      facts.push(el("div", { class: "fact" }, el("dt", { text: title }),
        el("dd", { class: "mono", text: value === "" ? "—" : String(value) })));
    }
  }
  $("info-facts").replaceChildren(...facts);
  $("info-more").replaceChildren(...more);
});

// -- start ----------------------------------------------------------------------------------------------
async function boot() {
  let state;
  for (let attempt = 0; ; attempt++) {
    try {
      state = await api("/ui/session");
      break;
    } catch (e) {
      setText($("view-loading").querySelector("p"), `The daemon does not answer (${e.message}); retrying…`);
      await new Promise((r) => setTimeout(r, Math.min(5000, 500 * (attempt + 1))));
    }
  }
  session.auth = !!state.auth;
  if (state.auth && !state.signed_in) {
    showSignIn("");
    return;
  }
  setSignedIn(true);
  if (!location.hash) history.replaceState(null, "", "#/vms");
  route();
}

// xterm.js and its fit addon are classic deferred scripts: they run before this module.
boot();

// a terminal copy for other modules' use (e.g. log panes): select text, Ctrl+Shift+C
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey && e.shiftKey && (e.key === "C" || e.key === "c") && !e.target.closest(".xterm")) {
    const text = String(window.getSelection() || "");
    if (text) copyText(text);
  }
});

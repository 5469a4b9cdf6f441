// The operators' dashboard: the pipeline live from queue-stats (polled),
// dead letters with replay and delete (admin key), and a job lookup.
"use strict";

const adminKey = rememberedInput("admin-key");
const stageSelect = document.getElementById("dlq-stage");
STAGES.forEach((s) => stageSelect.append(el("option", { value: s }, s)));

function stageCard(s) {
  const waiting = s.lag + s.retrying + s.throttled;
  let cls = "stage";
  if (waiting + s.pending > 0 && s.live_workers === 0) cls += " starved";
  else if (s.advice && /add consumers/.test(s.advice)) cls += " hot";
  return el("div", { class: cls, "data-stage": s.stage },
    el("h3", {}, s.stage),
    el("div", {}, el("span", { class: "big lag" }, s.lag), el("span", { class: "muted" }, " waiting")),
    el("div", { class: "kv" },
      el("span", {}, "in flight"), el("span", {}, s.pending),
      el("span", {}, "retrying"), el("span", {}, s.retrying),
      el("span", {}, "throttled"), el("span", {}, s.throttled),
      el("span", {}, "img/s 1 min"), el("span", { class: "throughput" }, s.throughput_1m.toFixed(2)),
      el("span", {}, "img/s 5 min"), el("span", {}, s.throughput_5m.toFixed(2)),
      el("span", {}, "workers"), el("span", { class: "workers" }, s.live_workers),
      el("span", {}, "oldest"), el("span", {}, s.oldest_pending_ms == null ? "–" : ago(s.oldest_pending_ms)),
      el("span", {}, "processed"), el("span", {}, s.totals.processed),
      el("span", {}, "dead-lettered"), el("span", {}, s.totals.dead),
    ));
}

async function refreshStats() {
  try {
    // Vendors, consumers and hosts are shown only with the admin key.
    const st = await api("/api/image-queue/queue-stats", { key: adminKey() });
    const parts = [];
    st.stages.forEach((s, i) => {
      if (i) parts.push(el("div", { class: "arrow" }, "→"));
      parts.push(stageCard(s));
    });
    document.getElementById("pipeline").replaceChildren(...parts);
    // The fair-admission window (admin key only): how many images may be
    // in flight past rate-check, and why that many.
    document.getElementById("admission").textContent = st.admission
      ? `Admission window: ${st.admission.window} image(s) in flight downstream · ${st.admission.reason}`
      : "";
    document.getElementById("advice").replaceChildren(
      ...st.stages.filter((s) => s.advice).map((s) => el("p", { class: "advice" }, s.advice)));
    const vendors = Object.entries(st.vendor_backlog || {}).map(([v, n]) => `${v}: ${n}`).join(", ");
    document.getElementById("totals").textContent =
      `· ${st.stages.reduce((n, s) => n + s.live_workers, 0)} live worker(s) · ${st.dead_letters} dead letter(s)` + (vendors ? ` · backlog ${vendors}` : "");
    document.getElementById("consumers").replaceChildren(...st.stages.flatMap((s) => (s.consumers || []).map((c) => {
      const beat = (st.workers || []).find((w) => w.consumer === c.name);
      return el("tr", {},
        el("td", {}, s.stage), el("td", {}, c.name), el("td", {}, c.host || "–"),
        el("td", {}, beat ? `${beat.in_flight}/${beat.concurrency}` : "–"),
        el("td", {}, c.pending), el("td", {}, ago(c.idle_ms)), el("td", {}, c.live ? "yes" : "no"));
    })));
    document.getElementById("updated").textContent = "updated " + new Date(st.collected_ms).toLocaleTimeString();
    document.getElementById("stats-error").textContent = "";
  } catch (e) {
    document.getElementById("stats-error").textContent = "Stats unavailable: " + e.message;
  }
}

async function loadDeadLetters() {
  const msg = document.getElementById("dlq-error-msg");
  msg.textContent = "";
  if (!adminKey()) { msg.textContent = "Enter the admin key."; return; }
  const q = new URLSearchParams({ limit: "100" });
  for (const [name, id] of [["stage", "dlq-stage"], ["vendor", "dlq-vendor"], ["error", "dlq-error"]]) {
    const v = document.getElementById(id).value.trim();
    if (v) q.set(name, v);
  }
  try {
    const r = await api("/api/admin/dlq?" + q, { key: adminKey() });
    document.getElementById("dlq-total").textContent = `· ${r.total} held, ${r.dead_letters.length} shown`;
    const now = Date.now();
    document.getElementById("dlq").replaceChildren(...r.dead_letters.map((d) => el("tr", { class: "dead-letter", "data-id": d.id },
      el("td", {}, ago(now - d.failed_ms) + " ago"),
      el("td", {}, d.stage), el("td", {}, d.vendor),
      el("td", {}, el("code", {}, d.job), " #" + d.image),
      el("td", { class: "error" }, d.error), el("td", {}, d.attempts),
      el("td", {},
        el("button", { class: "replay", onclick: () => act(d.id, "replay") }, "Replay"), " ",
        el("button", { class: "danger delete", onclick: () => act(d.id, "delete") }, "Delete")))));
  } catch (e) {
    msg.textContent = e.message;
  }
}

async function act(id, what) {
  const msg = document.getElementById("dlq-error-msg");
  try {
    if (what === "replay") {
      await api(`/api/admin/dlq/${encodeURIComponent(id)}/replay`, { key: adminKey(), method: "POST" });
    } else {
      await api(`/api/admin/dlq/${encodeURIComponent(id)}`, { key: adminKey(), method: "DELETE" });
    }
    msg.textContent = "";
  } catch (e) {
    msg.textContent = e.message;
  }
  loadDeadLetters();
}

document.getElementById("dlq-load").addEventListener("click", loadDeadLetters);
document.getElementById("lookup").addEventListener("click", async () => {
  const id = document.getElementById("lookup-id").value.trim();
  const out = document.getElementById("lookup-result");
  const msg = document.getElementById("lookup-error");
  msg.textContent = "";
  if (!adminKey()) { msg.textContent = "Enter the admin key (above, with the dead letters)."; return; }
  try {
    const job = await api("/api/admin/job/" + encodeURIComponent(id), { key: adminKey() });
    out.textContent = JSON.stringify(job, null, 2);
    out.hidden = false;
  } catch (e) {
    msg.textContent = e.message;
    out.hidden = true;
  }
});

refreshStats();
setInterval(refreshStats, 2000);
if (adminKey()) loadDeadLetters();

// The vendor page: submit images as a multipart job, then follow each
// image through the stages by polling the job until it ends.
"use strict";

const apiKey = rememberedInput("api-key");
let files = [];
let polling = null;

const drop = document.getElementById("drop");
const fileInput = document.getElementById("files");

function choose(list) {
  files = Array.from(list).filter((f) => /^image\//.test(f.type) || /\.(jpe?g|png|webp|gif)$/i.test(f.name));
  document.getElementById("chosen").textContent = files.length
    ? files.length + " image(s): " + files.map((f) => f.name).join(", ")
    : "No images chosen.";
}

fileInput.addEventListener("change", () => choose(fileInput.files));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files);
});

function operations() {
  return ["bg-removal", "face-crop", "resize"].filter((op) => document.getElementById("op-" + op).checked);
}

/** A record id from a file name: what a vendor would use as its SKU. */
function recordId(name, i) {
  const base = name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "-").slice(0, 200);
  return base || "image-" + (i + 1);
}

document.getElementById("submit").addEventListener("click", async () => {
  const error = document.getElementById("submit-error");
  error.textContent = "";
  if (!apiKey()) { error.textContent = "Enter your API key first."; return; }
  const urls = document.getElementById("urls").value.split(/\s+/).filter((u) => u);
  if (!files.length && !urls.length) { error.textContent = "Choose at least one image, or give its URL."; return; }
  const ops = operations();
  if (!ops.length) { error.textContent = "Pick at least one operation."; return; }
  // Files go as multipart; URLs (when no file is chosen) as JSON.
  let request;
  if (files.length) {
    const form = new FormData();
    form.append("operations", ops.join(","));
    files.forEach((f, i) => {
      form.append("images", f, f.name);
      form.append("record_id", recordId(f.name, i));
    });
    request = { key: apiKey(), method: "POST", body: form };
  } else {
    const images = urls.map((url, i) => ({ url, record_id: recordId(url.split(/[?#]/)[0].split("/").pop() || "", i) }));
    request = { key: apiKey(), method: "POST", json: { operations: ops, images } };
  }
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    const job = await api("/api/image-queue/jobs", request);
    follow(job.job_id);
  } catch (e) {
    error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
});

function follow(jobId) {
  if (polling) clearTimeout(polling);
  document.getElementById("job-section").hidden = false;
  document.getElementById("job-id").textContent = jobId;
  const tick = async () => {
    try {
      const job = await api("/api/image-queue/job/" + encodeURIComponent(jobId), { key: apiKey() });
      render(job);
      const terminal = ["completed", "failed", "partially_failed", "cancelled"].includes(job.status);
      if (!terminal) polling = setTimeout(tick, 1000);
    } catch (e) {
      document.getElementById("job-summary").textContent = "Could not read the job: " + e.message;
      polling = setTimeout(tick, 3000);
    }
  };
  tick();
}

function stageChips(img, ops) {
  const wanted = STAGES.filter((s) => !["bg-removal", "face-crop", "resize"].includes(s) || ops.includes(s));
  const at = img.stage === "done" ? wanted.length : wanted.indexOf(img.stage);
  return el("div", { class: "chips" }, wanted.map((s, i) => {
    let cls = "chip";
    if (i < at) cls += " done";
    // An image not yet admitted (queued, or over its quota) waits for the
    // stage; only a processing one is in it.
    else if (i === at) cls += img.status === "failed" ? " failed" : ["queued", "throttled"].includes(img.status) ? " waiting" : " here";
    const title = cls.endsWith("waiting") ? "waiting for " + s : cls.endsWith("here") ? "in " + s : null;
    return el("span", { class: cls, title }, s);
  }));
}

function render(job) {
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = "status-" + job.status;
  // The start estimate, while nothing has started and the pipeline has
  // measured its throughput.
  const est = job.estimated_start;
  const wait = est ? Math.round((est.start_ms - Date.now()) / 1000) : null;
  const start = est ? (wait > 1 ? `; expected to start in about ${wait} s` : "; starting now") : "";
  document.getElementById("job-summary").textContent =
    `${job.completed} of ${job.total} done, ${job.failed} failed, ${job.skipped} skipped${start}`;
  const body = document.getElementById("images");
  body.replaceChildren(...job.images.map((img) => el("tr", { class: "image-row", "data-status": img.status },
    el("td", {}, img.index + 1),
    el("td", {}, img.record_id),
    el("td", {}, stageChips(img, job.operations)),
    el("td", { class: "status-" + img.status }, img.status, img.error ? el("div", { class: "error" }, img.error) : null,
      ((img.notes && img.notes.warnings) || []).map((w) => el("div", { class: "warning" }, w))),
    el("td", {},
      // The result itself, on a checkerboard so that a blank cutout shows.
      img.outputs && img.outputs.thumb ? el("img", { class: "result-thumb", src: img.outputs.thumb, alt: "" }) : null,
      Object.entries(img.outputs || {}).map(([name, url]) =>
        el("div", {}, el("a", { class: "result-link", href: url, target: "_blank", rel: "noopener" }, name)))),
  )));
}

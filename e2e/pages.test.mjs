// The vendor page and the dashboard, driven in real headless Chromium
// against a running `image-queue up` (started by tests/e2e.rs, which
// passes its address and keys in the environment).
//
// BASE_URL, VENDOR_KEY, ADMIN_KEY: the server and its keys.
// IMAGES: paths of PNG files to upload, separated by ':'.
// SCREENSHOT_DIR: where the screenshots go.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const need = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} must be set (tests/e2e.rs sets it)`);
  return v;
};
const BASE = need("BASE_URL");
const VENDOR_KEY = need("VENDOR_KEY");
const ADMIN_KEY = need("ADMIN_KEY");
const IMAGES = need("IMAGES").split(":");
const SHOTS = need("SCREENSHOT_DIR");

let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run"],
  });
});

after(async () => {
  await browser?.close();
});

/** Submits a job through the API directly, as another vendor's system would. */
async function submitJob(files, ops = "bg-removal,face-crop,resize") {
  const form = new FormData();
  form.append("operations", ops);
  files.forEach(({ name, bytes }, i) => {
    form.append("images", new Blob([bytes], { type: "image/png" }), name);
    form.append("record_id", `load-${i}`);
  });
  const r = await fetch(BASE + "/api/image-queue/jobs", {
    method: "POST",
    headers: { Authorization: "Bearer " + VENDOR_KEY },
    body: form,
  });
  const body = await r.text();
  assert.equal(r.status, 202, body);
  return JSON.parse(body).job_id;
}

test("a vendor submits images on the vendor page and watches them complete", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(BASE + "/");
  await page.fill("#api-key", VENDOR_KEY);
  await page.dispatchEvent("#api-key", "change");
  // Only resize is ticked by default: a product shot must not lose its
  // ends to a face crop, nor its background, unless asked.
  assert.equal(await page.isChecked("#op-resize"), true);
  assert.equal(await page.isChecked("#op-bg-removal"), false);
  assert.equal(await page.isChecked("#op-face-crop"), false);
  await page.check("#op-bg-removal");
  await page.check("#op-face-crop");
  await page.setInputFiles("#files", IMAGES);
  await page.click("#submit");
  await page.waitForSelector("#job-section:not([hidden])");
  await page.waitForFunction(() => document.querySelector("#job-status").textContent === "completed", null, {
    timeout: 90_000,
  });
  const rows = await page.$$(".image-row");
  assert.equal(rows.length, IMAGES.length);
  for (const row of rows) {
    assert.equal(await row.getAttribute("data-status"), "completed");
    assert.equal((await row.$$("a.result-link")).length, 3, "three variants per image");
    assert.equal((await row.$$(".chip.done")).length, 6, "every stage passed");
    // The result is shown, on a checkerboard.
    const thumb = await row.$("img.result-thumb");
    assert.ok(thumb, "a result thumbnail");
    await page.waitForFunction((img) => img.complete && img.naturalWidth > 0, thumb);
    // A product has no face: it is left uncropped, and the page says so.
    assert.match(await row.$eval(".warning", (e) => e.textContent), /no face/);
  }
  // The links lead to the results themselves.
  const href = await page.getAttribute("a.result-link", "href");
  const r = await fetch(href);
  assert.equal(r.status, 200, href);
  assert.match(r.headers.get("content-type") || "", /^image\//);
  await page.screenshot({ path: join(SHOTS, "vendor.png"), fullPage: true });
  assert.deepEqual(errors, []);
  await page.close();
});

test("the dashboard shows the pipeline live, and dead letters can be deleted", async () => {
  const png = readFileSync(IMAGES[0]);
  // A PNG whose header and end are intact but whose pixel data is garbage
  // passes the upload's screening but no decoder: it fails for good and is
  // dead-lettered.
  const broken = Buffer.from(png);
  broken.fill(7, broken.indexOf("IDAT") + 16, broken.length - 12);
  const brokenJob = await submitJob([{ name: "broken.png", bytes: broken }], "resize");
  // Enough work that the stages have lag while the page looks.
  const load = [];
  for (let i = 0; i < 12; i++) {
    load.push(submitJob(IMAGES.map((p, k) => ({ name: `l${i}-${k}.png`, bytes: readFileSync(p) }))));
  }
  await Promise.all(load);

  const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(BASE + "/dashboard");
  await page.waitForFunction(() => document.querySelectorAll(".stage").length === 6);
  // Jobs are flowing: some stage has work waiting or in flight.
  await page.waitForFunction(() =>
    [...document.querySelectorAll(".stage")].some((s) => Number(s.querySelector(".lag").textContent) > 0 ||
      Number(s.querySelector(".throughput").textContent) > 0), null, { timeout: 30_000 });
  const workers = await page.$$eval(".stage .workers", (els) => els.map((e) => Number(e.textContent)));
  assert.deepEqual(workers, [1, 1, 1, 1, 1, 1], "one live worker per stage in `up`");
  const shot = join(SHOTS, "dashboard.png");
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`dashboard screenshot: ${shot}`);

  // The broken image's dead letter, found and deleted with the admin key.
  await page.fill("#admin-key", ADMIN_KEY);
  await page.dispatchEvent("#admin-key", "change");
  // With the admin key, the admission window and its reason are shown.
  await page.waitForFunction(() => /Admission window: \d+ image\(s\) in flight downstream · \S/
    .test(document.getElementById("admission").textContent), null, { timeout: 30_000 });
  await page.fill("#dlq-vendor", "demo");
  // The broken image reaches its dead end in its own time: wait for it
  // through the API, then look for it on the page.
  const deadline = Date.now() + 60_000;
  for (;;) {
    const r = await fetch(BASE + "/api/admin/dlq?vendor=demo", { headers: { Authorization: "Bearer " + ADMIN_KEY } });
    assert.equal(r.status, 200);
    if ((await r.json()).dead_letters.length > 0) break;
    assert.ok(Date.now() < deadline, "the broken image was never dead-lettered");
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  await page.click("#dlq-load");
  const row = "tr.dead-letter";
  await page.waitForSelector(row);
  const text = await page.textContent(row);
  assert.match(text, new RegExp(brokenJob));
  await page.screenshot({ path: join(SHOTS, "dashboard-dead-letters.png"), fullPage: true });
  await page.click(`${row} button.delete`);
  await page.waitForFunction(() => document.querySelectorAll("tr.dead-letter").length === 0);
  assert.match(await page.textContent("#dlq-total"), /0 held/);

  // Job lookup.
  await page.fill("#lookup-id", brokenJob);
  await page.click("#lookup");
  await page.waitForSelector("#lookup-result:not([hidden])");
  const job = JSON.parse(await page.textContent("#lookup-result"));
  assert.equal(job.status, "failed");
  assert.equal(job.vendor, "demo");
  assert.deepEqual(errors, []);
  await page.close();
});

// Last: its dead letter would be counted by the dashboard's test.
test("a vendor submits an image by URL; one that cannot be fetched fails with the reason", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(BASE + "/");
  await page.fill("#api-key", VENDOR_KEY);
  await page.dispatchEvent("#api-key", "change");
  await page.fill("#urls", "https://no-such-host.invalid/photos/sku-9.jpg");
  await page.click("#submit");
  await page.waitForSelector("#job-section:not([hidden])");
  await page.waitForFunction(() => document.querySelector("#job-status").textContent === "failed", null, {
    timeout: 60_000,
  });
  const row = await page.$(".image-row");
  assert.equal(await row.$eval("td:nth-child(2)", (e) => e.textContent), "sku-9");
  assert.match(await row.$eval(".error", (e) => e.textContent), /does not resolve/);
  assert.deepEqual(errors, []);
  await page.close();
});

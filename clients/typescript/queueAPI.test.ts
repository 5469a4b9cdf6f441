/**
 * The client against a real server: `image-queue up` (the binary named by
 * IQ_BINARY) on a free port with a temporary data directory.
 */
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { deflateSync } from "node:zlib";
import { QueueAPI, QueueApiError, type Progress, type Job } from "./queueAPI.js";

const bin = process.env.IQ_BINARY;
let server: ChildProcess;
let dir: string;
let base: string;
let key: string;

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** A small PNG: a red square on white. */
function png(w: number, h: number): Uint8Array {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (b: Buffer) => {
    let c = 0xffffffff;
    for (const x of b) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type: string, data: Buffer) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const c = Buffer.alloc(4);
    c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const rows: Buffer[] = [];
  for (let y = 0; y < h; y++) {
    const row = Buffer.alloc(1 + w * 3, 255);
    row[0] = 0;
    for (let x = 0; x < w; x++) {
      if (x > w / 4 && x < (3 * w) / 4 && y > h / 4 && y < (3 * h) / 4) row.set([200, 30, 30], 1 + x * 3);
    }
    rows.push(row);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(Buffer.concat(rows))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

before(async () => {
  assert.ok(bin, "set IQ_BINARY to the image-queue binary (cargo build, then target/debug/image-queue)");
  dir = mkdtempSync(join(tmpdir(), "iq-client-"));
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  server = spawn(bin!, ["up", "--listen", `127.0.0.1:${port}`, "--data-dir", dir], {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, RUST_LOG: "warn" },
  });
  // `up` prints its ready-to-paste curl once everything runs.
  await new Promise<void>((resolve, reject) => {
    let out = "";
    server.stdout!.on("data", (d) => {
      out += d;
      if (out.includes("Then follow it with")) resolve();
    });
    server.on("exit", (code) => reject(new Error(`image-queue up exited with ${code}`)));
  });
  key = readFileSync(join(dir, "demo-vendor.key"), "utf8").trim();
});

after(() => {
  server?.kill("SIGTERM");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("submit files, follow progress live, and read the results", async () => {
  const api = new QueueAPI({ baseUrl: base, apiKey: key });
  const sub = await api.submitFiles(["bg-removal", "resize"], [
    { data: new Blob([png(64, 48)], { type: "image/png" }), name: "a.png", record_id: "sku-1" },
  ]);
  assert.equal(sub.status, "queued");
  const seen: (Progress | Job)[] = [];
  const job = await api.waitForJob(sub.job_id, (p) => seen.push(p), { timeoutMs: 60_000 });
  assert.equal(job.status, "completed");
  assert.ok(seen.length > 0, "progress was reported");
  const outputs = job.images[0].outputs;
  assert.deepEqual(Object.keys(outputs).sort(), ["large", "medium", "thumb"]);
  const res = await fetch(outputs.thumb);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), "image/webp");
});

test("an idempotent retry returns the same job; list and cancel", async () => {
  const api = new QueueAPI({ baseUrl: base, apiKey: key });
  const images = [{ url: "https://images.example.invalid/a.jpg", record_id: "sku-2" }];
  const a = await api.submitUrls(["resize"], images, "retry-me");
  const b = await api.submitUrls(["resize"], images, "retry-me");
  assert.equal(a.job_id, b.job_id);
  const list = await api.listJobs({ limit: 50 });
  assert.ok(list.jobs.some((j) => j.job_id === a.job_id));
  try {
    const cancelled = await api.cancelJob(a.job_id);
    assert.equal(cancelled.status, "cancelled");
  } catch (e) {
    // The job may already have ended (its URL cannot be fetched): 409.
    assert.ok(e instanceof QueueApiError && e.status === 409, String(e));
  }
});

test("a vendor's webhook: set, read without its secret, remove", async () => {
  const api = new QueueAPI({ baseUrl: base, apiKey: key });
  const set = await api.setWebhook("https://shop.example/hooks/iq");
  assert.match(set.secret, /^whsec_[0-9a-f]{48}$/);
  assert.deepEqual(await api.getWebhook(), { url: "https://shop.example/hooks/iq" });
  await api.removeWebhook();
  assert.deepEqual(await api.getWebhook(), { url: null });
});

test("errors carry the API's status and code", async () => {
  const bad = new QueueAPI({ baseUrl: base, apiKey: "not-a-key" });
  await assert.rejects(bad.getJob("0".repeat(32)), (e: unknown) => e instanceof QueueApiError && e.status === 401);
  const api = new QueueAPI({ baseUrl: base, apiKey: key });
  await assert.rejects(api.getJob("0".repeat(32)), (e: unknown) => e instanceof QueueApiError && e.code === "not_found");
  await assert.rejects(
    api.submitUrls(["sharpen" as never], [{ url: "https://x.invalid/a.jpg", record_id: "r" }]),
    (e: unknown) => e instanceof QueueApiError && e.status === 422,
  );
});

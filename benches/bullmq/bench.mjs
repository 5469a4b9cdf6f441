// The pipeline workload on BullMQ, built the way BullMQ users chain stages:
// six queues, each worker adding the job to the next queue. Handlers do
// nothing. Prints one JSON line like `image-queue bench pipeline`.
//
// usage: node bench.mjs <redis-url> <jobs> [rate]
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const [url, jobsArg, rateArg] = process.argv.slice(2);
const total = Number(jobsArg ?? 20000);
const rate = rateArg ? Number(rateArg) : null;
const u = new URL(url);
const connection = { host: u.hostname, port: Number(u.port || 6379), maxRetriesPerRequest: null };
const prefix = `bullbench${Math.floor(Math.random() * 1e9)}`;
const stages = ["rate-check", "bg-removal", "face-crop", "resize", "upload", "db-commit"];

// BullMQ's fastest settings we know: no stored results or history, no
// per-job events stream, high worker concurrency.
const jobOpts = { removeOnComplete: true, removeOnFail: true };
const queues = stages.map((s) => new Queue(s, { connection, prefix, streams: { events: { maxLen: 0 } } }));
const submitted = new Map();
const latencies = [];
let last = 0;
let resolveDone;
const done = new Promise((r) => (resolveDone = r));

const workers = stages.map(
  (s, i) =>
    new Worker(
      s,
      async (job) => {
        if (i + 1 < stages.length) {
          await queues[i + 1].add("img", job.data, jobOpts);
        } else {
          const t = submitted.get(job.data.id);
          const now = performance.now();
          latencies.push(now - t);
          last = now;
          if (latencies.length === total) resolveDone();
        }
      },
      { connection, prefix, concurrency: 64, autorun: true, removeOnComplete: { count: 0 }, removeOnFail: { count: 0 } },
    ),
);

const admin = new IORedis(url);

async function cpuSeconds() {
  const info = await admin.info("cpu");
  let t = 0;
  for (const line of info.split("\n")) {
    const [k, v] = line.trim().split(":");
    if (k === "used_cpu_sys" || k === "used_cpu_user") t += Number(v);
  }
  return t;
}

await Promise.all(workers.map((w) => w.waitUntilReady()));
const cpuBefore = await cpuSeconds();
const start = performance.now();
if (rate) {
  for (let n = 0; n < total; n++) {
    const due = start + (n * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    submitted.set(n, performance.now());
    await queues[0].add("img", { id: n }, jobOpts);
  }
} else {
  const batch = 500;
  for (let n = 0; n < total; n += batch) {
    const jobs = [];
    for (let k = n; k < Math.min(n + batch, total); k++) {
      submitted.set(k, performance.now());
      jobs.push({ name: "img", data: { id: k }, opts: jobOpts });
    }
    await queues[0].addBulk(jobs);
  }
}
await done;
const cpuAfter = await cpuSeconds();
latencies.sort((a, b) => a - b);
const pct = (q) => latencies[Math.min(latencies.length - 1, Math.round((latencies.length - 1) * q))];
console.log(
  JSON.stringify({
    jobs: total,
    rate,
    jobs_per_s: total / ((last - start) / 1000),
    p50_ms: pct(0.5),
    p99_ms: pct(0.99),
    redis_cpu_us_per_job: ((cpuAfter - cpuBefore) * 1e6) / total,
  }),
);
await Promise.all(workers.map((w) => w.close()));
const client = admin;
let cursor = "0";
do {
  const [next, keys] = await client.scan(cursor, "MATCH", `${prefix}:*`, "COUNT", 1000);
  if (keys.length) await client.unlink(...keys);
  cursor = next;
} while (cursor !== "0");
await Promise.all(queues.map((q) => q.close()));
process.exit(0);

/**
 * A typed client of image-queue's HTTP API: the successor of the Bull
 * system's `src/lib/queueAPI.ts`. Submit jobs (image URLs or files), read,
 * list and cancel them, and wait for one to finish with progress, over
 * Server-Sent Events where the runtime has a streaming fetch, by polling
 * otherwise.
 */

export type Operation = "bg-removal" | "face-crop" | "resize";

export type JobStatus = "queued" | "processing" | "completed" | "partially_failed" | "failed" | "cancelled";

export interface ImageState {
  index: number;
  record_id: string;
  stage: string;
  status: string;
  attempts: number;
  error?: string;
  resume_at_ms?: number;
  outputs: Record<string, string>;
  notes?: Record<string, unknown>;
}

export interface Job {
  job_id: string;
  status: JobStatus;
  operations: Operation[];
  created_ms: number;
  updated_ms: number;
  finished_ms?: number;
  total: number;
  completed: number;
  failed: number;
  skipped: number;
  /** What became of the vendor's webhook call for this job's end. */
  webhook?: string;
  /** While no image has started: when the first is expected to. */
  estimated_start?: EstimatedStart;
  images: ImageState[];
}

/** The vendor's own queue ahead, drained at its fair share of the measured
 * throughput, or a used-up quota's refill, whichever is later. */
export interface EstimatedStart {
  start_ms: number;
  queued_ahead: number;
  share: number;
  throughput: number;
  quota_resumes_ms?: number;
}

export interface Submitted {
  job_id: string;
  status: "queued";
  images: number;
  status_url: string;
  /** Absent until the pipeline has measured its throughput. */
  estimated_start?: EstimatedStart;
}

export interface Progress {
  job: string;
  image: number;
  stage: string;
  status: string;
}

/** An error answered by the API: its HTTP status and `{error: {code, message}}`. */
export class QueueApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = "QueueApiError";
  }
}

const TERMINAL: JobStatus[] = ["completed", "partially_failed", "failed", "cancelled"];

export function isTerminal(status: JobStatus): boolean {
  return TERMINAL.includes(status);
}

export interface ClientOptions {
  /** e.g. `http://127.0.0.1:3001` */
  baseUrl: string;
  /** The vendor's API key. */
  apiKey: string;
  fetch?: typeof fetch;
}

export class QueueAPI {
  private readonly base: string;
  private readonly key: string;
  private readonly fetchImpl: typeof fetch;

  constructor(opts: ClientOptions) {
    this.base = opts.baseUrl.replace(/\/+$/, "");
    this.key = opts.apiKey;
    this.fetchImpl = opts.fetch ?? fetch;
  }

  private async request<T>(method: string, path: string, body?: BodyInit, headers: Record<string, string> = {}): Promise<T> {
    const res = await this.fetchImpl(this.base + path, {
      method,
      body,
      headers: { authorization: `Bearer ${this.key}`, ...headers },
    });
    const text = await res.text();
    const json = text ? JSON.parse(text) : {};
    if (!res.ok) {
      const retry = res.headers.get("retry-after");
      throw new QueueApiError(
        res.status,
        json?.error?.code ?? "unknown",
        json?.error?.message ?? res.statusText,
        retry ? Number(retry) : undefined,
      );
    }
    return json as T;
  }

  /** Submits images by URL. An idempotency key makes a retried submit return the same job. */
  submitUrls(
    operations: Operation[],
    images: { url: string; record_id: string }[],
    idempotencyKey?: string,
  ): Promise<Submitted> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (idempotencyKey) headers["idempotency-key"] = idempotencyKey;
    return this.request("POST", "/api/image-queue/jobs", JSON.stringify({ operations, images }), headers);
  }

  /** Submits image files (one record id per file, in order). */
  submitFiles(
    operations: Operation[],
    files: { data: Blob; name: string; record_id: string }[],
    idempotencyKey?: string,
  ): Promise<Submitted> {
    const form = new FormData();
    form.append("operations", operations.join(","));
    for (const f of files) {
      form.append("images", f.data, f.name);
      form.append("record_id", f.record_id);
    }
    const headers: Record<string, string> = {};
    if (idempotencyKey) headers["idempotency-key"] = idempotencyKey;
    return this.request("POST", "/api/image-queue/jobs", form, headers);
  }

  getJob(jobId: string): Promise<Job> {
    return this.request("GET", `/api/image-queue/job/${encodeURIComponent(jobId)}`);
  }

  cancelJob(jobId: string): Promise<Job> {
    return this.request("DELETE", `/api/image-queue/job/${encodeURIComponent(jobId)}`);
  }

  /** Sets (or replaces) this vendor's webhook; the secret is shown only here. */
  setWebhook(url: string): Promise<{ url: string; secret: string }> {
    return this.request("PUT", "/api/image-queue/webhook", JSON.stringify({ url }), {
      "content-type": "application/json",
    });
  }

  getWebhook(): Promise<{ url: string | null }> {
    return this.request("GET", "/api/image-queue/webhook");
  }

  async removeWebhook(): Promise<void> {
    await this.request("DELETE", "/api/image-queue/webhook");
  }

  listJobs(opts: { status?: JobStatus | "active"; cursor?: number; limit?: number } = {}): Promise<{
    jobs: Job[];
    next_cursor: number | null;
  }> {
    const q = new URLSearchParams();
    if (opts.status) q.set("status", opts.status);
    if (opts.cursor !== undefined) q.set("cursor", String(opts.cursor));
    if (opts.limit !== undefined) q.set("limit", String(opts.limit));
    const qs = q.toString();
    return this.request("GET", `/api/image-queue/jobs${qs ? `?${qs}` : ""}`);
  }

  /**
   * Resolves with the job once it has ended. `onProgress` hears each stage
   * transition (over SSE) or each changed poll. Falls back to polling when
   * the event stream cannot be opened or breaks.
   */
  async waitForJob(
    jobId: string,
    onProgress?: (p: Progress | Job) => void,
    opts: { timeoutMs?: number; pollMs?: number } = {},
  ): Promise<Job> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10 * 60_000);
    try {
      const done = await this.streamUntilDone(jobId, onProgress, deadline);
      if (done) return done;
    } catch (e) {
      if (e instanceof QueueApiError && e.status === 404) throw e;
      // Fall through to polling.
    }
    let last = "";
    while (Date.now() < deadline) {
      const job = await this.getJob(jobId);
      const sig = JSON.stringify([job.status, job.images.map((i) => [i.stage, i.status])]);
      if (sig !== last) {
        last = sig;
        onProgress?.(job);
      }
      if (isTerminal(job.status)) return job;
      await new Promise((r) => setTimeout(r, opts.pollMs ?? 1000));
    }
    throw new QueueApiError(408, "timeout", `job ${jobId} did not finish in time`);
  }

  private async streamUntilDone(
    jobId: string,
    onProgress: ((p: Progress | Job) => void) | undefined,
    deadline: number,
  ): Promise<Job | null> {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), Math.max(0, deadline - Date.now()));
    try {
      const res = await this.fetchImpl(`${this.base}/api/image-queue/job/${encodeURIComponent(jobId)}/events`, {
        headers: { authorization: `Bearer ${this.key}`, accept: "text/event-stream" },
        signal: ctrl.signal,
      });
      if (res.status === 404) throw new QueueApiError(404, "not_found", "no such job");
      if (!res.ok || !res.body) return null;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return null;
        buf += value;
        let sep: number;
        while ((sep = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, sep);
          buf = buf.slice(sep + 2);
          let name = "message";
          let data = "";
          for (const line of frame.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (!data) continue;
          const payload = JSON.parse(data);
          if (name === "progress") onProgress?.(payload as Progress);
          if (name === "done") return payload as Job;
        }
      }
    } finally {
      clearTimeout(timer);
      ctrl.abort();
    }
  }
}

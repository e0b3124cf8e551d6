// S3-compatible object store (AWS S3, MinIO, Ceph RGW, GCS interop) over the
// AWS SDK v3. The SDK's own retries are off: every request goes through
// withRetry (attempt limit, attempt timeout, total deadline, jittered
// backoff) and every failure leaves here as a StrataError with an errno.
// Puts are atomic (see s3-upload.ts); ranged gets must return exactly the
// bytes asked for.
import { createHash } from 'crypto';
import {
  DeleteObjectCommand, GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, S3Client,
  type GetObjectCommandOutput,
} from '@aws-sdk/client-s3';
import { StrataError, einval } from '../errors';
import { validateKey } from './fs';
import { DEFAULT_RETRY, TransientError, withRetry, type RetryPolicy } from './retry';
import { classifyS3 } from './s3-errors';
import { abortUpload, upload } from './s3-upload';
import type { ObjectInfo, ObjectStore } from './types';

export interface S3StoreOptions {
  bucket: string;
  /** Key prefix inside the bucket ("" or "a/b"; a trailing slash is implied). */
  prefix?: string;
  /** Default: $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1. */
  region?: string;
  /** e.g. http://127.0.0.1:9000 (MinIO), https://storage.googleapis.com (GCS). Default: AWS. */
  endpoint?: string;
  /** Bucket in the path instead of the host name (MinIO, Ceph, most self-hosted servers). */
  forcePathStyle?: boolean;
  /** Default: the SDK's chain (environment, shared config files, instance or container role). */
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Multipart part size (default 8 MiB; S3 needs ≥ 5 MiB for all parts but the last). */
  partSize?: number;
  /** Parts of one put in flight at once (default 4). */
  concurrency?: number;
  /** Keys per list request (default and S3's maximum: 1000). */
  pageSize?: number;
  retry?: Partial<RetryPolicy>;
  /** Send Content-MD5 on puts so the server rejects damaged bodies (default true). */
  contentMd5?: boolean;
  /** Compare ETags with the MD5 of what was sent or read, for servers that do
   * not check Content-MD5. Wrong with SSE-KMS or SSE-C (their ETags are not MD5s). */
  verifyEtag?: boolean;
  /** Bytes of the current put acknowledged by the server so far. */
  onProgress?: (bytes: number, key: string) => void;
  /** Use this client instead of building one from the options above. */
  client?: S3Client;
}

export class S3ObjectStore implements ObjectStore {
  readonly client: S3Client;
  readonly bucket: string;
  readonly prefix: string;
  private readonly retry: RetryPolicy;
  private readonly partSize: number;
  private readonly concurrency: number;
  private readonly pageSize: number;
  /** Multipart uploads whose abort failed (upload id -> key), tried again later. */
  private readonly stranded = new Map<string, string>();
  private strandedTimer: NodeJS.Timeout | null = null;
  private strandedDelayMs = 60_000;

  constructor(private readonly opts: S3StoreOptions) {
    // S3's naming rules, widened to what GCS allows too ('_', longer names).
    if (!opts.bucket || !/^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$/.test(opts.bucket)) throw einval(`invalid bucket name ${JSON.stringify(opts.bucket)}`);
    const prefix = (opts.prefix ?? '').replace(/^\/+|\/+$/g, '');
    if (prefix) validateKey(prefix);
    this.bucket = opts.bucket;
    this.prefix = prefix ? `${prefix}/` : '';
    this.retry = { ...DEFAULT_RETRY, ...opts.retry };
    this.partSize = positive('partSize', opts.partSize ?? 8 << 20);
    this.concurrency = positive('concurrency', opts.concurrency ?? 4);
    this.pageSize = Math.min(1000, positive('pageSize', opts.pageSize ?? 1000));
    positive('retry.maxAttempts', this.retry.maxAttempts);
    this.client = opts.client ?? new S3Client({
      region: opts.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      endpoint: opts.endpoint,
      forcePathStyle: opts.forcePathStyle,
      credentials: opts.credentials,
      maxAttempts: 1, // retries are ours (withRetry): one policy, one deadline
      // Only what the operation requires: third-party servers may not know
      // the newer x-amz-checksum-* flexible checksums; Content-MD5 covers puts.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
  }

  private full(key: string): string {
    validateKey(key);
    return this.prefix + key;
  }

  private run<T>(what: string, fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
    return withRetry(what, this.retry, (e) => classifyS3(what, e), fn);
  }

  async put(key: string, data: Uint8Array | AsyncIterable<Uint8Array>): Promise<void> {
    await upload({
      client: this.client, bucket: this.bucket, key: this.full(key), name: key, partSize: this.partSize,
      concurrency: this.concurrency, retry: this.retry, contentMd5: this.opts.contentMd5 ?? true,
      verifyEtag: this.opts.verifyEtag ?? false, onProgress: this.opts.onProgress,
      onAbortFailed: (id) => this.strand(id, this.full(key)),
    }, data);
  }

  /** Multipart uploads whose abort failed and is still to be retried. */
  get strandedUploads(): number { return this.stranded.size; }

  private strand(uploadId: string, key: string): void {
    this.stranded.set(uploadId, key);
    this.scheduleAborts();
  }

  private scheduleAborts(): void {
    if (this.strandedTimer || this.stranded.size === 0) return;
    this.strandedTimer = setTimeout(() => {
      this.strandedTimer = null;
      void this.abortStranded().then(({ left }) => {
        // Backing off up to an hour while the server keeps refusing.
        this.strandedDelayMs = left ? Math.min(this.strandedDelayMs * 2, 3_600_000) : 60_000;
        this.scheduleAborts();
      });
    }, this.strandedDelayMs);
    this.strandedTimer.unref();
  }

  /** Tries again to abort the multipart uploads whose abort failed (also run on a timer). */
  async abortStranded(): Promise<{ aborted: number; left: number }> {
    let aborted = 0;
    for (const [id, key] of [...this.stranded]) {
      if (await abortUpload({ client: this.client, bucket: this.bucket, key, name: key.slice(this.prefix.length) }, id)) {
        this.stranded.delete(id);
        aborted++;
      }
    }
    return { aborted, left: this.stranded.size };
  }

  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const k = this.full(key);
    if (range && !(Number.isSafeInteger(range.offset) && Number.isSafeInteger(range.length) && range.offset >= 0 && range.length >= 0)) {
      throw einval(`invalid range ${range.offset}+${range.length} for ${key}`);
    }
    if (range && range.length === 0) {
      // "bytes=a-(a-1)" is not a range S3 accepts: check the size instead.
      const h = await this.head(key);
      if (!h) throw new StrataError('ENOENT', `get ${key}: not found`);
      if (range.offset > h.size) throw new StrataError('EBADMSG', `get ${key}: object is ${h.size} bytes; offset ${range.offset} is beyond it`);
      return Buffer.alloc(0);
    }
    const what = `get ${key}`;
    return this.run(what, async (signal) => {
      const out = await this.client.send(new GetObjectCommand({
        Bucket: this.bucket, Key: k, Range: range ? `bytes=${range.offset}-${range.offset + range.length - 1}` : undefined,
      }), { abortSignal: signal });
      const expect = expectedLength(what, out, range);
      const body = await readBody(what, out, expect, signal);
      if (range && !out.ContentRange) return body.subarray(range.offset, range.offset + range.length); // server ignored Range
      if (!range && this.opts.verifyEtag) checkEtag(what, out.ETag, body);
      return body;
    });
  }

  async head(key: string): Promise<ObjectInfo | null> {
    const k = this.full(key);
    try {
      const out = await this.run(`head ${key}`, (signal) =>
        this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: k }), { abortSignal: signal }));
      return { key, size: out.ContentLength ?? 0 };
    } catch (e) {
      if ((e as StrataError).code === 'ENOENT') return null;
      throw e;
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    const out: ObjectInfo[] = [];
    let token: string | undefined;
    do {
      const page = await this.run(`list ${prefix}`, (signal) => this.client.send(new ListObjectsV2Command({
        Bucket: this.bucket, Prefix: this.prefix + prefix, ContinuationToken: token, MaxKeys: this.pageSize,
      }), { abortSignal: signal }));
      for (const o of page.Contents ?? []) {
        if (o.Key?.startsWith(this.prefix)) out.push({ key: o.Key.slice(this.prefix.length), size: o.Size ?? 0, modified: o.LastModified?.getTime() });
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
      if (page.IsTruncated && !token) throw new StrataError('EIO', `list ${prefix}: truncated page without a continuation token`);
    } while (token);
    return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  }

  async delete(key: string): Promise<void> {
    const k = this.full(key);
    try {
      await this.run(`delete ${key}`, (signal) =>
        this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: k }), { abortSignal: signal }));
    } catch (e) {
      if ((e as StrataError).code !== 'ENOENT') throw e; // already gone: what delete wants
    }
  }

  /** Closes the client's idle connections. */
  close(): void { this.client.destroy(); }
}

/** The byte count a GET must deliver, from the request and Content-Range; a
 * range past the object's end is EBADMSG at once (it will not get longer). */
function expectedLength(what: string, out: GetObjectCommandOutput, range?: { offset: number; length: number }): number | undefined {
  if (!range) return out.ContentLength;
  if (!out.ContentRange) {
    // 200 without Content-Range: the whole object came back.
    const size = out.ContentLength;
    if (size !== undefined && size < range.offset + range.length) throw tooShort(what, size, range);
    return size;
  }
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(out.ContentRange);
  if (!m) throw new TransientError(`${what}: unparsable Content-Range ${out.ContentRange}`);
  const [start, end, total] = [Number(m[1]), Number(m[2]), m[3] === '*' ? NaN : Number(m[3])];
  if (total < range.offset + range.length) throw tooShort(what, total, range);
  if (start !== range.offset || end !== range.offset + range.length - 1) {
    throw new TransientError(`${what}: asked for ${range.offset}+${range.length}, got ${out.ContentRange}`);
  }
  return range.length;
}

const tooShort = (what: string, size: number, r: { offset: number; length: number }) =>
  new StrataError('EBADMSG', `${what}: object is ${size} bytes; range ${r.offset}+${r.length} is beyond it (truncated?)`);

/** Reads the body into one buffer; fewer or more bytes than promised is a
 * transient failure (a connection cut mid-body), retried by the caller. */
async function readBody(what: string, out: GetObjectCommandOutput, expect: number | undefined, signal: AbortSignal): Promise<Buffer> {
  const body = out.Body as (AsyncIterable<Uint8Array> & { destroy?: (e?: Error) => void }) | undefined;
  if (!body) {
    if (expect) throw new TransientError(`${what}: response has no body`);
    return Buffer.alloc(0);
  }
  // The SDK stops watching the signal once headers arrive; a stalled body must still end.
  const onAbort = () => body.destroy?.(signal.reason);
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    if (expect === undefined) {
      const chunks: Buffer[] = [];
      for await (const c of body) chunks.push(Buffer.from(c));
      return Buffer.concat(chunks);
    }
    const buf = Buffer.allocUnsafe(expect);
    let got = 0;
    for await (const c of body) {
      if (got + c.length > expect) throw new TransientError(`${what}: more than the ${expect} bytes promised`);
      buf.set(c, got);
      got += c.length;
    }
    if (got !== expect) throw new TransientError(`${what}: short read, ${got} of ${expect} bytes`);
    return buf;
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

function checkEtag(what: string, etag: string | undefined, body: Buffer): void {
  const e = (etag ?? '').replace(/"/g, '').toLowerCase();
  // Multipart ETags ("<md5 of md5s>-<parts>") are not a digest of the body.
  if (!/^[0-9a-f]{32}$/.test(e)) return;
  if (createHash('md5').update(body).digest('hex') !== e) throw new TransientError(`${what}: body does not match its ETag`);
}

function positive(name: string, v: number): number {
  if (!Number.isSafeInteger(v) || v <= 0) throw einval(`${name} must be a positive integer, not ${v}`);
  return v;
}

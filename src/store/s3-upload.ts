// One atomic S3 put. Data that fits one part goes up as a single PutObject;
// anything larger (or a stream that turns out larger) as a multipart upload
// with at most `concurrency` parts in flight, so memory stays near
// (concurrency + 1) × partSize however large the stream is. Either way the
// object becomes visible only when its last request (PutObject or
// CompleteMultipartUpload) succeeds; a failed multipart upload is aborted so
// the server can drop its parts.
import { createHash } from 'crypto';
import {
  AbortMultipartUploadCommand, CompleteMultipartUploadCommand, CreateMultipartUploadCommand, DeleteObjectCommand,
  HeadObjectCommand, PutObjectCommand, UploadPartCommand, type S3Client,
} from '@aws-sdk/client-s3';
import { StrataError } from '../errors';
import { TransientError, withRetry, type RetryPolicy } from './retry';
import { classifyS3, isNoSuchUpload } from './s3-errors';

export interface UploadTarget {
  client: S3Client;
  bucket: string;
  /** The full object key (store prefix included). */
  key: string;
  /** The key as the caller named it, for messages. */
  name: string;
  partSize: number;
  concurrency: number;
  retry: RetryPolicy;
  /** Send Content-MD5 so the server rejects a body damaged in transit. */
  contentMd5: boolean;
  /** Also compare the returned ETag with the MD5 (servers that ignore Content-MD5; not with SSE-KMS/SSE-C). */
  verifyEtag: boolean;
  /** A multipart upload whose abort failed: its parts still cost storage until someone aborts it. */
  onAbortFailed?: (uploadId: string) => void;
  onProgress?: (bytes: number, key: string) => void;
}

const MAX_PARTS = 10_000; // S3's limit

export async function upload(t: UploadTarget, data: Uint8Array | AsyncIterable<Uint8Array>): Promise<void> {
  const parts = splitParts(data, t.partSize)[Symbol.asyncIterator]();
  const first = await parts.next();
  const second = first.done ? first : await parts.next();
  if (second.done) {
    const body = first.done ? Buffer.alloc(0) : first.value;
    await putSingle(t, body);
    t.onProgress?.(body.length, t.name);
    return;
  }
  await putMultipart(t, first.value, second.value, parts);
}

async function putSingle(t: UploadTarget, body: Buffer): Promise<void> {
  const md5 = createHash('md5').update(body).digest();
  try {
    await withRetry(`put ${t.name}`, t.retry, (e) => classifyS3(`put ${t.name}`, e), async (signal) => {
      const out = await t.client.send(new PutObjectCommand({
        Bucket: t.bucket, Key: t.key, Body: body, ContentLength: body.length,
        ContentMD5: t.contentMd5 ? md5.toString('base64') : undefined,
      }), { abortSignal: signal });
      checkEtag(t, out.ETag, md5, 'object');
    });
  } catch (e) {
    // Only an ETag check can fail after the server stored the body: then a
    // damaged object is visible, so take it away again.
    if (t.verifyEtag) await deleteQuietly(t);
    throw e;
  }
}

async function putMultipart(t: UploadTarget, p1: Buffer, p2: Buffer, rest: AsyncIterator<Buffer>): Promise<void> {
  const what = `put ${t.name}`;
  const classify = (e: unknown) => classifyS3(what, e);
  const created = await withRetry(`${what}: create multipart upload`, t.retry, classify, (signal) =>
    t.client.send(new CreateMultipartUploadCommand({ Bucket: t.bucket, Key: t.key }), { abortSignal: signal }));
  const uploadId = created.UploadId;
  if (!uploadId) throw new StrataError('EIO', `${what}: server returned no upload id`);

  // One failure stops everything: parts in flight are cancelled, no new part starts.
  const cancel = new AbortController();
  let failure: unknown;
  const fail = (e: unknown) => { if (failure === undefined) { failure = e; cancel.abort(e); } };
  const done: Array<{ PartNumber: number; ETag: string }> = [];
  const inflight = new Set<Promise<void>>();
  let total = 0, sent = 0;

  const start = (n: number, body: Buffer) => {
    if (n > MAX_PARTS) throw new StrataError('E2BIG', `${what}: more than ${MAX_PARTS} parts of ${t.partSize} bytes`);
    total += body.length;
    const p = uploadPart(t, uploadId, n, body, cancel.signal).then((etag) => {
      done.push({ PartNumber: n, ETag: etag });
      sent += body.length;
      t.onProgress?.(sent, t.name);
    }, fail).finally(() => inflight.delete(p));
    inflight.add(p);
  };
  try {
    let n = 0;
    let lookahead: Buffer | undefined = p2;
    start(++n, p1);
    for (;;) {
      while (inflight.size >= t.concurrency && failure === undefined) await Promise.race(inflight);
      if (failure !== undefined) break;
      let body = lookahead;
      lookahead = undefined;
      if (!body) {
        let next: IteratorResult<Buffer>;
        try { next = await rest.next(); } catch (e) { fail(e); break; }
        if (next.done) break;
        body = next.value;
      }
      start(++n, body);
    }
    await Promise.all(inflight);
    if (failure !== undefined) throw failure;
    done.sort((a, b) => a.PartNumber - b.PartNumber);
    await complete(t, uploadId, done, total);
  } catch (e) {
    fail(e);
    await Promise.allSettled(inflight);
    await rest.return?.().catch(() => {});
    await abortQuietly(t, uploadId);
    throw failure;
  }
}

async function uploadPart(t: UploadTarget, uploadId: string, n: number, body: Buffer, cancel: AbortSignal): Promise<string> {
  const md5 = createHash('md5').update(body).digest();
  const what = `put ${t.name} part ${n}`;
  return withRetry(what, t.retry, (e) => classifyS3(what, e), async (signal) => {
    const out = await t.client.send(new UploadPartCommand({
      Bucket: t.bucket, Key: t.key, UploadId: uploadId, PartNumber: n, Body: body, ContentLength: body.length,
      ContentMD5: t.contentMd5 ? md5.toString('base64') : undefined,
    }), { abortSignal: signal });
    if (!out.ETag) throw new TransientError(`${what}: no ETag in the response`);
    checkEtag(t, out.ETag, md5, `part ${n}`);
    return out.ETag;
  }, cancel);
}

async function complete(t: UploadTarget, uploadId: string, parts: Array<{ PartNumber: number; ETag: string }>, total: number): Promise<void> {
  const what = `put ${t.name}: complete multipart upload`;
  try {
    await withRetry(what, t.retry, (e) => classifyS3(what, e), async (signal, attempt) => {
      try {
        await t.client.send(new CompleteMultipartUploadCommand({
          Bucket: t.bucket, Key: t.key, UploadId: uploadId, MultipartUpload: { Parts: parts },
        }), { abortSignal: signal });
      } catch (e) {
        // A retried Complete whose first try succeeded but lost its reply
        // finds the upload gone: then the object is there, whole.
        if (attempt > 1 && isNoSuchUpload(e) && await sizeIs(t, total, signal)) return;
        throw e;
      }
    });
  } catch (e) {
    if (isNoSuchUpload(e) && await sizeIs(t, total).catch(() => false)) return;
    throw e;
  }
}

async function sizeIs(t: UploadTarget, size: number, signal?: AbortSignal): Promise<boolean> {
  try {
    const h = await t.client.send(new HeadObjectCommand({ Bucket: t.bucket, Key: t.key }), { abortSignal: signal });
    return h.ContentLength === size;
  } catch { return false; }
}

const QUICK: RetryPolicy = { maxAttempts: 3, baseDelayMs: 100, maxDelayMs: 1000, attemptTimeoutMs: 10_000, deadlineMs: 20_000 };

/** Best effort: the put's own error is what the caller must see. An abort
 * that fails is handed to onAbortFailed (the store tries again later); the
 * parts are never visible, and a lifecycle rule
 * (AbortIncompleteMultipartUpload) is the last resort for them. */
async function abortQuietly(t: UploadTarget, uploadId: string): Promise<void> {
  if (!(await abortUpload(t, uploadId))) t.onAbortFailed?.(uploadId);
}

/** Aborts a multipart upload; true when it is gone (aborted now, or already). */
export async function abortUpload(t: Pick<UploadTarget, 'client' | 'bucket' | 'key' | 'name'>, uploadId: string): Promise<boolean> {
  const what = `put ${t.name}: abort multipart upload`;
  return withRetry(what, QUICK, (e) => classifyS3(what, e), (signal) =>
    t.client.send(new AbortMultipartUploadCommand({ Bucket: t.bucket, Key: t.key, UploadId: uploadId }), { abortSignal: signal }),
  ).then(() => true, (e) => isNoSuchUpload(e));
}

async function deleteQuietly(t: UploadTarget): Promise<void> {
  const what = `put ${t.name}: remove damaged object`;
  await withRetry(what, QUICK, (e) => classifyS3(what, e), (signal) =>
    t.client.send(new DeleteObjectCommand({ Bucket: t.bucket, Key: t.key }), { abortSignal: signal }),
  ).catch(() => {});
}

function checkEtag(t: UploadTarget, etag: string | undefined, md5: Buffer, what: string): void {
  if (!t.verifyEtag) return;
  const got = (etag ?? '').replace(/"/g, '').toLowerCase();
  if (got !== md5.toString('hex')) throw new TransientError(`${what}: ETag ${got || '(none)'} is not the MD5 of what was sent`);
}

/** Re-chunks a buffer or a stream of chunks into parts of exactly `size`
 * bytes (the last may be shorter). A buffer is sliced, not copied. */
export async function* splitParts(data: Uint8Array | AsyncIterable<Uint8Array>, size: number): AsyncGenerator<Buffer> {
  if (data instanceof Uint8Array) {
    const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    for (let o = 0; o < b.length; o += size) yield b.subarray(o, Math.min(b.length, o + size));
    return;
  }
  let held: Buffer[] = [], heldBytes = 0;
  for await (const chunk of data) {
    let c = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    while (heldBytes + c.length >= size) {
      const take = size - heldBytes;
      held.push(c.subarray(0, take));
      // Copy: the part must not alias a chunk the producer may reuse.
      yield Buffer.concat(held, size);
      held = []; heldBytes = 0;
      c = c.subarray(take);
    }
    if (c.length) { held.push(Buffer.from(c)); heldBytes += c.length; }
  }
  if (heldBytes) yield Buffer.concat(held, heldBytes);
}

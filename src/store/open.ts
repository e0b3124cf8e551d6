// Turns a store spec into a backend: a directory path or file:// URL is the
// local filesystem store; s3://bucket/prefix?… is S3 or an S3-compatible
// server. Credentials never come from the URL (it ends up in logs and
// process lists): they come from the SDK's chain (AWS_ACCESS_KEY_ID, …).
import { fileURLToPath } from 'url';
import { einval } from '../errors';
import { FsObjectStore } from './fs';
import type { S3StoreOptions } from './s3';
import type { RetryPolicy } from './retry';
import type { ObjectStore } from './types';

/** A store from a spec string, or an S3 store from its options. */
export function openStore(spec: string | S3StoreOptions): ObjectStore {
  if (typeof spec !== 'string') return newS3(spec);
  if (spec.startsWith('s3://')) return newS3(parseS3Url(spec));
  if (spec.startsWith('file://')) return new FsObjectStore(fileURLToPath(spec));
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) throw einval(`unsupported store URL ${spec} (use a directory, file:// or s3://)`);
  return new FsObjectStore(spec);
}

function newS3(opts: S3StoreOptions): ObjectStore {
  // Loaded on demand: the SDK costs ~170 ms at start-up that local stores never need.
  const { S3ObjectStore } = require('./s3') as typeof import('./s3');
  return new S3ObjectStore(opts);
}

const NUMERIC = ['partSize', 'concurrency', 'pageSize'] as const;
const RETRY = ['maxAttempts', 'baseDelayMs', 'maxDelayMs', 'attemptTimeoutMs', 'deadlineMs'] as const;
const FLAGS = ['forcePathStyle', 'contentMd5', 'verifyEtag'] as const;

/**
 * s3://BUCKET[/PREFIX][?endpoint=URL&region=R&forcePathStyle=1&partSize=N&concurrency=N&pageSize=N
 *   &maxAttempts=N&baseDelayMs=N&maxDelayMs=N&attemptTimeoutMs=N&deadlineMs=N&contentMd5=0|1&verifyEtag=0|1]
 */
export function parseS3Url(spec: string): S3StoreOptions {
  let u: URL;
  try { u = new URL(spec); } catch { throw einval(`invalid store URL ${spec}`); }
  if (u.protocol !== 's3:' || !u.hostname) throw einval(`invalid S3 store URL ${spec}: expected s3://bucket[/prefix]`);
  if (u.username || u.password) throw einval('credentials do not belong in a store URL: use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY');
  const opts: S3StoreOptions = { bucket: u.hostname, prefix: decodeURIComponent(u.pathname.replace(/^\/+/, '')) };
  const retry: Partial<RetryPolicy> = {};
  for (const [k, v] of u.searchParams) {
    if (k === 'endpoint') opts.endpoint = v;
    else if (k === 'region') opts.region = v;
    else if ((FLAGS as readonly string[]).includes(k)) opts[k as typeof FLAGS[number]] = flag(k, v);
    else if ((NUMERIC as readonly string[]).includes(k)) opts[k as typeof NUMERIC[number]] = num(k, v);
    else if ((RETRY as readonly string[]).includes(k)) retry[k as typeof RETRY[number]] = num(k, v);
    else throw einval(`unknown S3 store option ${k} in ${spec}`);
  }
  if (Object.keys(retry).length) opts.retry = retry;
  return opts;
}

function flag(k: string, v: string): boolean {
  if (['1', 'true', 'yes'].includes(v)) return true;
  if (['0', 'false', 'no'].includes(v)) return false;
  throw einval(`S3 store option ${k} must be 0 or 1, not ${v}`);
}

function num(k: string, v: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n <= 0) throw einval(`S3 store option ${k} must be a positive integer, not ${v}`);
  return n;
}

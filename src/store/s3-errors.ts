// What an S3 failure means for strata: transient (retry it) or final, and
// then which errno. Decided on the HTTP status and the S3 error code, never
// on message text, so it holds across AWS, MinIO, Ceph RGW and GCS.
import { StrataError } from '../errors';
import { describe, type Verdict } from './retry';

interface SdkError { name?: string; code?: string; $metadata?: { httpStatusCode?: number } }

const TRANSIENT_CODES = new Set(['SlowDown', 'Throttling', 'ThrottlingException', 'RequestTimeout', 'RequestTimeTooSkewed',
  'InternalError', 'ServiceUnavailable', 'BadDigest', 'IncompleteBody', 'XAmzContentSHA256Mismatch']);

/** Classifies a failed S3 request made for `what` (`key` names the object in errors). */
export function classifyS3(what: string, e: unknown): Verdict {
  if (e instanceof StrataError) return e;
  const x = (e ?? {}) as SdkError;
  // No credentials anywhere in the chain: asking again will not find any.
  if (x.name === 'CredentialsProviderError') return new StrataError('EPERM', `${what}: ${describe(e)}`, { cause: e });
  const status = x.$metadata?.httpStatusCode;
  // No HTTP status (connection refused or reset, socket timeout) or a 2xx
  // whose body broke off while being parsed: the transport failed, not S3.
  if (status === undefined || status < 300) return 'retry';
  if (status >= 500 || status === 429 || status === 408 || TRANSIENT_CODES.has(x.name ?? '')) return 'retry';
  if (status === 404 && x.name !== 'NoSuchBucket' && x.name !== 'NoSuchUpload') {
    return new StrataError('ENOENT', `${what}: not found`, { cause: e });
  }
  if (status === 416 || x.name === 'InvalidRange') {
    return new StrataError('EBADMSG', `${what}: range is beyond the object's end (truncated?)`, { cause: e });
  }
  if (status === 401 || status === 403) return new StrataError('EPERM', `${what}: ${describe(e)}`, { cause: e });
  return new StrataError('EIO', `${what}: ${describe(e)}`, { cause: e });
}

export function isNoSuchUpload(e: unknown): boolean {
  const c = (e as StrataError)?.cause as SdkError | undefined;
  return (c?.name ?? (e as SdkError)?.name) === 'NoSuchUpload';
}

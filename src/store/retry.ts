// Retries for remote object-store requests: exponential backoff with full
// jitter (so many clients throttled together do not retry in lockstep), a
// per-request attempt limit, a per-attempt timeout and a total deadline. The
// caller classifies each failure; exhausted attempts become EIO, a passed
// deadline ETIMEDOUT, so callers above never see a transport error type.
import { StrataError } from '../errors';

export interface RetryPolicy {
  /** Attempts per request, the first included. */
  maxAttempts: number;
  /** Backoff before attempt n+1 is uniform in [0, min(maxDelayMs, baseDelayMs·2^(n-1))]. */
  baseDelayMs: number;
  maxDelayMs: number;
  /** One attempt is abandoned (and retried) after this long. */
  attemptTimeoutMs: number;
  /** All attempts of one request, backoff included, end by this. */
  deadlineMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 6, baseDelayMs: 100, maxDelayMs: 5000, attemptTimeoutMs: 60_000, deadlineMs: 300_000,
};

/** `retry`: transient, try again; an Error: final, throw it as it is. */
export type Verdict = 'retry' | Error;

/** A failure the caller knows is transient (short read, checksum mismatch in transit). */
export class TransientError extends Error {}

export async function withRetry<T>(
  what: string,
  policy: RetryPolicy,
  classify: (e: unknown) => Verdict,
  fn: (signal: AbortSignal, attempt: number) => Promise<T>,
  outer?: AbortSignal,
): Promise<T> {
  const deadline = Date.now() + policy.deadlineMs;
  let last: unknown;
  for (let attempt = 1; ; attempt++) {
    if (outer?.aborted) throw outer.reason;
    const left = deadline - Date.now();
    if (left <= 0) throw timedOut(what, policy, attempt - 1, last);
    const ctrl = new AbortController();
    const byDeadline = policy.attemptTimeoutMs >= left;
    const timer = setTimeout(() => ctrl.abort(new TransientError(`attempt timed out after ${Math.min(policy.attemptTimeoutMs, left)} ms`)),
      Math.min(policy.attemptTimeoutMs, left));
    const onOuter = () => ctrl.abort(outer!.reason);
    outer?.addEventListener('abort', onOuter, { once: true });
    try {
      return await fn(ctrl.signal, attempt);
    } catch (e) {
      if (outer?.aborted) throw outer.reason;
      // An aborted attempt surfaces as the SDK's AbortError; what matters is why we aborted.
      const err = ctrl.signal.aborted ? ctrl.signal.reason : e;
      if (ctrl.signal.aborted && byDeadline) throw timedOut(what, policy, attempt, err);
      const v = err instanceof TransientError ? 'retry' : classify(err);
      if (v !== 'retry') throw v;
      last = err;
      if (attempt >= policy.maxAttempts) {
        throw new StrataError('EIO', `${what}: failed after ${attempt} attempts: ${describe(err)}`, { cause: err });
      }
      const backoff = Math.random() * Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
      if (Date.now() + backoff >= deadline) throw timedOut(what, policy, attempt, err);
      await sleep(backoff, outer);
    } finally {
      clearTimeout(timer);
      outer?.removeEventListener('abort', onOuter);
    }
  }
}

function timedOut(what: string, p: RetryPolicy, attempts: number, last: unknown): StrataError {
  return new StrataError('ETIMEDOUT', `${what}: deadline of ${p.deadlineMs} ms passed after ${attempts} attempt(s)` +
    (last ? `; last error: ${describe(last)}` : ''), { cause: last });
}

export function describe(e: unknown): string {
  const x = e as { name?: string; message?: string; code?: string; $metadata?: { httpStatusCode?: number } };
  const status = x?.$metadata?.httpStatusCode;
  return [x?.name, x?.code, status && `HTTP ${status}`, x?.message].filter(Boolean).join(' ') || String(e);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, ms);
    const onAbort = () => { clearTimeout(t); reject(signal!.reason); };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

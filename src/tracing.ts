// OpenTelemetry hooks where they are cheap: long operations (import,
// snapshot, device create/delete) and template frame fetches get spans.
// @opentelemetry/api is a no-op until the embedding process registers an SDK,
// so this costs nothing otherwise; the per-request data path is not traced.
import { trace, SpanStatusCode, type Attributes } from '@opentelemetry/api';

const tracer = trace.getTracer('strata');

export async function traced<T>(name: string, attrs: Attributes, fn: () => Promise<T>): Promise<T> {
  return tracer.startActiveSpan(name, { attributes: attrs }, async (span) => {
    try {
      return await fn();
    } catch (e) {
      span.recordException(e as Error);
      span.setStatus({ code: SpanStatusCode.ERROR, message: (e as Error).message });
      throw e;
    } finally { span.end(); }
  });
}

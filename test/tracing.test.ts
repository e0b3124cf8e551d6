// OpenTelemetry hooks: with a tracer provider registered (as an embedding
// process's SDK would), long operations and frame fetches produce spans,
// and failures are recorded on them.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import { trace, context, type Span, type Tracer, type TracerProvider } from '@opentelemetry/api';
import { Engine, Codec } from '../src/index';
import { makeImage, rejects, tmpdir } from './helpers/util';

const spans: Array<{ name: string; attrs: Record<string, unknown>; error?: string; ended: boolean }> = [];

// A recording provider: the smallest stand-in for an OpenTelemetry SDK.
function recordingSpan(name: string, attrs: Record<string, unknown>): Span {
  const rec: { name: string; attrs: Record<string, unknown>; error?: string; ended: boolean } = { name, attrs: { ...attrs }, ended: false };
  spans.push(rec);
  const span = {
    spanContext: () => ({ traceId: '0'.repeat(31) + '1', spanId: '0'.repeat(15) + '1', traceFlags: 1 }),
    setAttribute: (k: string, v: unknown) => { rec.attrs[k] = v; return span; },
    setAttributes: (a: Record<string, unknown>) => { Object.assign(rec.attrs, a); return span; },
    addEvent: () => span, addLink: () => span, addLinks: () => span,
    setStatus: (s: { message?: string }) => { rec.error = s.message; return span; },
    updateName: () => span, end: () => { rec.ended = true; }, isRecording: () => true,
    recordException: () => {},
  };
  return span as unknown as Span;
}
const tracer = {
  startSpan: (name: string, o?: { attributes?: Record<string, unknown> }) => recordingSpan(name, o?.attributes ?? {}),
  startActiveSpan: (name: string, ...args: unknown[]) => {
    const fn = args[args.length - 1] as (s: Span) => unknown;
    const o = (args.length > 1 ? args[0] : {}) as { attributes?: Record<string, unknown> };
    const span = recordingSpan(name, o.attributes ?? {});
    return context.with(trace.setSpan(context.active(), span), () => fn(span));
  },
} as unknown as Tracer;
trace.setGlobalTracerProvider({ getTracer: () => tracer } as TracerProvider);

test('import, fetch and snapshot produce ended spans; a failed import records its error', async () => {
  const dir = tmpdir('tracing');
  try {
    fs.writeFileSync(`${dir}/img`, makeImage(1024, 2));
    const e1 = await Engine.open({ store: `${dir}/store` });
    const { id } = await e1.importImage(`${dir}/img`, { codec: Codec.Lz4 });
    await e1.close();
    const e = await Engine.open({ store: `${dir}/store` });
    const d = await e.openDevice(id);
    await d.read(0, 65536); // cold: fetches
    await d.write(0, Buffer.alloc(4096, 1));
    await d.snapshot();
    await rejects(e.importImage(`${dir}/missing`), /ENOENT|no such file/);
    await e.close();
    const names = spans.map((s) => s.name);
    assert.ok(names.includes('strata.import'), names.join());
    assert.ok(names.includes('strata.fetch'), names.join());
    assert.ok(names.includes('strata.snapshot'), names.join());
    assert.ok(spans.every((s) => s.ended), 'every span ended');
    assert.ok(spans.some((s) => s.name === 'strata.import' && s.error && s.attrs['strata.image'] === `${dir}/missing`), 'the failure is on its span');
    assert.ok(spans.some((s) => s.name === 'strata.fetch' && s.attrs['strata.layer'] === id));
  } finally { fs.rmSync(dir, { recursive: true, force: true }); }
});

test.run();

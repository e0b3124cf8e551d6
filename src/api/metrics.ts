// Prometheus metrics for the daemon (prom-client), served at /metrics.
// Totals the engine already counts are read at scrape time; latencies are
// observed where they happen (fetches, device create/delete, snapshots,
// engine-path requests). Requests the I/O workers serve without the engine
// are counted in the device's gate record (start to end, into fixed
// buckets) and exported here as a histogram read at scrape time.
import * as client from 'prom-client';
import type { Engine } from '../engine';
import type { DeviceManager } from './devices';

const LAT = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30];

export class Metrics {
  readonly registry = new client.Registry();
  readonly fetchSeconds: client.Histogram<'result'>;
  readonly deviceOpSeconds: client.Histogram<'op'>;
  readonly snapshotSeconds: client.Histogram<'result'>;
  readonly uploadBytes: client.Counter<never>;
  readonly slowIoSeconds: client.Histogram<'op'>;

  constructor(engine: Engine, devices: DeviceManager) {
    const r = this.registry;
    client.collectDefaultMetrics({ register: r, prefix: 'strata_process_' });
    this.fetchSeconds = new client.Histogram({ name: 'strata_fetch_seconds', help: 'template frame fetch latency (store GET, verify, decompress, cache write)', labelNames: ['result'], buckets: LAT, registers: [r] });
    this.deviceOpSeconds = new client.Histogram({ name: 'strata_device_lifecycle_seconds', help: 'device create/delete latency', labelNames: ['op'], buckets: LAT, registers: [r] });
    this.snapshotSeconds = new client.Histogram({ name: 'strata_snapshot_seconds', help: 'snapshot duration (freeze to committed layer)', labelNames: ['result'], buckets: LAT, registers: [r] });
    this.uploadBytes = new client.Counter({ name: 'strata_upload_bytes_total', help: 'compressed bytes uploaded by snapshots', registers: [r] });
    this.slowIoSeconds = new client.Histogram({ name: 'strata_device_engine_io_seconds', help: 'latency of requests served by the engine (slow path: cold data, copy-on-write, flush, trim)', labelNames: ['op'], buckets: LAT, registers: [r] });
    engine.core.observe.fetch = (s, ok) => this.fetchSeconds.observe({ result: ok ? 'ok' : 'error' }, s);

    new client.Gauge({ name: 'strata_devices', help: 'devices in use', registers: [r], collect() { this.set(devices.size); } });
    const perDevice = (name: string, help: string, pick: (m: ReturnType<DeviceManager['list']>[number]) => number) =>
      new client.Counter({
        name, help, labelNames: ['device'], registers: [r],
        collect() { this.reset(); for (const m of devices.list()) this.inc({ device: m.id }, pick(m)); },
      });
    perDevice('strata_device_engine_reads_total', 'reads served by the engine', (m) => m.dev.stats.reads);
    perDevice('strata_device_engine_writes_total', 'writes served by the engine', (m) => m.dev.stats.writes);
    perDevice('strata_device_engine_read_bytes_total', 'bytes read through the engine', (m) => m.dev.stats.readBytes);
    perDevice('strata_device_engine_write_bytes_total', 'bytes written through the engine', (m) => m.dev.stats.writeBytes);
    perDevice('strata_device_native_reads_total', 'reads the I/O workers served without the engine', (m) => m.dev.nativeStats().fastReads);
    perDevice('strata_device_native_writes_total', 'writes the I/O workers served without the engine', (m) => m.dev.nativeStats().fastWrites);
    perDevice('strata_device_native_read_bytes_total', 'bytes the I/O workers read without the engine', (m) => m.dev.nativeStats().readBytes);
    perDevice('strata_device_native_write_bytes_total', 'bytes the I/O workers wrote without the engine', (m) => m.dev.nativeStats().writeBytes);
    perDevice('strata_device_flushes_total', 'flushes', (m) => m.dev.stats.flushes);
    const cache = (name: string, help: string, key: 'fetches' | 'fetchBytes' | 'fetchErrors' | 'hits') =>
      new client.Counter({ name, help, registers: [r], collect() { this.reset(); this.inc(engine.stats().cache[key]); } });
    cache('strata_cache_fetches_total', 'template frames fetched from the object store', 'fetches');
    cache('strata_cache_fetch_bytes_total', 'compressed bytes fetched', 'fetchBytes');
    cache('strata_cache_fetch_errors_total', 'failed or corrupt fetches', 'fetchErrors');
    cache('strata_cache_hits_total', 'frame lookups already cached (engine path)', 'hits');
    const counter = (name: string, help: string, pick: (s: ReturnType<Engine['stats']>) => number) =>
      new client.Counter({ name, help, registers: [r], collect() { this.reset(); this.inc(pick(engine.stats())); } });
    counter('strata_cache_restored_frames_total', 'frames an earlier process cached, verified on first use instead of fetched', (s) => s.cache.restoredFrames);
    counter('strata_cache_persisted_frames_total', 'fetched frames made durable and journaled (a later process, after a crash or reboot, uses them without a fetch)', (s) => s.cache.persistedFrames);
    counter('strata_cache_restore_failures_total', 'cached frames from an earlier process that failed verification (fetched again)', (s) => s.cache.restoreFailures);
    counter('strata_cache_scrubbed_frames_total', 'cached frames re-verified by the scrub', (s) => s.cache.scrubbed);
    counter('strata_cache_scrub_failures_total', 'cached frames the scrub found damaged and dropped', (s) => s.cache.scrubFailures);
    counter('strata_fetch_readahead_total', 'frame fetches started as readahead', (s) => s.fetches.readahead);
    counter('strata_fetch_prefetch_total', 'frame fetches started for a boot profile', (s) => s.fetches.prefetch);
    counter('strata_profile_prefetched_frames_total', 'boot-profile frames made present (fetched or already cached)', (s) => s.profiles?.prefetched ?? 0);
    counter('strata_profiles_written_total', 'boot profiles stored (recorded or inherited by a snapshot)', (s) => s.profiles?.written ?? 0);
    counter('strata_profiles_invalid_total', 'boot profiles ignored as corrupt or invalid', (s) => s.profiles?.invalid ?? 0);
    new client.Gauge({ name: 'strata_shared_memory_bytes', help: 'size of the engine\'s one WebAssembly shared memory (4 GiB at most)', registers: [r], collect() { this.set(engine.core.heap.memory.buffer.byteLength); } });
    new client.Gauge({ name: 'strata_shared_memory_reserved_bytes', help: 'bytes at the start of the shared memory set aside for the registered I/O arena', registers: [r], collect() { this.set(engine.core.heap.heap.base); } });
    new client.Gauge({ name: 'strata_shared_memory_used_bytes', help: 'bytes of the shared memory allocated (state tables, mappings, I/O arena)', registers: [r], collect() { this.set(engine.core.heap.heap.used); } });
    new client.Gauge({ name: 'strata_fetch_queued', help: 'frame fetches waiting for a slot', registers: [r], collect() { this.set(engine.stats().fetches.queued); } });
    r.registerMetric(nativeLatency(devices) as unknown as client.Metric);
    new client.Gauge({
      name: 'strata_cache_hit_ratio', help: 'cached frame lookups / all lookups (engine path)', registers: [r],
      collect() { const c = engine.stats().cache; const all = c.hits + c.fetches; this.set(all ? c.hits / all : 1); },
    });
  }

  text(): Promise<string> { return this.registry.metrics(); }
}

/**
 * strata_device_native_io_seconds{device,op}: a Prometheus histogram built
 * from the native buckets (prom-client's Histogram can only observe, and
 * observing from JS per request is what the target's counters avoid).
 */
function nativeLatency(devices: DeviceManager) {
  const name = 'strata_device_native_io_seconds';
  const help = 'service time of requests the I/O workers served without the engine (acquired to released, including the I/O)';
  type Value = { labels: Record<string, string | number>; value: number; metricName: string };
  return {
    name, help, type: 'histogram', aggregator: 'sum',
    get() {
      const values: Value[] = [];
      for (const m of devices.list()) {
        const lat = m.dev.nativeStats().latency;
        if (!lat) continue;
        for (const op of ['read', 'write'] as const) {
          const side = lat[op];
          let acc = 0;
          side.counts.forEach((c, i) => {
            acc += c;
            const le = i < lat.boundsNs.length ? lat.boundsNs[i] / 1e9 : '+Inf';
            values.push({ labels: { device: m.id, op, le }, value: acc, metricName: `${name}_bucket` });
          });
          values.push({ labels: { device: m.id, op }, value: side.sumNs / 1e9, metricName: `${name}_sum` });
          values.push({ labels: { device: m.id, op }, value: acc, metricName: `${name}_count` });
        }
      }
      return { name, help, type: 'histogram', values, aggregator: 'sum' };
    },
    reset() {},
  };
}

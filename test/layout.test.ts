// The data plane's shared-memory layouts are defined once (assembly/layout.ts):
// TypeScript reads them from the compiled module (the native addon reads no
// record: it only synchronises). A layout the engine misreads fails here.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { SharedHeap, layout, S } from '../src/wasm';
import { ZERO_LAYER } from '../src/format';

test('states, the zero layer and record sizes as the engine uses them', () => {
  const l = layout();
  assert.equal({ ...S }, { ABSENT: l.ABSENT, FETCHING: l.FETCHING, CACHED: l.CACHED, DIRTY: l.DIRTY, ZERO: l.ZERO, CLEAN: l.CLEAN });
  assert.is(new Set(Object.values(S)).size, 6, 'states are distinct');
  assert.is(l.ZERO_LAYER, ZERO_LAYER, 'in-memory zero layer = the layer header format\'s');
  for (const [size, fields] of [[l.EXTENT_SIZE, [l.EXT_DEV, l.EXT_LEN, l.EXT_LAYER, l.EXT_DATA]], [l.FRAME_SIZE, [l.FRAME_U, l.FRAME_C, l.FRAME_USIZE, l.FRAME_CSIZE, l.FRAME_SUM]]] as const) {
    for (const f of fields) assert.ok(f + 4 <= size, `field at ${f} inside a ${size}-byte record`);
  }
});

test('records written through the accessors are what the searches read', () => {
  const heap = new SharedHeap({ reserveBytes: 65536 });
  const w = heap.wasm, l = layout();
  const ext = heap.alloc(3 * l.EXTENT_SIZE), fr = heap.alloc(2 * l.FRAME_SIZE);
  w.extentPut(ext, 0, 0n, 4096n, 0, 8192n);
  w.extentPut(ext, 1, 4096n, 8192n, ZERO_LAYER, 777n); // zero extents keep no data offset
  w.extentPut(ext, 2, 12288n, 4096n, 1, 0n);
  assert.is(w.findExtent(ext, 3, 5000n), 1);
  assert.is(w.extentLayer(ext, 1) >>> 0, ZERO_LAYER);
  assert.is(w.extentData(ext, 1), 0n);
  assert.is(w.extentData(ext, 0), 8192n);
  assert.ok(w.validateExtents(ext, 3, 16384n, 2));
  w.framePut(fr, 0, 0n, 0n, 2 << 20, 1000, 0xabcn);
  w.framePut(fr, 1, BigInt(2 << 20), 1000n, 1 << 20, 500, 0xdefn);
  assert.is(w.findFrame(fr, 2, BigInt((2 << 20) + 5)), 1);
  assert.is(w.findFrame(fr, 2, BigInt(3 << 20)), -1);
  const v = new DataView(heap.buffer);
  assert.is(v.getUint32(fr + l.FRAME_SIZE + l.FRAME_CSIZE, true), 500);
  assert.is(v.getBigUint64(fr + l.FRAME_SIZE + l.FRAME_SUM, true), 0xdefn);
});

test.run();

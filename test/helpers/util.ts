// Shared test helpers: a seeded PRNG, temp dirs, images with a mix of data,
// zero and duplicate blocks, and a store that counts and can corrupt gets.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { FsObjectStore } from '../../src/store/fs';
import type { ObjectStore } from '../../src/store/types';

export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function tmpdir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `strata-${tag}-`));
}

/** How many of this process's file descriptors are open on `file` (by /proc/self/fd). */
export function fdsOn(file: string): number {
  return fs.readdirSync('/proc/self/fd').filter((n) => {
    try { return fs.readlinkSync(`/proc/self/fd/${n}`) === file; } catch { return false; }
  }).length;
}

/** An image of `blocks` 4 KiB blocks: ~1/4 zero, some repeats, the rest pseudo-random. */
export function makeImage(blocks: number, seed: number): Buffer {
  const r = rng(seed);
  const b = Buffer.alloc(blocks * 4096);
  for (let i = 0; i < blocks; i++) {
    const kind = r();
    if (kind < 0.25) continue;
    if (kind < 0.35 && i > 0) { const j = Math.floor(r() * i); b.copy(b, i * 4096, j * 4096, j * 4096 + 4096); continue; }
    // Compressible but distinct: a random byte pattern with runs.
    for (let o = 0; o < 4096; o += 16) b.fill(Math.floor(r() * 256), i * 4096 + o, i * 4096 + o + 16);
  }
  return b;
}

/**
 * The filesystem store in `dir`, whose uploads of layer data wait for
 * release() (a snapshot's upload held while the test acts), then fail
 * (`fail`) or go through.
 */
export function heldStore(dir: string, fail = false): { store: ObjectStore; release(): void } {
  const fsStore = new FsObjectStore(dir);
  let release!: () => void;
  const held = new Promise<void>((r) => { release = r; });
  const store: ObjectStore = Object.assign(Object.create(fsStore), {
    put: async (k: string, d: Uint8Array | AsyncIterable<Uint8Array>) => {
      if (!k.endsWith('/data')) return fsStore.put(k, d);
      await held;
      if (fail) throw new Error('injected upload failure');
      return fsStore.put(k, d);
    },
  });
  return { store, release };
}

/** The real filesystem store, instrumented: counts ranged gets, can fail or corrupt them. */
export class CountingStore extends FsObjectStore {
  gets = 0;
  failNext = 0;
  corruptNext = 0;
  delayMs = 0;
  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    if (key.endsWith('/data')) this.gets++;
    if (this.delayMs) await new Promise((r) => setTimeout(r, this.delayMs));
    if (key.endsWith('/data') && this.failNext > 0) { this.failNext--; throw new Error('injected store failure'); }
    const b = await super.get(key, range);
    if (key.endsWith('/data') && this.corruptNext > 0) { this.corruptNext--; b[b.length >> 1] ^= 0xff; }
    return b;
  }
}

export function skip(reason: string): void {
  console.log(`SKIP: ${reason}`);
}

/** Asserts that a promise rejects with a message matching `re` (uvu has no async throws). */
export async function rejects(p: Promise<unknown>, re: RegExp): Promise<void> {
  let err: unknown;
  try { await p; } catch (e) { err = e; }
  if (!err) throw new Error(`expected a rejection matching ${re}, but it resolved`);
  if (!re.test(String((err as Error).message))) throw new Error(`expected a rejection matching ${re}, got: ${(err as Error).message}`);
}

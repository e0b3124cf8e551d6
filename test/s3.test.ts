// The S3 object store against a real S3-protocol server (s3rver, in a child
// process so it can be killed mid-upload), reached through a fault-injecting
// proxy: contract, pagination, multipart with bounded memory, retries,
// deadlines, and an engine round trip over S3.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { createHash } from 'crypto';
import { skip, makeImage, tmpdir } from './helpers/util';
import { s3rverMissing, startS3Server, type S3Server } from './helpers/s3-server';
import { FaultProxy, type Seen } from './helpers/fault-proxy';

const missing = s3rverMissing();
if (missing) { skip(missing); process.exit(0); }

/* eslint-disable @typescript-eslint/no-var-requires */
const { S3ObjectStore } = require('../src/store/s3') as typeof import('../src/store/s3');
const { Engine, StrataError } = require('../src/index') as typeof import('../src/index');
type StoreOpts = Partial<import('../src/store/s3').S3StoreOptions>;

const BUCKET = 'strata';
const dir = tmpdir('s3');
let server: S3Server;
let proxy: FaultProxy;
let run = 0;
// s3rver's fixed credentials; set in the environment too, so s3:// specs
// resolve them from the SDK's chain without probing anything off this host.
process.env.AWS_ACCESS_KEY_ID = 'S3RVER';
process.env.AWS_SECRET_ACCESS_KEY = 'S3RVER';
process.env.AWS_EC2_METADATA_DISABLED = 'true';
// The SDK's notice that its 2027 releases will need Node 22 (the lock pins this one).
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';

const FAST = { baseDelayMs: 5, maxDelayMs: 40, attemptTimeoutMs: 5000, deadlineMs: 30_000, maxAttempts: 5 };

/** A store under its own prefix, talking to the server through the proxy. */
function store(opts: StoreOpts = {}) {
  return new S3ObjectStore({
    bucket: BUCKET, prefix: `t${++run}`, endpoint: proxy.endpoint, forcePathStyle: true, region: 'us-east-1',
    credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' }, ...opts, retry: { ...FAST, ...opts.retry },
  });
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try { await p; } catch (e) { return (e as { code?: string }).code ?? `untyped: ${(e as Error).message}`; }
  return 'none';
}

async function* chunks(total: number, size: number, seed = 1): AsyncGenerator<Buffer> {
  for (let o = 0; o < total; o += size) {
    const c = Buffer.alloc(Math.min(size, total - o));
    for (let i = 0; i < c.length; i++) c[i] = (o + i) * seed % 251;
    yield c;
  }
}
const bytesOf = async (g: AsyncIterable<Buffer>) => { const a: Buffer[] = []; for await (const c of g) a.push(c); return Buffer.concat(a); };
const isPart = (r: Seen) => r.method === 'PUT' && /[?&]partNumber=/.test(r.url);

test.before(async () => {
  server = await startS3Server(path.join(dir, 'server'), BUCKET);
  proxy = await FaultProxy.start(server.port);
});
test.after(async () => {
  await proxy?.close();
  await server?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});
test.before.each(() => proxy.clear());

test('put/get/range/head/list/delete, typed errors, keys validated', async () => {
  const s = store();
  await s.put('layers/a/header', Buffer.from('hello'));
  await s.put('layers/a/data', chunks(10, 3));
  await s.put('layers/a/empty', Buffer.alloc(0));
  const data = await bytesOf(chunks(10, 3));
  assert.ok((await s.get('layers/a/data')).equals(data));
  assert.ok((await s.get('layers/a/data', { offset: 2, length: 5 })).equals(data.subarray(2, 7)));
  assert.is((await s.get('layers/a/data', { offset: 10, length: 0 })).length, 0);
  assert.is((await s.get('layers/a/empty')).length, 0);
  assert.equal(await s.head('layers/a/header'), { key: 'layers/a/header', size: 5 });
  assert.is(await s.head('layers/b/header'), null);
  assert.equal((await s.list('layers/')).map((o) => [o.key, o.size]), [['layers/a/data', 10], ['layers/a/empty', 0], ['layers/a/header', 5]]);
  assert.equal(await store().list(''), [], 'another prefix sees nothing');
  assert.is(await codeOf(s.get('layers/a/data', { offset: 5, length: 10 })), 'EBADMSG');
  assert.is(await codeOf(s.get('layers/a/data', { offset: 11, length: 1 })), 'EBADMSG');
  assert.is(await codeOf(s.get('layers/zz/data')), 'ENOENT');
  assert.is(await codeOf(s.get('layers/zz/data', { offset: 0, length: 1 })), 'ENOENT');
  for (const k of ['../x', 'a//b', '/abs', '', 'a/.tmp-x']) assert.is(await codeOf(s.put(k, Buffer.alloc(1))), 'EINVAL', k);
  await s.delete('layers/a/data');
  await s.delete('layers/a/data'); // absent: still fine
  assert.is(await s.head('layers/a/data'), null);
  const e = await s.get('layers/a/data').catch((x) => x);
  assert.instance(e, StrataError);
  assert.is(e.errno, require('os').constants.errno.ENOENT);
});

test('list follows continuation tokens across pages', async () => {
  const s = store({ pageSize: 7 });
  const names = Array.from({ length: 45 }, (_, i) => `k/${String(i).padStart(3, '0')}`);
  for (let i = 0; i < names.length; i += 15) await Promise.all(names.slice(i, i + 15).map((k) => s.put(k, Buffer.from(k))));
  await s.put('other/x', Buffer.from('x'));
  proxy.clear();
  const got = await s.list('k/');
  assert.equal(got.map((o) => o.key), names);
  assert.ok(got.every((o) => o.size === 5));
  assert.is(proxy.seen.filter((r) => r.method === 'GET' && r.url.includes('list-type=2')).length, 7, '45 keys / 7 per page');
});

test('a large streamed put goes multipart, with bounded parts in flight and bounded read-ahead', async () => {
  const partSize = 64 * 1024, concurrency = 3, total = 20 * partSize + 12345;
  let acked = 0, produced = 0, maxLead = 0;
  const s = store({ partSize, concurrency, onProgress: (b) => { acked = b; } });
  async function* source() {
    for await (const c of chunks(total, 10_000, 7)) {
      produced += c.length;
      maxLead = Math.max(maxLead, produced - acked);
      yield c;
    }
  }
  await s.put('big/data', source());
  const parts = proxy.seen.filter(isPart);
  assert.is(parts.length, 21);
  assert.is(acked, total, 'progress reaches the total');
  assert.ok(maxLead <= (concurrency + 2) * partSize, `read-ahead ${maxLead} stays bounded`);
  assert.ok((await s.get('big/data')).equals(await bytesOf(chunks(total, 10_000, 7))));
  assert.ok((await s.get('big/data', { offset: partSize - 10, length: 20 })).equals((await bytesOf(chunks(total, 10_000, 7))).subarray(partSize - 10, partSize + 10)));
  // A buffer larger than a part is sliced into parts too.
  proxy.clear();
  const buf = await bytesOf(chunks(3 * partSize, partSize, 3));
  await s.put('big/buf', buf);
  assert.is(proxy.seen.filter(isPart).length, 3);
  assert.ok((await s.get('big/buf')).equals(buf));
});

test('throttling, 5xx and reset connections are retried and the put succeeds', async () => {
  const s = store({ partSize: 32 * 1024 });
  const slow = proxy.inject({ kind: 'status', status: 503 }, { times: 3, match: isPart });
  const err = proxy.inject({ kind: 'status', status: 500 }, { times: 1, match: (r) => r.method === 'POST' && r.url.includes('uploadId=') });
  const reset = proxy.inject({ kind: 'reset' }, { times: 2, match: (r) => r.method === 'PUT' && !isPart(r) });
  await s.put('r/multi', chunks(100_000, 8192));
  await s.put('r/single', Buffer.from('single'));
  assert.is(slow.hits, 3);
  assert.is(err.hits, 1);
  assert.is(reset.hits, 2);
  assert.ok((await s.get('r/multi')).equals(await bytesOf(chunks(100_000, 8192))));
  assert.is((await s.get('r/single')).toString(), 'single');
});

test('a get cut off mid-body is retried; cut every time it is EIO, never a short buffer', async () => {
  const s = store();
  const data = await bytesOf(chunks(50_000, 50_000, 5));
  await s.put('g/obj', data);
  const cut = proxy.inject({ kind: 'cutBody' }, { times: 2, match: (r) => r.method === 'GET' });
  assert.ok((await s.get('g/obj', { offset: 1000, length: 40_000 })).equals(data.subarray(1000, 41_000)));
  assert.is(cut.hits, 2);
  proxy.inject({ kind: 'cutBody' }, { match: (r) => r.method === 'GET' });
  assert.is(await codeOf(store({ prefix: s.prefix, retry: { maxAttempts: 3 } }).get('g/obj', { offset: 0, length: 40_000 })), 'EIO');
});

test('a part that keeps failing aborts the upload: EIO and no visible object', async () => {
  const s = store({ partSize: 32 * 1024, concurrency: 2, retry: { maxAttempts: 3 } });
  proxy.inject({ kind: 'status', status: 500 }, { match: (r) => isPart(r) && /partNumber=3\b/.test(r.url) });
  const e = await s.put('f/data', chunks(200_000, 8192)).catch((x) => x);
  assert.instance(e, StrataError);
  assert.is(e.code, 'EIO');
  assert.match(e.message, /part 3/);
  assert.ok(proxy.seen.some((r) => r.method === 'DELETE' && r.url.includes('uploadId=')), 'abort was sent');
  assert.is(await s.head('f/data'), null);
  assert.equal(await s.list(''), []);
});

test('a multipart upload whose abort fails is remembered and aborted later, not left to cost storage', async () => {
  const s = store({ partSize: 32 * 1024, concurrency: 2, retry: { maxAttempts: 2 } });
  const isAbort = (r: Seen) => r.method === 'DELETE' && r.url.includes('uploadId=');
  proxy.inject({ kind: 'status', status: 500 }, { match: (r) => isPart(r) && /partNumber=2\b/.test(r.url) });
  const refused = proxy.inject({ kind: 'status', status: 503 }, { match: isAbort });
  assert.is(await codeOf(s.put('st/data', chunks(200_000, 8192))), 'EIO');
  assert.ok(refused.hits >= 1, 'the abort was tried');
  assert.is(s.strandedUploads, 1, 'and remembered when it failed');
  proxy.clear();
  // This s3rver cannot abort (405): the proxy answers as a server that can.
  const ok = proxy.inject({ kind: 'reply', status: 204 }, { match: isAbort });
  assert.equal(await s.abortStranded(), { aborted: 1, left: 0 });
  assert.is(ok.hits, 1);
  assert.is(s.strandedUploads, 0);
  assert.equal(await s.abortStranded(), { aborted: 0, left: 0 }, 'nothing left to do');
});

test('a source that fails mid-stream leaves no object and surfaces its own error', async () => {
  const s = store({ partSize: 16 * 1024 });
  async function* bad() { yield* chunks(50_000, 4096); throw new Error('source died'); }
  const e = await s.put('src/data', bad()).catch((x) => x);
  assert.is(e?.message, 'source died');
  assert.equal(await s.list(''), []);
});

test('a request that outlives the deadline is ETIMEDOUT, promptly', async () => {
  const s = store({ retry: { attemptTimeoutMs: 300, deadlineMs: 1000, maxAttempts: 100 } });
  proxy.inject({ kind: 'delay', ms: 3000 });
  const t0 = Date.now();
  const e = await s.put('d/obj', Buffer.from('late')).catch((x) => x);
  assert.instance(e, StrataError);
  assert.is(e.code, 'ETIMEDOUT');
  assert.is(e.errno, require('os').constants.errno.ETIMEDOUT);
  assert.ok(Date.now() - t0 < 2500, `gave up after ${Date.now() - t0} ms`);
  proxy.clear();
  assert.is(await s.head('d/obj'), null);
});

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

test('engine round trip over s3://: import, device, snapshot, resume elsewhere', async () => {
  const img = makeImage(600, 11);
  fs.writeFileSync(path.join(dir, 'img'), img);
  const spec = `s3://${BUCKET}/eng?endpoint=${encodeURIComponent(proxy.endpoint)}&region=us-east-1&forcePathStyle=1&partSize=65536&baseDelayMs=5`;
  const e1 = await Engine.open({ store: spec, cacheDir: path.join(dir, 'cache1'), workers: 1 });
  let snapId: string, model: Buffer;
  try {
    const { id } = await e1.importImage(path.join(dir, 'img'));
    assert.ok(proxy.seen.some(isPart), 'the data object went up in parts');
    const dev = await e1.openDevice(id);
    assert.ok((await dev.read(0, img.length)).equals(img));
    model = Buffer.from(img);
    const patch = Buffer.alloc(3 * 4096, 0x5a);
    await dev.write(40 * 4096, patch);
    patch.copy(model, 40 * 4096);
    await dev.write(599 * 4096 + 512, Buffer.alloc(512, 7));
    model.fill(7, 599 * 4096 + 512, 599 * 4096 + 1024);
    snapId = (await dev.snapshot()).id;
    assert.equal((await e1.listLayers()).sort(), [id, snapId].sort());
  } finally { await e1.close(); }
  const e2 = await Engine.open({ store: spec, cacheDir: path.join(dir, 'cache2'), workers: 1 });
  try {
    const dev = await e2.openDevice(snapId);
    assert.is(sha(await dev.read(0, img.length)), sha(model));
  } finally { await e2.close(); }
});

test('engine: transient faults are ridden out; a header that cannot be written leaves no layer', async () => {
  const img = makeImage(300, 12);
  fs.writeFileSync(path.join(dir, 'img2'), img);
  const spec = `s3://${BUCKET}/eng2?endpoint=${encodeURIComponent(proxy.endpoint)}&forcePathStyle=1&partSize=65536&baseDelayMs=5&maxAttempts=3`;
  const eng = await Engine.open({ store: spec, cacheDir: path.join(dir, 'cache3'), workers: 1 });
  try {
    // At most two faults can hit one request: fewer than its three attempts.
    proxy.inject({ kind: 'status', status: 503 }, { times: 1 });
    proxy.inject({ kind: 'reset' }, { times: 1, match: (r) => r.method === 'PUT' });
    const { id } = await eng.importImage(path.join(dir, 'img2'));
    const before = (await eng.store.list('layers/')).map((o) => o.key);
    assert.equal(before, [`layers/${id}/data`, `layers/${id}/header`, `layers/${id}/index`]);
    proxy.clear();
    proxy.inject({ kind: 'status', status: 500 }, { match: (r) => r.method === 'PUT' && /\/header(\?|$)/.test(r.url) });
    const e = await eng.importImage(path.join(dir, 'img2')).catch((x) => x);
    assert.instance(e, StrataError);
    assert.is(e.code, 'EIO');
    proxy.clear();
    assert.equal((await eng.store.list('layers/')).map((o) => o.key), before, 'no header, data or index of the failed layer');
    assert.equal(await eng.listLayers(), [id]);
  } finally { await eng.close(); }
});

test('a body damaged in transit is caught by its MD5 and sent again; damaged every time, nothing stays', async () => {
  // s3rver ignores Content-MD5 (AWS, MinIO, Ceph and GCS reject such a put
  // with BadDigest); verifyEtag checks the MD5 ETag it returns instead.
  const s = store({ partSize: 16 * 1024, verifyEtag: true, retry: { maxAttempts: 3 } });
  const data = await bytesOf(chunks(60_000, 5000, 9));
  const single = proxy.inject({ kind: 'corruptRequest' }, { times: 1, match: (r) => r.method === 'PUT' && !isPart(r) });
  const part = proxy.inject({ kind: 'corruptRequest' }, { times: 1, match: (r) => isPart(r) && /partNumber=2\b/.test(r.url) });
  await s.put('c/single', data.subarray(0, 9000));
  await s.put('c/multi', data);
  assert.is(single.hits, 1);
  assert.is(part.hits, 1);
  assert.ok((await s.get('c/single')).equals(data.subarray(0, 9000)));
  assert.ok((await s.get('c/multi')).equals(data));
  proxy.inject({ kind: 'corruptRequest' }, { match: (r) => r.method === 'PUT' });
  assert.is(await codeOf(s.put('c/bad', data.subarray(0, 9000))), 'EIO');
  assert.is(await codeOf(s.put('c/bad2', data)), 'EIO');
  proxy.clear();
  assert.equal((await s.list('c/')).map((o) => o.key), ['c/multi', 'c/single']);
});

test('openStore: directories and file:// are local, s3:// is S3 with its options, bad specs are EINVAL', async () => {
  const { openStore, parseS3Url } = require('../src/store/open') as typeof import('../src/store/open');
  const { FsObjectStore } = require('../src/store/fs') as typeof import('../src/store/fs');
  assert.instance(openStore(path.join(dir, 'local')), FsObjectStore);
  assert.instance(openStore(`file://${path.join(dir, 'local2')}`), FsObjectStore);
  const s3 = openStore(`s3://${BUCKET}/a/b?endpoint=http://127.0.0.1:1&forcePathStyle=1&partSize=5242880`);
  assert.instance(s3, S3ObjectStore);
  assert.is((s3 as InstanceType<typeof S3ObjectStore>).prefix, 'a/b/');
  assert.equal(parseS3Url('s3://b-1/p?region=eu-west-1&maxAttempts=2&deadlineMs=500&verifyEtag=1'),
    { bucket: 'b-1', prefix: 'p', region: 'eu-west-1', verifyEtag: true, retry: { maxAttempts: 2, deadlineMs: 500 } });
  for (const bad of ['s3://b/p?bogus=1', 's3://key:secret@bucket/p', 's3://b/p?partSize=-1', 'gs://b/p', 's3://B_/p']) {
    let code = 'none';
    try { openStore(bad); } catch (e) { code = (e as { code: string }).code; }
    assert.is(code, 'EINVAL', bad);
  }
});

// Last: it kills the shared server (and restarts it for the checks).
test('the server dies mid-upload: the put fails typed, and no partial object appears', async () => {
  const s = store({ partSize: 16 * 1024, concurrency: 2, retry: { maxAttempts: 3, attemptTimeoutMs: 2000 } });
  let killed = false;
  async function* source() {
    let n = 0;
    for await (const c of chunks(400_000, 16 * 1024)) {
      if (++n === 4) {
        while (!proxy.seen.some(isPart)) await new Promise((r) => setTimeout(r, 10));
        await server.stop();
        killed = true;
      }
      yield c;
    }
  }
  const e = await s.put('kill/data', source()).catch((x) => x);
  assert.ok(killed);
  assert.instance(e, StrataError);
  assert.ok(['EIO', 'ETIMEDOUT'].includes(e.code), e.code);
  server = await startS3Server(path.join(dir, 'server'), BUCKET);
  proxy.upstreamPort = server.port;
  assert.is(await s.head('kill/data'), null);
  assert.equal(await s.list(''), []);
});

test.run();

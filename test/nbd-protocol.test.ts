// NBD protocol conformance and bad input against a live server, with a raw
// client that can misbehave on purpose.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { OVER_TLS, RawClient } from './helpers/nbd-client';
import { nbdFixture, Fixture } from './helpers/nbd-fixture';
import { CMD, CMD_FLAG, ERR, INFO, OPT, REP, TFLAG } from '../src/nbd/protocol';
import { rng, tmpdir } from './helpers/util';
import * as fs from 'fs';
import * as path from 'path';
import { loadNative } from '../src/native';
import { spawnSync } from 'child_process';
import { Engine } from '../src/index';
import { deviceExport } from '../src/nbd-export';
import { skip } from './helpers/util';
import { NbdServer } from '../src/nbd/server';
import { ExportMap, type NbdExport } from '../src/nbd/export';

let f: Fixture;
test.before(async () => { f = await nbdFixture('nbdproto'); await f.addDevice('d0'); await f.addDevice('d1'); });
test.after(async () => { await f.close(); });

test('handshake: GO advertises size, flags and block sizes; LIST names the exports', async () => {
  const c = await RawClient.open(f.sock, 'd0');
  assert.is(c.size, f.img.length);
  for (const fl of [TFLAG.HAS_FLAGS, TFLAG.SEND_FLUSH, TFLAG.SEND_FUA, TFLAG.SEND_TRIM, TFLAG.SEND_WRITE_ZEROES, TFLAG.SEND_FAST_ZERO, TFLAG.CAN_MULTI_CONN, TFLAG.SEND_CACHE]) {
    assert.ok(c.flags & fl, `flag ${fl}`);
  }
  assert.equal(c.blockInfo, [512, 4096, 32 * 1024 * 1024]);
  c.close();
  const l = await RawClient.connect(f.sock);
  await l.greeting();
  l.sendOption(OPT.LIST);
  const reps = await l.optReplies();
  const names = reps.filter((r) => r.type === REP.SERVER).map((r) => r.data.toString('utf8', 4));
  assert.equal(names.sort(), ['d0', 'd1']);
  l.close();
});

test('unknown options get ERR_UNSUP without losing framing; unknown export ERR_UNKNOWN; ABORT acks', async () => {
  const c = await RawClient.connect(f.sock);
  await c.greeting();
  c.sendOption(99, Buffer.from('some option data'));
  assert.is((await c.optReply()).type, REP.ERR_UNSUP);
  if (!OVER_TLS) { // a server without TLS does not offer STARTTLS
    c.sendOption(OPT.STARTTLS);
    assert.is((await c.optReply()).type, REP.ERR_UNSUP);
  }
  c.sendOption(OPT.INFO, RawClient.infoRequest('nope'));
  assert.is((await c.optReply()).type, REP.ERR_UNKNOWN);
  c.sendOption(OPT.INFO, Buffer.from([0, 0, 0, 9, 1])); // truncated request
  assert.is((await c.optReply()).type, REP.ERR_INVALID);
  c.sendOption(OPT.SET_META_CONTEXT, RawClient.metaRequest('d0', ['base:allocation']));
  assert.is((await c.optReply()).type, REP.ERR_INVALID, 'meta context needs structured replies');
  c.sendOption(OPT.INFO, RawClient.infoRequest('d0', [INFO.NAME, INFO.DESCRIPTION]));
  const reps = await c.optReplies();
  assert.is(reps[reps.length - 1].type, REP.ACK);
  assert.ok(reps.some((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO.DESCRIPTION));
  c.sendOption(OPT.ABORT);
  assert.is((await c.optReply()).type, REP.ACK);
  assert.ok(await c.closedWithin(1000));
});

test('EXPORT_NAME works (with and without NO_ZEROES); unknown client flags or an unknown export close', async () => {
  for (const flags of [1, 3]) {
    const c = await RawClient.connect(f.sock);
    await c.greeting(flags);
    c.sendOption(OPT.EXPORT_NAME, Buffer.from('d0'));
    await c.want(flags === 3 ? 10 : 134);
    const b = c.q.take(flags === 3 ? 10 : 134);
    assert.is(Number(b.readBigUInt64BE(0)), f.img.length);
    assert.not.ok(await c.closedWithin(50));
    c.close();
  }
  const bad = await RawClient.connect(f.sock);
  await bad.greeting(0x80);
  assert.ok(await bad.closedWithin(1000));
  const un = await RawClient.connect(f.sock);
  await un.greeting();
  un.sendOption(OPT.EXPORT_NAME, Buffer.from('missing'));
  assert.ok(await un.closedWithin(1000));
});

test('pipelined requests are all answered (any order), data matches the image', async () => {
  const c = await RawClient.open(f.sock, 'd0');
  const reqs = [];
  for (let i = 0; i < 200; i++) reqs.push(c.read((i * 13 % 4000) * 4096, 4096 * (1 + i % 4)));
  const reps = await Promise.all(reqs);
  reps.forEach((r, i) => {
    assert.is(r.error, 0);
    const off = (i * 13 % 4000) * 4096;
    assert.ok(r.data.equals(f.img.subarray(off, off + 4096 * (1 + i % 4))));
  });
  c.close();
});

test('bad requests get the right errors and the connection keeps working', async () => {
  const c = await RawClient.open(f.sock, 'd0');
  const size = f.img.length;
  assert.is((await c.read(size, 4096)).error, ERR.EINVAL, 'read past the end');
  assert.is((await c.write(size - 512, Buffer.alloc(1024))).error, ERR.ENOSPC, 'write past the end');
  assert.is((await c.read(100, 512)).error, ERR.EINVAL, 'misaligned read');
  assert.is((await c.write(512, Buffer.alloc(100))).error, ERR.EINVAL, 'misaligned write');
  assert.is((await c.request(CMD.READ, 0, 64 * 1024 * 1024)).error, ERR.EINVAL, 'read above max payload');
  assert.is((await c.request(42, 0, 0)).error, ERR.EINVAL, 'unknown command');
  assert.is((await c.request(CMD.READ, 0, 4096, { flags: 1 << 9 })).error, ERR.EINVAL, 'unknown flag');
  assert.is((await c.request(CMD.BLOCK_STATUS, 0, 4096)).error, ERR.EINVAL, 'block status without context');
  assert.is((await c.request(CMD.WRITE_ZEROES, 512, 1024, { flags: CMD_FLAG.FAST_ZERO })).error, ERR.ENOTSUP, 'slow fast-zero');
  // Still alive and correct.
  const r = await c.read(4096, 4096);
  assert.is(r.error, 0);
  assert.ok(r.data.equals(f.img.subarray(4096, 8192)));
  c.close();
});

test('write/flush/trim/zero/cache round trip; FUA; multi-conn: a flush on one connection after writes on another', async () => {
  const a = await RawClient.open(f.sock, 'd1'), b = await RawClient.open(f.sock, 'd1');
  const d = Buffer.alloc(8192, 0x5c);
  assert.is((await a.write(40960, d)).error, 0);
  assert.is((await a.write(49152, d, CMD_FLAG.FUA)).error, 0);
  assert.is((await b.request(CMD.FLUSH, 0, 0)).error, 0);
  assert.ok((await b.read(40960, 8192)).data.equals(d), 'visible on the other connection');
  assert.is((await b.request(CMD.TRIM, 40960, 4096)).error, 0);
  assert.ok((await a.read(40960, 4096)).data.every((x) => x === 0));
  assert.is((await a.request(CMD.WRITE_ZEROES, 45056, 4096, { flags: CMD_FLAG.NO_HOLE })).error, 0);
  assert.ok((await b.read(45056, 4096)).data.every((x) => x === 0));
  assert.is((await a.request(CMD.CACHE, 0, 1 << 20)).error, 0);
  a.close(); b.close();
});

test('structured replies and base:allocation block status tell holes truthfully', async () => {
  const c = await RawClient.open(f.sock, 'd0', { structured: true, meta: true });
  const r = await c.read(0, 16384);
  assert.is(r.error, 0);
  assert.is(r.chunks[0].type, 1);
  assert.ok(r.data.equals(f.img.subarray(0, 16384)));
  const e = await c.read(f.img.length, 512);
  assert.is(e.error, ERR.EINVAL, 'errors arrive as error chunks');
  // Structured replies let a client ask for more than the maximum payload;
  // a server that will not fragment answers EOVERFLOW (retry smaller).
  assert.is((await c.request(CMD.READ, 0, 64 * 1024 * 1024)).error, ERR.EOVERFLOW, 'structured read above max payload');
  assert.is((await c.read(4096, 4096)).error, 0, 'and the connection keeps working');
  const bs = await c.request(CMD.BLOCK_STATUS, 0, 64 * 4096);
  assert.is(bs.error, 0);
  const p = bs.chunks[0].payload;
  assert.is(p.readUInt32BE(0), 1, 'context id');
  let pos = 0;
  for (let i = 4; i < p.length; i += 8) {
    const len = p.readUInt32BE(i), flags = p.readUInt32BE(i + 4);
    const zero = f.img.subarray(pos, pos + len).every((x) => x === 0);
    if (flags & 2) assert.ok(zero, `range ${pos}+${len} reported zero`);
    pos += len;
  }
  assert.is(pos, 64 * 4096);
  const one = await c.request(CMD.BLOCK_STATUS, 0, 64 * 4096, { flags: CMD_FLAG.REQ_ONE });
  assert.is(one.chunks[0].payload.length, 12, 'REQ_ONE gives one descriptor');
  c.close();
});

test('a write the overlay\'s filesystem has no room for is answered ENOSPC (the NBD error for it), not EIO', async () => {
  const small = `${f.dir}/small-${OVER_TLS ? 'tls' : 'plain'}`;
  fs.mkdirSync(small, { recursive: true });
  if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small]).status !== 0) { skip('cannot mount a small tmpfs here (needs root)'); return; }
  const engine = await Engine.open({ store: `${f.dir}/store`, cacheDir: `${small}/cache` });
  try {
    const dev = await engine.openDevice(f.base);
    f.exports.set('full', deviceExport(dev));
    const c = await RawClient.open(f.sock, 'full');
    const errors: number[] = [];
    for (let off = 0; off < 8 << 20; off += 256 * 1024) errors.push((await c.write(off, Buffer.alloc(256 * 1024, 7))).error);
    assert.is(errors[0], 0, 'the first writes fit');
    const failed = errors.filter((e) => e !== 0);
    assert.ok(failed.length > 0, '8 MiB cannot fit in 4 MiB');
    assert.ok(failed.every((e) => e === ERR.ENOSPC), `errors: ${[...new Set(failed)].join(', ')}`);
    c.close();
    f.exports.delete('full');
  } finally {
    await engine.close();
    spawnSync('umount', [small]);
  }
});

test('wrong magic, oversized write and vanished clients close only that connection; acknowledged writes survive', async () => {
  const good = await RawClient.open(f.sock, 'd1');
  assert.is((await good.write(0, Buffer.alloc(4096, 0x31))).error, 0);
  const m = await RawClient.open(f.sock, 'd1');
  m.socket.write(RawClient.header(CMD.READ, 0, 4096, 1n, 0, 0x12345678));
  assert.ok(await m.closedWithin(1000), 'bad magic closes');
  const big = await RawClient.open(f.sock, 'd1');
  big.socket.write(RawClient.header(CMD.WRITE, 0, 0x7fffffff, 1n)); // no payload follows
  assert.ok(await big.closedWithin(1000), 'oversized write closes before any payload is read');
  const v = await RawClient.open(f.sock, 'd1');
  v.socket.write(RawClient.header(CMD.WRITE, 400 * 4096, 65536, 9n));
  v.socket.write(Buffer.alloc(1000)); // truncated payload, then gone
  v.socket.destroy();
  const t = await RawClient.open(f.sock, 'd1');
  t.socket.write(RawClient.header(CMD.READ, 0, 4096, 5n).subarray(0, 10)); // truncated header
  t.socket.end();
  await new Promise((r) => setTimeout(r, 50));
  const r = await good.read(0, 4096);
  assert.ok(r.data.every((x) => x === 0x31), 'acknowledged write intact, connection alive');
  assert.ok((await good.read(400 * 4096, 65536)).data.equals(f.img.subarray(400 * 4096, 400 * 4096 + 65536)), 'the truncated write was not applied');
  good.close();
});

test('NBD_CMD_DISC: the connection closes once its replies are out, also when the client sends more after it or vanishes at once (fuzz seed 641625235)', async () => {
  // A server of its own, so its connection count is this test's alone.
  const srv = new NbdServer({ exports: f.exports, tls: f.tls });
  const sock = await srv.listenUnix(`${f.dir}/disc.sock`);
  const gone = async (what: string) => {
    for (let i = 0; i < 100 && srv.connections > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.is(srv.connections, 0, `${what}: the server still holds the connection`);
  };
  try {
    // A polite client: a read, DISC, and it waits for the server to close.
    const a = await RawClient.open(sock, 'd0');
    const r = a.read(0, 65536);
    a.socket.write(RawClient.header(CMD.DISC, 0, 0, 2n));
    assert.is((await r).error, 0, 'the request before DISC is answered');
    assert.ok(await a.closedWithin(2000), 'the server closes after DISC');
    await gone('DISC, then the client waited');
    // The fuzz's sequence: DISC, then more requests and payload than one
    // socket read takes (the server stopped reading there: the client's close
    // stayed queued behind bytes never consumed). No reply is pending, so no
    // failed send closes the connection by chance.
    const junk = Buffer.concat([RawClient.header(CMD.READ, 0, 4096, 3n), RawClient.header(CMD.WRITE, 0, 65536, 4n), Buffer.alloc(256 * 1024, 0x31)]);
    for (const wait of [false, true]) {
      const b = await RawClient.open(sock, 'd0');
      assert.is((await b.read(4096, 4096)).error, 0);
      b.socket.write(Buffer.concat([RawClient.header(CMD.DISC, 0, 0, 2n), junk]));
      if (wait) assert.ok(await b.closedWithin(2000), 'the server closes after DISC');
      else { await new Promise((res) => setTimeout(res, 2)); b.close(); }
      await gone(`DISC with more requests after it, then the client ${wait ? 'saw the server close' : 'closed at once'}`);
    }
    const chk = await RawClient.open(sock, 'd0');
    assert.ok((await chk.read(0, 65536)).data.equals(f.img.subarray(0, 65536)), 'nothing sent after DISC was applied');
    chk.close();
    await gone('the check read');
  } finally { await srv.close(500); }
});

test('H3: a client stalled mid-payload does not block reads or writes of the same blocks on other connections', async () => {
  const slow = await RawClient.open(f.sock, 'd1');
  slow.socket.write(RawClient.header(CMD.WRITE, 600 * 4096, 65536, 77n));
  slow.socket.write(Buffer.alloc(30000, 0x66)); // half the payload, then silence
  const other = await RawClient.open(f.sock, 'd1');
  const t0 = Date.now();
  const r = await other.read(600 * 4096, 65536);
  const w = await other.write(600 * 4096, Buffer.alloc(4096, 0x67));
  assert.is(r.error, 0);
  assert.is(w.error, 0);
  assert.ok(Date.now() - t0 < 1000, `other connection waited ${Date.now() - t0} ms`);
  slow.close(); other.close();
});

test('two connections on two I/O workers write the same blocks, payloads straddling the receive buffer: each write answered once', async () => {
  // 32 pipelined 4 KiB writes overrun the worker's 128 KiB receive buffer,
  // so some payloads arrive in two parts while the other worker holds their
  // blocks: a receive in flight then must not be mistaken for the payload's.
  const cs = [await RawClient.open(f.sock, 'd1'), await RawClient.open(f.sock, 'd1')];
  let answered = 0;
  await Promise.all(cs.map(async (c, ci) => {
    for (let round = 0; round < 150; round++) {
      const ops = [];
      for (let i = 0; i < 32; i++) ops.push(c.write((1000 + (round * 7 + i * 3) % 16) * 4096, Buffer.alloc(4096, ci * 100 + i)));
      for (const r of await Promise.all(ops)) { assert.is(r.error, 0, 'the connection stays up and every reply is known'); answered++; }
    }
  }));
  assert.is(answered, 2 * 150 * 32);
  for (const c of cs) c.close();
});

for (const given of [false, true]) {
  test(`an export with no device behind it (a library user's own) is served through ${given ? 'the I/O workers it is given (an engine\'s)' : 'the server\'s own I/O workers'}`, async () => {
    // Bytes in a plain Buffer: every request goes from the worker to the export's methods.
    const mem = Buffer.alloc(1 << 20);
    const calls = { read: 0, write: 0, flush: 0 };
    const exp: NbdExport = {
      size: mem.length,
      async read(o, l) { calls.read++; return Buffer.from(mem.subarray(o, o + l)); },
      async write(o, d) { calls.write++; d.copy(mem, o); },
      async flush() { calls.flush++; },
      async trim(o, l) { mem.fill(0, o, o + l); },
      async writeZeroes(o, l) { mem.fill(0, o, o + l); },
      async cache() {},
      zeroMap: (o, l) => [{ offset: o, length: l, zero: false }],
    };
    const exports = new ExportMap();
    exports.set('mem', exp);
    let asked = 0;
    const io = given ? () => { asked++; return f.engine.core.io(); } : undefined;
    const srv = new NbdServer({ exports, tls: f.tls, io });
    const sock = await srv.listenUnix(`${f.dir}/mem.sock`);
    try {
      const c = await RawClient.open(sock, 'mem');
      const data = Buffer.alloc(8192, 0x6d);
      assert.is((await c.write(4096, data)).error, 0);
      assert.is((await c.request(CMD.FLUSH, 0, 0)).error, 0);
      const r = await c.read(0, 16384);
      assert.is(r.error, 0);
      assert.ok(r.data.subarray(4096, 12288).equals(data) && r.data.subarray(0, 4096).every((b) => b === 0), 'the export\'s bytes');
      assert.equal(calls, { read: 1, write: 1, flush: 1 }, 'each request reached the export once');
      assert.is(srv.connections, 1);
      assert.is(asked, given ? 1 : 0, 'the given workers relay it');
      c.close();
    } finally { await srv.close(); }
  });
}

test('H1 over NBD: reads racing writes of the same range see one whole write', async () => {
  const c1 = await RawClient.open(f.sock, 'd1'), c2 = await RawClient.open(f.sock, 'd1');
  const ops: Promise<unknown>[] = [];
  const reads: Promise<{ error: number; data: Buffer }>[] = [];
  for (let i = 1; i <= 40; i++) {
    ops.push(c1.write(700 * 4096, Buffer.alloc(32768, i)));
    reads.push(c2.read(700 * 4096, 32768));
  }
  await Promise.all(ops);
  // A read may also run before the first write: then it sees the image.
  const before = f.img.subarray(700 * 4096, 700 * 4096 + 32768);
  for (const r of await Promise.all(reads)) {
    assert.is(r.error, 0);
    assert.ok(r.data.equals(before) || (r.data[0] >= 1 && r.data[0] <= 40 && r.data.every((x) => x === r.data[0])),
      'a read mixed bytes of two writes (or of the image and a write)');
  }
  c1.close(); c2.close();
});

test('pipelined writes of one block (each waits for the one before to release it) are all answered; the connection stays up', async () => {
  const c = await RawClient.open(f.sock, 'd1');
  const ops = [];
  for (let i = 1; i <= 64; i++) ops.push(c.write(900 * 4096, Buffer.alloc(4096, i)));
  for (const r of await Promise.all(ops)) assert.is(r.error, 0);
  const r = await c.read(900 * 4096, 4096);
  assert.is(r.error, 0);
  assert.ok(r.data[0] >= 1 && r.data[0] <= 64 && r.data.every((x) => x === r.data[0]), 'one whole write');
  c.close();
});

test('memory per connection is bounded: a client that never reads replies is throttled', async () => {
  const c = await RawClient.open(f.sock, 'd0');
  c.socket.pause(); // never read replies
  const before = process.memoryUsage().rss;
  // Ask for 4 GiB of reads, 1 MiB each, as fast as the socket takes them.
  const hdrs = [];
  for (let i = 0; i < 4096; i++) hdrs.push(RawClient.header(CMD.READ, (i % 15) * (1 << 20), 1 << 20, BigInt(i + 1)));
  c.socket.write(Buffer.concat(hdrs));
  await new Promise((r) => setTimeout(r, 1500));
  const grown = (process.memoryUsage().rss - before) / (1 << 20);
  assert.ok(grown < 400, `server memory grew by ${grown.toFixed(0)} MiB for 4 GiB of unread replies`);
  c.close();
  // And the server still serves others.
  const d = await RawClient.open(f.sock, 'd0');
  assert.is((await d.read(0, 4096)).error, 0);
  d.close();
  // Replies sent straight from I/O buffers: none stays pinned after the clients are gone.
  const t0 = Date.now();
  while (f.engine.core.arena.used !== 0 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 20));
  assert.is(f.engine.core.arena.used, 0, 'I/O buffers leaked by a dropped connection');
});

test('per connection, replies a client never reads stay within the documented 64 MiB (requests in flight included)', async () => {
  const clients = await Promise.all([0, 1].map(() => RawClient.open(f.sock, 'd0')));
  for (const c of clients) {
    c.socket.pause(); // never read replies
    const hdrs = [];
    for (let i = 0; i < 1024; i++) hdrs.push(RawClient.header(CMD.READ, (i % 15) * (1 << 20), 1 << 20, BigInt(i + 1)));
    c.socket.write(Buffer.concat(hdrs));
  }
  let peak = 0;
  for (let i = 0; i < 30; i++) { await new Promise((r) => setTimeout(r, 100)); peak = Math.max(peak, f.server.unsentBytes); }
  const perConn = peak / 2 / (1 << 20);
  assert.ok(perConn > 32, `the clients' replies did pile up (${perConn.toFixed(0)} MiB each)`);
  assert.ok(perConn <= 64 + 2, `${perConn.toFixed(1)} MiB of replies queued per connection (limit 64 MiB + one request)`);
  for (const c of clients) c.close();
});

test('replies of reads and writes never interleave, also while the client stops reading', async () => {
  // Reads and writes answered by the worker and by the main thread (the
  // first write of a block is copy-on-write) go out on one socket. With the
  // client paused, the socket fills and both queue what it does not take.
  const c = await RawClient.open(f.sock, 'd1');
  assert.ok(f.img.length >= 4 << 20, 'image large enough');
  const R = 0, W = f.img.length - 400 * 4096; // a read region and a write region of d1
  const want = (await c.read(R, 1 << 20)).data;
  c.socket.pause();
  const rnd = rng(11);
  const reads: Array<Promise<{ error: number; data: Buffer }>> = [];
  const writes: Array<{ at: number; data: Buffer; p: Promise<{ error: number }> }> = [];
  for (let i = 0; i < 400; i++) {
    const ro = (i * 7 % 16) * 65536;
    reads.push(c.read(R + ro, 65536).then((r) => ({ error: r.error, data: r.error ? r.data : (r.data.equals(want.subarray(ro, ro + 65536)) ? r.data : Buffer.alloc(0)) })));
    const data = Buffer.alloc(4096);
    for (let k = 0; k < data.length; k += 4) data.writeUInt32LE(rnd() >>> 0, k);
    const at = W + i * 4096;
    writes.push({ at, data, p: c.write(at, data) });
  }
  await new Promise((r) => setTimeout(r, 500));
  c.socket.resume();
  const timeout = new Promise<never>((_, rej) => setTimeout(() => rej(new Error('replies did not all arrive within 30 s')), 30_000));
  const rr = await Promise.race([Promise.all(reads), timeout]);
  const wr = await Promise.race([Promise.all(writes.map((w) => w.p)), timeout]);
  rr.forEach((r, i) => { assert.is(r.error, 0, `read ${i}`); assert.is(r.data.length, 65536, `read ${i} returned the region's bytes`); });
  wr.forEach((r, i) => assert.is(r.error, 0, `write ${i}`));
  const back = (await c.read(W, 400 * 4096)).data;
  for (const w of writes) assert.ok(back.subarray(w.at - W, w.at - W + 4096).equals(w.data), `write at ${w.at} reads back`);
  c.close();
});

/** Threads of this process (/proc/self/task). */
const threads = () => fs.readdirSync('/proc/self/task').length;

test('connections run on the fixed pool of I/O workers: 40 more connections add no thread', async () => {
  const warm = await RawClient.open(f.sock, 'd0'); // starts the pool
  const cs: RawClient[] = [];
  try {
    const want = (await warm.read(0, 64 * 4096)).data;
    const before = threads();
    for (let i = 0; i < 40; i++) cs.push(await RawClient.open(f.sock, 'd0'));
    const rs = await Promise.all(cs.map((c, i) => c.read((i % 64) * 4096, 4096)));
    rs.forEach((r, i) => assert.ok(r.error === 0 && r.data.equals(want.subarray((i % 64) * 4096, (i % 64 + 1) * 4096)), `read on connection ${i}`));
    const during = threads();
    assert.ok(during <= before + 1, `threads with 41 connections: ${during}, with one: ${before} (the old native path ran 2+ per connection)`);
  } finally {
    for (const c of [warm, ...cs]) c.close();
  }
});

function readRequest(cookie: number, off: number, len: number): Buffer {
  const req = Buffer.alloc(28);
  req.writeUInt32BE(0x25609513, 0); req.writeUInt16BE(CMD.READ, 6); req.writeBigUInt64BE(BigInt(cookie), 8);
  req.writeBigUInt64BE(BigInt(off), 16); req.writeUInt32BE(len, 24);
  return req;
}

test('READs that miss the page cache are served by the I/O worker, whole and right, without stalling the connection; a close with them in flight ends cleanly', async () => {
  const dir = tmpdir('cold');
  const TMPFS = 0x01021994;
  if (fs.statfsSync(f.dir).type === TMPFS) {
    console.log(`SKIP: cold reads: ${f.dir} is on tmpfs, which never misses the page cache`);
    fs.rmSync(dir, { recursive: true, force: true });
    return;
  }
  fs.rmSync(dir, { recursive: true, force: true });
  const SIZE = 8 << 20, BS = 4096;
  const d = await f.addDevice('cold');
  const data = Buffer.alloc(SIZE);
  const rnd = rng(5);
  for (let i = 0; i < SIZE; i += 4) data.writeUInt32LE(rnd() >>> 0, i);
  await d.write(0, data, { fua: true });
  const overlayFd = (d as unknown as { cur: { fd: number } }).cur.fd;
  for (const closeEarly of [false, true]) {
    loadNative().dropPageCache(overlayFd);
    const c = await RawClient.open(f.sock, 'cold');
    const sock = c.socket;
    // 600 pipelined reads of blocks spread over the cold overlay, some repeated (hits after a miss).
    const offs: number[] = [];
    for (let i = 0; i < 600; i++) offs.push(((i * 2654435761) >>> 0) % (SIZE / BS) * BS);
    const conns = f.server.connections;
    if (closeEarly) {
      sock.write(Buffer.concat(offs.map((o, i) => readRequest(i, o, BS))));
      sock.destroy();
      for (let i = 0; i < 500 && f.server.connections >= conns; i++) await new Promise((r) => setTimeout(r, 10));
      assert.is(f.server.connections, conns - 1, 'closed with cold reads in flight: the connection is gone');
      continue;
    }
    try {
      const rs = await Promise.all(offs.map((o) => c.read(o, BS)));
      rs.forEach((r, i) => {
        assert.is(r.error, 0, `read ${i}`);
        assert.ok(r.data.equals(data.subarray(offs[i], offs[i] + BS)), `read ${i} returns the device's bytes`);
      });
      const conn = [...(f.server as unknown as { conns: Set<{ wireStats(): { fast: number } | null }> }).conns].at(-1)!;
      assert.is(conn.wireStats()?.fast, offs.length, 'every read was served by the I/O worker');
    } finally { c.close(); }
  }
  await d.close();
  f.devices.delete('cold');
  f.exports.delete('cold');
});

test('fuzz: 10,000 random and mutated messages (handshake and transmission); checked alive and correct after every batch; fds and RSS bounded', async () => {
  const seed = Number(process.env.STRATA_SEED ?? Math.floor(Math.random() * 2 ** 31));
  const r = rng(seed);
  const int = (n: number) => Math.floor(r() * n);
  await f.addDevice('fz');
  const fds0 = fs.readdirSync('/proc/self/fd').length;
  const rss0 = process.memoryUsage().rss;
  const probe = await RawClient.open(f.sock, 'd0');
  let sent = 0, batches = 0;
  while (sent < 10_000) {
    const c = r() < 0.3 ? await RawClient.connect(f.sock) : await RawClient.open(f.sock, 'fz');
    const handshake = !c.size;
    if (handshake) await c.greeting(r() < 0.9 ? 3 : int(2 ** 32));
    const burst = 50 + int(200);
    for (let i = 0; i < burst && !c.closed; i++, sent++) {
      let msg: Buffer;
      if (handshake) {
        const opt = Buffer.alloc(16 + int(40));
        opt.writeBigUInt64BE(r() < 0.9 ? 0x49484156454f5054n : BigInt(int(2 ** 31)), 0);
        opt.writeUInt32BE(int(14), 8);
        opt.writeUInt32BE(r() < 0.8 ? opt.length - 16 : int(2 ** 32), 12);
        for (let k = 16; k < opt.length; k++) opt[k] = int(256);
        msg = opt;
      } else {
        const type = r() < 0.8 ? int(8) : int(65536);
        const len = r() < 0.7 ? 512 * int(16) : int(2 ** 32);
        const off = r() < 0.7 ? 512 * int(f.img.length / 512) : int(2 ** 53);
        msg = RawClient.header(type === CMD.DISC ? CMD.READ : type, off, len, BigInt(int(2 ** 48)), r() < 0.8 ? 0 : int(65536));
        if (type === CMD.WRITE && len <= 8192) msg = Buffer.concat([msg, Buffer.alloc(len, int(256))]);
        if (r() < 0.1) msg[int(msg.length)] ^= 1 << int(8); // mutation
        if (r() < 0.05) msg = msg.subarray(0, int(msg.length)); // truncation
      }
      if (r() < 0.02) { msg = Buffer.alloc(int(64)); for (let k = 0; k < msg.length; k++) msg[k] = int(256); }
      c.socket.write(msg);
    }
    await new Promise((res) => setTimeout(res, 2));
    c.close();
    // After every batch: another connection still reads the right bytes.
    const at = 65536 * int(f.img.length / 65536);
    const got = await probe.read(at, 65536);
    assert.is(got.error, 0, `seed ${seed}, batch ${batches}`);
    assert.ok(got.data.equals(f.img.subarray(at, at + 65536)), `seed ${seed}, batch ${batches}: read at ${at}`);
    batches++;
  }
  probe.close();
  for (let i = 0; i < 100 && f.server.connections > 0; i++) await new Promise((res) => setTimeout(res, 20));
  assert.is(f.server.connections, 0, `seed ${seed}: every fuzzing connection is gone`);
  // Native wires close their descriptors on their own threads: give them a moment.
  let fds = fs.readdirSync('/proc/self/fd').length;
  for (let i = 0; i < 100 && fds > fds0 + 4; i++) { await new Promise((res) => setTimeout(res, 20)); fds = fs.readdirSync('/proc/self/fd').length; }
  const kinds = () => {
    const k: Record<string, number> = {};
    for (const n of fs.readdirSync('/proc/self/fd')) {
      let t = '?'; try { t = fs.readlinkSync(`/proc/self/fd/${n}`).replace(/\[\d+\]|:\d+$/, '').replace(/^\/.*/, 'file'); } catch { /* gone */ }
      k[t] = (k[t] ?? 0) + 1;
    }
    return JSON.stringify(k);
  };
  assert.ok(fds <= fds0 + 4, `seed ${seed}: ${fds} fds open, ${fds0} before the fuzzing: ${kinds()}`);
  const grew = (process.memoryUsage().rss - rss0) / 1048576;
  assert.ok(grew < 256, `seed ${seed}: RSS grew ${grew.toFixed(0)} MiB`);
  // The server is alive, other exports are untouched and correct.
  const c = await RawClient.open(f.sock, 'd0');
  const rr = await c.read(0, 65536);
  assert.is(rr.error, 0, `seed ${seed}`);
  assert.ok(rr.data.equals(f.img.subarray(0, 65536)), `seed ${seed}`);
  c.close();
  console.log(`  fuzz: ${sent} messages in ${batches} connections, seed ${seed}; fds ${fds0} -> ${fds}, RSS +${grew.toFixed(0)} MiB`);
});

test.run();

// The NBD handshake against hostile clients: replies a client never reads
// stop the server reading, a handshake has a deadline and an option budget,
// and a server at its connection limit says so.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as net from 'net';
import { spawn } from 'child_process';
import { once } from 'events';
import { RawClient } from './helpers/nbd-client';
import { nbdFixture, type Fixture } from './helpers/nbd-fixture';
import { NbdServer } from '../src/nbd/server';
import { OPT, REP } from '../src/nbd/protocol';

let f: Fixture;
test.before(async () => { f = await nbdFixture('nbdhs', 256); await f.addDevice('d0'); });
test.after(async () => { await f.close(); });

/** A second server on the fixture's exports with its own limits. */
async function server(opts: Partial<ConstructorParameters<typeof NbdServer>[0]>, name: string): Promise<{ srv: NbdServer; sock: string }> {
  const srv = new NbdServer({ exports: f.exports, ...opts });
  return { srv, sock: await srv.listenUnix(`${f.dir}/${name}.sock`) };
}

test('a client that sends options and never reads the replies stops being read (unsent replies bounded)', async () => {
  // The flooder is another process, so this one's event loop serves as a daemon's would.
  const script = `
    const s = require('net').createConnection(${JSON.stringify(f.sock)});
    s.once('data', () => {
      s.pause();
      const f = Buffer.alloc(4); f.writeUInt32BE(3, 0); s.write(f);
      const name = Buffer.from('d0');
      const d = Buffer.alloc(4 + name.length + 2); d.writeUInt32BE(name.length, 0); name.copy(d, 4);
      const h = Buffer.alloc(16); h.writeBigUInt64BE(0x49484156454f5054n, 0); h.writeUInt32BE(6, 8); h.writeUInt32BE(d.length, 12);
      const one = Buffer.concat([h, d]);
      const chunk = Buffer.concat(Array.from({ length: 2000 }, () => one));
      const more = () => { while (s.write(chunk)); };
      s.on('drain', more); more();
    });
    s.on('error', () => {});`;
  const child = spawn(process.execPath, ['-e', script], { stdio: 'ignore' });
  try {
    let peak = 0;
    for (let i = 0; i < 30; i++) { await new Promise((r) => setTimeout(r, 100)); peak = Math.max(peak, f.server.unsentBytes); }
    assert.ok(peak > 0, 'replies were queued: the flood reached the server');
    assert.ok(peak < 1 << 20, `unsent handshake replies peaked at ${(peak / 1048576).toFixed(1)} MiB`);
    const other = await RawClient.open(f.sock, 'd0');
    assert.is((await other.read(0, 4096)).error, 0, 'everyone else is served meanwhile');
    other.close();
  } finally { child.kill('SIGKILL'); }
});

test('a handshake has a deadline: silent and stalled clients are closed', async () => {
  const { srv, sock } = await server({ handshakeTimeoutMs: 300 }, 'deadline');
  try {
    const silent = await RawClient.connect(sock);
    const stalled = await RawClient.connect(sock);
    await stalled.greeting();
    stalled.sendOption(OPT.LIST);
    await stalled.optReplies();
    assert.ok(await silent.closedWithin(3000), 'a client that sends nothing is closed');
    assert.ok(await stalled.closedWithin(3000), 'a client that stops mid-handshake is closed');
    const ok = await RawClient.open(sock, 'd0');
    await new Promise((r) => setTimeout(r, 500));
    assert.is((await ok.read(0, 512)).error, 0, 'the deadline ends with the handshake');
    ok.close();
  } finally { await srv.close(500); }
});

test('a handshake has an option budget: the option past it is refused with a reason and the connection closed', async () => {
  const { srv, sock } = await server({ maxOptions: 50 }, 'budget');
  try {
    const c = await RawClient.connect(sock);
    await c.greeting();
    for (let i = 0; i < 50; i++) { c.sendOption(OPT.LIST); await c.optReplies(); }
    c.sendOption(OPT.LIST);
    const r = await c.optReply();
    assert.is(r.type, REP.ERR_POLICY);
    assert.match(r.data.toString(), /more than 50 options/);
    assert.ok(await c.closedWithin(1000));
  } finally { await srv.close(500); }
});

test('over the connection limit a client is told why, and served again once a connection closes', async () => {
  const { srv, sock } = await server({ maxConnections: 3 }, 'limit');
  try {
    const held = await Promise.all([0, 1, 2].map(() => RawClient.open(sock, 'd0')));
    const extra = await RawClient.connect(sock);
    await extra.greeting();
    extra.sendOption(OPT.INFO, RawClient.infoRequest('d0'));
    const r = await extra.optReply();
    assert.is(r.type, REP.ERR_POLICY);
    assert.match(r.data.toString(), /too many NBD connections \(the limit is 3\)/);
    assert.ok(await extra.closedWithin(1000));
    held[0].close();
    await new Promise((r2) => setTimeout(r2, 100));
    const again = await RawClient.open(sock, 'd0');
    assert.is((await again.read(0, 512)).error, 0);
    for (const c of [...held.slice(1), again]) c.close();
  } finally { await srv.close(500); }
});

test('ABORT closes the connection, also when the client sends more after it and vanishes, or never closes its end', async () => {
  const { srv, sock } = await server({}, 'abort');
  const gone = async (what: string) => {
    for (let i = 0; i < 100 && srv.connections > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.is(srv.connections, 0, `${what}: the server still holds the connection`);
  };
  const abort = Buffer.alloc(16);
  abort.writeBigUInt64BE(0x49484156454f5054n, 0); abort.writeUInt32BE(OPT.ABORT, 8);
  try {
    // ABORT and then more than a handshake reads ahead (the server stops
    // reading there); the client closes without reading anything.
    const c = await RawClient.connect(sock);
    await c.greeting();
    c.socket.write(Buffer.concat([abort, Buffer.alloc(256 * 1024, 0x41)]));
    await new Promise((r) => setTimeout(r, 50));
    c.close();
    await gone('ABORT with more data after it, then the client closed');
    // ABORT from a client that reads the ACK and keeps its end open: the server still closes.
    const h = net.createConnection({ path: sock, allowHalfOpen: true });
    h.on('error', () => {});
    try {
      await once(h, 'connect');
      const ended = new Promise<void>((r) => h.once('end', () => r()));
      let got = Buffer.alloc(0);
      h.on('data', (b: Buffer) => { got = Buffer.concat([got, b]); });
      while (got.length < 18) await new Promise((r) => setTimeout(r, 5));
      const flags = Buffer.alloc(4); flags.writeUInt32BE(3, 0);
      h.write(Buffer.concat([flags, abort]));
      await ended;
      assert.is(got.length, 18 + 20, 'greeting and the ACK');
      assert.is(got.readUInt32BE(18 + 12), REP.ACK);
      await gone('ABORT, the client keeps its end open');
    } finally { h.destroy(); }
  } finally { await srv.close(500); }
});

test('raw: many idle connections beyond the limit cost nothing lasting', async () => {
  const { srv, sock } = await server({ maxConnections: 10, handshakeTimeoutMs: 500 }, 'flood');
  try {
    const socks = await Promise.all(Array.from({ length: 200 }, () => new Promise<net.Socket>((res) => {
      const s = net.createConnection(sock, () => res(s));
      s.on('error', () => {});
    })));
    await new Promise((r) => setTimeout(r, 3500));
    assert.is(srv.connections, 0, 'every idle connection was closed at its deadline');
    for (const s of socks) s.destroy();
    const ok = await RawClient.open(sock, 'd0');
    ok.close();
  } finally { await srv.close(500); }
});

test.run();

// The API's input checks, in-process: fields named like Object.prototype
// members are unknown fields, malformed percent-encoding is a 400 (not a
// 500 with a logged server error), and a listener is judged loopback by the
// address it is bound to.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as http from 'http';
import { fields, optional, Router, str } from '../src/api/http';
import { startApi } from '../src/api/server';
import { isLoopbackAddress } from '../src/net-address';
import { rejects } from './helpers/util';

function serve(router: Router): Promise<{ port: number; errors: unknown[]; close(): void }> {
  const errors: unknown[] = [];
  const srv = http.createServer((req, res) => { void router.handle(req, res, (e) => errors.push(e)); });
  return new Promise((r) => srv.listen(0, '127.0.0.1', () => r({ port: (srv.address() as { port: number }).port, errors, close: () => srv.close() })));
}

function call(port: number, method: string, path: string, body?: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, headers: body ? { 'content-type': 'application/json' } : {} }, (res) => {
      let text = ''; res.on('data', (c) => { text += c; }); res.on('end', () => resolve({ status: res.statusCode!, text }));
    });
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

test('fields named like Object.prototype members are unknown fields (400)', async () => {
  const router = new Router().add('POST', '/x', (req) => ({ body: fields(req.body, { name: optional(str(/^[a-z]+$/, 'lowercase')) }) }));
  const s = await serve(router);
  try {
    for (const k of ['constructor', 'toString', '__proto__', 'hasOwnProperty', 'valueOf', 'isPrototypeOf']) {
      const r = await call(s.port, 'POST', '/x', `{"${k}": 1}`);
      assert.is(r.status, 400, `${k}: ${r.text}`);
      assert.match(r.text, /unknown field/);
    }
    assert.is((await call(s.port, 'POST', '/x', '{"name": "ok"}')).status, 200);
  } finally { s.close(); }
});

test('malformed percent-encoding in a path is a 400, and no server error is logged', async () => {
  const router = new Router().add('GET', '/v1/devices/:id', (req) => ({ body: { id: req.params.id } }));
  const s = await serve(router);
  try {
    for (const p of ['/v1/devices/%E0%A4%A', '/v1/devices/%', '/v1/devices/%zz']) {
      const r = await call(s.port, 'GET', p);
      assert.is(r.status, 400, `${p}: ${r.text}`);
      assert.match(r.text, /percent-encoding/);
    }
    assert.is(JSON.parse((await call(s.port, 'GET', '/v1/devices/a%2Db')).text).id, 'a-b');
    assert.equal(s.errors, []);
  } finally { s.close(); }
});

test('loopback is decided on the bound address: 0.0.0.0 needs a token however it is named', async () => {
  for (const ip of ['127.0.0.1', '127.1.2.3', '::1', '::ffff:127.0.0.1']) assert.ok(isLoopbackAddress(ip), ip);
  for (const ip of ['0.0.0.0', '::', '10.0.0.1', '::ffff:10.0.0.1', '128.0.0.1']) assert.not.ok(isLoopbackAddress(ip), ip);
  const router = new Router();
  await rejects(startApi(router, { host: '0.0.0.0', port: 0 }, () => {}), /beyond loopback\) only with a bearer token/);
  const ok = await startApi(router, { host: '127.0.0.1', port: 0 }, () => {});
  ok.server.close();
  const tok = await startApi(router, { host: '0.0.0.0', port: 0, token: 't' }, () => {});
  tok.server.close();
});

test.run();

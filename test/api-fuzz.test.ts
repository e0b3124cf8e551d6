// The HTTP API against random and hostile requests and racing operations:
// thousands of malformed requests (methods, paths, encodings, bodies,
// headers) get 4xx answers, never a 5xx or a logged server error; creates,
// deletes and snapshots of the same device and template race without
// leaving a device the daemon cannot account for.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as http from 'http';
import * as path from 'path';
import { spawn } from 'child_process';
import { makeImage, rng, tmpdir } from './helpers/util';

const SERVER = path.join(__dirname, '..', 'src', 'server.js');

function call(sock: string, method: string, p: string, body?: string, headers: Record<string, string> = {}): Promise<{ status: number; json: any }> {
  return new Promise((resolve) => {
    const req = http.request({ socketPath: sock, method, path: p, headers: { ...(body !== undefined ? { 'content-length': Buffer.byteLength(body) } : {}), ...headers } }, (res) => {
      let text = '';
      res.on('data', (c) => { text += c; });
      res.on('end', () => { let json: any; try { json = JSON.parse(text); } catch { json = undefined; } resolve({ status: res.statusCode!, json }); });
    });
    req.on('error', () => resolve({ status: 0, json: undefined })); // the server may close a request it refuses
    if (body !== undefined) req.write(body);
    req.end();
  });
}

test('API fuzz (3,000 random requests) and races (create, delete, snapshot of one device and template): 4xx for nonsense, no 5xx, no server error', async () => {
  const seed = Number(process.env.STRATA_SEED ?? Math.floor(Math.random() * 2 ** 31));
  const r = rng(seed);
  const int = (n: number) => Math.floor(r() * n);
  const pick = <T>(xs: T[]) => xs[int(xs.length)];
  const dir = tmpdir('api-fuzz');
  fs.writeFileSync(`${dir}/img`, makeImage(64, 5));
  const child = spawn(process.execPath, [SERVER, '--data', `${dir}/data`, '--import', `${dir}/img`, '--import-root', dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => { out += d; });
  child.stderr!.on('data', (d) => { out += d; });
  const sock = `${dir}/data/api.sock`;
  try {
    for (let i = 0; i < 600 && !/"msg":"imported"/.test(out); i++) await new Promise((res) => setTimeout(res, 50));
    const tpl = /"layer":"([0-9a-f]{32})"/.exec(out)![1];
    // Kept to the end: the template stays in use, so deleting it is always refused.
    const keeper = await call(sock, 'POST', '/v1/devices', JSON.stringify({ layer: tpl, id: 'keeper', frontend: 'nbd' }), { 'content-type': 'application/json' });
    assert.is(keeper.status, 201, `keeper: ${JSON.stringify(keeper.json)}`);
    const ids = ['vm1', 'a', '..', '%2e%2e', '%E0%A4%A', '%', 'x'.repeat(70), tpl, `${tpl}/x`, 'constructor', '__proto__', '0'.repeat(32), ''];
    const paths = () => pick([
      '/v1/health', '/v1/ready', '/metrics', '/v1/openapi.json', '/v1/templates', '/v1/devices', '/v1/snapshots', '/v1/operations',
      `/v1/templates/${pick(ids)}`, `/v1/devices/${pick(ids)}`, `/v1/devices/${pick(ids)}/snapshots`, `/v1/snapshots/${pick(ids)}`,
      `/v1/operations/${pick(ids)}`, `/v1/${pick(ids)}`, `/${'a/'.repeat(int(50))}`, `/v1/devices?${'x=1&'.repeat(int(20))}`, '/v1/devices/vm1/../../etc',
    ]);
    const value = (depth = 0): unknown => {
      switch (int(depth > 2 ? 5 : 8)) {
        case 0: return null;
        case 1: return int(2 ** 53) * (r() < 0.5 ? -1 : 1);
        case 2: return 'x'.repeat(int(100));
        case 3: return r() < 0.5;
        case 4: return tpl;
        case 5: return [value(depth + 1)];
        case 6: return { [pick(['layer', 'id', 'path', 'frontend', 'client', 'codec', 'level', '__proto__', 'constructor'])]: value(depth + 1) };
        default: return 1e308;
      }
    };
    const body = () => {
      const k = int(6);
      if (k === 0) return undefined;
      if (k === 1) return Buffer.from(Array.from({ length: int(200) }, () => int(256))).toString('latin1');
      if (k === 2) return '{"layer": "' + tpl + '", "id": "' + pick(ids) + '", "frontend": "' + pick(['nbd', 'ublk', 'auto', 'x']) + '"}';
      if (k === 3) return JSON.stringify({ path: pick([`${dir}/img`, '/etc/passwd', `${dir}/../../etc/shadow`, 'rel', '']) });
      return JSON.stringify(Object.fromEntries(Array.from({ length: int(5) }, () => [pick(['layer', 'id', 'frontend', 'client', 'path', 'codec', 'level', 'toString', 'hasOwnProperty', 'zzz']), value()])));
    };
    const statuses = new Map<number, number>();
    let inflight: Promise<void>[] = [];
    for (let i = 0; i < 3000; i++) {
      const method = pick(['POST', 'POST', 'POST', 'POST', 'GET', 'GET', 'DELETE', 'DELETE', 'PUT', 'HEAD']);
      const headers: Record<string, string> = r() < 0.7 ? { 'content-type': pick(['application/json', 'text/plain', 'application/json; charset=utf-8', 'x/y']) } : {};
      inflight.push(call(sock, method, paths(), body(), headers).then((res) => {
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        assert.ok(res.status < 500 || res.status === 501 || res.status === 507, `seed ${seed}: ${method} answered ${res.status}: ${JSON.stringify(res.json)}`);
      }));
      if (inflight.length >= 16) { await Promise.all(inflight); inflight = []; }
    }
    await Promise.all(inflight);

    // Races on one device id and the template: whatever wins, the daemon's
    // list and its files agree, and the template in use is never deleted.
    for (let round = 0; round < 40; round++) {
      const id = `race${round % 3}`;
      await Promise.all([
        call(sock, 'POST', '/v1/devices', JSON.stringify({ layer: tpl, id, frontend: 'nbd' }), { 'content-type': 'application/json' }),
        call(sock, 'POST', '/v1/devices', JSON.stringify({ layer: tpl, id, frontend: 'nbd' }), { 'content-type': 'application/json' }),
        call(sock, 'DELETE', `/v1/devices/${id}`),
        call(sock, 'POST', `/v1/devices/${id}/snapshots`),
        call(sock, 'DELETE', `/v1/templates/${tpl}`).then((res) => assert.is(res.status, 409, `seed ${seed}: the template in use was not refused (${res.status})`)),
      ]);
    }
    const devs = (await call(sock, 'GET', '/v1/devices')).json as Array<{ id: string }>;
    const manifests = fs.readdirSync(`${dir}/data/cache/devices`).filter((n) => n.endsWith('.json')).map((n) => n.slice(0, -5));
    assert.equal(devs.map((d) => d.id).sort(), manifests.sort(), `seed ${seed}: the daemon's devices are the ones on disk`);
    assert.is((await call(sock, 'GET', '/v1/health')).status, 200);
    const errors = out.split('\n').filter((l) => l.includes('"level":"error"'));
    assert.equal(errors, [], `seed ${seed}: server errors logged`);
    console.log(`  api fuzz: seed ${seed}; statuses ${JSON.stringify(Object.fromEntries(statuses))}; ${devs.length} devices after the races`);
  } finally {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();

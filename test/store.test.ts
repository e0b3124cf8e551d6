import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'fs';
import * as path from 'path';
import { FsObjectStore } from '../src/store/fs';
import { tmpdir } from './helpers/util';

const dir = tmpdir('store');
const s = new FsObjectStore(dir);
const code = async (p: Promise<unknown>) => { try { await p; } catch (e) { return (e as { code: string }).code; } return 'none'; };

test('put/get/head/list/delete', async () => {
  await s.put('layers/a/header', Buffer.from('hello'));
  async function* gen() { yield Buffer.from('ab'); yield Buffer.from('cd'); }
  await s.put('layers/a/data', gen());
  assert.is((await s.get('layers/a/data')).toString(), 'abcd');
  assert.is((await s.get('layers/a/data', { offset: 1, length: 2 })).toString(), 'bc');
  assert.equal(await s.head('layers/a/header'), { key: 'layers/a/header', size: 5 });
  assert.is(await s.head('layers/b/header'), null);
  assert.equal((await s.list('layers/')).map((o) => o.key), ['layers/a/data', 'layers/a/header']);
  await s.delete('layers/a/data');
  assert.is(await s.head('layers/a/data'), null);
});

test('ranged get past the end is an error, not a short read', async () => {
  await s.put('x/obj', Buffer.alloc(10));
  assert.is(await code(s.get('x/obj', { offset: 5, length: 10 })), 'EBADMSG');
  assert.is(await code(s.get('x/missing')), 'ENOENT');
});

test('keys cannot escape the store', async () => {
  for (const k of ['../etc/passwd', 'a/../../b', '/abs', 'a//b', '', 'a/.tmp-x']) {
    assert.is(await code(s.put(k, Buffer.alloc(1))), 'EINVAL', k);
  }
  assert.not.ok(fs.existsSync(path.join(dir, '..', 'etc')));
});

test('a failed streaming put leaves nothing visible', async () => {
  async function* bad() { yield Buffer.from('partial'); throw new Error('source died'); }
  let err: Error | undefined;
  try { await s.put('y/obj', bad()); } catch (e) { err = e as Error; }
  assert.is(err?.message, 'source died');
  assert.is(await s.head('y/obj'), null);
  assert.equal(fs.readdirSync(path.join(dir, 'y')), []);
});

test.run();

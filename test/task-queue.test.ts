// The worker pool runs waiting tasks by priority: a demand miss's frame is
// decompressed before prefetched frames queued ahead of it (issue: prefetch
// never delays demand reads), FIFO within a priority.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Engine } from '../src/index';
import { PriorityTaskQueue } from '../src/task-queue';
import { Priority } from '../src/fetch-queue';
import { tmpdir } from './helpers/util';

test('the queue: demand before readahead before prefetch, FIFO within each; unknown priorities are demand', () => {
  const q = new PriorityTaskQueue();
  const t = (name: string, prio?: unknown) => ({ task: { name, prio } }) as never;
  for (const x of [t('p1', Priority.Prefetch), t('r1', Priority.Readahead), t('d1'), t('p2', Priority.Prefetch), t('d2', Priority.Demand), t('x', 7)]) q.push(x);
  assert.is(q.size, 6);
  const order: string[] = [];
  for (let x = q.shift(); x; x = q.shift()) order.push((x as unknown as { task: { name: string } }).task.name);
  assert.equal(order, ['d1', 'd2', 'x', 'r1', 'p1', 'p2']);
  const a = t('a', Priority.Prefetch), b = t('b', Priority.Prefetch);
  q.push(a); q.push(b); q.remove(a);
  assert.is(q.size, 1);
  assert.is((q.shift() as unknown as { task: { name: string } }).task.name, 'b');
});

test('a busy pool: a demand task submitted after a dozen prefetch tasks runs before them', async () => {
  const dir = tmpdir('task-queue');
  const e = await Engine.open({ store: `${dir}/store`, cacheDir: `${dir}/cache`, workers: 1 });
  try {
    const len = 8 << 20;
    const ptr = e.core.heap.alloc(len);
    const done: string[] = [];
    const run = (name: string, prio: Priority) =>
      e.core.run({ op: 'hash', ptr, len, prio } as never).then(() => { done.push(name); });
    const jobs = Array.from({ length: 12 }, (_, i) => run(`prefetch${i}`, Priority.Prefetch));
    jobs.push(run('demand', Priority.Demand));
    await Promise.all(jobs);
    // One prefetch task was already on the worker (and piscina may hand it one more).
    assert.ok(done.indexOf('demand') <= 2, `completion order: ${done.join(' ')}`);
    e.core.heap.free(ptr);
  } finally { await e.close(); }
});

test.run();

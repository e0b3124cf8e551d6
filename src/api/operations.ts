// Long operations (template import, snapshot upload) as resources: started
// by a request that returns 202 at once, polled at /v1/operations/:id for
// state and progress. The last 1000 finished ones are kept.
import { randomBytes } from 'crypto';
import { StrataError } from '../errors';

export type OpState = 'running' | 'succeeded' | 'failed';

export interface Operation {
  id: string;
  kind: string;
  state: OpState;
  target?: string;
  progress: { phase: string; done: number; total: number };
  result?: unknown;
  error?: { code: string; message: string };
  started: string;
  finished?: string;
}

const KEEP_FINISHED = 1000;

export class Operations {
  private ops = new Map<string, Operation>();
  private running = new Set<Promise<unknown>>();

  constructor(private readonly log: (msg: string, extra: Record<string, unknown>) => void = () => {}) {}

  /** Starts fn in the background; it reports progress through the setter it gets. */
  start(kind: string, target: string | undefined,
    fn: (progress: (p: { phase: string; done: number; total: number }) => void) => Promise<unknown>): Operation {
    const op: Operation = {
      id: randomBytes(8).toString('hex'), kind, target, state: 'running',
      progress: { phase: 'starting', done: 0, total: 0 }, started: new Date().toISOString(),
    };
    this.ops.set(op.id, op);
    const p = fn((pr) => { op.progress = { ...pr }; }).then(
      (result) => { op.state = 'succeeded'; op.result = result; },
      (e) => {
        op.state = 'failed';
        op.error = { code: (e as StrataError).code ?? 'EIO', message: (e as Error).message };
        this.log('operation failed', { operation: op.id, kind, target, error: op.error.message });
      }).finally(() => {
      op.finished = new Date().toISOString();
      this.running.delete(p);
      this.trim();
    });
    this.running.add(p);
    return op;
  }

  get(id: string): Operation | undefined { return this.ops.get(id); }
  list(): Operation[] { return [...this.ops.values()]; }
  get active(): number { return this.running.size; }

  /** Resolves when every running operation has finished (or failed). */
  async settle(): Promise<void> { await Promise.allSettled([...this.running]); }

  private trim(): void {
    const done = [...this.ops.values()].filter((o) => o.state !== 'running');
    for (const o of done.slice(0, Math.max(0, done.length - KEEP_FINISHED))) this.ops.delete(o.id);
  }
}

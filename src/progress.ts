// Progress on a terminal: one self-rewriting stderr line, throttled. Silent
// when stderr is not a TTY so logs and pipes stay clean.
import type { Progress } from './layer-writer';

export function progressPrinter(label: string, bytesPerUnit = 4096, stream: NodeJS.WriteStream = process.stderr): ((p: Progress) => void) & { end(): void } {
  const t0 = Date.now();
  let last = 0, shown = false;
  const fn = ((p: Progress) => {
    if (!stream.isTTY) return;
    const now = Date.now();
    if (now - last < 100 && p.done < p.total) return;
    last = now;
    const pct = p.total ? Math.floor((p.done / p.total) * 100) : 100;
    const mbs = (p.done * bytesPerUnit) / 1e6 / Math.max(0.001, (now - t0) / 1000);
    const width = 24, fill = Math.round((pct / 100) * width);
    stream.write(`\r${label} ${p.phase.padEnd(6)} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${String(pct).padStart(3)}% ${mbs.toFixed(0)} MB/s `);
    shown = true;
  }) as ((p: Progress) => void) & { end(): void };
  fn.end = () => { if (shown) stream.write('\n'); };
  return fn;
}

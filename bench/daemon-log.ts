// What the benches read from a strata daemon's log: it listens first, then
// imports the image given with --import and logs {"msg":"imported","layer":…}.
import * as fs from 'fs';

/**
 * Waits for the daemon logging to `logFile` to finish its --import and
 * returns the layer id; throws (with `why()`) if it dies first or takes
 * longer than `timeoutMs`.
 */
export async function importedLayer(logFile: string, alive: () => boolean, why: () => string, timeoutMs = 600_000): Promise<string> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    let text = '';
    try { text = fs.readFileSync(logFile, 'utf8'); } catch { /* not yet */ }
    const line = text.split('\n').find((l) => l.includes('"msg":"imported"'));
    if (line) return String(JSON.parse(line).layer);
    if (!alive()) throw new Error(`strata daemon stopped before importing: ${why()}`);
    if (performance.now() > deadline) throw new Error(`strata daemon did not import the image within ${timeoutMs / 1000} s: ${why()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

#!/usr/bin/env node
// Runs every test/*.test.ts file (uvu) in its own process and prints a closing
// line CI can read: "N passed, N failed, N skipped". uvu itself prints no
// failed count, and a file that crashes before reporting counts as a failure.
// A suite that cannot run here prints "SKIP: <reason>" (counted as skipped).
'use strict';
const fs = require('fs');
const path = require('path');
const { spawn } = require('child_process');

const dir = __dirname;
const filter = process.argv.slice(2);
const files = fs.readdirSync(dir)
  .filter((f) => f.endsWith('.test.ts'))
  .filter((f) => filter.length === 0 || filter.some((x) => f.includes(x)))
  .sort();
const TIMEOUT_MS = Number(process.env.STRATA_TEST_TIMEOUT_MS || 15 * 60 * 1000);
const strip = (s) => s.replace(/\x1b\[[0-9;]*m/g, '');

function runFile(file) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const child = spawn(process.execPath, ['-r', 'tsx/cjs', path.join(dir, file)], {
      cwd: path.join(dir, '..'), stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, FORCE_COLOR: '0' },
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; process.stdout.write(d); });
    child.stderr.on('data', (d) => { out += d; process.stderr.write(d); });
    const timer = setTimeout(() => { out += `\nTIMEOUT after ${TIMEOUT_MS} ms\n`; child.kill('SIGKILL'); }, TIMEOUT_MS);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const text = strip(out);
      const num = (re) => { const m = text.match(re); return m ? Number(m[1]) : null; };
      const total = num(/Total:\s+(\d+)/);
      const passed = num(/Passed:\s+(\d+)/);
      const skippedUvu = num(/Skipped:\s+(\d+)/) || 0;
      const skips = (text.match(/^SKIP: .*$/gm) || []);
      let r;
      if (total === null || passed === null) {
        r = { passed: 0, failed: skips.length ? 0 : 1, skipped: skips.length };
      } else {
        r = { passed, failed: total - passed - skippedUvu, skipped: skippedUvu + skips.length };
        if (code !== 0 && r.failed === 0) r.failed = 1; // crashed after reporting
      }
      r.file = file; r.ms = Date.now() - t0; r.code = code ?? signal; r.skips = skips;
      // Kept for the closing summary: CI often shows only the end of the log.
      if (r.failed) r.tail = text.trimEnd().split('\n').slice(-40);
      resolve(r);
    });
  });
}

(async () => {
  const results = [];
  for (const f of files) {
    process.stdout.write(`\n=== ${f}\n`);
    results.push(await runFile(f));
  }
  const sum = (k) => results.reduce((a, r) => a + r[k], 0);
  console.log('\n--- test files');
  for (const r of results) {
    console.log(`${r.failed ? 'FAIL' : 'ok  '} ${r.file.padEnd(34)} ${String(r.passed).padStart(4)} passed ${String(r.failed).padStart(3)} failed ${String(r.skipped).padStart(3)} skipped  ${(r.ms / 1000).toFixed(1)}s`);
    for (const s of r.skips) console.log(`       ${s}`);
  }
  for (const r of results.filter((x) => x.failed)) {
    console.log(`\n--- ${r.file} failed (exit ${r.code}); its last lines:`);
    for (const l of r.tail) console.log(`  | ${l}`);
  }
  const failed = sum('failed');
  console.log(`\n${sum('passed')} passed, ${failed} failed, ${sum('skipped')} skipped`);
  process.exit(failed ? 1 : 0);
})();

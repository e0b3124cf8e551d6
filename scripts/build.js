#!/usr/bin/env node
// Builds build/strata.wasm (asc) and build/Release/strata_native.node
// (node-gyp against system liburing) when their sources are newer.
'use strict';
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const root = path.join(__dirname, '..');

function newest(dir, exts) {
  let t = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newest(p, exts));
    else if (exts.some((x) => e.name.endsWith(x))) t = Math.max(t, fs.statSync(p).mtimeMs);
  }
  return t;
}
const mtime = (p) => (fs.existsSync(p) ? fs.statSync(p).mtimeMs : -1);

function nodeGyp() {
  // npm ships node-gyp; running it directly avoids a registry round trip.
  const cands = [process.env.npm_config_node_gyp,
    path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')];
  for (const c of cands) if (c && fs.existsSync(c)) return c;
  throw new Error('node-gyp not found (it ships with npm); reinstall npm');
}

function build({ log = () => {}, force = false } = {}) {
  const wasm = path.join(root, 'build', 'strata.wasm');
  if (force || mtime(wasm) < Math.max(newest(path.join(root, 'assembly'), ['.ts']), mtime(path.join(root, 'asconfig.json')))) {
    log('compiling assembly/ -> build/strata.wasm');
    execFileSync(process.execPath, [path.join(root, 'node_modules', 'assemblyscript', 'bin', 'asc.js'),
      'assembly/index.ts', '--target', 'release'], { cwd: root, stdio: 'inherit' });
  }
  const addon = path.join(root, 'build', 'Release', 'strata_native.node');
  const src = Math.max(newest(path.join(root, 'native'), ['.cc', '.h']), mtime(path.join(root, 'binding.gyp')));
  if (force || mtime(addon) < src) {
    log('building native addon (node-gyp, liburing)');
    // configure+build, not rebuild: rebuild wipes build/, where the WASM lives too.
    const args = [nodeGyp(), 'configure', 'build', '--loglevel=warn'];
    if (fs.existsSync('/usr/include/node/node_api.h')) args.push('--nodedir=/usr');
    execFileSync(process.execPath, args, { cwd: root, stdio: ['ignore', quietGyp() ? 'ignore' : 'inherit', 'inherit'] });
  }
}
const quietGyp = () => !process.env.STRATA_VERBOSE_BUILD;

if (require.main === module) build({ log: (m) => process.stderr.write(`[build] ${m}\n`), force: process.argv.includes('--force') });
module.exports = { build };

#!/usr/bin/env node
// One-shot set-up used by `npm test` and `npm start`: system packages, npm
// dependencies, then the WASM and native builds. Idempotent and quick when
// everything is already in place.
'use strict';
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const root = path.join(__dirname, '..');
const quiet = process.argv.includes('--quiet');
const log = (m) => { if (!quiet) process.stderr.write(`[setup] ${m}\n`); };

// System packages the core needs: a header file proves each is installed.
const REQUIRED = [{ pkg: 'liburing-dev', file: '/usr/include/liburing.h' }];

function aptInstall(pkgs) {
  if (pkgs.length === 0) return;
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!isRoot) {
    console.error(`strata setup: missing system package(s): ${pkgs.join(', ')}.\n` +
      `Install them with: sudo apt-get install -y ${pkgs.join(' ')}`);
    process.exit(3);
  }
  log(`installing ${pkgs.join(' ')} with apt-get`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  try {
    execFileSync('apt-get', ['update', '-qq'], { stdio: ['ignore', 'ignore', 'inherit'], env });
    execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...pkgs],
      { stdio: ['ignore', 'ignore', 'inherit'], env });
  } catch (e) {
    console.error(`strata setup: apt-get could not install ${pkgs.join(', ')}: ${e.message}`);
    process.exit(3);
  }
}

function main() {
  aptInstall(REQUIRED.filter((r) => !fs.existsSync(r.file)).map((r) => r.pkg));
  if (!fs.existsSync(path.join(root, 'node_modules', '.package-lock.json'))) {
    log('installing npm dependencies');
    const hasLock = fs.existsSync(path.join(root, 'package-lock.json'));
    execFileSync('npm', [hasLock ? 'ci' : 'install', '--no-audit', '--no-fund'],
      { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] });
  }
  require('./build').build({ log });
}

if (require.main === module) main();
module.exports = { aptInstall };

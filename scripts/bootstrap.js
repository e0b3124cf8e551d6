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

// System packages the core needs: a file proves each is installed.
const REQUIRED = [{ pkg: 'liburing-dev', file: '/usr/include/liburing.h' }];
// Real NBD peers and clients for the interop tests and benchmarks (--test).
const TEST_TOOLS = [
  { pkg: 'fio', file: '/usr/bin/fio' },
  { pkg: 'libnbd-bin', file: '/usr/bin/nbdinfo' },
  { pkg: 'nbdkit', file: '/usr/bin/nbdkit' },
  { pkg: 'qemu-utils', file: '/usr/bin/qemu-img' },
  { pkg: 'e2fsprogs', file: '/sbin/mkfs.ext4' },
  // The crash harness kills processes at exact system calls with it.
  { pkg: 'strace', file: '/usr/bin/strace' },
  // The NBD TLS tests make their certificates with it.
  { pkg: 'openssl', file: '/usr/bin/openssl' },
];
// The kernel VM lane (--vm): QEMU, a static busybox for the initramfs, the
// nbd userspace client, and what run-in-vm.sh unpacks kernels with.
const VM_TOOLS = [
  { pkg: 'qemu-system-x86', file: '/usr/bin/qemu-system-x86_64' },
  { pkg: 'busybox-static', file: '/bin/busybox' },
  { pkg: 'nbd-client', file: '/sbin/nbd-client' },
  { pkg: 'cpio', file: '/bin/cpio' },
  { pkg: 'xz-utils', file: '/usr/bin/xz' },
  // Backtraces of core dumps a crashed in-VM test leaves.
  { pkg: 'gdb', file: '/usr/bin/gdb' },
  // The power-cut test's second file system (test/vm/power-cut.ts).
  { pkg: 'btrfs-progs', file: '/usr/sbin/mkfs.btrfs' },
  ...TEST_TOOLS,
];

function aptInstall(pkgs, optional = false) {
  if (pkgs.length === 0) return true;
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!isRoot) {
    console.error(`strata setup: missing system package(s): ${pkgs.join(', ')}.\n` +
      `Install them with: sudo apt-get install -y ${pkgs.join(' ')}` +
      (optional ? '\n(tests that need them will be reported as skipped)' : ''));
    if (optional) return false;
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
    if (optional) return false;
    process.exit(3);
  }
  return true;
}

const missing = (list) => list.filter((r) => !fs.existsSync(r.file) && !fs.existsSync(r.file.replace('/sbin/', '/usr/sbin/'))).map((r) => r.pkg);

function main() {
  aptInstall(missing(REQUIRED));
  if (process.argv.includes('--test')) aptInstall(missing(TEST_TOOLS), true);
  if (process.argv.includes('--vm')) aptInstall(missing(VM_TOOLS));
  // (Re)install when node_modules is missing or older than the lock file, so
  // a dependency added on a branch reaches working copies set up before it.
  const installed = path.join(root, 'node_modules', '.package-lock.json');
  const lock = path.join(root, 'package-lock.json');
  if (!fs.existsSync(installed) || (fs.existsSync(lock) && fs.statSync(lock).mtimeMs > fs.statSync(installed).mtimeMs)) {
    log('installing npm dependencies');
    const hasLock = fs.existsSync(path.join(root, 'package-lock.json'));
    execFileSync('npm', [hasLock ? 'ci' : 'install', '--no-audit', '--no-fund'],
      { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] });
  }
  require('./build').build({ log });
}

if (require.main === module) main();
module.exports = { aptInstall };

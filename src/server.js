#!/usr/bin/env node
// `node src/server.js`: the strata daemon (see src/daemon.ts).
'use strict';
require('tsx/cjs/api').register();
require('./daemon.ts').main(process.argv.slice(2)).catch((e) => {
  console.error(`strata daemon: ${e.message}`);
  process.exit(1);
});

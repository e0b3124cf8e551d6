// piscina loads plain JavaScript; this registers tsx so the TypeScript worker
// modules can be required as they are. workerData.module names the worker
// (default: the codec worker).
'use strict';
require('tsx/cjs/api').register();
const { workerData } = require('worker_threads');
module.exports = require((workerData && workerData.module) || './codec-worker.ts');

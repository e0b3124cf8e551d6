// piscina loads plain JavaScript; this registers tsx so the TypeScript worker
// modules can be required as they are.
'use strict';
require('tsx/cjs/api').register();
module.exports = require('./codec-worker.ts');

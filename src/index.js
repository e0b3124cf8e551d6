// CommonJS entry for `require('strata')`: loads the TypeScript sources via tsx.
'use strict';
require('tsx/cjs/api').register();
module.exports = require('./index.ts');

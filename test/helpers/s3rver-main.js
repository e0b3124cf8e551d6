// Child process for the S3 tests: a real S3-protocol server (s3rver) on a
// loopback port, its data in argv[2], bucket argv[3]. Prints "LISTENING <port>"
// once it accepts requests; runs until killed, so a test can kill it mid-upload.
'use strict';
const S3rver = require('s3rver');

const [directory, bucket, port] = process.argv.slice(2);
new S3rver({ address: '127.0.0.1', port: Number(port || 0), silent: true, directory, configureBuckets: [{ name: bucket }] })
  .run()
  .then((addr) => console.log(`LISTENING ${addr.port}`))
  .catch((e) => { console.error(e); process.exit(1); });

// The same conformance and bad-input suite with the transmission phase
// served from JavaScript (STRATA_NBD_WORKER=0), the path used when an export
// offers no I/O worker (and every TLS connection).
process.env.STRATA_NBD_WORKER = '0';
require('./nbd-protocol.test');

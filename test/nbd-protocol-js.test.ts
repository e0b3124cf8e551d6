// The same conformance and bad-input suite with the transmission phase
// served from JavaScript (STRATA_NBD_NATIVE=0), the path used when an export
// has no native target.
process.env.STRATA_NBD_NATIVE = '0';
require('./nbd-protocol.test');

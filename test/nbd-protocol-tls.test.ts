// The same conformance and bad-input suite over TLS: every connection that
// reaches transmission upgrades with STARTTLS first, so its requests reach
// the I/O worker through the TLS relay (a socket pair) instead of the
// client's own socket.
process.env.STRATA_TEST_NBD_TLS = '1';
require('./nbd-protocol.test');

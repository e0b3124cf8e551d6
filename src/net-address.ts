// Loopback or not, decided on the address a listener is actually bound to
// (what the host name resolved to), never on how the host was spelled:
// "127.example.com" may resolve anywhere, and 0.0.0.0 is every interface.
import * as net from 'net';

export function isLoopbackAddress(ip: string): boolean {
  const v4 = ip.startsWith('::ffff:') ? ip.slice(7) : ip;
  if (net.isIPv4(v4)) return v4.split('.')[0] === '127';
  return ip === '::1';
}

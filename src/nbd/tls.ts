// NBD over TLS: the spec's STARTTLS upgrade of a connection during option
// haggling. Credentials in the layouts nbdkit and qemu-nbd read, so one set
// of files serves them all: X.509 in a directory (ca-cert.pem,
// server-cert.pem, server-key.pem) and pre-shared keys in psktool's format
// (one `identity:hexkey` per line). A connection's identity is its PSK
// identity or its client certificate's common name (--tls-verify-peer).
import * as fs from 'fs';
import * as path from 'path';
import * as tls from 'tls';
import type { Socket } from 'net';
import { einval } from '../errors';

export type TlsMode = 'off' | 'on' | 'require';

export interface NbdTlsOptions {
  /** off: no STARTTLS; on: offered; require: nothing but STARTTLS (and ABORT) before it. */
  mode: TlsMode;
  /** Directory with server-cert.pem, server-key.pem and (for verifyPeer) ca-cert.pem. */
  certificates?: string;
  /** psktool-format file: `identity:hexkey` per line. */
  pskFile?: string;
  /** Require a client certificate signed by ca-cert.pem. */
  verifyPeer?: boolean;
}

// PSK suites are off in OpenSSL's default list. Under TLS 1.3 this OpenSSL
// takes a PSK only with a SHA-256 suite, and with a certificate loaded its
// default order picks a SHA-384 one first (a PSK client then fails with
// "insufficient credentials"): SHA-256 suites first, in our order.
const PSK_CIPHERS = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:' +
  'ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:ECDHE-PSK-CHACHA20-POLY1305:' +
  'DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305';
const PSK_CONTEXT = { ciphers: `${PSK_CIPHERS}:${tls.DEFAULT_CIPHERS}`, honorCipherOrder: true };
// Required by OpenSSL once client certificates are requested and sessions (TLS 1.3 PSKs) are in play.
const SESSION_ID_CONTEXT = 'strata-nbd';

export class NbdTls {
  private constructor(readonly mode: TlsMode, private readonly ctx: tls.SecureContextOptions | null,
    private readonly psk: Map<string, Buffer> | null, private readonly verifyPeer: boolean) {}

  /** Reads the credentials; refuses a mode that could never complete a handshake. */
  static load(o: NbdTlsOptions): NbdTls {
    if (o.mode === 'off') return new NbdTls('off', null, null, false);
    if (!o.certificates && !o.pskFile) throw einval(`--tls ${o.mode} needs --tls-certificates DIR or --tls-psk FILE`);
    // Context options, not a context: tls.Server builds its own from them.
    let ctx: tls.SecureContextOptions | null = null;
    if (o.certificates) {
      const read = (name: string) => {
        try { return fs.readFileSync(path.join(o.certificates!, name)); } catch (e) { throw einval(`--tls-certificates: ${(e as Error).message}`); }
      };
      ctx = {
        cert: read('server-cert.pem'), key: read('server-key.pem'), sessionIdContext: SESSION_ID_CONTEXT,
        ...(o.verifyPeer ? { ca: read('ca-cert.pem') } : {}),
        ...(o.pskFile ? PSK_CONTEXT : {}),
      };
      try { tls.createSecureContext(ctx); } catch (e) { throw einval(`--tls-certificates ${o.certificates}: ${(e as Error).message}`); } // at start, not per client
    } else if (o.verifyPeer) throw einval('--tls-verify-peer needs --tls-certificates (the CA that signs client certificates)');
    let psk: Map<string, Buffer> | null = null;
    if (o.pskFile) {
      let text: string;
      try { text = fs.readFileSync(o.pskFile, 'utf8'); } catch (e) { throw einval(`--tls-psk: ${(e as Error).message}`); }
      psk = new Map();
      for (const [i, line] of text.split('\n').entries()) {
        if (!line.trim()) continue;
        const m = /^([^:\s]{1,128}):([0-9a-fA-F]{2,128})$/.exec(line.trim());
        if (!m || m[2].length % 2) throw einval(`--tls-psk ${o.pskFile}, line ${i + 1}: expected identity:hexkey`);
        psk.set(m[1], Buffer.from(m[2], 'hex'));
      }
      if (psk.size === 0) throw einval(`--tls-psk ${o.pskFile}: no keys`);
      if (!ctx) ctx = { ...PSK_CONTEXT, sessionIdContext: SESSION_ID_CONTEXT };
    }
    return new NbdTls(o.mode, ctx, psk, !!o.verifyPeer);
  }

  /** The same credentials in another mode. */
  withMode(mode: TlsMode): NbdTls { return mode === this.mode ? this : new NbdTls(mode, this.ctx, this.psk, this.verifyPeer); }

  /**
   * Runs the TLS handshake on `socket` (the client sent STARTTLS and got its
   * ACK). Resolves with the encrypted socket and the client's identity
   * (null when it has none: a certificate-only server without verifyPeer).
   */
  upgrade(socket: Socket): Promise<{ socket: tls.TLSSocket; identity: string | null }> {
    let pskIdentity: string | null = null;
    const psk = this.psk;
    // A tls.Server of its own takes the socket (as if it had accepted it):
    // it enforces requestCert and tells whether the certificate verified.
    // With keys as well, OpenSSL must not insist on a certificate (a PSK
    // client has none): a client proves itself by either, checked below.
    const srv = tls.createServer({
      ...this.ctx!, requestCert: this.verifyPeer, rejectUnauthorized: this.verifyPeer && !psk,
      ...(psk ? { pskCallback: (_s: tls.TLSSocket, id: string) => { const k = psk.get(id); if (k) pskIdentity = id; return k ?? null; } } : {}),
    } as tls.TlsOptions);
    return new Promise((resolve, reject) => {
      srv.once('tlsClientError', (e) => { socket.destroy(); reject(new Error(`TLS handshake failed: ${e.message}`)); });
      socket.once('close', () => reject(new Error('TLS handshake: the client went away')));
      srv.once('secureConnection', (t: tls.TLSSocket) => {
        t.on('error', () => {});
        if (this.verifyPeer && !pskIdentity && !t.authorized) {
          t.destroy();
          reject(new Error(`TLS: the client has neither a known key nor a certificate signed by the CA (${String(t.authorizationError ?? 'no certificate')})`));
          return;
        }
        const cn = this.verifyPeer && !pskIdentity ? t.getPeerCertificate()?.subject?.CN : undefined;
        resolve({ socket: t, identity: pskIdentity ?? (typeof cn === 'string' ? cn : null) });
      });
      srv.emit('connection', socket);
    });
  }
}

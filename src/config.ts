// Daemon configuration: defaults < config file < environment < flags.
// One table defines every setting, its flag, variable and meaning; --help
// and the README print from it.
import * as fs from 'fs';
import * as path from 'path';
import { einval } from './errors';

type Kind = 'string' | 'int' | 'frontend' | 'onoff' | 'bool' | 'tls';
interface Setting { key: string; flag: string; env: string; kind: Kind; doc: string }

export const SETTINGS: Setting[] = [
  { key: 'data', flag: 'data', env: 'STRATA_DATA', kind: 'string', doc: 'data directory (object store, caches, sockets); default ./strata-data' },
  { key: 'store', flag: 'store', env: 'STRATA_STORE', kind: 'string', doc: 'object store: a directory or s3://bucket/prefix?endpoint=...; default DATA/store' },
  { key: 'nbdSocket', flag: 'socket', env: 'STRATA_NBD_SOCKET', kind: 'string', doc: 'NBD unix socket; default DATA/nbd.sock' },
  { key: 'nbdPort', flag: 'tcp', env: 'STRATA_NBD_PORT', kind: 'int', doc: 'also serve NBD on this TCP port' },
  { key: 'nbdHost', flag: 'host', env: 'STRATA_NBD_HOST', kind: 'string', doc: 'NBD TCP address; default 127.0.0.1' },
  { key: 'nbdMaxConnections', flag: 'nbd-max-connections', env: 'STRATA_NBD_MAX_CONNECTIONS', kind: 'int', doc: 'most NBD connections at once (later ones are refused with a reason); default 1000' },
  { key: 'nbdByName', flag: 'nbd-by-name', env: 'STRATA_NBD_BY_NAME', kind: 'onoff', doc: 'open a device when a client names <layer>/<name> (GO/EXPORT_NAME only): on or off; default on, off when NBD listens beyond loopback' },
  { key: 'nbdByNameMax', flag: 'nbd-by-name-max', env: 'STRATA_NBD_BY_NAME_MAX', kind: 'int', doc: 'most devices opened by name at once; default 64' },
  { key: 'tls', flag: 'tls', env: 'STRATA_TLS', kind: 'tls', doc: 'NBD TLS (STARTTLS): off, on (offered) or require (on TCP; unix-socket clients are offered it); default off' },
  { key: 'tlsCertificates', flag: 'tls-certificates', env: 'STRATA_TLS_CERTIFICATES', kind: 'string', doc: 'directory with server-cert.pem, server-key.pem (and ca-cert.pem), as nbdkit and qemu-nbd read it' },
  { key: 'tlsPsk', flag: 'tls-psk', env: 'STRATA_TLS_PSK', kind: 'string', doc: 'pre-shared keys, one identity:hexkey per line (psktool format)' },
  { key: 'tlsVerifyPeer', flag: 'tls-verify-peer', env: 'STRATA_TLS_VERIFY_PEER', kind: 'bool', doc: 'require client certificates signed by ca-cert.pem (their common name is the client identity)' },
  { key: 'insecureNbd', flag: 'insecure-nbd', env: 'STRATA_INSECURE_NBD', kind: 'bool', doc: 'serve NBD beyond loopback without TLS (every device readable and writable by anyone who can connect)' },
  { key: 'apiSocket', flag: 'api-socket', env: 'STRATA_API_SOCKET', kind: 'string', doc: 'HTTP API unix socket (mode 0600); default DATA/api.sock' },
  { key: 'apiPort', flag: 'api-port', env: 'STRATA_API_PORT', kind: 'int', doc: 'serve the HTTP API on TCP instead of the unix socket' },
  { key: 'apiHost', flag: 'api-host', env: 'STRATA_API_HOST', kind: 'string', doc: 'HTTP API TCP address; default 127.0.0.1 (others need a token)' },
  { key: 'apiToken', flag: 'api-token', env: 'STRATA_API_TOKEN', kind: 'string', doc: 'bearer token every API request must carry' },
  { key: 'importRoot', flag: 'import-root', env: 'STRATA_IMPORT_ROOT', kind: 'string', doc: 'API imports only from inside this directory' },
  { key: 'frontend', flag: 'frontend', env: 'STRATA_FRONTEND', kind: 'frontend', doc: 'default device frontend: auto (ublk when usable, else nbd), nbd or ublk' },
  { key: 'ublkOnStop', flag: 'ublk-on-stop', env: 'STRATA_UBLK_ON_STOP', kind: 'string', doc: 'ublk devices at shutdown: keep (recoverable by the next start) or remove; default keep' },
  { key: 'maxDevices', flag: 'max-devices', env: 'STRATA_MAX_DEVICES', kind: 'int', doc: 'most devices at once; default 1024' },
  { key: 'cacheMaxMiB', flag: 'cache-max-mib', env: 'STRATA_CACHE_MAX_MIB', kind: 'int', doc: 'template cache size limit in MiB (0: none); default 0' },
  { key: 'cacheScrubMiBps', flag: 'cache-scrub-mibps', env: 'STRATA_CACHE_SCRUB_MIBPS', kind: 'int', doc: 're-verify cached template data in the background at this rate in MiB/s (0: never); default 16' },
  { key: 'cacheMinFreeMiB', flag: 'cache-min-free-mib', env: 'STRATA_CACHE_MIN_FREE_MIB', kind: 'int', doc: 'evict cached template data while the cache disk has less free space; default 1024' },
  { key: 'fetchConcurrency', flag: 'fetch-concurrency', env: 'STRATA_FETCH_CONCURRENCY', kind: 'int', doc: 'frame fetches from the object store at once on this host (guest misses first, then readahead, then boot-profile prefetch); default 16' },
  { key: 'ioWorkers', flag: 'io-workers', env: 'STRATA_IO_WORKERS', kind: 'int', doc: 'threads serving NBD connections after their handshake, each with one io_uring ring for all of its connections; default: one per CPU' },
  { key: 'readaheadFrames', flag: 'readahead-frames', env: 'STRATA_READAHEAD_FRAMES', kind: 'int', doc: '2 MiB frames fetched ahead of sequential misses (0: none); default 4' },
  { key: 'bootProfiles', flag: 'boot-profiles', env: 'STRATA_BOOT_PROFILES', kind: 'onoff', doc: 'record the frames a device reads first and prefetch them for the next device on that layer: on or off; default on' },
  { key: 'bootProfileWindowS', flag: 'boot-profile-window', env: 'STRATA_BOOT_PROFILE_WINDOW', kind: 'int', doc: 'seconds of a new device\'s reads a boot profile records; default 60' },
  { key: 'hostId', flag: 'host-id', env: 'STRATA_HOST_ID', kind: 'string', doc: 'this host\'s name in the store\'s leases (letters, digits, ._-); default: made once and kept in DATA/host-id' },
  { key: 'leaseTtlS', flag: 'lease-ttl', env: 'STRATA_LEASE_TTL', kind: 'int', doc: 'seconds a host\'s lease on the layers it uses counts after it was last written (renewed every third); default 120' },
  { key: 'maxChain', flag: 'max-chain', env: 'STRATA_MAX_CHAIN', kind: 'int', doc: 'chain length at which a snapshot compacts (stores the blocks of small ancestors itself, keeps the template and big layers); default 32' },
  { key: 'sharedCache', flag: 'shared-cache', env: 'STRATA_SHARED_CACHE', kind: 'string', doc: 'directory shared by hosts (e.g. NFS) as a second frame cache tier' },
  { key: 'import', flag: 'import', env: 'STRATA_IMPORT', kind: 'string', doc: 'import this raw image at start and print its NBD URI' },
];

export interface Config {
  data: string; store: string; nbdSocket: string; nbdPort?: number; nbdHost: string;
  apiSocket: string; apiPort?: number; apiHost: string; apiToken?: string; importRoot?: string;
  frontend: 'auto' | 'nbd' | 'ublk'; maxDevices: number; import?: string; configFile?: string;
  nbdMaxConnections: number; nbdByName?: boolean; nbdByNameMax: number; insecureNbd: boolean;
  tls: 'off' | 'on' | 'require'; tlsCertificates?: string; tlsPsk?: string; tlsVerifyPeer: boolean;
  cacheMaxBytes: number; cacheMinFreeBytes: number; cacheScrubBytesPerSec: number;
  fetchConcurrency: number; ioWorkers?: number; readaheadFrames: number; bootProfiles: boolean; bootProfileWindowMs: number;
  hostId?: string; leaseTtlMs: number; maxChain?: number; sharedCache?: string; ublkOnStop: 'keep' | 'remove';
}

function parse(s: Setting, v: unknown, from: string): unknown {
  if (v === undefined || v === null) return undefined;
  if (s.kind === 'int') {
    const n = typeof v === 'number' ? v : Number(String(v));
    if (!Number.isInteger(n) || n < 0 || n > 1_000_000) throw einval(`${from}: ${s.key} must be a non-negative integer, got ${JSON.stringify(v)}`);
    return n;
  }
  if (typeof v !== 'string' && typeof v !== 'boolean') throw einval(`${from}: ${s.key} must be a string`);
  const str = String(v);
  if (s.kind === 'bool') {
    if (!['true', '1', 'false', '0'].includes(str)) throw einval(`${from}: ${s.key} takes no value (or true/false), got ${JSON.stringify(v)}`);
    return str === 'true' || str === '1';
  }
  if (s.kind === 'onoff') {
    if (str !== 'on' && str !== 'off') throw einval(`${from}: ${s.key} must be on or off, got ${JSON.stringify(v)}`);
    return str === 'on';
  }
  if (s.kind === 'frontend' && !['auto', 'nbd', 'ublk'].includes(str)) throw einval(`${from}: frontend must be auto, nbd or ublk`);
  if (s.kind === 'tls' && !['off', 'on', 'require'].includes(str)) throw einval(`${from}: tls must be off, on or require`);
  return str;
}

/** Resolves the configuration; `args` are parsed flags (see cli.ts parseArgs). */
export function loadConfig(args: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): Config {
  const raw: Record<string, unknown> = {};
  const file = (args.config ?? env.STRATA_CONFIG) as string | undefined;
  if (file !== undefined) {
    let obj: unknown;
    try { obj = JSON.parse(fs.readFileSync(String(file), 'utf8')); } catch (e) { throw einval(`config file ${file}: ${(e as Error).message}`); }
    if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) throw einval(`config file ${file}: must be a JSON object`);
    for (const [k, v] of Object.entries(obj)) {
      const s = SETTINGS.find((x) => x.key === k);
      if (!s) throw einval(`config file ${file}: unknown setting ${JSON.stringify(k)} (known: ${SETTINGS.map((x) => x.key).join(', ')})`);
      raw[k] = parse(s, v, `config file ${file}`);
    }
  }
  for (const s of SETTINGS) { const v = parse(s, env[s.env], s.env); if (v !== undefined) raw[s.key] = v; }
  for (const s of SETTINGS) { const v = parse(s, args[s.flag], `--${s.flag}`); if (v !== undefined) raw[s.key] = v; }
  const data = path.resolve(String(raw.data ?? 'strata-data'));
  return {
    data,
    // A directory, or a URL (s3://bucket/prefix?..., file://...) kept as given.
    store: /^[a-z][a-z0-9+.-]*:\/\//i.test(String(raw.store ?? '')) ? String(raw.store) : path.resolve(String(raw.store ?? path.join(data, 'store'))),
    nbdSocket: path.resolve(String(raw.nbdSocket ?? path.join(data, 'nbd.sock'))),
    nbdPort: raw.nbdPort as number | undefined,
    nbdHost: String(raw.nbdHost ?? '127.0.0.1'),
    apiSocket: path.resolve(String(raw.apiSocket ?? path.join(data, 'api.sock'))),
    apiPort: raw.apiPort as number | undefined,
    apiHost: String(raw.apiHost ?? '127.0.0.1'),
    apiToken: raw.apiToken as string | undefined,
    importRoot: raw.importRoot !== undefined ? path.resolve(String(raw.importRoot)) : undefined,
    frontend: (raw.frontend ?? 'auto') as Config['frontend'],
    maxDevices: (raw.maxDevices as number | undefined) ?? 1024,
    nbdMaxConnections: (raw.nbdMaxConnections as number | undefined) ?? 1000,
    nbdByName: raw.nbdByName as boolean | undefined,
    nbdByNameMax: (raw.nbdByNameMax as number | undefined) ?? 64,
    insecureNbd: raw.insecureNbd === true,
    tls: (raw.tls ?? 'off') as Config['tls'],
    tlsCertificates: raw.tlsCertificates !== undefined ? path.resolve(String(raw.tlsCertificates)) : undefined,
    tlsPsk: raw.tlsPsk !== undefined ? path.resolve(String(raw.tlsPsk)) : undefined,
    tlsVerifyPeer: raw.tlsVerifyPeer === true,
    import: raw.import as string | undefined,
    ublkOnStop: (() => {
      const v = String(raw.ublkOnStop ?? 'keep');
      if (v !== 'keep' && v !== 'remove') throw einval(`ublkOnStop must be keep or remove, got ${JSON.stringify(v)}`);
      return v;
    })(),
    sharedCache: raw.sharedCache !== undefined ? path.resolve(String(raw.sharedCache)) : undefined,
    cacheMaxBytes: ((raw.cacheMaxMiB as number | undefined) ?? 0) * 1024 * 1024,
    cacheMinFreeBytes: ((raw.cacheMinFreeMiB as number | undefined) ?? 1024) * 1024 * 1024,
    cacheScrubBytesPerSec: ((raw.cacheScrubMiBps as number | undefined) ?? 16) * 1024 * 1024,
    fetchConcurrency: (() => {
      const n = (raw.fetchConcurrency as number | undefined) ?? 16;
      if (n < 1 || n > 1024) throw einval(`fetchConcurrency must be 1..1024, got ${n}`);
      return n;
    })(),
    ioWorkers: (() => {
      const n = raw.ioWorkers as number | undefined;
      if (n !== undefined && (n < 1 || n > 256)) throw einval(`ioWorkers must be 1..256, got ${n}`);
      return n;
    })(),
    readaheadFrames: (raw.readaheadFrames as number | undefined) ?? 4,
    bootProfiles: (raw.bootProfiles as boolean | undefined) ?? true,
    bootProfileWindowMs: ((raw.bootProfileWindowS as number | undefined) ?? 60) * 1000,
    hostId: raw.hostId as string | undefined,
    maxChain: raw.maxChain as number | undefined,
    leaseTtlMs: (() => {
      const n = (raw.leaseTtlS as number | undefined) ?? 120;
      if (n < 1) throw einval(`leaseTtlS must be at least 1, got ${n}`);
      return n * 1000;
    })(),
    configFile: file,
  };
}

export function settingsHelp(): string {
  const w = Math.max(...SETTINGS.map((s) => s.flag.length)) + 4;
  const v = Math.max(...SETTINGS.map((s) => s.env.length)) + 2;
  return SETTINGS.map((s) => `  --${s.flag.padEnd(w)}${s.env.padEnd(v)}${s.doc}`).join('\n');
}

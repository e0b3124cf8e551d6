// What the NBD server serves: anything with this shape. The protocol code
// depends only on this interface, never on the engine.
import type { IoWorkers } from '../io/pool';

export interface ZeroRange { offset: number; length: number; zero: boolean }

export interface NbdExport {
  readonly size: number;
  readonly readOnly?: boolean;
  readonly description?: string;
  read(offset: number, length: number): Promise<Buffer>;
  /** Optional copy-free read: the data stays valid until release(). */
  readView?(offset: number, length: number): Promise<{ data: Buffer; release(): void }>;
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  writeZeroes(offset: number, length: number, opts: { fua: boolean; noHole: boolean; fast: boolean }): Promise<void>;
  cache(offset: number, length: number): Promise<void>;
  /** Which parts of the range read as zeros without stored data. */
  zeroMap(offset: number, length: number): ZeroRange[];
  /**
   * Optional: the connection's transmission phase then runs on an I/O
   * worker, which serves what the device's view places and hands
   * everything else to the methods above. `gate`: the heap offset of
   * the device's gate record (assembly/gate.ts).
   */
  io?(): { workers: IoWorkers; gate: number };
}

/** What an NBD_OPT_INFO (or a meta-context query) tells about an export. */
export type ExportInfo = Pick<NbdExport, 'size' | 'readOnly' | 'description'>;

/** Who is asking: how the client connected and, after STARTTLS, who it proved to be. */
export interface ClientInfo {
  transport: 'unix' | 'tcp';
  tls: boolean;
  /** PSK identity or client certificate common name; null without TLS (or without one). */
  identity: string | null;
}

/** Resolves export names for a server; each call says which client asks. */
export interface ExportResolver {
  /** The export to transmit on (GO / EXPORT_NAME): this may open something. */
  get(name: string, client?: ClientInfo): NbdExport | undefined | Promise<NbdExport | undefined>;
  /** For queries (INFO, meta contexts): must not create anything; defaults to get(). */
  describe?(name: string, client?: ClientInfo): ExportInfo | undefined | Promise<ExportInfo | undefined>;
  list(client?: ClientInfo): Array<{ name: string; description?: string }>;
}

export class ExportMap implements ExportResolver {
  private m = new Map<string, NbdExport>();
  set(name: string, e: NbdExport): void { this.m.set(name, e); }
  delete(name: string): boolean { return this.m.delete(name); }
  get(name: string): NbdExport | undefined { return this.m.get(name); }
  list() { return [...this.m.entries()].map(([name, e]) => ({ name, description: e.description })); }
}

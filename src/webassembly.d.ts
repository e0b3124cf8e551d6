// The WebAssembly globals strata uses (TypeScript ships them only in lib.dom).
declare namespace WebAssembly {
  interface MemoryDescriptor { initial: number; maximum?: number; shared?: boolean }
  class Memory {
    constructor(d: MemoryDescriptor);
    readonly buffer: ArrayBuffer | SharedArrayBuffer;
    grow(delta: number): number;
  }
  class Module { constructor(bytes: BufferSource) }
  class Instance { constructor(m: Module, imports?: Record<string, Record<string, unknown>>); readonly exports: Record<string, unknown> }
  class Global { value: unknown }
}

// NBD wire protocol: constants and message encoders (shared/reference/
// nbd-protocol.md). Pure functions over buffers; nothing here knows about
// strata devices.

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HS_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const CLIENT_FLAG = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const OPT = {
  EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11,
} as const;

export const REP = {
  ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005, ERR_UNKNOWN: 0x80000006, ERR_SHUTDOWN: 0x80000007, ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TFLAG = {
  HAS_FLAGS: 1 << 0, READ_ONLY: 1 << 1, SEND_FLUSH: 1 << 2, SEND_FUA: 1 << 3, ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5, SEND_WRITE_ZEROES: 1 << 6, SEND_DF: 1 << 7, CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9, SEND_CACHE: 1 << 10, SEND_FAST_ZERO: 1 << 11,
} as const;

export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4, PAYLOAD_LEN: 1 << 5 } as const;

export const REPLY_TYPE = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
export const REPLY_FLAG_DONE = 1;

export const ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

export const STATE = { HOLE: 1, ZERO: 2 } as const;

export const REQUEST_LEN = 28;
export const BASE_ALLOCATION = 'base:allocation';

/** Maps an errno (from a StrataError or anything else) onto the NBD error set. */
export function nbdError(errno: number | undefined): number {
  switch (errno) {
    case ERR.EPERM: case ERR.EIO: case ERR.ENOMEM: case ERR.EINVAL: case ERR.ENOSPC:
    case ERR.EOVERFLOW: case ERR.ENOTSUP: case ERR.ESHUTDOWN: return errno;
    case 30: return ERR.EPERM; // EROFS
    case 27: return ERR.ENOSPC; // EFBIG
    case 122: return ERR.ENOSPC; // EDQUOT
    default: return ERR.EIO;
  }
}

export function serverGreeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(HS_FLAG.FIXED_NEWSTYLE | HS_FLAG.NO_ZEROES, 16);
  return b;
}

export function optReply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export function infoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function infoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

export function infoString(type: number, s: string): Buffer {
  const str = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(2 + str.length);
  b.writeUInt16BE(type, 0);
  str.copy(b, 2);
  return b;
}

export function simpleReply(error: number, cookie: Buffer): Buffer {
  const b = Buffer.allocUnsafe(16);
  putSimpleReply(b, 0, error, cookie, 0);
  return b;
}

/** Writes a simple reply (16 bytes) at b[at], the cookie taken from c[ca..ca+8). */
export function putSimpleReply(b: Buffer, at: number, error: number, c: Buffer, ca: number): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  c.copy(b, at + 8, ca, ca + 8);
}

/** Structured chunk header (20 bytes); the payload follows separately. */
export function chunkHeader(flags: number, type: number, cookie: Buffer, length: number): Buffer {
  const b = Buffer.allocUnsafe(20);
  putChunkHeader(b, 0, flags, type, cookie, 0, length);
  return b;
}

/** Writes a chunk header (20 bytes) at b[at], the cookie taken from c[ca..ca+8). */
export function putChunkHeader(b: Buffer, at: number, flags: number, type: number, c: Buffer, ca: number, length: number): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  c.copy(b, at + 8, ca, ca + 8);
  b.writeUInt32BE(length, at + 16);
}

/** Bytes before a READ reply's data: a simple reply, or an OFFSET_DATA chunk header and its offset. */
export const readReplyHeaderLen = (structured: boolean): number => (structured ? 28 : 16);

/** Writes a successful READ reply's header (readReplyHeaderLen bytes) at b[at]. */
export function putReadReplyHeader(b: Buffer, at: number, structured: boolean, c: Buffer, ca: number, offset: number, length: number): void {
  if (!structured) { putSimpleReply(b, at, 0, c, ca); return; }
  putChunkHeader(b, at, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, c, ca, 8 + length);
  b.writeUInt32BE(Math.floor(offset / 0x100000000), at + 20);
  b.writeUInt32BE(offset >>> 0, at + 24);
}

export function errorChunk(cookie: Buffer, error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 200), 'utf8');
  const b = Buffer.alloc(20 + 6 + msg.length);
  chunkHeader(REPLY_FLAG_DONE, REPLY_TYPE.ERROR, cookie, 6 + msg.length).copy(b, 0);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  return b;
}

/**
 * Where the fields of a request header (REQUEST_LEN bytes, big-endian) are:
 * the I/O worker reads them in place, allocating nothing per request.
 * Offsets above 2^53 cannot be valid for any device: read as hi * 2^32 + lo
 * they stay huge, never wrap.
 */
export const REQ = { MAGIC: 0, FLAGS: 4, TYPE: 6, COOKIE: 8, OFFSET_HI: 16, OFFSET_LO: 20, LENGTH: 24 } as const;

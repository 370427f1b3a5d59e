// The frame codec of tcp-link.ts: a fixed 24-byte header, then the payload.
//
// Frame: u32 payloadBytes | u32 type | u32 round | u32 pages | f64 gpa | payload.
// JSON payloads for control records; raw page bytes for RAM. Every header is checked: unknown
// type, oversized payload, a RAM payload that is not `pages` whole pages, or an unaligned gpa is
// a protocol error (MigrationLinkError).
//
// Concurrency: none (one reader per socket, on the main thread).
import { PAGE_SIZE } from '../vmm/engine.ts';
import { MigrationLinkError, type DestRecord, type SourceRecord } from './link.ts';

export const HEADER_BYTES = 24;
export const MAX_PAYLOAD_BYTES = 64 * 2 ** 20;
export const LINK_VERSION = 1;

export enum T {
  HELLO = 1,
  HELLO_ACK = 2,
  CHANNEL_HELLO = 3,
  CONFIG = 4,
  RAM = 5,
  ZERO = 6,
  SYNC = 7,
  VCPU = 8,
  END = 9,
  READY = 10,
  COMPLETE = 11,
  ERROR = 12,
  SYNCED = 13,
}

export interface Frame {
  type: number;
  round: number;
  pages: number;
  gpa: number;
  payload: Buffer;
}

export function header(type: number, payloadBytes: number, round = 0, pages = 0, gpa = 0): Buffer {
  const h = Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt32LE(payloadBytes, 0);
  h.writeUInt32LE(type, 4);
  h.writeUInt32LE(round >>> 0, 8);
  h.writeUInt32LE(pages >>> 0, 12);
  h.writeDoubleLE(gpa, 16);
  return h;
}

export function jsonFrame(type: number, value: unknown): Buffer {
  const body = Buffer.from(JSON.stringify(value));
  return Buffer.concat([header(type, body.length), body]);
}

/** Incremental frame parser: push() socket chunks, then take frames while next() returns one. */
export class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /**
   * RAM payloads that span socket chunks are reassembled here, not in a fresh buffer: the
   * destination applies a RAM record before the next one is parsed (see DestLink.run).
   */
  private scratch: Buffer | null = null;

  private take(n: number, reuse = false): Buffer {
    if (this.chunks[0]!.length >= n) {
      const first = this.chunks[0]!;
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    let out: Buffer;
    if (reuse) {
      if (!this.scratch || this.scratch.length < n) this.scratch = Buffer.allocUnsafeSlow(Math.max(n, 1 << 20));
      out = this.scratch.subarray(0, n);
    } else out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  private peekHeader(): Buffer {
    return this.chunks[0]!.length >= HEADER_BYTES ? this.chunks[0]!.subarray(0, HEADER_BYTES) : Buffer.concat(this.chunks).subarray(0, HEADER_BYTES);
  }

  next(): Frame | null {
    if (this.buffered < HEADER_BYTES) return null;
    const h = this.peekHeader();
    const len = h.readUInt32LE(0);
    const type = h.readUInt32LE(4);
    if (type < T.HELLO || type > T.SYNCED) throw new MigrationLinkError(`protocol error: unknown record type ${type}`);
    if (len > MAX_PAYLOAD_BYTES) throw new MigrationLinkError(`protocol error: record of ${len} bytes exceeds ${MAX_PAYLOAD_BYTES}`);
    if (this.buffered < HEADER_BYTES + len) return null;
    const round = h.readUInt32LE(8);
    const pages = h.readUInt32LE(12);
    const gpa = h.readDoubleLE(16);
    this.take(HEADER_BYTES);
    const payload = len ? this.take(len, type === T.RAM) : Buffer.alloc(0);
    if (type === T.RAM && len !== pages * PAGE_SIZE) throw new MigrationLinkError(`protocol error: RAM record of ${len} bytes for ${pages} pages`);
    if ((type === T.RAM || type === T.ZERO) && (gpa % PAGE_SIZE !== 0 || !Number.isSafeInteger(gpa))) throw new MigrationLinkError(`protocol error: unaligned gpa ${gpa}`);
    return { type, round, pages, gpa, payload };
  }
}

export function parseJson<X>(f: Frame): X {
  try {
    return JSON.parse(f.payload.toString('utf8')) as X;
  } catch {
    throw new MigrationLinkError(`protocol error: record type ${f.type} carries malformed JSON`);
  }
}

export function encodeSource(r: SourceRecord): Buffer[] {
  switch (r.type) {
    case 'config':
      return [jsonFrame(T.CONFIG, r.config)];
    case 'ram':
      return [header(T.RAM, r.data.length, r.round, r.data.length / PAGE_SIZE, r.gpa), r.data as Buffer];
    case 'zero':
      return [header(T.ZERO, 0, r.round, r.pages, r.gpa)];
    case 'sync':
      return [header(T.SYNC, 0, r.round)];
    case 'vcpu':
      return [jsonFrame(T.VCPU, r.state)];
    case 'end':
      return [jsonFrame(T.END, { finalRound: r.finalRound, pagesSent: r.pagesSent, hash: r.hash })];
  }
}

export function decodeSource(f: Frame): SourceRecord {
  switch (f.type) {
    case T.CONFIG:
      return { type: 'config', config: parseJson(f) };
    case T.RAM:
      return { type: 'ram', round: f.round, gpa: f.gpa, data: f.payload };
    case T.ZERO:
      return { type: 'zero', round: f.round, gpa: f.gpa, pages: f.pages };
    case T.SYNC:
      return { type: 'sync', round: f.round };
    case T.VCPU:
      return { type: 'vcpu', state: parseJson(f) };
    case T.END: {
      const e = parseJson<{ finalRound: number; pagesSent: number; hash: string }>(f);
      if (typeof e.hash !== 'string') throw new MigrationLinkError('protocol error: END without a memory hash');
      return { type: 'end', finalRound: e.finalRound, pagesSent: e.pagesSent, hash: e.hash };
    }
    default:
      throw new MigrationLinkError(`protocol error: record type ${f.type} not expected from the source`);
  }
}

export function encodeDest(r: DestRecord): Buffer {
  switch (r.type) {
    case 'ready':
      return header(T.READY, 0);
    case 'synced':
      return header(T.SYNCED, 0, r.round);
    case 'complete':
      return jsonFrame(T.COMPLETE, r);
    case 'error':
      return jsonFrame(T.ERROR, { message: r.message });
  }
}

export function decodeDest(f: Frame): DestRecord {
  switch (f.type) {
    case T.READY:
      return { type: 'ready' };
    case T.SYNCED:
      return { type: 'synced', round: f.round };
    case T.COMPLETE:
      return { ...parseJson<object>(f), type: 'complete' } as DestRecord;
    case T.ERROR:
      return { type: 'error', message: parseJson<{ message: string }>(f).message };
    default:
      throw new MigrationLinkError(`protocol error: record type ${f.type} not expected from the destination`);
  }
}

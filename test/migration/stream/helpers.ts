// Shared helpers for the stream tests: build streams, decode them in arbitrary chunkings, and
// merge the decoder's page-granular RAM fragments back into whole records.

import { StreamDecoder } from '../../../src/migration/stream/decoder.ts';
import { encodeToBytes } from '../../../src/migration/stream/encoder.ts';
import { STREAM_VERSION, type MigrationRecord, type StreamDirection } from '../../../src/migration/stream/format.ts';
import { StreamLayout } from '../../../src/migration/stream/layout.ts';

export const LAYOUT = [
  { slot: 0, pages: 64 },
  { slot: 3, pages: 200 },
];

export function concat(parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

export function encodeAll(records: MigrationRecord[]): Uint8Array {
  return concat(records.map(encodeToBytes));
}

/** Pages with recognisable, position-dependent contents. */
export function pageData(slot: number, firstPage: number, count: number, salt = 0): Uint8Array {
  const data = new Uint8Array(count * 4096);
  const dv = new DataView(data.buffer);
  for (let i = 0; i < count; i++) {
    for (let w = 0; w < 1024; w += 97) dv.setUint32(i * 4096 + w * 4, (slot * 1_000_003 + (firstPage + i) * 7919 + w + salt) >>> 0, true);
  }
  return data;
}

export function hello(channels = 1): MigrationRecord {
  return { kind: 'hello', version: STREAM_VERSION, channels, caps: 3, sessionId: 0x1234_5678_9abc_def0n };
}

/** Decode `bytes` pushed in pieces of the given sizes (cycled); returns records as they came. */
export function decodeChunked(
  bytes: Uint8Array,
  chunkSizes: number[],
  direction: StreamDirection = 'to-destination',
  layout?: StreamLayout,
): MigrationRecord[] {
  const dec = new StreamDecoder({ direction, layout });
  const out: MigrationRecord[] = [];
  let off = 0;
  let k = 0;
  while (off < bytes.length) {
    const n = Math.max(1, chunkSizes[k++ % chunkSizes.length]!);
    dec.push(bytes.subarray(off, off + n));
    off += n;
    for (let r = dec.next(); r; r = dec.next()) out.push(r);
  }
  dec.finish();
  return out;
}

/** Merge consecutive RAM fragments of one wire record (same slot, contiguous pages). */
export function mergeRam(records: MigrationRecord[]): MigrationRecord[] {
  const out: MigrationRecord[] = [];
  for (const r of records) {
    const prev = out[out.length - 1];
    if (r.kind === 'ram' && prev?.kind === 'ram' && prev.slot === r.slot && prev.firstPage + prev.count === r.firstPage) {
      out[out.length - 1] = { ...prev, count: prev.count + r.count, data: concat([prev.data, r.data]) };
    } else {
      out.push(r.kind === 'ram' ? { ...r, data: new Uint8Array(r.data) } : r);
    }
  }
  return out;
}

/** Records with RAM data as base64 text: deep equality on big typed arrays is slow in vitest. */
export function norm(records: MigrationRecord[]): unknown[] {
  return mergeRam(records).map((r) =>
    r.kind === 'ram' ? { ...r, data: Buffer.from(r.data.buffer, r.data.byteOffset, r.data.byteLength).toString('base64') } : r,
  );
}

/** xorshift64 from a seed: r(n) is the next draw in [0, n). The same seed, the same draws. */
export function rng(seed: number): (n: number) => number {
  let s = BigInt(seed) | 1n;
  return (n: number) => {
    s ^= s << 13n;
    s &= 0xffff_ffff_ffff_ffffn;
    s ^= s >> 7n;
    s ^= s << 17n;
    s &= 0xffff_ffff_ffff_ffffn;
    return n <= 1 ? 0 : Number(s % BigInt(n));
  };
}

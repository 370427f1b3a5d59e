// Fuzz the decoder with thousands of seeded mutations of valid streams (bit flips, byte
// overwrites, truncations, splices, deletions, duplications), pushed in random chunkings. The
// decoder may only ever hand out records whose pages lie inside CONFIG's memslots with exactly
// count*4096 bytes of data, or throw MigrationStreamError; nothing else.

import { describe, expect, it } from 'vitest';
import { StreamDecoder } from '../../../src/migration/stream/decoder.ts';
import { encodeToBytes, writeRamHeader } from '../../../src/migration/stream/encoder.ts';
import { MigrationStreamError, RamEncoding, STREAM_VERSION, type MigrationRecord } from '../../../src/migration/stream/format.ts';
import { compressPages } from '../../../src/migration/stream/lz4.ts';
import { LAYOUT, concat, hello, pageData, rng } from './helpers.ts';


function lz4Ram(slot: number, firstPage: number, count: number): Uint8Array {
  const data = new Uint8Array(count * 4096).fill(slot + 1);
  data[17] = firstPage;
  const block = compressPages(data)!;
  const buf = new Uint8Array(24 + block.length);
  const p = writeRamHeader(buf, 0, slot, firstPage, count, RamEncoding.LZ4, block.length);
  buf.set(block, p);
  return buf;
}

function validDestinationStream(): Uint8Array {
  const records: MigrationRecord[] = [
    hello(2),
    { kind: 'config', config: { memslots: LAYOUT, vcpus: 1 } },
    { kind: 'ram', slot: 0, firstPage: 0, count: 2, data: pageData(0, 0, 2) },
    { kind: 'zero', slot: 3, firstPage: 10, count: 5 },
    { kind: 'ram', slot: 3, firstPage: 198, count: 2, data: pageData(3, 198, 2) },
    { kind: 'sync', round: 1 },
    { kind: 'ram', slot: 0, firstPage: 63, count: 1, data: pageData(0, 63, 1, 5) },
    { kind: 'sync', round: 2 },
    { kind: 'vcpu-state', state: { regs: [1, 2, 3] } },
    { kind: 'end', memoryHash: 123456789n, pages: 264, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 },
    { kind: 'go' },
  ];
  const parts = records.map(encodeToBytes);
  parts.splice(4, 0, lz4Ram(3, 50, 3));
  return concat(parts);
}

function validSourceStream(): Uint8Array {
  return concat([
    { kind: 'hello-ack', version: STREAM_VERSION, channels: 2, caps: 3 },
    { kind: 'ready' },
    { kind: 'postcopy-request', slot: 0, page: 3, count: 1 },
    { kind: 'error', code: 2, message: 'bad' },
    { kind: 'sync-ack', round: 2 },
    { kind: 'complete', memoryHash: 5n, pages: 264, details: { hash: '0123/264' } },
    { kind: 'started' },
  ].map((r) => encodeToBytes(r as MigrationRecord)));
}

function mutate(base: Uint8Array, r: (n: number) => number): Uint8Array {
  let b: Uint8Array = new Uint8Array(base);
  const ops = 1 + r(3);
  for (let k = 0; k < ops; k++) {
    switch (r(7)) {
      case 0: { // bit flips
        for (let i = 1 + r(8); i > 0; i--) b[r(b.length)]! ^= 1 << r(8);
        break;
      }
      case 1: { // overwrite a few bytes, biased towards headers (the first 64 bytes of records)
        const at = r(4) === 0 ? r(Math.min(64, b.length)) : r(b.length);
        for (let i = 0; i < 1 + r(4); i++) if (at + i < b.length) b[at + i] = r(4) === 0 ? 0xff : r(256);
        break;
      }
      case 2: // truncate
        b = b.subarray(0, r(b.length));
        break;
      case 3: { // splice: copy a segment of the stream elsewhere (records out of place)
        const from = r(b.length);
        const len = r(Math.min(200, b.length - from) + 1);
        const to = r(b.length);
        b = concat([b.subarray(0, to), b.slice(from, from + len), b.subarray(to)]);
        break;
      }
      case 4: { // delete a range
        const from = r(b.length);
        b = concat([b.subarray(0, from), b.subarray(from + r(300))]);
        break;
      }
      case 5: { // insert random bytes
        const at = r(b.length);
        const junk = new Uint8Array(r(40)).map(() => r(256));
        b = concat([b.subarray(0, at), junk, b.subarray(at)]);
        break;
      }
      case 6: { // overwrite a u32 with an interesting value
        const at = r(Math.max(1, b.length - 4));
        const v = [0, 1, 0xffff_ffff, 0x8000_0000, 4096, 1024, 1025, 64, 200, 199][r(10)]!;
        if (at + 4 <= b.length) new DataView(b.buffer, b.byteOffset).setUint32(at, v, true);
        break;
      }
    }
  }
  return b;
}

describe('decoder fuzzing', () => {
  it('only yields in-range records or throws MigrationStreamError, over 8000 mutated streams', () => {
    const streams = { 'to-destination': validDestinationStream(), 'to-source': validSourceStream() } as const;
    const pagesOf = new Map(LAYOUT.map((s) => [s.slot, s.pages]));
    // A guarded stand-in for guest memory: every RAM record is "written" into it.
    const memory = new Map(LAYOUT.map((s) => [s.slot, new Uint8Array(s.pages * 4096)]));
    const outcomes = new Map<string, number>();
    let yielded = 0;
    for (let iter = 0; iter < 8000; iter++) {
      const r = rng(0x5eed + iter);
      const direction = iter % 8 === 7 ? 'to-source' : 'to-destination';
      const bytes = mutate(streams[direction], r);
      const dec = new StreamDecoder({ direction });
      let outcome = 'ok';
      try {
        let off = 0;
        while (off < bytes.length) {
          const n = 1 + r(r(2) ? 64 : 9000);
          dec.push(bytes.subarray(off, off + n));
          off += n;
          for (let rec = dec.next(); rec; rec = dec.next()) {
            yielded++;
            if (rec.kind === 'ram' || rec.kind === 'zero') {
              const pages = pagesOf.get(rec.slot);
              expect(pages, `slot ${rec.slot}`).toBeDefined();
              expect(rec.count).toBeGreaterThanOrEqual(1);
              expect(rec.firstPage + rec.count).toBeLessThanOrEqual(pages!);
              if (rec.kind === 'ram') {
                expect(rec.data.length).toBe(rec.count * 4096);
                memory.get(rec.slot)!.set(rec.data, rec.firstPage * 4096); // throws RangeError if out of bounds
              }
            } else if (rec.kind === 'postcopy-request') {
              expect(rec.count).toBeGreaterThanOrEqual(1);
            }
          }
        }
        dec.finish();
      } catch (e) {
        if (!(e instanceof MigrationStreamError)) throw e;
        outcome = e.code;
        expect(e.message.length).toBeGreaterThan(10);
      }
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
    }
    if (process.env.FUZZ_VERBOSE) console.log(Object.fromEntries(outcomes), { yielded });
    // The mutations reach many different rules, and some streams survive (e.g. payload flips).
    expect(outcomes.size).toBeGreaterThan(10);
    expect(outcomes.get('ok') ?? 0).toBeGreaterThan(0);
    expect(yielded).toBeGreaterThan(4000);
  });
});

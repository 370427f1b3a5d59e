import { describe, expect, it } from 'vitest';
import { StreamDecoder } from '../../../src/migration/stream/decoder.ts';
import { encodeRecord, encodeToBytes, writeRamHeader } from '../../../src/migration/stream/encoder.ts';
import {
  MAX_PAYLOAD_BYTES,
  MigrationStreamError,
  RamEncoding,
  RecordType,
  STREAM_VERSION,
  type MigrationRecord,
} from '../../../src/migration/stream/format.ts';
import { StreamLayout } from '../../../src/migration/stream/layout.ts';
import { compressPages } from '../../../src/migration/stream/lz4.ts';
import { LAYOUT, concat, decodeChunked, encodeAll, hello, norm, pageData } from './helpers.ts';

const toDestination: MigrationRecord[] = [
  hello(4),
  { kind: 'channel-hello', version: STREAM_VERSION, channelIndex: 3, sessionId: 0xffff_ffff_ffff_fffen },
  { kind: 'config', config: { memslots: LAYOUT, engine: 'soft', vcpus: 2, workload: { kind: 'idle' } } },
  { kind: 'ram', slot: 0, firstPage: 5, count: 3, data: pageData(0, 5, 3) },
  { kind: 'ram', slot: 3, firstPage: 199, count: 1, data: pageData(3, 199, 1) },
  { kind: 'zero', slot: 3, firstPage: 0, count: 200 },
  { kind: 'sync', round: 7 },
  { kind: 'vcpu-state', state: [{ vcpu: 0, regs: { rip: 4096 } }] },
  { kind: 'end', memoryHash: 0xdead_beef_0123_4567n, pages: 264, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 },
  { kind: 'go' },
  { kind: 'error', code: 7, message: 'cancelled by the user: ünïcødé' },
];
const toSource: MigrationRecord[] = [
  { kind: 'hello-ack', version: STREAM_VERSION, channels: 2, caps: 1 },
  { kind: 'ready' },
  { kind: 'complete', memoryHash: 2n ** 64n - 1n, pages: 2 ** 40 },
  { kind: 'complete', memoryHash: 5n, pages: 1, details: { rescanHash: 'abc/1', downtimeMs: 12.5 } },
  { kind: 'postcopy-request', slot: 3, page: 17, count: 1 },
  { kind: 'sync-ack', round: 4 },
  { kind: 'started' },
  { kind: 'error', code: 8, message: 'hash mismatch' },
];

function expectStreamError(fn: () => unknown, code: string, text?: RegExp): MigrationStreamError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MigrationStreamError);
    expect((e as MigrationStreamError).code).toBe(code);
    if (text) expect((e as Error).message).toMatch(text);
    return e as MigrationStreamError;
  }
  throw new Error(`expected MigrationStreamError ${code}, nothing was thrown`);
}

function withLayout(): StreamLayout {
  return new StreamLayout(LAYOUT);
}

describe('stream format round trip', () => {
  it('decodes every record type it encodes, in one chunk', () => {
    expect(norm(decodeChunked(encodeAll(toDestination), [1 << 30]))).toEqual(norm(toDestination));
    expect(decodeChunked(encodeAll(toSource), [1 << 30], 'to-source', withLayout())).toEqual(toSource);
  });

  it('decodes records straddling chunk boundaries, for many chunkings', () => {
    const bytes = encodeAll(toDestination);
    for (const sizes of [[1], [3, 5, 7], [4095], [4097, 13], [8], [9000, 1, 2]]) {
      expect(norm(decodeChunked(bytes, sizes))).toEqual(norm(toDestination));
    }
  });

  it('hands out many records from one chunk, RAM data as views into it', () => {
    const records: MigrationRecord[] = [{ kind: 'config', config: { memslots: LAYOUT } }];
    for (let p = 0; p < 64; p += 2) records.push({ kind: 'ram', slot: 0, firstPage: p, count: 1, data: pageData(0, p, 1) });
    records.push({ kind: 'sync', round: 1 });
    const bytes = encodeAll(records);
    const dec = new StreamDecoder({ direction: 'to-destination' });
    dec.push(bytes);
    const out: MigrationRecord[] = [];
    for (let r = dec.next(); r; r = dec.next()) out.push(r);
    expect(out).toHaveLength(records.length);
    expect(norm(out)).toEqual(norm(records));
    const ram = out[1] as MigrationRecord & { kind: 'ram' };
    expect(ram.data.buffer).toBe(bytes.buffer); // no copy
    expect(dec.atRecordBoundary).toBe(true);
  });

  it('splits a big RAM record into whole-page fragments as bytes arrive', () => {
    const rec: MigrationRecord = { kind: 'ram', slot: 3, firstPage: 10, count: 100, data: pageData(3, 10, 100) };
    const dec = new StreamDecoder({ direction: 'to-destination', layout: withLayout() });
    const bytes = encodeToBytes(rec);
    dec.push(bytes.subarray(0, 24 + 4096 * 2 + 100)); // headers + 2 pages + a sliver
    const first = dec.next();
    expect(first).toMatchObject({ kind: 'ram', slot: 3, firstPage: 10, count: 2 });
    expect(dec.next()).toBeNull();
    dec.push(bytes.subarray(24 + 4096 * 2 + 100));
    const rest = [];
    for (let r = dec.next(); r; r = dec.next()) rest.push(r);
    expect(norm([first!, ...rest])).toEqual(norm([rec]));
  });

  it('round-trips lz4 RAM records and skips lz4 when it does not help', () => {
    const data = new Uint8Array(4096 * 4).fill(0x5a);
    const block = compressPages(data)!;
    expect(block.length).toBeLessThan(data.length / 8);
    const buf = new Uint8Array(64 + block.length);
    const p = writeRamHeader(buf, 0, 0, 8, 4, RamEncoding.LZ4, block.length);
    buf.set(block, p);
    const bytes = concat([encodeToBytes({ kind: 'config', config: { memslots: LAYOUT } }), buf.subarray(0, p + block.length)]);
    const out = decodeChunked(bytes, [7, 100]);
    expect(out[1]).toMatchObject({ kind: 'ram', slot: 0, firstPage: 8, count: 4 });
    expect(Buffer.compare((out[1] as MigrationRecord & { kind: 'ram' }).data, data)).toBe(0);
    const random = new Uint8Array(4096).map(() => (Math.random() * 256) | 0);
    expect(compressPages(random)).toBeUndefined();
  });

  it('encodeRecord reports no room instead of writing past the end', () => {
    const dst = new Uint8Array(20);
    expect(encodeRecord({ kind: 'end', memoryHash: 1n, pages: 1, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 }, dst, 0)).toBe(-1);
    expect(dst.every((b) => b === 0)).toBe(true);
    expect(encodeRecord({ kind: 'sync', round: 1 }, dst, 8)).toBe(20);
  });
});

describe('stream validation', () => {
  const config = encodeToBytes({ kind: 'config', config: { memslots: LAYOUT } });
  const header = (type: number, len: number, flags = 0, reserved = 0) => {
    const h = Buffer.alloc(8);
    h.writeUInt8(type, 0);
    h.writeUInt8(flags, 1);
    h.writeUInt16LE(reserved, 2);
    h.writeUInt32LE(len, 4);
    return new Uint8Array(h);
  };
  const ramRecord = (slot: number, firstPage: number, count: number, dataBytes = count * 4096, encoding = 0) => {
    const buf = Buffer.alloc(8 + 16 + dataBytes);
    buf.set(header(RecordType.RAM, 16 + dataBytes), 0);
    buf.writeUInt32LE(slot, 8);
    buf.writeUInt32LE(firstPage, 12);
    buf.writeUInt32LE(count, 16);
    buf.writeUInt8(encoding, 20);
    return new Uint8Array(buf);
  };

  it('rejects a wrong magic and a wrong version', () => {
    const h = Buffer.from(encodeToBytes(hello()));
    h.write('STAGE2XX', 8, 'latin1');
    expectStreamError(() => decodeChunked(h, [100]), 'bad-magic', /HELLO magic is "STAGE2XX", expected "STAGE2MG"/);
    const v = Buffer.from(encodeToBytes(hello()));
    v.writeUInt16LE(99, 16);
    expectStreamError(() => decodeChunked(v, [100]), 'bad-version', /source speaks stream version 99 \(HELLO\)/);
    const a = Buffer.from(encodeToBytes({ kind: 'hello-ack', version: STREAM_VERSION + 1, channels: 1, caps: 0 }));
    expectStreamError(() => decodeChunked(a, [100], 'to-source'), 'bad-version');
  });

  it('rejects unknown types, wrong-direction records, flags, reserved bits and bad lengths', () => {
    expectStreamError(() => decodeChunked(header(0x42, 0), [8]), 'unknown-type', /unknown record type 66/);
    expectStreamError(() => decodeChunked(encodeToBytes({ kind: 'ready' }), [8]), 'wrong-direction', /READY/);
    expectStreamError(() => decodeChunked(concat([header(RecordType.SYNC, 4, 1), new Uint8Array(4)]), [12]), 'bad-flags');
    expectStreamError(() => decodeChunked(concat([header(RecordType.SYNC, 4, 0, 9), new Uint8Array(4)]), [12]), 'bad-reserved');
    expectStreamError(() => decodeChunked(concat([header(RecordType.SYNC, 5), new Uint8Array(5)]), [13]), 'bad-length', /SYNC payloadLength 5/);
    expectStreamError(() => decodeChunked(header(RecordType.RAM, MAX_PAYLOAD_BYTES + 1), [8]), 'oversize', /RAM payloadLength/);
    expectStreamError(() => decodeChunked(header(RecordType.CONFIG, 0xffff_ffff), [8]), 'oversize');
  });

  it('rejects truncated streams at the end', () => {
    const bytes = encodeAll(toDestination);
    for (const cut of [1, 7, 9, 30, 300, bytes.length - 1]) {
      expectStreamError(() => decodeChunked(bytes.subarray(0, cut), [50]), 'truncated', /stream ended inside/);
    }
  });

  it('rejects pages outside the memslots before handing out any data', () => {
    const cases: [Uint8Array, string, RegExp][] = [
      [ramRecord(1, 0, 1), 'out-of-range', /slot 1 is not a memslot/],
      [ramRecord(0, 64, 1), 'out-of-range', /slot 0 firstPage 64 count 1 outside the slot's 64 pages/],
      [ramRecord(0, 60, 5), 'out-of-range', /firstPage 60 count 5/],
      [ramRecord(3, 0xffff_ffff, 1), 'out-of-range', /firstPage 4294967295/],
      [ramRecord(0, 0, 0, 4096), 'out-of-range', /RAM count 0/],
      [ramRecord(0, 0, 2, 4096), 'bad-data-length', /raw data length 4096 != count 2 \* 4096/],
      [ramRecord(0, 0, 1, 4096, 2), 'bad-encoding', /RAM encoding 2/],
      [ramRecord(0, 0, 2, 100, 1), 'bad-lz4', /lz4 size prefix/],
    ];
    for (const [rec, code, text] of cases) {
      const dec = new StreamDecoder({ direction: 'to-destination' });
      dec.push(config);
      expect(dec.next()?.kind).toBe('config');
      dec.push(rec);
      expectStreamError(() => dec.next(), code, text);
      // Poisoned: it never hands out anything afterwards.
      expectStreamError(() => dec.next(), code);
    }
    const zero = encodeToBytes({ kind: 'zero', slot: 3, firstPage: 150, count: 51 });
    expectStreamError(() => decodeChunked(concat([config, zero]), [1000]), 'out-of-range', /count 51 outside the slot's 200 pages/);
  });

  it('rejects pages before CONFIG, bad JSON and a CONFIG without memslots', () => {
    expectStreamError(() => decodeChunked(ramRecord(0, 0, 1), [5000]), 'no-config', /RAM record before CONFIG/);
    const bad = Buffer.from('{"memslots": [');
    expectStreamError(() => decodeChunked(concat([header(RecordType.CONFIG, bad.length), bad]), [100]), 'bad-json');
    const noSlots = Buffer.from('{"engine":"soft"}');
    expectStreamError(() => decodeChunked(concat([header(RecordType.CONFIG, noSlots.length), noSlots]), [100]), 'bad-config', /memslots/);
    const negative = Buffer.from('{"memslots":[{"slot":0,"pages":-1}]}');
    expectStreamError(() => decodeChunked(concat([header(RecordType.CONFIG, negative.length), negative]), [100]), 'bad-config', /pages = -1/);
  });

  it('rejects a lz4 block that lies about its size or is garbage', () => {
    const data = new Uint8Array(4096 * 2).fill(3);
    const block = Buffer.from(compressPages(data)!);
    const build = (b: Uint8Array, count: number) => {
      const buf = new Uint8Array(64 + b.length);
      const p = writeRamHeader(buf, 0, 0, 0, count, RamEncoding.LZ4, b.length);
      buf.set(b, p);
      return concat([config, buf.subarray(0, p + b.length)]);
    };
    expectStreamError(() => decodeChunked(build(block, 3), [9999]), 'bad-lz4', /prefix 8192 != count\*4096 = 12288/);
    const garbage = Buffer.from(block);
    garbage.fill(0xff, 4);
    expectStreamError(() => decodeChunked(build(garbage, 2), [9999]), 'bad-lz4');
    const short = Buffer.from(block.subarray(0, block.length - 3));
    expectStreamError(() => decodeChunked(build(short, 2), [9999]), 'bad-lz4');
  });
});

// The trace file format (src/guest/trace-format.ts): what is written reads back exactly, and a
// truncated or corrupted file is refused with a TraceFormatError, never another exception.
import { describe, expect, it } from 'vitest';
import { gunzipSync, gzipSync } from 'node:zlib';
import { decodeTrace, encodeTrace, TraceFormatError, type Trace } from '../../src/guest/trace-format.ts';

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

function randomPages(r: () => number, distinct: number): Uint32Array {
  const set = new Set<number>();
  const n = Math.floor(r() * 40);
  for (let i = 0; i < n; i++) set.add(Math.floor(r() * distinct));
  return Uint32Array.from(set).sort();
}

function sampleTrace(reads: boolean, seed = 5): Trace {
  const r = rng(seed);
  const distinct = 3000;
  const epochs = 120;
  return {
    pageSize: 4096,
    epochUnit: 1,
    epochLength: 100_000,
    totalUnits: 11_950_001,
    // Above 2^32: the varints must not go through 32-bit shifts.
    nativeRunNs: 9_876_543_210_123,
    distinctPages: distinct,
    program: 'sqlite3 :memory: < orders.sql — ünïcode',
    writes: Array.from({ length: epochs }, () => randomPages(r, distinct)),
    reads: reads ? Array.from({ length: epochs }, () => randomPages(r, distinct)) : null,
  };
}

describe('trace format', () => {
  it.each([false, true])('round trip (reads recorded: %s)', (reads) => {
    const t = sampleTrace(reads);
    expect(decodeTrace(encodeTrace(t))).toEqual(t);
  });

  it('consecutive pages cost one byte each', () => {
    const t = sampleTrace(false);
    t.writes = [new Uint32Array(0)];
    const empty = gunzipSync(encodeTrace(t)).length;
    t.writes = [Uint32Array.from({ length: 2000 }, (_, i) => i)];
    // The count grows from 1 byte to 2, plus 2000 one-byte deltas.
    expect(gunzipSync(encodeTrace(t)).length - empty).toBe(2001);
  });

  it('the writer refuses pages out of order or out of range', () => {
    const t = sampleTrace(false);
    t.writes[3] = Uint32Array.of(5, 5);
    expect(() => encodeTrace(t)).toThrow(/not ascending/);
    t.writes[3] = Uint32Array.of(3000);
    expect(() => encodeTrace(t)).toThrow(/below distinctPages/);
  });

  it('every truncation of the file is a TraceFormatError', () => {
    const file = encodeTrace(sampleTrace(true));
    for (let n = 0; n < file.length; n++) expect(() => decodeTrace(file.subarray(0, n)), `${n} bytes`).toThrow(TraceFormatError);
  });

  it('every truncation of the body (re-compressed) is a TraceFormatError that says so', () => {
    const body = gunzipSync(encodeTrace(sampleTrace(true)));
    for (let n = 0; n < body.length; n += 7) {
      expect(() => decodeTrace(gzipSync(body.subarray(0, n))), `${n} bytes`).toThrow(TraceFormatError);
    }
    expect(() => decodeTrace(gzipSync(body.subarray(0, body.length - 1)))).toThrow(/truncated body/);
    expect(() => decodeTrace(gzipSync(Buffer.concat([body, Buffer.of(0)])))).toThrow(/1 bytes after the last epoch/);
  });

  it('fuzz: flipped bytes in the file or the body decode or throw TraceFormatError, nothing else', () => {
    const file = encodeTrace(sampleTrace(true));
    const body = gunzipSync(file);
    const r = rng(99);
    let refused = 0;
    for (let i = 0; i < 400; i++) {
      const useBody = i % 2 === 0;
      const bytes = Buffer.from(useBody ? body : file);
      for (let k = 0; k < 1 + Math.floor(r() * 3); k++) bytes[Math.floor(r() * bytes.length)] ^= 1 + Math.floor(r() * 255);
      try {
        const t = decodeTrace(useBody ? gzipSync(bytes) : bytes);
        // What decodes must satisfy the format's invariants.
        for (const w of t.writes) for (let j = 0; j < w.length; j++) expect(w[j]! < t.distinctPages && (j === 0 || w[j]! > w[j - 1]!)).toBe(true);
      } catch (e) {
        if (!(e instanceof TraceFormatError)) throw e;
        refused++;
      }
    }
    expect(refused).toBeGreaterThan(200);
  });

  it('names what is wrong: magic, version, page size', () => {
    const body = gunzipSync(encodeTrace(sampleTrace(false)));
    const bad = (at: number, v: number) => {
      const b = Buffer.from(body);
      b[at] = v;
      return gzipSync(b);
    };
    expect(() => decodeTrace(bad(0, 0x41))).toThrow(/bad magic/);
    expect(() => decodeTrace(bad(4, 2))).toThrow(/trace version 2, this build reads version 1/);
    expect(() => decodeTrace(Buffer.from('not a trace'))).toThrow(/not a gzip-compressed trace/);
  });
});

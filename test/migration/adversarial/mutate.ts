// Seeded mutations of a captured migration stream (capture.ts), from blind byte damage to
// well-formed records that lie: every record type, header field, length, count, CONFIG field
// and vCPU-state field gets hit. Each mutation returns the new bytes and a description that
// reproduces it in a failure message.
//
// Concurrency: pure functions.
import { RECORD_HEADER_BYTES, RecordType } from '../../../src/migration/stream/format.ts';
import type { RecordSpan } from './capture.ts';
export { rng } from '../stream/helpers.ts';

export type Rng = (n: number) => number;


export interface Mutation {
  bytes: Uint8Array;
  what: string;
}

const cat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
const end = (r: RecordSpan) => r.offset + RECORD_HEADER_BYTES + r.payloadLength;

export function recordBytes(type: number, payload: Uint8Array): Uint8Array {
  const b = new Uint8Array(RECORD_HEADER_BYTES + payload.length);
  const dv = new DataView(b.buffer);
  b[0] = type;
  dv.setUint32(4, payload.length, true);
  b.set(payload, RECORD_HEADER_BYTES);
  return b;
}

/** Replace record `r` with `replacement` (any bytes). */
export function replaceRecord(s: Uint8Array, r: RecordSpan, replacement: Uint8Array): Uint8Array {
  return cat(s.subarray(0, r.offset), replacement, s.subarray(end(r)));
}

export function jsonOf(s: Uint8Array, r: RecordSpan): unknown {
  return JSON.parse(Buffer.from(s.subarray(r.offset + RECORD_HEADER_BYTES, end(r))).toString('utf8'));
}

/** Record `r` re-encoded with a new JSON payload (the length follows the text). */
export function withJson(s: Uint8Array, r: RecordSpan, value: unknown): Uint8Array {
  return replaceRecord(s, r, recordBytes(r.type, new Uint8Array(Buffer.from(JSON.stringify(value) ?? 'null', 'utf8'))));
}

type Path = (string | number)[];

function leaves(v: unknown, path: Path = [], out: Path[] = []): Path[] {
  if (typeof v === 'object' && v !== null) {
    out.push(path); // the container itself can be replaced or emptied too
    for (const [k, c] of Object.entries(v)) leaves(c, [...path, Array.isArray(v) ? Number(k) : k], out);
  } else out.push(path);
  return out;
}

function setAt(root: unknown, path: Path, f: (old: unknown) => unknown): unknown {
  if (path.length === 0) return f(root);
  const copy = structuredClone(root) as Record<string | number, unknown>;
  let o = copy;
  for (const k of path.slice(0, -1)) o = o[k] as Record<string | number, unknown>;
  const last = path[path.length - 1]!;
  const v = f(o[last]);
  if (v === REMOVE) delete o[last];
  else o[last] = v;
  return copy;
}
const REMOVE = Symbol('remove');

/** A value that differs from `old` in a way a careless reader might accept. */
function mutateValue(old: unknown, r: Rng): unknown {
  const pick = <T>(xs: T[]): T => xs[r(xs.length)]!;
  if (typeof old === 'number') return pick([old + 1, old - 1, -old - 1, old * 2, 0, -1, 2 ** 53, 4096, old + 4096, 1.5, Number.MAX_SAFE_INTEGER, String(old), null, REMOVE]);
  if (typeof old === 'boolean') return pick([!old, 0, 'true', null, REMOVE]);
  if (typeof old === 'string') return pick([old + 'x', '', 'global-write', 'exclusive', 'zipf', 'hugetlb', 'kvm', old.slice(1), 42, null, REMOVE]);
  if (Array.isArray(old)) return pick([[], [...old, ...old], old.slice(1), {}, null, REMOVE]);
  if (old === null || old === undefined) return pick([0, {}, 'x']);
  return pick([{ ...(old as object), unexpected: 1 }, {}, [], null, REMOVE]);
}

function jsonMutation(s: Uint8Array, rec: RecordSpan, r: Rng): Mutation {
  const value = jsonOf(s, rec);
  const paths = leaves(value);
  const path = paths[r(paths.length)]!;
  const mutated = setAt(value, path, (old) => mutateValue(old, r));
  return { bytes: withJson(s, rec, mutated), what: `${rec.name} JSON ${path.join('.') || '(root)'} := ${JSON.stringify(path.length ? walk(mutated, path) : mutated) ?? 'removed'}` };
}

function walk(v: unknown, path: Path): unknown {
  let o = v as Record<string | number, unknown> | undefined;
  for (const k of path) o = o?.[k] as Record<string | number, unknown> | undefined;
  return o;
}

/** One random mutation of `s` (records: its spans). */
export function mutate(s: Uint8Array, records: RecordSpan[], r: Rng): Mutation {
  // Records are picked uniformly (not bytes): RAM data is most of the bytes, the control
  // records are where the interesting lies are.
  const rec = records[r(records.length)]!;
  const at = (off: number) => `${rec.name} @${off - rec.offset} (stream offset ${off})`;
  const copy = () => new Uint8Array(s);
  switch (r(12)) {
    case 0: {
      const b = copy();
      const off = r(s.length);
      const bit = r(8);
      b[off]! ^= 1 << bit;
      return { bytes: b, what: `bit ${bit} flipped at stream offset ${off}` };
    }
    case 1: {
      // A byte in this record's header or first 40 payload bytes: every fixed field.
      const b = copy();
      const off = rec.offset + r(Math.min(RECORD_HEADER_BYTES + 40, RECORD_HEADER_BYTES + rec.payloadLength));
      const v = r(256);
      b[off] = v === b[off] ? v ^ 0xff : v;
      return { bytes: b, what: `byte := ${b[off]} at ${at(off)}` };
    }
    case 2: {
      const b = copy();
      const dv = new DataView(b.buffer);
      const len = [0, 1, rec.payloadLength - 1, rec.payloadLength + 1, rec.payloadLength + 4096, 0xffff_ffff, r(1 << 24)][r(7)]!;
      dv.setUint32(rec.offset + 4, len >>> 0, true);
      return { bytes: b, what: `${rec.name} payloadLength ${rec.payloadLength} := ${len >>> 0}` };
    }
    case 3: {
      const b = copy();
      const known = Object.values(RecordType) as number[];
      const t = r(2) ? known[r(known.length)]! : r(256);
      b[rec.offset] = t;
      return { bytes: b, what: `${rec.name} type := ${t}` };
    }
    case 4:
      return { bytes: cat(s.subarray(0, rec.offset), s.subarray(end(rec))), what: `${rec.name} record dropped` };
    case 5:
      return { bytes: cat(s.subarray(0, end(rec)), s.subarray(rec.offset)), what: `${rec.name} record duplicated` };
    case 6: {
      const i = records.indexOf(rec);
      const next = records[i + 1];
      if (!next) return { bytes: s.subarray(0, rec.offset), what: `stream cut before the last record (${rec.name})` };
      return { bytes: cat(s.subarray(0, rec.offset), s.subarray(next.offset, end(next)), s.subarray(rec.offset, next.offset), s.subarray(end(next))), what: `${rec.name} swapped with the next ${next.name}` };
    }
    case 7: {
      const cut = r(s.length);
      return { bytes: s.subarray(0, cut), what: `stream truncated at offset ${cut} (in ${rec.name})` };
    }
    case 8: {
      const off = r(s.length);
      const n = 1 + r(64);
      return { bytes: cat(s.subarray(0, off), s.subarray(Math.min(s.length, off + n))), what: `${n} bytes deleted at stream offset ${off}` };
    }
    case 9: {
      const off = r(s.length);
      const junk = new Uint8Array(1 + r(16)).map(() => r(256));
      return { bytes: cat(s.subarray(0, off), junk, s.subarray(off)), what: `${junk.length} random bytes inserted at stream offset ${off}` };
    }
    default: {
      // Well-formed JSON that lies: CONFIG or a VCPU_STATE, one field changed.
      const json = records.filter((x) => x.type === RecordType.CONFIG || x.type === RecordType.VCPU_STATE);
      return jsonMutation(s, json[r(json.length)]!, r);
    }
  }
}

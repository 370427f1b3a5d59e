// The destination against corrupted and lying post-copy switchovers. One real migration that
// switches to post-copy after its bulk round is captured (capture.ts: the main stream, which
// carries POSTCOPY_DISCARD and POSTCOPY_RUN) and cut before GO, so each replay ends at the
// commit: the receiver must refuse (a plain message, no JavaScript internals), or answer COMPLETE
// with exactly the hash of the pages the source kept (then the quiet source never sends GO and
// the receiver says so). It never hangs and never vouches for memory the source did not keep.
// Mutations are aimed at the post-copy records (and their neighbours); the plain records are
// covered by stream-mutator.test.ts.
import { beforeAll, describe, expect, it } from 'vitest';
import { openEngine } from '../../../src/vmm/factory.ts';
import type { Engine } from '../../../src/vmm/engine.ts';
import { RecordType } from '../../../src/migration/stream/format.ts';
import { captureMigration, recordSpans, type RecordSpan } from './capture.ts';
import { mutate, recordBytes, replaceRecord, rng } from './mutate.ts';
import { replay } from './replay.ts';
import { JS_INTERNALS } from '../helpers.ts';

const MUTATIONS = Number(process.env.STAGE2_POSTCOPY_MUTATIONS ?? 40);
const SEED = Number(process.env.STAGE2_MUTATION_SEED ?? 1);
const NO_GO = /after (COMPLETE|END) without GO/;
const popcount = (b: number) => { let n = 0; for (; b; b &= b - 1) n++; return n; };

let engine: Engine;
let stream: Uint8Array;
let records: RecordSpan[];
/** What the unmutated stream's receiver answers in COMPLETE: the hash of the pages the source kept. */
let keptHash: string;

beforeAll(async () => {
  engine = await openEngine('soft');
  // A guest that rewrites part of its memory during the bulk round: the switch then keeps pages
  // (a hash worth checking) and discards others. How much it rewrites depends on timing on a
  // busy machine, so the capture is retried at a few rates until both hold.
  let cap: Awaited<ReturnType<typeof captureMigration>> | null = null;
  let fallback: Awaited<ReturnType<typeof captureMigration>> | null = null;
  for (let attempt = 0; attempt < 6 && !cap; attempt++) {
    const c = await captureMigration(engine, {
      vcpus: 2,
      bytesPerVcpu: 256 << 10,
      workload: 'dirty-rate',
      workloadOptions: { dirtyRate: [16, 12, 24, 8][attempt % 4]! << 20, workingSetBytes: 256 << 10 },
      postcopy: { switchAfter: 1, onNoConvergence: 'postcopy', retries: 0 },
    });
    const discards = c.records.filter((r) => r.type === RecordType.POSTCOPY_DISCARD);
    const bits = discards.reduce((n, r) => n + [...c.toDestination.subarray(r.offset + 20, r.offset + 8 + r.payloadLength)].reduce((k, byte) => k + popcount(byte), 0), 0);
    if (bits > 0 && bits < 128) cap = c;
    else if (bits > 0) fallback = c;
  }
  // On a loaded machine the guest may rewrite everything every time: then every page is
  // discarded and the kept hash is that of no page, a weaker check but the same protocol.
  cap ??= fallback;
  if (!cap) throw new Error('no capture with discarded pages in 6 attempts');
  const go = cap.records.find((r) => r.type === RecordType.GO)!;
  stream = cap.toDestination.subarray(0, go.offset);
  records = recordSpans(stream);
  const out = await replay(stream, engine, null);
  if (out.kind !== 'rejected' || !NO_GO.test(out.message) || !out.completeHash) throw new Error(`the captured post-copy switchover did not replay to COMPLETE: ${JSON.stringify(out)}`);
  keptHash = out.completeHash;
}, 60_000);

/** The outcome is acceptable: refused plainly, or COMPLETE for exactly the kept memory. */
function judge(out: Awaited<ReturnType<typeof replay>>): string | null {
  if (out.kind === 'hung') return `hung: ${out.message}`;
  if (out.kind === 'completed') return 'the receiver started the guest without GO';
  if (JS_INTERNALS.test(out.message)) return `message with JavaScript internals: ${out.message}`;
  if (NO_GO.test(out.message) && out.completeHash !== keptHash) return `COMPLETE vouched for ${out.completeHash}, the source kept ${keptHash}`;
  return null;
}

describe('the receiver against corrupted post-copy switchovers (soft engine)', () => {
  it('the capture holds the post-copy records', () => {
    expect(records.filter((r) => r.type === RecordType.POSTCOPY_DISCARD).length).toBeGreaterThan(0);
    expect(records.filter((r) => r.type === RecordType.POSTCOPY_RUN)).toHaveLength(1);
  });

  const targeted: [string, (s: Uint8Array) => Uint8Array, RegExp][] = [
    ['a POSTCOPY_DISCARD dropped', (s) => {
      const d = recordSpans(s).find((r) => r.type === RecordType.POSTCOPY_DISCARD)!;
      return new Uint8Array(Buffer.concat([s.subarray(0, d.offset), s.subarray(d.offset + 8 + d.payloadLength)]));
    }, /memory hash mismatch at POSTCOPY_RUN|pages are missing here/],
    ['a POSTCOPY_DISCARD for a page past the memslot', (s) => {
      const d = recordSpans(s).find((r) => r.type === RecordType.POSTCOPY_DISCARD)!;
      const b = new Uint8Array(s.subarray(d.offset, d.offset + 8 + d.payloadLength));
      const dv = new DataView(b.buffer, b.byteOffset);
      // slot u32 @8, firstPage u32 @12 (stream/format.ts): move the run past the slot's end.
      dv.setUint32(12, dv.getUint32(12, true) + (1 << 20), true);
      return replaceRecord(s, d, b);
    }, /POSTCOPY_DISCARD|outside|not guest RAM/],
    ['POSTCOPY_RUN with one missing page more', (s) => {
      const run = recordSpans(s).find((r) => r.type === RecordType.POSTCOPY_RUN)!;
      const b = new Uint8Array(s.subarray(run.offset, run.offset + 8 + run.payloadLength));
      const dv = new DataView(b.buffer, b.byteOffset);
      const at = 8 + 36; // missingPages: u64 at payload offset 36 (stream/encoder.ts)
      dv.setUint32(at, dv.getUint32(at, true) + 1, true);
      return replaceRecord(s, run, b);
    }, /POSTCOPY_RUN says \d+ pages are missing here, this side misses \d+/],
    ['a POSTCOPY_DISCARD with an empty payload', (s) => {
      const d = recordSpans(s).find((r) => r.type === RecordType.POSTCOPY_DISCARD)!;
      return replaceRecord(s, d, recordBytes(RecordType.POSTCOPY_DISCARD, new Uint8Array(0)));
    }, /POSTCOPY_DISCARD|truncated|short|length/i],
  ];
  for (const [name, make, expected] of targeted) {
    it(`refuses ${name}`, async () => {
      const out = await replay(make(stream), engine, null);
      expect(judge(out)).toBeNull();
      expect(out.kind).toBe('rejected');
      expect((out as { message: string }).message).toMatch(expected);
      expect((out as { message: string }).message).not.toMatch(NO_GO);
    });
  }

  it(`${MUTATIONS} seeded random mutations around the post-copy records: refused plainly or COMPLETE for the kept memory, never hung`, async () => {
    const r = rng(SEED);
    // The post-copy records, the vCPU states beside them (JSON lies), and the final SYNC.
    const aimed = records.filter((x) => x.type === RecordType.POSTCOPY_DISCARD || x.type === RecordType.POSTCOPY_RUN || x.type === RecordType.VCPU_STATE || (x.type === RecordType.SYNC && x.offset > records.find((y) => y.type === RecordType.VCPU_STATE)!.offset));
    const bad: string[] = [];
    const tally = new Map<string, number>();
    for (let i = 0; i < MUTATIONS; i++) {
      const m = mutate(stream, aimed, r);
      const out = await replay(m.bytes, engine, null);
      const verdict = judge(out);
      if (verdict) bad.push(`#${i} ${m.what}: ${verdict}`);
      const key = out.kind === 'rejected' ? (NO_GO.test(out.message) ? 'COMPLETE (kept memory), no GO' : `rejected: ${out.message.replace(/\d+/g, 'N').slice(0, 70)}`) : out.kind;
      tally.set(key, (tally.get(key) ?? 0) + 1);
    }
    console.log(`post-copy mutator, seed ${SEED}, ${MUTATIONS} mutations:\n${[...tally].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${String(n).padStart(5)}  ${k}`).join('\n')}`);
    expect(bad).toEqual([]);
  }, 240_000);
});

// The destination against corrupted and lying streams. One real migration is captured
// (capture.ts); then (1) the corruptions a tester found accepted before are replayed, each must
// be refused with a message that names the field, and (2) seeded random mutations (mutate.ts)
// are replayed into real receivers (replay.ts). The rule for every one: either it is refused
// with a plain message (no JavaScript internals), or the receiver completes and everything it
// runs on equals the source's at switchover (memory, CONFIG, vCPU states); never a hang.
//
// `npm test` runs a bounded number of mutations; STAGE2_MUTATIONS=N runs N (the long run),
// STAGE2_MUTATION_SEED picks the seed.
import { writeFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { openEngine } from '../../../src/vmm/factory.ts';
import type { Engine } from '../../../src/vmm/engine.ts';
import { MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { validateConfig } from '../../../src/migration/config-validate.ts';
import { RecordType } from '../../../src/migration/stream/format.ts';
import { captureMigration, type CapturedMigration } from './capture.ts';
import { jsonOf, mutate, rng, withJson } from './mutate.ts';
import { replay, type Reference, type ReplayOutcome } from './replay.ts';
import { JS_INTERNALS } from '../helpers.ts';

const MUTATIONS = Number(process.env.STAGE2_MUTATIONS ?? 60);
/** STAGE2_MUTATION_LOG=FILE: the counts so far are rewritten there every 250 mutations. */
const LOG = process.env.STAGE2_MUTATION_LOG;

const tallyText = (tally: Map<string, number>) => [...tally].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${String(n).padStart(6)}  ${k}`).join('\n');
const SEED = Number(process.env.STAGE2_MUTATION_SEED ?? 1);


let engine: Engine;
let cap: CapturedMigration;
let ref: Reference;

beforeAll(async () => {
  engine = await openEngine('soft');
  cap = await captureMigration(engine, { vcpus: 2, bytesPerVcpu: 256 << 10, workload: 'sequential' });
  const cfgRec = cap.records.find((r) => r.type === RecordType.CONFIG)!;
  const states = cap.records.filter((r) => r.type === RecordType.VCPU_STATE).map((r) => jsonOf(cap.toDestination, r) as { vcpu: number });
  ref = {
    sourceHash: cap.sourceHash,
    configJson: JSON.stringify(validateConfig(jsonOf(cap.toDestination, cfgRec), MMU_LOCK_MODES)),
    vcpuStatesJson: JSON.stringify(states.sort((a, b) => a.vcpu - b.vcpu)),
  };
});

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** The captured stream with CONFIG (or vCPU state `vcpu`) changed by `f`. */
function lie(record: 'config' | number, f: (j: Json) => void): Uint8Array {
  const spans = cap.records.filter((r) => (record === 'config' ? r.type === RecordType.CONFIG : r.type === RecordType.VCPU_STATE && (jsonOf(cap.toDestination, r) as Json).vcpu === record));
  const span = spans[0]!;
  const j = jsonOf(cap.toDestination, span) as Json;
  f(j);
  return withJson(cap.toDestination, span, j);
}

const guestSlot = (j: Json) => j.memslots.find((s: Json) => !s.internal);

describe('the receiver against lying and corrupted streams (soft engine)', () => {
  it('the captured stream itself replays to an equal destination', async () => {
    const out = await replay(cap.toDestination, engine, ref);
    expect(out).toMatchObject({ kind: 'completed', equal: true });
  });

  // The corruptions an independent tester found accepted (issue 8), each refused by name.
  const cases: [string, () => Uint8Array, RegExp][] = [
    ['a shifted memslot base', () => lie('config', (j) => (guestSlot(j).guestPhysAddr += 2 << 20)), /workload\.gpaBase|CONFIG differs/],
    ['a memslot twice the size (pages and ramBytes to match)', () => lie('config', (j) => {
      const s = guestSlot(j);
      j.ramBytes += s.memorySize;
      s.memorySize *= 2;
      s.pages *= 2;
    }), /CONFIG differs/],
    ['a read-only flag on guest RAM', () => lie('config', (j) => (guestSlot(j).flags = 2)), /memslots\[\d+\]\.flags: KVM_MEM_READONLY/],
    ['an unknown lock mode', () => lie('config', (j) => (j.vmConfig.lock = 'turbo')), /vmConfig\.lock: "turbo" is not one of/],
    ['an unknown workload kind', () => lie('config', (j) => (j.workload.kind = 'zipf')), /workload\.kind: "zipf" is not one of/],
    ['a zero workload base', () => lie('config', (j) => (j.workload.gpaBase = 0)), /workload\.gpaBase: .* is in no guest-RAM memslot/],
    ['a zero memslot base', () => lie('config', (j) => (guestSlot(j).guestPhysAddr = 0)), /workload\.gpaBase|guestPhysAddr: .* overlaps/],
    ['a negative pass count', () => lie(0, (j) => {
      j.arch.passes = -1;
      j.progress.passesCompleted = -1;
    }), /VCPU_STATE record \d: vCPU state progress\.passesCompleted: -1 is outside/],
    ['a vCPU state of null', () => lie(1, (j) => Object.keys(j).forEach((k) => delete j[k])), /VCPU_STATE record \d: vCPU state record\.engine: missing/],
    ['a vCPU state for an undefined vCPU', () => lie(1, (j) => delete j.vcpu), /vCPU state record\.vcpu: missing/],
    ['a vCPU position past the slice', () => lie(0, (j) => (j.arch.pos = 1 << 20)), /arch\.pos: 1048576 is outside 0\.\.64/],
    ['a pass count changed consistently', () => lie(0, (j) => {
      j.arch.passes += 1;
      j.progress.passesCompleted += 1;
    }), /vCPU state differs from what the source sent/],
    ['an extra CONFIG field', () => lie('config', (j) => (j.turbo = true)), /CONFIG\.turbo: unknown field/],
  ];
  for (const [name, make, expected] of cases) {
    it(`refuses ${name}`, async () => {
      const out = await replay(make(), engine, ref);
      expect(out.kind).toBe('rejected');
      const message = (out as { message: string }).message;
      expect(message).toMatch(expected);
      expect(message).not.toMatch(JS_INTERNALS);
    });
  }

  it(`${MUTATIONS} seeded random mutations: refused plainly or equal, never hung`, async () => {
    const r = rng(SEED);
    const tally = new Map<string, number>();
    const bad: string[] = [];
    for (let i = 0; i < MUTATIONS; i++) {
      const m = mutate(cap.toDestination, cap.records, r);
      const out: ReplayOutcome = await replay(m.bytes, engine, ref);
      const key = out.kind === 'rejected' ? `rejected: ${out.message.replace(/\d+/g, 'N').slice(0, 70)}` : out.kind === 'completed' ? `completed (equal: ${out.equal})` : 'HUNG';
      tally.set(key, (tally.get(key) ?? 0) + 1);
      if (out.kind === 'hung') bad.push(`#${i} ${m.what}: ${out.message}`);
      if (out.kind === 'completed' && !out.equal) bad.push(`#${i} ${m.what}: completed with a different state (${out.why})`);
      if (out.kind === 'rejected' && JS_INTERNALS.test(out.message)) bad.push(`#${i} ${m.what}: ${out.message}`);
      // A long run leaves its counts so far in a file (it may be stopped before the end).
      if (LOG && ((i + 1) % 250 === 0 || i + 1 === MUTATIONS)) writeFileSync(LOG, `seed ${SEED}: ${i + 1} of ${MUTATIONS} mutations, ${bad.length} bad\n${tallyText(tally)}\n${bad.join('\n')}\n`);
    }
    const summary = tallyText(tally);
    console.log(`stream mutator, seed ${SEED}, ${MUTATIONS} mutations:\n${summary}`);
    expect(bad).toEqual([]);
  });
});

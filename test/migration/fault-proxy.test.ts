// Adversarial liveness tests (issue 8): a real source and destination in this process, small
// soft VMs, the stream through fault-proxy.ts on 127.0.0.1. For every phase (the record where
// the fault starts) x {cut, reset, stall} x direction, the migration must end within a loose
// bound of its idle timeout, `failed` with the phase in the error; before GO the source resumes
// intact and the destination keeps nothing; after GO the source stays paused; the guest never
// runs on both sides. A slow but moving link, and a stall released in time, must complete.
//
// STAGE2_LONG=1 adds a long randomized run (STAGE2_LONG_CASES cases, default 300: random
// direction, fault, byte offset or record, 1 or 2 channels) and prints the counts.
import { describe, it, expect } from 'vitest';
import { availableEngines } from '../../src/vmm/factory.ts';
import type { Engine } from '../../src/vmm/engine.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { connectLink, listenLink } from '../../src/migration/wire-link.ts';
import { lazyLink } from '../../src/migration/lazy-link.ts';
import { migrateVm } from '../../src/migration/source.ts';
import { receiveMigration, type ReceiveResult } from '../../src/migration/destination.ts';
import type { MigrationStats } from '../../src/migration/stats.ts';
import { FaultProxy, type Direction, type Fault, type FaultRule, type RecordName } from './fault-proxy.ts';
import { JS_INTERNALS } from './helpers.ts';

const { engines } = await availableEngines();
const soft = engines.find((e) => e.kind === 'soft')!;

/** The idle timeout of both sides in these tests. */
const T = 1500;
/** Hang guard: a case must end well within this (the bound is loose on purpose: CI is loaded). */
const BOUND = 10 * T;

interface Outcome {
  stats: MigrationStats;
  dest: ReceiveResult | null;
  destError: Error | null;
  /** The destination never got past the handshake (nothing was accepted). */
  neverAccepted: boolean;
  sourceMs: number;
  destMs: number;
  proxy: FaultProxy;
}

interface Scenario {
  workload?: 'idle' | 'sequential';
  vcpus?: number;
  bytesPerVcpu?: number;
  channels?: number;
  maxRounds?: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function throughProxy(engine: Engine, rules: FaultRule[], sc: Scenario = {}): Promise<Outcome> {
  const listener = await listenLink({ host: '127.0.0.1', port: 0, timeoutMs: T });
  const proxy = await FaultProxy.start({ host: '127.0.0.1', port: listener.port }, rules);
  const { vm, spec } = await createSourceVm(engine, { vcpus: sc.vcpus ?? 2, bytesPerVcpu: sc.bytesPerVcpu ?? 16 << 20, backing: 'anonymous', workload: sc.workload ?? 'idle' });
  const t0 = Date.now();
  let accepted = false;
  let destMs = -1;
  const destP = listener.accept().then((link) => {
    accepted = true;
    return receiveMigration(link, { openEngine: async () => engine, timeoutMs: T, preallocate: false }).then(
      (d) => ({ dest: d, destError: null }),
      (e: Error) => ({ dest: null, destError: e }),
    );
  });
  destP.then(() => (destMs = Date.now() - t0)).catch(() => undefined);
  const link = lazyLink(sc.channels ?? 1, () => connectLink({ host: '127.0.0.1', port: proxy.port, channels: sc.channels ?? 1, timeoutMs: T }));
  const stats = await migrateVm(vm, link, { workload: spec, backing: 'anonymous', timeoutMs: T, downtimeLimitMs: sc.workload === 'sequential' ? 0 : 300, maxRounds: sc.maxRounds ?? 3, destroyOnComplete: false });
  const sourceMs = Date.now() - t0;
  // The destination ends by its own timeout (it may not hear of the source's end through a
  // stalled proxy); if the fault hit the handshake nothing was accepted, and nothing will be.
  const settled = await Promise.race([destP, sleep(BOUND).then(() => null)]);
  listener.close();
  await vm.destroy();
  const neverAccepted = !accepted;
  if (!settled && accepted) throw new Error(`the destination did not end within ${BOUND} ms (rules ${JSON.stringify(rules)})`);
  return { stats, dest: settled?.dest ?? null, destError: settled?.destError ?? null, neverAccepted, sourceMs, destMs, proxy };
}

/**
 * The invariants every faulted migration must keep, whatever the fault. `extraMs`: time a slowed
 * link legitimately adds to the bound.
 */
function expectSafe(o: Outcome, extraMs = 0): void {
  const { stats, dest } = o;
  expect(o.sourceMs).toBeLessThan(BOUND + extraMs);
  if (!o.neverAccepted) expect(o.destMs).toBeLessThan(BOUND + extraMs);
  // Never on both sides: a running source means no guest on the destination.
  if (stats.status !== 'completed' && stats.sourceRunning !== false) {
    expect(dest).toBeNull();
    expect(stats.sourceIntact).toBe(true);
    if (!o.neverAccepted) expect(o.destError?.message).toMatch(/incoming migration failed during \w+: .*nothing was kept/);
  }
  if (stats.status === 'completed') expect(stats.verified).toBe(true);
}

interface PhaseCase {
  name: string;
  dir: Direction;
  record: RecordName;
  round?: number;
  /** What the source's error must name, whatever the fault. */
  sourcePhase: RegExp;
  /**
   * What it names for a stall: its own phase exactly. The idle timeout fires on this side, or on
   * the destination at about the same time, whose ERROR may then come first through the other
   * direction; either way the message says "no progress from the ... for N ms" and names this
   * side's phase.
   */
  stallPhase: RegExp;
  /** GO may have reached the destination: the guest runs there, the source stays paused. */
  afterGo?: boolean;
  /** A fault on GO: the source has committed, the destination never starts. */
  committed?: boolean;
  scenario?: Scenario;
}

const PHASES: PhaseCase[] = [
  { name: 'HELLO', dir: 'up', record: 'HELLO', sourcePhase: /handshake|hello/i, stallPhase: /did not answer channel 0's hello within \d+ ms/ },
  { name: 'HELLO_ACK', dir: 'down', record: 'HELLO_ACK', sourcePhase: /handshake|hello/i, stallPhase: /did not answer channel 0's hello within \d+ ms/ },
  { name: 'CONFIG', dir: 'up', record: 'CONFIG', sourcePhase: /during setup/, stallPhase: /during setup \(waiting for READY\)/ },
  { name: 'READY', dir: 'down', record: 'READY', sourcePhase: /during setup/, stallPhase: /during setup \(waiting for READY\)/ },
  { name: 'RAM round 1', dir: 'up', record: 'RAM', round: 1, sourcePhase: /during active \(round 1\)/, stallPhase: /during active \(round 1\)/ },
  { name: 'SYNC round 1', dir: 'up', record: 'SYNC', round: 1, sourcePhase: /during (active \(round 1\)|device)/, stallPhase: /during device \(waiting for SYNC_ACK of round 1\)/ },
  { name: 'SYNC_ACK round 1', dir: 'down', record: 'SYNC_ACK', round: 1, sourcePhase: /during (active \(round \d\)|device)/, stallPhase: /during device \(waiting for SYNC_ACK of round 1\)/ },
  {
    name: 'RAM round 2 (iterative)',
    dir: 'up',
    record: 'RAM',
    round: 2,
    sourcePhase: /during (active \(round \d\)|device)/,
    stallPhase: /during (active \(round \d\)|device \(waiting for SYNC_ACK of round \d\))/,
    scenario: { workload: 'sequential', vcpus: 1, bytesPerVcpu: 8 << 20, maxRounds: 3 },
  },
  { name: 'VCPU_STATE', dir: 'up', record: 'VCPU_STATE', sourcePhase: /during device|waiting for COMPLETE/, stallPhase: /waiting for COMPLETE/ },
  { name: 'END', dir: 'up', record: 'END', sourcePhase: /during device|waiting for COMPLETE/, stallPhase: /waiting for COMPLETE/ },
  { name: 'COMPLETE', dir: 'down', record: 'COMPLETE', sourcePhase: /waiting for COMPLETE/, stallPhase: /waiting for COMPLETE/ },
  { name: 'GO', dir: 'up', record: 'GO', committed: true, sourcePhase: /waiting for STARTED after GO/, stallPhase: /waiting for STARTED after GO/ },
  { name: 'STARTED', dir: 'down', record: 'STARTED', afterGo: true, committed: true, sourcePhase: /waiting for STARTED after GO/, stallPhase: /waiting for STARTED after GO/ },
];

const FAULTS: Fault[] = ['cut', 'reset', 'stall'];

describe.concurrent('fault proxy: every phase x cut/reset/stall, both directions (soft engine)', () => {
  for (const ph of PHASES) {
    for (const fault of FAULTS) {
      it(`${fault} ${ph.dir === 'up' ? 'source->destination' : 'destination->source'} at ${ph.name}`, async (ctx) => {
        const rule: FaultRule = { dir: ph.dir, fault, at: { record: ph.record, round: ph.round } };
        const o = await throughProxy(soft, [rule], ph.scenario);
        await o.proxy.close();
        if (ph.round === 2 && o.proxy.fired.length === 0 && o.stats.status === 'completed') {
          // A guest starved of CPU (a loaded machine) dirtied nothing after the bulk round: no
          // round-2 pages to fault. The run itself completed and verified; nothing to judge.
          expect(o.stats.verified).toBe(true);
          await o.dest?.vm.destroy();
          ctx.skip();
        }
        expect(o.proxy.fired.map((f) => f.record)).toEqual([ph.record]);
        const { stats } = o;
        expectSafe(o);
        expect(stats.status).toBe('failed');
        expect(stats.error).toMatch(fault === 'stall' ? ph.stallPhase : ph.sourcePhase);
        if (fault === 'stall') expect(stats.error).toMatch(/no progress from the (destination|source) for \d+ ms|did not answer/);
        if (ph.committed) {
          expect(stats.sourceRunning).toBe(false);
          expect(stats.error).toMatch(/switchover outcome unknown/);
        } else {
          expect(stats.sourceRunning).toBe(true);
          expect(stats.sourceIntact).toBe(true);
        }
        if (ph.afterGo) {
          // GO arrived: the guest runs on the destination only.
          expect(o.dest).not.toBeNull();
          await o.dest!.vm.destroy();
        } else if (!o.neverAccepted) {
          expect(o.dest).toBeNull();
          expect(o.destError?.message).toMatch(/incoming migration failed during \w+: .*nothing was kept/);
          if (fault === 'stall' && ph.dir === 'up' && ph.record !== 'HELLO') {
            // Through a black hole the destination learns nothing: its own timeout ends it.
            expect(o.destError?.message).toMatch(/no progress from the source for \d+ ms/);
          }
        }
      }, 60_000);
    }
  }
});

describe.concurrent('fault proxy: slow or briefly stalled links still complete (soft engine)', () => {
  it('a link slowed to 8 MB/s from the first RAM record completes: the idle timeout counts progress, not total time', async () => {
    // 16 MiB of guest RAM at 8 MB/s takes ~2 s, more than the 1.5 s idle timeout.
    const o = await throughProxy(soft, [{ dir: 'up', fault: 'slow', bytesPerSec: 8e6, at: { record: 'RAM', round: 1 } }], { vcpus: 1, bytesPerVcpu: 16 << 20 });
    await o.proxy.close();
    expect(o.stats.status).toBe('completed');
    expect(o.stats.verified).toBe(true);
    expect(o.sourceMs).toBeGreaterThan(T);
    await o.dest!.vm.destroy();
  }, 60_000);

  it('a stall released before the idle timeout completes', async () => {
    const o = await throughProxy(soft, [{ dir: 'up', fault: 'stall', releaseAfterMs: T / 3, at: { record: 'RAM', round: 1 } }], { vcpus: 1, bytesPerVcpu: 4 << 20 });
    await o.proxy.close();
    expect(o.proxy.fired).toHaveLength(1);
    expect(o.stats.status).toBe('completed');
    expect(o.stats.verified).toBe(true);
    await o.dest!.vm.destroy();
  }, 60_000);

  it('a stall on a data channel of two fails both sides by their timeouts', async () => {
    const o = await throughProxy(soft, [{ conn: 1, dir: 'up', fault: 'stall', at: { record: 'RAM', round: 1 } }], { channels: 2 });
    await o.proxy.close();
    expectSafe(o);
    expect(o.stats.status).toBe('failed');
    expect(o.stats.error).toMatch(/no progress from the (destination|source) for \d+ ms/);
    expect(o.stats.error).toMatch(/during (active \(round 1\)|device)/);
    expect(o.destError?.message).toMatch(/nothing was kept/);
  }, 60_000);
});

// ---- the long run (not part of npm test) ----

const LONG = process.env.STAGE2_LONG === '1';
/** STAGE2_LONG_FAULTS=cut,slow restricts the mix (default: cut, reset, stall twice, slow). */
const FAULT_MIX = (process.env.STAGE2_LONG_FAULTS?.split(',') as Fault[] | undefined) ?? ['cut', 'reset', 'stall', 'stall', 'slow'];
/** STAGE2_LONG_SLOW_BPS: the rate of a slow link (default 4 MB/s). */
const SLOW_BPS = Number(process.env.STAGE2_LONG_SLOW_BPS ?? 4e6);
const RECORDS_UP: RecordName[] = ['HELLO', 'CONFIG', 'RAM', 'ZERO', 'SYNC', 'VCPU_STATE', 'END', 'GO'];
const RECORDS_DOWN: RecordName[] = ['HELLO_ACK', 'READY', 'SYNC_ACK', 'COMPLETE', 'STARTED'];


// What the destination says, corrupted: one byte of a back-channel record flipped (its type, its
// length, a payload field). The source must never commit to a state it did not send, never run
// the guest where the destination may run it, and say what was wrong in plain words.
describe.concurrent('fault proxy: corrupted answers from the destination (soft engine)', () => {
  const cases: [RecordName, number, string][] = [
    ['HELLO_ACK', 0, 'type'],
    ['HELLO_ACK', 8, 'version'],
    ['HELLO_ACK', 10, 'channels'],
    ['READY', 0, 'type'],
    ['READY', 4, 'length'],
    ['SYNC_ACK', 0, 'type'],
    ['SYNC_ACK', 8, 'round'],
    ['SYNC_ACK', 11, 'round (high byte)'],
    ['COMPLETE', 0, 'type'],
    ['COMPLETE', 4, 'length'],
    ['COMPLETE', 8, 'memory hash'],
    ['COMPLETE', 16, 'page count'],
    ['STARTED', 0, 'type'],
    ['STARTED', 4, 'length'],
  ];
  for (const [record, at, field] of cases) {
    it(`${record} with its ${field} byte flipped: refused plainly, the guest runs on exactly one side`, async () => {
      const o = await throughProxy(soft, [{ dir: 'down', at: { record }, fault: 'corrupt', corruptOffset: at }], { workload: 'sequential', bytesPerVcpu: 1 << 20 });
      await o.proxy.close();
      expect(o.proxy.fired.length).toBe(1);
      expectSafe(o);
      if (o.stats.error) expect(o.stats.error).not.toMatch(JS_INTERNALS);
      if (o.destError) expect(o.destError.message).not.toMatch(JS_INTERNALS);
      // A COMPLETE that vouches for other memory is never committed to.
      if (record === 'COMPLETE' && at === 8) {
        expect(o.stats.status).toBe('failed');
        expect(o.stats.error).toMatch(/COMPLETE reports memory hash .* not committing/);
        expect(o.stats.sourceRunning).toBe(true);
      }
      // An answer for a round never sent is a protocol error, not a reason to pause early.
      if (record === 'SYNC_ACK' && at === 11) {
        expect(o.stats.status).toBe('failed');
        expect(o.stats.error).toMatch(/protocol error: SYNC_ACK for round \d+, but rounds up to \d+ were sent/);
      }
      // Corrupting STARTED comes after GO: the source cannot know, stays paused; the guest runs there.
      if (record === 'STARTED') {
        expect(o.stats.sourceRunning).toBe(false);
        expect(o.dest).not.toBeNull();
      }
      if (o.dest) await o.dest.vm.destroy();
    });
  }
});

describe.runIf(LONG)('fault proxy: long randomized run', () => {
  it('random faults at random offsets and records: every case ends in bound, safely', async () => {
    const cases = Number(process.env.STAGE2_LONG_CASES ?? 300);
    const concurrency = 3;
    let seed = Number(process.env.STAGE2_LONG_SEED ?? 12345) >>> 0;
    const rand = () => {
      seed ^= seed << 13;
      seed >>>= 0;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>>= 0) / 2 ** 32;
    };
    const pick = <X>(xs: readonly X[]): X => xs[Math.floor(rand() * xs.length)]!;
    // Stream lengths of a clean run, to draw offsets from.
    const clean = await throughProxy(soft, []);
    const lengths = { up: clean.proxy.bytes(0, 'up'), down: clean.proxy.bytes(0, 'down') };
    await clean.proxy.close();
    await clean.dest?.vm.destroy();
    const counts = new Map<string, number>();
    const bump = (k: string) => counts.set(k, (counts.get(k) ?? 0) + 1);
    const failures: string[] = [];
    /** A few error messages per outcome, to read in the summary. */
    const samples = new Map<string, string[]>();
    let maxSourceMs = 0;
    let maxDestMs = 0;
    let next = 0;
    const worker = async () => {
      for (;;) {
        const i = next++;
        if (i >= cases) return;
        const dir: Direction = rand() < 0.6 ? 'up' : 'down';
        const fault = pick<Fault>(FAULT_MIX);
        const channels = rand() < 0.25 ? 2 : 1;
        const conn = channels === 2 && rand() < 0.5 ? 1 : 0;
        const byOffset = rand() < 0.5;
        const at = byOffset ? { offset: Math.floor(rand() * lengths[dir] * 1.05) } : { record: pick(dir === 'up' ? RECORDS_UP : RECORDS_DOWN), nth: 1 + Math.floor(rand() * 3) };
        const rule: FaultRule = { conn, dir, fault, at, bytesPerSec: SLOW_BPS, releaseAfterMs: fault === 'stall' && rand() < 0.2 ? Math.floor(rand() * 2 * T) : undefined };
        const desc = JSON.stringify(rule) + ` channels=${channels}`;
        try {
          const o = await throughProxy(soft, [rule], { channels });
          await o.proxy.close();
          expectSafe(o, fault === 'slow' ? (lengths.up / SLOW_BPS) * 1000 : 0);
          maxSourceMs = Math.max(maxSourceMs, o.sourceMs);
          maxDestMs = Math.max(maxDestMs, o.destMs);
          const fired = o.proxy.fired.length > 0;
          const key = `${fault}:${fired ? 'fired' : 'not-fired'}:${o.stats.status}`;
          bump(key);
          if (o.stats.error && (samples.get(key)?.length ?? 0) < 3) samples.set(key, [...(samples.get(key) ?? []), `${desc} -> ${o.stats.error}`]);
          if (o.stats.status === 'failed') {
            expect(o.stats.error).toMatch(/during|waiting for|handshake|hello/i);
            bump(`phase:${/during setup|waiting for READY/.test(o.stats.error!) ? 'setup' : /active \(round/.test(o.stats.error!) ? 'active' : /during device/.test(o.stats.error!) ? 'device' : /COMPLETE/.test(o.stats.error!) ? 'waiting-COMPLETE' : /STARTED/.test(o.stats.error!) ? 'waiting-STARTED' : 'handshake'}`);
          }
          if (o.stats.sourceRunning === false) bump('source-paused-after-GO');
          if (o.dest) {
            bump('destination-running');
            await o.dest.vm.destroy();
          }
        } catch (e) {
          failures.push(`${desc}: ${(e as Error).message}`);
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    const table = [...counts.entries()].sort().map(([k, v]) => `  ${k}: ${v}${(samples.get(k) ?? []).map((m) => `\n      e.g. ${m.slice(0, 400)}`).join('')}`).join('\n');
    console.log(`fault proxy long run: ${cases} cases, stream ${lengths.up} bytes up / ${lengths.down} down, timeout ${T} ms\n${table}\n  max source ${maxSourceMs} ms, max destination ${maxDestMs} ms\n  violations: ${failures.length}\n${failures.join('\n')}`);
    expect(failures).toEqual([]);
  }, 3_600_000);
});

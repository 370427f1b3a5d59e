// Parallel stage-2 stress (seed 003): several worker threads fault, relax, split, collapse and
// write-protect one shared table at random under each MMU lock mode, and zap 2 MiB regions'
// 4 KiB tables as async huge-page recovery does (Stage2PageTable.zapTablesShared), while a lock-free reader
// walks it. Checks: every thread's own mappings match its model after every change (no torn or
// lost PTE update), every translation anywhere is a legal one, no walk ever reads a freed table
// page (debug walks + quarantined pool: freed pages stay POISON), the mapping counters every
// thread kept where it changed entries (racing collapses included) sum to what a walk of the
// final table finds, and after destroy() the live table-page counter is back to 0 with every
// allocated page freed.
//
// Seeded: STAGE2_STRESS_SEED=<n> replays a run (thread interleaving still varies); the seed is
// printed on failure. Bounded: STAGE2_STRESS_MS per run (default 1500 ms parallel, 800 ms
// otherwise). STAGE2_STRESS_FOCUS=shared makes the mutators do only shared-region operations and
// sweeps (the mix that found map descending below its target level; fails within ~5 runs
// without that fix).

import { describe, it, expect } from 'vitest';
import { MmuLock, type MmuLockMode } from '../../../src/soft/locking/mmu-lock.ts';
import { MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { Stage2PageTable, type MappingCounts } from '../../../src/soft/pgtable/stage2.ts';
import { countMappingsByWalk } from '../../../src/soft/pgtable/mapping-counters.ts';
import { startWorker } from '../../../src/util/worker.ts';

const MUTATORS = 3;

interface Result {
  ok: boolean;
  error?: string;
  counts: Record<string, number>;
  leavesRemoved?: number;
  lockSleeps?: number;
}

interface StressRun {
  results: Result[];
  pgt: Stage2PageTable;
  removedAtDestroy: number;
  /** Mapping statistics once every thread is done and every retired table freed: counted, and by a walk. */
  counted?: MappingCounts;
  walked?: MappingCounts;
}

async function runStress(seed: number, durationMs: number, mode: MmuLockMode): Promise<StressRun> {
  const pgt = Stage2PageTable.create({ maxTablePages: 1 << 19, debug: true, quarantineFreedTables: true, maxThreads: 16 });
  const lock = MmuLock.create(mode);
  const ctl = new SharedArrayBuffer(16);
  const entry = new URL('./stage2-stress-worker.ts', import.meta.url);
  const roles: { role: 'mutator' | 'reader'; index: number }[] = [
    ...Array.from({ length: MUTATORS }, (_, i) => ({ role: 'mutator' as const, index: i })),
    { role: 'reader', index: 0 },
  ];
  const workers = roles.map((r, i) =>
    startWorker(entry, { ...r, seed: (seed + i * 0x9e3779b9) >>> 0, durationMs, focusShared: process.env.STAGE2_STRESS_FOCUS === 'shared', pgt: pgt.shared, lock: lock.shared, ctl }),
  );
  const stop = (): void => {
    Atomics.store(new Int32Array(ctl), 1, 1);
  };
  const resultOf = (i: number): Promise<Result> =>
    new Promise<Result>((resolve) => {
      const w = workers[i]!;
      const timer = setTimeout(() => resolve({ ok: false, error: `worker ${i} gave no result in time (hung?)`, counts: {} }), durationMs + 20_000);
      w.once('message', (m: Result) => {
        clearTimeout(timer);
        resolve(m);
      });
      w.once('error', (e) => {
        clearTimeout(timer);
        resolve({ ok: false, error: `worker ${i} crashed: ${String(e)}`, counts: {} });
      });
    });
  // Listen from the start: a worker that fails early posts its result at once.
  const pending = workers.map((_, i) => resultOf(i));
  let results: Result[];
  try {
    results = await Promise.all(pending.slice(0, MUTATORS));
    // Mutators are done: stop the reader.
    stop();
    results.push(await pending[MUTATORS]!);
  } finally {
    stop();
    await Promise.all(workers.map((w) => w.terminate()));
  }
  if (results.some((r) => !r.ok)) return { results, pgt, removedAtDestroy: 0 };
  let removedAtDestroy = 0;
  pgt.setCallbacks({ onLeafRemoved: () => removedAtDestroy++ });
  lock.exclusiveLock();
  // The workers are gone (terminated, possibly inside a read section): free what they retired,
  // then the counters the mutators kept must equal a walk.
  pgt.epoch.drainAll();
  const counted = pgt.mappingCounts();
  const walked = countMappingsByWalk((fn) => pgt.forEachLeaf(0, 2 ** 36, fn));
  pgt.destroy();
  lock.exclusiveUnlock();
  return { results, pgt, removedAtDestroy, counted, walked };
}

describe('stage-2 parallel stress', () => {
  for (const mode of MMU_LOCK_MODES) {
    it(`survives random faults, relaxes, splits, collapses, write-protect sweeps and teardown (${mode} MMU lock)`, async () => {
      const seed = Number(process.env.STAGE2_STRESS_SEED ?? Math.floor(Math.random() * 2 ** 31));
      const durationMs = Number(process.env.STAGE2_STRESS_MS ?? (mode === 'parallel' ? 1500 : 800));
      let run;
      try {
        run = await runStress(seed, durationMs, mode);
      } catch (e) {
        throw new Error(`stage-2 stress (${mode}) failed with STAGE2_STRESS_SEED=${seed}: ${String(e)}`);
      }
      const { results, pgt, removedAtDestroy, counted, walked } = run;
      const failures = results.filter((r) => !r.ok).map((r) => r.error);
      if (failures.length > 0) throw new Error(`stage-2 stress (${mode}) failed with STAGE2_STRESS_SEED=${seed}:\n${failures.join('\n')}`);
      const total: Record<string, number> = {};
      for (const r of results) for (const [k, v] of Object.entries(r.counts)) total[k] = (total[k] ?? 0) + v;
      // The run really exercised the racy paths.
      if (process.env.STAGE2_STRESS_FOCUS !== 'shared') expect(total['own.map4k'] ?? 0, `seed ${seed}`).toBeGreaterThan(50);
      expect(total['shared.collapse2m'] ?? 0, `seed ${seed}`).toBeGreaterThan(5);
      expect(total['shared.split'] ?? 0, `seed ${seed}`).toBeGreaterThan(2);
      expect(total['shared.zapTable'] ?? 0, `seed ${seed}`).toBeGreaterThan(2);
      expect(total['wrprotSweep'] ?? 0, `seed ${seed}`).toBeGreaterThan(0);
      expect(total['readerBatches'] ?? 0, `seed ${seed}`).toBeGreaterThan(0);
      expect(removedAtDestroy).toBeGreaterThan(0);
      expect(counted, `seed ${seed}: mapping counters vs a walk`).toEqual(walked);
      expect(walked!.leaves4k + walked!.leaves2m, `seed ${seed}`).toBeGreaterThan(0);
      expect(pgt.liveTablePages(), `seed ${seed}`).toBe(0);
      const st = pgt.pool.stats();
      expect(st.allocated, `seed ${seed}`).toBe(st.freed);
      expect(pgt.epoch.pending()).toBe(0);
      console.log(`stage-2 stress (${mode}) seed ${seed}: ${JSON.stringify(total)} tables allocated ${st.allocated}`);
    });
  }
});

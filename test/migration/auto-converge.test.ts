// Auto-converge on every real engine present: a guest that dirties its memory faster than
// --max-bandwidth drains it makes the source throttle the vCPUs step by step; without
// auto-converge the throttle stays off and the migration stops at the round limit.
//
// Not checked here: that throttling alone brings the migration under the downtime limit. The
// workloads (src/guest/workload.ts) have no rate knob: a sequential pass over a few MiB takes
// about a millisecond on either engine, so even at 99% throttle (10 ms of running per second)
// the guest still rewrites all of its memory every round. Convergence by the estimate is
// covered by the idle and dirtying migrations in precopy-engines.test.ts.
import { describe, it, expect } from 'vitest';
import { availableEngines } from '../../src/vmm/factory.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { migrateInProcess } from './helpers.ts';

const { engines, unavailable } = await availableEngines();
for (const u of unavailable) console.warn(`auto-converge: skipping ${u.engine}: ${u.missing}`);

const MAX_ROUNDS = 5;

for (const engine of engines) {
  describe(`auto-converge on the ${engine.kind} engine`, () => {
    for (const autoConverge of [true, false]) {
      it(`a guest dirtying faster than --max-bandwidth ${autoConverge ? 'is throttled stepwise' : 'is never throttled without auto-converge'}`, async () => {
        const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 1 << 20, backing: 'anonymous', workload: 'sequential' });
        const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, maxBandwidth: 8 << 20, downtimeLimitMs: 1, maxRounds: MAX_ROUNDS, autoConverge });
        expect(stats.status).toBe('completed');
        expect(stats.verified).toBe(true);
        const iterative = stats.rounds.filter((r) => r.kind === 'iterative');
        // Every round found most of memory dirty again: the guest outruns the link.
        expect(iterative).toHaveLength(MAX_ROUNDS);
        if (autoConverge) {
          expect(stats.throttlePercent).toBeGreaterThanOrEqual(20);
          expect(iterative.at(-1)!.throttlePercent).toBeGreaterThan(iterative[0]!.throttlePercent);
        } else {
          expect(stats.throttlePercent).toBe(0);
          expect(stats.rounds.every((r) => r.throttlePercent === 0)).toBe(true);
        }
        await dest!.vm.destroy();
      });
    }
  });
}

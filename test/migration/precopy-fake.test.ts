// Pre-copy over real loopback TCP with the test-only fake engine (test/migration/fake-engine.ts):
// the state machines' behaviour independent of any real engine.
import { describe, it, expect } from 'vitest';
import { FakeEngine, FakeVm } from './fake-engine.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { checkSequentialMemory, migrateInProcess } from './helpers.ts';

const engine = new FakeEngine();

describe('pre-copy (fake engine)', () => {
  it('migrates an idle guest and verifies memory by hash on both sides', async () => {
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 4 << 20, backing: 'anonymous', workload: 'idle' });
    const { stats, dest, destError } = await migrateInProcess(vm, engine, { workload: spec });
    expect(destError).toBeNull();
    expect(stats.status).toBe('completed');
    expect(stats.verified).toBe(true);
    expect(dest!.rescanHash).toBe(dest!.hash);
    expect(stats.normalPages).toBeGreaterThanOrEqual(2048);
    expect(stats.ramBytes).toBe((8 << 20) + 64 * 4096);
    await dest!.vm.pause();
    expect(checkSequentialMemory(dest!.vm, spec, 2, [0, 0])).toBeNull();
    await dest!.vm.destroy();
  });

  it('migrates a guest dirtying memory throughout; the workload continues on the destination', async () => {
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 2 << 20, backing: 'anonymous', workload: 'sequential' });
    (vm as FakeVm).pagesPerStep = 8;
    await vm.waitForPasses(3);
    const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, downtimeLimitMs: 1 });
    expect(stats.status).toBe('completed');
    expect(stats.verified).toBe(true);
    expect(stats.dirtySyncCount).toBeGreaterThanOrEqual(2);
    expect(stats.passesAtSwitchover.every((p) => p >= 3)).toBe(true);
    const d = dest!.vm;
    expect(dest!.passesAtSwitchover).toEqual(stats.passesAtSwitchover);
    d.progress().forEach((p, i) => expect(p.passesCompleted).toBeGreaterThanOrEqual(stats.passesAtSwitchover[i]!));
    const target = Math.max(...stats.passesAtSwitchover) + 2;
    await d.waitForPasses(target, 20_000);
    await d.pause();
    const passes = d.progress().map((p) => p.passesCompleted);
    expect(Math.min(...passes)).toBeGreaterThanOrEqual(target);
    expect(checkSequentialMemory(d, spec, 2, passes)).toBeNull();
    await d.destroy();
  });
});

describe('auto-converge (fake engine)', () => {
  it('a guest dirtying faster than --max-bandwidth converges only once the vCPUs are throttled', async () => {
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 1 << 20, backing: 'anonymous', workload: 'sequential' });
    (vm as FakeVm).pagesPerStep = 256;
    const opts = { workload: spec, maxBandwidth: 4 << 20, downtimeLimitMs: 20, maxRounds: 40 };
    const { stats, dest } = await migrateInProcess(vm, engine, opts);
    expect(stats.status).toBe('completed');
    expect(stats.verified).toBe(true);
    expect(stats.throttlePercent).toBeGreaterThanOrEqual(20);
    // Converged by the estimate, not cut off by the round limit.
    expect(stats.rounds.length).toBeLessThan(opts.maxRounds + 2);
    expect(stats.expectedDowntimeSeconds * 1000).toBeLessThanOrEqual(opts.downtimeLimitMs);
    await dest!.vm.destroy();
  });

  it('without auto-converge the same guest never converges and stops at the round limit', async () => {
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 1 << 20, backing: 'anonymous', workload: 'sequential' });
    (vm as FakeVm).pagesPerStep = 256;
    const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, maxBandwidth: 4 << 20, downtimeLimitMs: 20, maxRounds: 4, autoConverge: false });
    expect(stats.status).toBe('completed');
    expect(stats.verified).toBe(true);
    expect(stats.throttlePercent).toBe(0);
    expect(stats.rounds.filter((r) => r.kind === 'iterative')).toHaveLength(4);
    expect(stats.expectedDowntimeSeconds * 1000).toBeGreaterThan(20);
    await dest!.vm.destroy();
  });
});

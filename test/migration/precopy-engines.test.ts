// Pre-copy with every real engine present on this host (soft always; kvm when /dev/kvm works),
// source and destination in this process over real loopback TCP.
import { describe, it, expect } from 'vitest';
import { availableEngines } from '../../src/vmm/factory.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { checkSequentialMemory, migrateInProcess } from './helpers.ts';
import { MigrationLinkError } from '../../src/migration/link.ts';
import { KVM_MEM_LOG_DIRTY_PAGES } from '../../src/vmm/engine.ts';

const { engines, unavailable } = await availableEngines();
for (const u of unavailable) console.warn(`precopy-engines: skipping ${u.engine}: ${u.missing}`);

for (const engine of engines) {
  describe(`pre-copy on the ${engine.kind} engine`, () => {
    it('migrates an idle guest, verified', async () => {
      const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 8 << 20, backing: 'anonymous', workload: 'idle' });
      // The destination preallocates its RAM here (receive --prealloc): same result.
      const { stats, dest, destError } = await migrateInProcess(vm, engine, { workload: spec, preallocate: true });
      expect(destError).toBeNull();
      expect(stats.status).toBe('completed');
      expect(stats.verified).toBe(true);
      expect(dest!.rescanHash).toBe(dest!.hash);
      await dest!.vm.pause();
      expect(checkSequentialMemory(dest!.vm, spec, 2, [0, 0])).toBeNull();
      await dest!.vm.destroy();
    });

    it('migrates a guest dirtying memory throughout; the workload continues where it stopped', async () => {
      const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 8 << 20, backing: 'anonymous', workload: 'sequential' });
      await vm.waitForPasses(2);
      const { stats, dest, destError } = await migrateInProcess(vm, engine, { workload: spec, downtimeLimitMs: 1, maxRounds: 4, channels: 2 });
      expect(destError).toBeNull();
      expect(stats.status).toBe('completed');
      expect(stats.verified).toBe(true);
      expect(dest!.rescanHash).toBe(dest!.hash);
      expect(stats.dirtySyncCount).toBeGreaterThanOrEqual(2);
      expect(dest!.passesAtSwitchover).toEqual(stats.passesAtSwitchover);
      const d = dest!.vm;
      const target = Math.max(...stats.passesAtSwitchover) + 2;
      await d.waitForPasses(target, 60_000);
      await d.pause();
      const passes = d.progress().map((p) => p.passesCompleted);
      expect(Math.min(...passes)).toBeGreaterThanOrEqual(target);
      expect(checkSequentialMemory(d, spec, 2, passes)).toBeNull();
      await d.destroy();
    });

    it('a connection dropped mid-iteration leaves the source running with intact memory and logging off', async () => {
      const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 8 << 20, backing: 'anonymous', workload: 'sequential' });
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        downtimeLimitMs: 0,
        maxRounds: 50,
        onPhase: (p, link) => {
          if (p === 'iterative') setTimeout(() => link.destroy(new MigrationLinkError('injected drop')), 20);
        },
      });
      expect(stats.status).toBe('failed');
      expect(stats.sourceIntact).toBe(true);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/nothing was kept/);
      expect(vm.memslots().every((s) => (s.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0)).toBe(true);
      const before = vm.progress().map((p) => p.passesCompleted);
      await vm.waitForPasses(Math.max(...before) + 1, 30_000);
      await vm.pause();
      const passes = vm.progress().map((p) => p.passesCompleted);
      expect(checkSequentialMemory(vm, spec, 2, passes)).toBeNull();
      await vm.destroy();
    });
  });
}

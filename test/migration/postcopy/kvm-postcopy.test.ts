// Post-copy onto the kvm engine (where /dev/kvm opens): the destination pages guest RAM on demand
// through the addon's real userfaultfd (KvmVm.startDemandPaging, path 'uffd'; kvm has no
// exit-on-missing). Switched after the bulk round and before it; verified by hash, and the
// guest's memory matches its workload after it ran on.
import { describe, expect, it } from 'vitest';
import { availableEngines } from '../../../src/vmm/factory.ts';
import { createSourceVm } from '../../../src/migration/source-vm.ts';
import { checkSequentialMemory, migrateInProcess } from '../helpers.ts';

const { engines, unavailable } = await availableEngines();
const kvm = engines.find((e) => e.kind === 'kvm');
for (const u of unavailable) if (u.engine === 'kvm') console.warn(`kvm-postcopy: skipping: ${u.missing}`);

describe.skipIf(!kvm)('post-copy on the kvm engine (real userfaultfd)', () => {
  for (const switchAfter of [1, 0]) {
    it(`--postcopy-after ${switchAfter}: completes verified, requests counted, memory consistent after the guest ran on`, async () => {
      const engine = kvm!;
      const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 8 << 20, backing: 'anonymous', workload: 'sequential' });
      const { stats, dest, destError } = await migrateInProcess(vm, engine, { workload: spec, downtimeLimitMs: 0, postcopy: { switchAfter, onNoConvergence: 'postcopy', retries: 0 } });
      try {
        expect(destError).toBeNull();
        expect(stats.error).toBeUndefined();
        expect(stats.status).toBe('completed');
        expect(stats.verified).toBe(true);
        expect(stats.postcopy?.switchedAfterRound).toBe(switchAfter);
        expect(dest!.postcopy?.faultPath).toBe('uffd');
        expect(dest!.postcopy?.result?.hash).toBe(stats.sourceHash);
        expect(stats.postcopyRequests).toBe(dest!.postcopy!.result!.remoteRequests);
        const pager = (stats.postcopy!.destination as { pager: { installed: number; missing: number } }).pager;
        expect(pager.missing).toBe(0);
        await dest!.vm.waitForPasses(Math.max(...dest!.passesAtSwitchover) + 2, 30_000);
        await dest!.vm.pause();
        expect(checkSequentialMemory(dest!.vm, spec, 2, dest!.vm.progress().map((p) => p.passesCompleted))).toBeNull();
      } finally {
        await dest?.vm.destroy();
      }
    }, 60_000);
  }
});

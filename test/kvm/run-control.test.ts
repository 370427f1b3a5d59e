// Kicks and state under stress: many pause/resume cycles in the middle of passes must neither
// lose nor repeat guest work, and a saved vCPU state loaded back reads back the same.
import { describe, it, expect, afterEach } from 'vitest';
import type { Vm } from '../../src/vmm/engine.ts';
import { workload } from '../../src/guest/workload.ts';
import type { KvmArchState } from '../../src/kvm/vcpu-state.ts';
import { WorkloadModel, diffPages, firstWords } from '../conformance/model.ts';
import { openKvmOrReason } from './kvm-env.ts';

const { engine, reason } = await openKvmOrReason();
const live: Vm[] = [];
afterEach(async () => {
  await Promise.all(live.splice(0).map((vm) => vm.destroy()));
});

async function randomVm(vcpus: number, bytesPerVcpu: number): Promise<{ vm: Vm; spec: ReturnType<typeof workload> }> {
  const vm = await engine!.createVm();
  live.push(vm);
  const spec = workload('random', bytesPerVcpu, { seed: 77 });
  const host = vm.mapHostMemory(vcpus * bytesPerVcpu, 'anonymous');
  vm.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: vcpus * bytesPerVcpu, userspaceAddr: host.hva });
  await vm.createVcpus(vcpus, spec);
  return { vm, spec };
}

describe(`kvm run control${engine ? '' : ` — skipped: ${reason}`}`, () => {
  it.skipIf(!engine)('50 pause/resume cycles mid-pass lose and repeat nothing', async () => {
    const { vm, spec } = await randomVm(2, 4 << 20);
    const total = 3000;
    vm.allowPasses(total);
    let midRun = 0;
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 2));
      await vm.pause();
      const at = vm.progress();
      if (at.every((p) => p.passesCompleted < total)) midRun++;
      await new Promise((r) => setTimeout(r, 1));
      expect(vm.progress()).toEqual(at);
      vm.resume();
    }
    expect(midRun).toBeGreaterThan(25); // the kicks really landed while the guest ran
    await vm.waitForPasses(total, 60_000);
    const model = new WorkloadModel(spec, 2);
    model.run(total);
    const got = firstWords((g, d) => vm.readGuest(g, d), spec.gpaBase, model.memory.length);
    expect(diffPages(got.words, model.memory)).toEqual([]);
    expect(vm.progress().map((p) => p.passesCompleted)).toEqual([total, total]);
  });

  it.skipIf(!engine)('a saved state loaded back into the same vCPU reads back identically', async () => {
    const { vm } = await randomVm(1, 1 << 20);
    vm.allowPasses(Infinity);
    await vm.waitForPasses(3, 30_000);
    await vm.pause();
    const a = vm.saveVcpuState(0);
    vm.loadVcpuState(a);
    const b = vm.saveVcpuState(0);
    // The TSC keeps counting while paused; everything else must be equal.
    const noTsc = (s: typeof a) => ({ ...(s.arch as KvmArchState), msrs: (s.arch as KvmArchState).msrs.filter((m) => m.index !== 0x10) });
    expect(noTsc(b)).toEqual(noTsc(a));
    expect(b.progress).toEqual(a.progress);
    const arch = a.arch as KvmArchState;
    for (const k of ['regs', 'sregs', 'fpu', 'vcpuEvents', 'mpState'] as const) expect(arch[k].length).toBeGreaterThan(0);
    vm.resume();
    await vm.waitForPasses(a.progress.passesCompleted + 2, 30_000);
  });
});

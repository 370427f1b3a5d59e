// The soft engine through the engine interface: the dirty-log benchmark procedure, teardown,
// memslot validation, run control, vCPU state save/load and workload exactness.
import { afterEach, describe, expect, it } from 'vitest';
import { SoftEngine } from '../../src/soft/engine.ts';
import type { SoftVm } from '../../src/soft/vm.ts';
import { runDirtyLogBench } from '../../src/bench/dirty-log.ts';
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemslotError } from '../../src/vmm/engine.ts';
import { workload } from '../../src/guest/workload.ts';
import { makeTestVm, snapshotWords, WorkloadModel, type TestVm } from './vcpu/harness.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

/** An engine whose VMs we can still inspect after the benchmark destroyed them. */
class WatchedEngine extends SoftEngine {
  vms: SoftVm[] = [];
  override async createVm(config = {}) {
    const vm = this.createSoftVm(config);
    this.vms.push(vm);
    return vm;
  }
}

describe('soft engine', () => {
  it('reports its capabilities', () => {
    const caps = new SoftEngine().capabilities();
    expect(caps).toMatchObject({ kind: 'soft', manualDirtyLogProtect: true, dirtyRingMaxEntries: 65536, memoryFaultExit: true, userfaultfd: true, demandPagingPaths: ['uffd', 'exit'] }); // the host model's userfaultfd (soft/uffd/)
    expect(caps.backings).toEqual(['anonymous', 'anonymous_thp', 'hugetlb']);
  });

  it.each([
    ['global-write', false],
    ['global', true],
    ['parallel', false],
  ] as const)('runs the dirty-log benchmark procedure (lock %s, manual %s) and frees every table page', async (lock, manualProtect) => {
    const engine = new WatchedEngine({ hostRamBytes: 64 * 2 ** 20 });
    const lines: string[] = [];
    const r = await runDirtyLogBench(
      engine,
      { vcpus: 2, bytesPerVcpu: 2 ** 20, backing: 'anonymous', iterations: 3, lock, manualProtect, guestPageSize: 4096, workload: 'sequential' },
      (l) => lines.push(l),
    );
    expect(r.pagesPerVcpu).toBe(256);
    expect(r.rounds.map((x) => x.dirtyPages)).toEqual([512, 512, 512]);
    expect(r.stats.mapped4k).toBe(512);
    // After populate every later write is a write-protect fault fixed by the fast path.
    expect(r.stats.fastPathRelaxes).toBe(3 * 512);
    expect(lines.some((l) => l.startsWith('Populate memory time'))).toBe(true);
    const vm = engine.vms[0]!;
    expect(vm.stage2.liveTablePages()).toBe(0);
    await vm.destroy(); // idempotent
  });

  it('surfaces memslot validation errors from setUserMemoryRegion', async () => {
    const t = (current = await makeTestVm({ vcpusNow: false }));
    const r = t.region;
    const rule = (f: () => void) => {
      try {
        f();
      } catch (e) {
        expect(e).toBeInstanceOf(MemslotError);
        return (e as MemslotError).rule;
      }
      return 'no error';
    };
    expect(rule(() => t.vm.setUserMemoryRegion({ ...r, slot: 1, guestPhysAddr: r.guestPhysAddr + 4096 }))).toBe('overlap');
    expect(rule(() => t.vm.setUserMemoryRegion({ ...r, slot: 1, guestPhysAddr: 123 }))).toBe('alignment');
    expect(rule(() => t.vm.setUserMemoryRegion({ ...r, flags: 1 << 5 }))).toBe('flags');
    expect(rule(() => t.vm.setUserMemoryRegion({ ...r, flags: KVM_MEM_READONLY }))).toBe('flags');
    expect(rule(() => t.vm.setUserMemoryRegion({ ...r, memorySize: r.memorySize * 2 }))).toBe('size');
    expect(rule(() => t.vm.setUserMemoryRegion({ ...r, slot: 7, memorySize: 0 }))).toBe('unknown-slot');
    expect(t.vm.memslots()).toHaveLength(1);
  });

  it('runs the workload exactly as specified (random, 3 vCPUs) and pauses/resumes mid-pass', async () => {
    const t = (current = await makeTestVm({ vcpus: 3, bytesPerVcpu: 128 * 4096, kind: 'random', seed: 9 }));
    const model = new WorkloadModel(t.spec, 3);
    t.vm.allowPasses(4);
    await t.vm.pause();
    t.vm.resume();
    await t.vm.waitForPasses(4);
    for (let i = 0; i < 4; i++) model.step();
    const words = snapshotWords(t);
    for (let p = 0; p < t.pages; p++) if (words[p] !== model.expected(p)) expect.fail(`page ${p}: ${words[p]} != ${model.expected(p)}`);
    expect(t.vm.progress().map((p) => p.passesCompleted)).toEqual([4, 4, 4]);
  });

  it('saves vCPU state while paused and resumes it in another VM with the same result', async () => {
    const t = (current = await makeTestVm({ vcpus: 2, bytesPerVcpu: 512 * 4096, kind: 'random', seed: 4 }));
    t.vm.allowPasses(Infinity);
    await t.vm.waitForPasses(2);
    await t.vm.pause();
    const states = [t.vm.saveVcpuState(0), t.vm.saveVcpuState(1)];
    expect(states.every((s) => s.progress.passesCompleted >= 2)).toBe(true);
    expect(() => JSON.parse(JSON.stringify(states))).not.toThrow();
    const mem = new Uint8Array(t.pages * 4096);
    t.vm.readGuest(t.spec.gpaBase, mem);
    // Destination: same memory, same registers; run both to the same pass count.
    const d = await makeTestVm({ vcpus: 2, bytesPerVcpu: 512 * 4096, kind: 'random', seed: 4 });
    try {
      d.vm.writeGuest(d.spec.gpaBase, mem);
      for (const s of states) d.vm.loadVcpuState(JSON.parse(JSON.stringify(s)));
      const target = Math.max(...states.map((s) => s.progress.passesCompleted)) + 2;
      t.vm.allowPasses(target);
      t.vm.resume();
      d.vm.allowPasses(target);
      await Promise.all([t.vm.waitForPasses(target), d.vm.waitForPasses(target)]);
      expect(snapshotWords(d)).toEqual(snapshotWords(t));
    } finally {
      await d.vm.destroy();
    }
  });

  it('halts an idle guest after one pass and refuses to load state into a running vCPU', async () => {
    const t = (current = await makeTestVm({ vcpus: 2, kind: 'idle', bytesPerVcpu: 64 * 4096 }));
    t.vm.allowPasses(Infinity);
    await t.vm.waitForPasses(5);
    expect(t.vm.progress()).toEqual([
      { vcpu: 0, passesCompleted: 1, halted: true },
      { vcpu: 1, passesCompleted: 1, halted: true },
    ]);
    await t.vm.pause();
    const s = t.vm.saveVcpuState(1);
    expect(s.progress.halted).toBe(true);
    t.vm.resume();
  });

  it('exits with an MMIO error when the guest writes outside every memslot, or into a read-only one', async () => {
    const engine = new SoftEngine({ hostRamBytes: 32 * 2 ** 20 });
    const vm = engine.createSoftVm();
    try {
      const spec = workload('sequential', 16 * 4096);
      const h = vm.mapHostMemory(8 * 4096, 'anonymous'); // half the slice has no memslot
      vm.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: 8 * 4096, userspaceAddr: h.hva });
      await vm.createVcpus(1, spec);
      vm.allowPasses(1);
      await expect(vm.waitForPasses(1)).rejects.toThrow(/MMIO access at gpa 0x100008000/);
    } finally {
      await vm.destroy();
    }
    const vm2 = engine.createSoftVm();
    try {
      const spec = workload('sequential', 8 * 4096);
      const h = vm2.mapHostMemory(8 * 4096, 'anonymous');
      vm2.setUserMemoryRegion({ slot: 0, flags: KVM_MEM_READONLY, guestPhysAddr: spec.gpaBase, memorySize: 8 * 4096, userspaceAddr: h.hva });
      await vm2.createVcpus(1, spec);
      vm2.allowPasses(1);
      await expect(vm2.waitForPasses(1)).rejects.toThrow(/MMIO/);
      expect(vm2.stats().mmioExits).toBe(1);
    } finally {
      await vm2.destroy();
    }
  });

  it('deleting a logging slot drops its mappings; its dirty log is gone', async () => {
    const t = (current = await makeTestVm({ bytesPerVcpu: 64 * 4096 }));
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    t.setLogging(true);
    expect(t.vm.stats().pages_4k).toBe(64);
    t.vm.setUserMemoryRegion({ ...t.region, flags: KVM_MEM_LOG_DIRTY_PAGES, memorySize: 0 });
    expect(t.vm.stats().pages_4k).toBe(0);
    expect(() => t.vm.getDirtyLog(0)).toThrow(/no memslot 0/);
  });
});

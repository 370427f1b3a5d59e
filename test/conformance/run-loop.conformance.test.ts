// The run loop's conformance suite (vmm/run/): every exit reason an engine can produce is
// produced, handled and re-entered after, pause / resume / kick under load lose no vCPU, and
// stats() counts the exits per reason and per vCPU. Runs against every engine present (kvm
// where /dev/kvm opens). SHUTDOWN / INTERNAL_ERROR, which no workload produces on purpose, are
// covered on the loop itself by test/vmm/run-loop.test.ts with a scripted guest.
import { describe, it, expect, afterEach } from 'vitest';
import { KVM_MEM_EXIT_ON_MISSING, MemslotError, PAGE_SIZE, type Engine, type Vm, type VmConfig } from '../../src/vmm/engine.ts';
import { VcpuError } from '../../src/vmm/errors.ts';
import { MEMORY_FAULT_FLAG_MISSING, MEMORY_FAULT_FLAG_WRITE, type PostedExit } from '../../src/vmm/run/exits.ts';
import { workload, type WorkloadKind, type WorkloadSpec } from '../../src/guest/workload.ts';
import { WorkloadModel, diffPages, firstWords } from './model.ts';
import { enginesUnderTest } from './engines.ts';

const { engines, unavailable } = await enginesUnderTest('run-loop conformance');
const live: Vm[] = [];
afterEach(async () => {
  await Promise.all(live.splice(0).map((vm) => vm.destroy()));
});

/** A VM whose test slot covers `slotPages` pages of the slices (all of them by default). */
async function vmFor(engine: Engine, vcpus: number, spec: WorkloadSpec, opts: { slotPages?: number; flags?: number; config?: VmConfig } = {}): Promise<Vm> {
  const vm = await engine.createVm(opts.config ?? {});
  live.push(vm);
  const bytes = vcpus * spec.bytesPerVcpu;
  const host = vm.mapHostMemory(bytes, 'anonymous');
  vm.setUserMemoryRegion({ slot: 0, flags: opts.flags ?? 0, guestPhysAddr: spec.gpaBase, memorySize: (opts.slotPages ?? bytes / PAGE_SIZE) * PAGE_SIZE, userspaceAddr: host.hva });
  await vm.createVcpus(vcpus, spec);
  return vm;
}

function expectMemory(vm: Vm, spec: WorkloadSpec, vcpus: number, passes: number, pages?: number): void {
  const model = new WorkloadModel(spec, vcpus);
  model.run(passes);
  const n = pages ?? model.memory.length;
  const { words } = firstWords((g, d) => vm.readGuest(g, d), spec.gpaBase, n);
  expect(diffPages(words, model.memory.subarray(0, n))).toEqual([]);
}

for (const u of unavailable) {
  describe(`run loop on ${u.engine}`, () => {
    it.skip(`skipped: ${u.missing}`, () => {});
  });
}

for (const engine of engines) {
  describe(`run loop on ${engine.kind}`, () => {
    it('IO: every pass is an exit, counted per vCPU; the vCPU re-enters after each', async () => {
      const spec = workload('sequential', 64 * PAGE_SIZE);
      const vm = await vmFor(engine, 2, spec);
      vm.allowPasses(5);
      await vm.waitForPasses(5);
      const s = vm.stats();
      expect(s['vcpu0.exitsIo']).toBe(5);
      expect(s['vcpu1.exitsIo']).toBe(5);
      expect(s.exitsIo).toBe(10);
      expect(s.vcpuExits).toBeGreaterThanOrEqual(10);
      expectMemory(vm, spec, 2, 5);
    });

    it('HLT: an idle guest halts after its pass and stays halted; pause and resume still work', async () => {
      const spec = workload('idle', 32 * PAGE_SIZE);
      const vm = await vmFor(engine, 2, spec);
      vm.allowPasses(Infinity);
      await vm.waitForPasses(1);
      expect(vm.progress().every((p) => p.halted && p.passesCompleted === 1)).toBe(true);
      await vm.pause();
      vm.resume();
      await vm.pause();
      const s = vm.stats();
      expect(s['vcpu0.exitsHlt']).toBe(1);
      expect(s['vcpu1.exitsHlt']).toBe(1);
      expectMemory(vm, spec, 2, 1);
    });

    it('INTR: 40 pause / resume kicks under load lose no vCPU and no guest work', async () => {
      const vcpus = 2;
      const spec = workload('random', 256 * PAGE_SIZE, { seed: 11 });
      const vm = await vmFor(engine, vcpus, spec);
      const passes = 400;
      vm.allowPasses(passes);
      for (let i = 0; i < 40; i++) {
        await new Promise((r) => setTimeout(r, 1));
        await vm.pause();
        const at = vm.progress();
        await new Promise((r) => setTimeout(r, 1));
        expect(vm.progress()).toEqual(at); // paused means stopped
        vm.resume();
      }
      await vm.waitForPasses(passes);
      expect(vm.progress().map((p) => p.passesCompleted)).toEqual([passes, passes]);
      const s = vm.stats();
      expect(s.exitsIntr).toBeGreaterThan(0);
      for (let v = 0; v < vcpus; v++) expect(s[`vcpu${v}.exitsIo`]).toBe(passes);
      expectMemory(vm, spec, vcpus, passes);
    });

    it('MMIO: an access to no memslot exits with its gpa; the handler completes it and the guest runs on', async () => {
      const spec = workload('sequential', 16 * PAGE_SIZE);
      const vm = await vmFor(engine, 1, spec, { slotPages: 8 });
      const seen: PostedExit[] = [];
      vm.onExit('mmio', (e) => {
        seen.push(e);
      });
      vm.allowPasses(2);
      await vm.waitForPasses(2);
      // Pages 8..15 have no memslot: each write of each pass is one MMIO exit, in order.
      const gpas = seen.map((e) => (e.gpa - spec.gpaBase) / PAGE_SIZE);
      expect(gpas).toEqual([8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15]);
      expect(seen.every((e) => e.vcpu === 0 && (e.flags & MEMORY_FAULT_FLAG_WRITE) !== 0)).toBe(true);
      expect(vm.stats().exitsMmio).toBe(16);
      expectMemory(vm, spec, 1, 2, 8);
    });

    it('MMIO without a handler stops the vCPU with a VcpuError naming the gpa', async () => {
      const spec = workload('sequential', 16 * PAGE_SIZE);
      const vm = await vmFor(engine, 1, spec, { slotPages: 8 });
      vm.allowPasses(1);
      const err = await vm.waitForPasses(1, 30_000).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(VcpuError);
      expect((err as VcpuError).reason).toBe('mmio');
      expect((err as VcpuError).message).toMatch(new RegExp(`gpa 0x${(spec.gpaBase + 8 * PAGE_SIZE).toString(16)}`));
    });

    it('MEMORY_FAULT: a missing page in an exit-on-missing memslot exits with its gpa; the VMM provides it; memory is right', async (ctx) => {
      const vcpus = 2;
      const spec = workload('random', 64 * PAGE_SIZE, { seed: 5 });
      const pages = (vcpus * spec.bytesPerVcpu) / PAGE_SIZE;
      let vm: Vm;
      try {
        vm = await vmFor(engine, vcpus, spec, { flags: KVM_MEM_EXIT_ON_MISSING });
      } catch (e) {
        if (e instanceof MemslotError && e.rule === 'flags') return ctx.skip(); // kvm: upstream never merged it
        throw e;
      }
      // The VMM provides half the pages up front (as post-copy's background copy would).
      const zero = new Uint8Array(PAGE_SIZE);
      for (let p = 0; p < pages; p += 2) vm.writeGuest(spec.gpaBase + p * PAGE_SIZE, zero);
      const faulted: number[] = [];
      vm.onExit('memoryFault', (e) => {
        expect(e.flags & MEMORY_FAULT_FLAG_MISSING).toBe(MEMORY_FAULT_FLAG_MISSING);
        expect(e.size).toBe(PAGE_SIZE);
        const page = (e.gpa - spec.gpaBase) / PAGE_SIZE;
        faulted.push(page);
        vm.writeGuest(e.gpa, zero); // "UFFDIO_COPY": the page now exists
      });
      vm.allowPasses(3);
      await vm.waitForPasses(3);
      // Exactly the odd pages the guest touched exited, each once.
      const model = new WorkloadModel(spec, vcpus);
      model.run(3);
      const touchedOdd = [...model.memory.keys()].filter((p) => p % 2 === 1 && model.memory[p] !== 0n);
      expect([...faulted].sort((a, b) => a - b)).toEqual(touchedOdd);
      expect(vm.stats().exitsMemoryFault).toBe(touchedOdd.length);
      expectMemory(vm, spec, vcpus, 3);
    });

    it('DIRTY_RING_FULL: a full ring exits, the VMM harvests, the vCPU re-enters', async (ctx) => {
      const max = engine.capabilities().dirtyRingMaxEntries;
      if (max === 0) return ctx.skip(); // the host's KVM has no KVM_CAP_DIRTY_LOG_RING
      const spec = workload('sequential', 1024 * PAGE_SIZE);
      const vm = await vmFor(engine, 1, spec, { config: { dirtyRingEntries: Math.min(max, 256) }, flags: 1 });
      vm.allowPasses(2);
      await vm.waitForPasses(2);
      expect(vm.stats().exitsDirtyRingFull).toBeGreaterThan(0);
      expectMemory(vm, spec, 1, 2);
    });

    it('stop while vCPUs run or wait for the VMM: destroy returns, no thread left', async () => {
      const kinds: WorkloadKind[] = ['sequential', 'random'];
      for (const kind of kinds) {
        const spec = workload(kind, 64 * PAGE_SIZE);
        const vm = await vmFor(engine, 2, spec, { slotPages: 100 });
        vm.onExit('mmio', () => new Promise(() => {})); // never answers: vCPU 1 waits for the VMM
        vm.allowPasses(Infinity);
        await new Promise((r) => setTimeout(r, 20));
        await vm.pause();
        await vm.destroy();
      }
    });
  });
}

// ONE conformance suite, run against every engine present on this host (soft always; kvm when
// /dev/kvm and the addon work). Each check compares an engine with the reference model of
// src/guest/workload.ts or with KVM's documented semantics, never with the other engine.
import { describe, it, expect, afterEach } from 'vitest';
import { readThreadSched } from '../../src/util/thread-sched.ts';
import {
  KVM_MEM_LOG_DIRTY_PAGES,
  MemslotError,
  PAGE_SIZE,
  type Engine,
  type GuestPageSize,
  type MemoryRegion,
  type Vm,
  type VmConfig,
} from '../../src/vmm/engine.ts';
import { newBitmap, countBits } from '../../src/vmm/dirty-bitmap.ts';
import { workload, type WorkloadKind, type WorkloadSpec } from '../../src/guest/workload.ts';
import { WorkloadModel, bitmapDiff, diffPages, firstWords } from './model.ts';
import { enginesUnderTest } from './engines.ts';

const MiB = 1 << 20;
const SLOT = 0;
const { engines, unavailable } = await enginesUnderTest('conformance');

const live: Vm[] = [];
afterEach(async () => {
  await Promise.all(live.splice(0).map((vm) => vm.destroy()));
});

async function newVm(engine: Engine, config: VmConfig = {}): Promise<Vm> {
  const vm = await engine.createVm(config);
  live.push(vm);
  return vm;
}

/** A VM with one test slot covering every vCPU's slice, and its vCPUs created. */
async function vmWithWorkload(engine: Engine, vcpus: number, spec: WorkloadSpec, config: VmConfig = {}, flags = 0): Promise<{ vm: Vm; region: MemoryRegion }> {
  const vm = await newVm(engine, config);
  const bytes = vcpus * spec.bytesPerVcpu;
  const host = vm.mapHostMemory(bytes, 'anonymous');
  const region = { slot: SLOT, flags, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: host.hva };
  vm.setUserMemoryRegion(region);
  await vm.createVcpus(vcpus, spec);
  return { vm, region };
}

function ruleOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (e instanceof MemslotError) return e.rule;
    throw e;
  }
  throw new Error('expected a MemslotError');
}

function expectMemory(vm: Vm, spec: WorkloadSpec, model: WorkloadModel): void {
  const pages = model.memory.length;
  const { words, restNonZero } = firstWords((g, d) => vm.readGuest(g, d), spec.gpaBase, pages);
  expect(diffPages(words, model.memory)).toEqual([]);
  expect(restNonZero).toEqual([]);
}

for (const u of unavailable) {
  describe(`engine ${u.engine}`, () => {
    it.skip(`skipped: ${u.missing}`, () => {});
  });
}

for (const engine of engines) {
  describe(`engine ${engine.kind}: memslots`, () => {
    it('creates, moves, changes flags and deletes a slot', async () => {
      const vm = await newVm(engine);
      const host = vm.mapHostMemory(4 * MiB, 'anonymous');
      const user = () => vm.memslots().filter((s) => !s.internal);
      const base: MemoryRegion = { slot: 3, flags: 0, guestPhysAddr: 2 ** 32, memorySize: 4 * MiB, userspaceAddr: host.hva };
      vm.setUserMemoryRegion(base);
      expect(user()).toEqual([{ ...base, pages: 1024, internal: false }]);
      vm.setUserMemoryRegion({ ...base, guestPhysAddr: 2 ** 33 });
      expect(user()[0]!.guestPhysAddr).toBe(2 ** 33);
      vm.setUserMemoryRegion({ ...base, guestPhysAddr: 2 ** 33, flags: KVM_MEM_LOG_DIRTY_PAGES });
      expect(user()[0]!.flags).toBe(KVM_MEM_LOG_DIRTY_PAGES);
      expect(countBits(vm.getDirtyLog(3))).toBe(0);
      vm.setUserMemoryRegion({ ...base, guestPhysAddr: 2 ** 33, memorySize: 0 });
      expect(user()).toEqual([]);
    });

    it('rejects invalid regions with a MemslotError naming the rule', async () => {
      const vm = await newVm(engine);
      const host = vm.mapHostMemory(8 * MiB, 'anonymous');
      const ok: MemoryRegion = { slot: 1, flags: 0, guestPhysAddr: 2 ** 32, memorySize: 4 * MiB, userspaceAddr: host.hva };
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, guestPhysAddr: 2 ** 32 + 512 }))).toBe('alignment');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, memorySize: 4 * MiB + 1 }))).toBe('alignment');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, userspaceAddr: host.hva + 8 }))).toBe('alignment');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, flags: 1 << 5 }))).toBe('flags');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, slot: -1 }))).toBe('slot');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, memorySize: 0 }))).toBe('unknown-slot');
      vm.setUserMemoryRegion(ok);
      // Another slot over the same guest-physical range: EEXIST in KVM.
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, slot: 2, guestPhysAddr: 2 ** 32 + 2 * MiB, userspaceAddr: host.hva + 4 * MiB }))).toBe('overlap');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, memorySize: 8 * MiB }))).toBe('size');
      expect(ruleOf(() => vm.setUserMemoryRegion({ ...ok, userspaceAddr: host.hva + 4 * MiB }))).toBe('hva');
      // The rejected requests changed nothing.
      expect(vm.memslots().filter((s) => !s.internal).map((s) => s.slot)).toEqual([1]);
      // Adjacent is fine.
      vm.setUserMemoryRegion({ ...ok, slot: 2, guestPhysAddr: 2 ** 32 + 4 * MiB, userspaceAddr: host.hva + 4 * MiB });
      expect(vm.memslots().filter((s) => !s.internal).map((s) => s.slot)).toEqual([1, 2]);
    });
  });

  describe(`engine ${engine.kind}: guest memory access`, () => {
    it('readGuest/writeGuest round-trip, across adjacent slots', async () => {
      const vm = await newVm(engine);
      const host = vm.mapHostMemory(2 * MiB, 'anonymous');
      vm.setUserMemoryRegion({ slot: 1, flags: 0, guestPhysAddr: 2 ** 32, memorySize: MiB, userspaceAddr: host.hva });
      vm.setUserMemoryRegion({ slot: 2, flags: 0, guestPhysAddr: 2 ** 32 + MiB, memorySize: MiB, userspaceAddr: host.hva + MiB });
      const src = Uint8Array.from({ length: 3 * PAGE_SIZE }, (_, i) => (i * 7 + 3) & 0xff);
      const at = 2 ** 32 + MiB - PAGE_SIZE - 100;
      vm.writeGuest(at, src);
      const back = new Uint8Array(src.length);
      vm.readGuest(at, back);
      expect(Buffer.from(back).equals(Buffer.from(src))).toBe(true);
      const untouched = new Uint8Array(16);
      vm.readGuest(2 ** 32, untouched);
      expect([...untouched]).toEqual(new Array(16).fill(0));
    });
  });

  describe(`engine ${engine.kind}: workloads`, () => {
    const cases: { kind: WorkloadKind; passes: number; guestPageSize: GuestPageSize }[] = [
      { kind: 'sequential', passes: 2, guestPageSize: 2097152 },
      { kind: 'sequential', passes: 2, guestPageSize: 4096 },
      { kind: 'random', passes: 3, guestPageSize: 2097152 },
      { kind: 'random', passes: 3, guestPageSize: 4096 },
      { kind: 'rwmix', passes: 3, guestPageSize: 2097152 },
      { kind: 'idle', passes: 1, guestPageSize: 2097152 },
    ];
    for (const c of cases) {
      it(`${c.kind} (${c.guestPageSize / 1024}K guest pages) writes exactly what the spec says, pass by pass`, async () => {
        const spec = workload(c.kind, 2 * MiB, { seed: 7, writePercent: 30 });
        const { vm } = await vmWithWorkload(engine, 2, spec, { guestPageSize: c.guestPageSize });
        const model = new WorkloadModel(spec, 2);
        for (let p = 1; p <= c.passes; p++) {
          vm.allowPasses(p);
          await vm.waitForPasses(p, 30_000);
          model.run(p);
          expectMemory(vm, spec, model);
          expect(vm.progress().map((x) => x.passesCompleted)).toEqual([p, p]);
        }
        // Two started vCPU threads: two distinct Linux tasks of this process (for schedstat).
        const tids = vm.vcpuThreadIds();
        expect(new Set(tids).size).toBe(2);
        for (const tid of tids) expect(readThreadSched(tid)?.onCpuNs).toBeGreaterThan(0);
        if (c.kind === 'idle') {
          vm.allowPasses(5);
          await vm.waitForPasses(5, 30_000);
          expect(vm.progress().every((x) => x.halted)).toBe(true);
          expectMemory(vm, spec, model);
        }
      });
    }
  });

  describe(`engine ${engine.kind}: dirty log`, () => {
    for (const manual of [true, false]) {
      for (const kind of ['sequential', 'random'] as const) {
        it(`${kind}, ${manual ? 'manual protect (get + clear)' : 'no manual protect (get clears)'}: reports exactly the pages each pass wrote`, async () => {
          if (manual && !engine.capabilities().manualDirtyLogProtect) return;
          const spec = workload(kind, MiB, { seed: 11 });
          const vcpus = 2;
          const { vm, region } = await vmWithWorkload(engine, vcpus, spec, { manualDirtyLogProtect: manual });
          const model = new WorkloadModel(spec, vcpus);
          // Populate (pass 1) without logging, then log passes 2..5.
          vm.allowPasses(1);
          await vm.waitForPasses(1, 30_000);
          model.step();
          vm.setUserMemoryRegion({ ...region, flags: KVM_MEM_LOG_DIRTY_PAGES });
          expect(countBits(vm.getDirtyLog(SLOT))).toBe(0);
          for (let p = 2; p <= 5; p++) {
            vm.allowPasses(p);
            await vm.waitForPasses(p, 30_000);
            const expected = model.step();
            const got = vm.getDirtyLog(SLOT);
            expect({ pass: p, ...bitmapDiff(got, expected) }).toEqual({ pass: p, missing: [], extra: [] });
            if (manual) {
              // Until cleared, the log keeps reporting the same pages.
              expect(bitmapDiff(vm.getDirtyLog(SLOT), expected)).toEqual({ missing: [], extra: [] });
              vm.clearDirtyLog(SLOT, 0, region.memorySize / PAGE_SIZE, got);
            }
            expect(countBits(vm.getDirtyLog(SLOT))).toBe(0);
          }
          expectMemory(vm, spec, model);
        });
      }
    }

    it('clearDirtyLog clears only the pages in the given range and bitmap', async () => {
      if (!engine.capabilities().manualDirtyLogProtect) return;
      const spec = workload('sequential', MiB);
      const { vm, region } = await vmWithWorkload(engine, 1, spec, { manualDirtyLogProtect: true }, KVM_MEM_LOG_DIRTY_PAGES);
      vm.allowPasses(1);
      await vm.waitForPasses(1, 30_000);
      const pages = region.memorySize / PAGE_SIZE;
      expect(countBits(vm.getDirtyLog(SLOT))).toBe(pages);
      // Clear pages 64..127 only, and of those only the even ones.
      const mask = newBitmap(64);
      mask[0] = 0x55555555;
      mask[1] = 0x55555555;
      vm.clearDirtyLog(SLOT, 64, 64, mask);
      const after = vm.getDirtyLog(SLOT);
      expect(countBits(after)).toBe(pages - 32);
      for (let p = 64; p < 128; p++) expect([p, ((after[p >>> 5]! >>> (p & 31)) & 1) === 1]).toEqual([p, p % 2 === 1]);
    });
  });

  describe(`engine ${engine.kind}: pause, resume, vCPU state`, () => {
    it('pause stops the guest; resume continues; state saved mid-pass and loaded into a new VM continues where it stopped', async () => {
      const spec = workload('random', 2 * MiB, { seed: 5 });
      const vcpus = 2;
      const total = 40;
      const src = await vmWithWorkload(engine, vcpus, spec);
      src.vm.allowPasses(total);
      await src.vm.waitForPasses(2, 30_000);
      await src.vm.pause();
      const at = src.vm.progress();
      const snapshot = new Uint8Array(src.region.memorySize);
      src.vm.readGuest(spec.gpaBase, snapshot);
      await new Promise((r) => setTimeout(r, 100));
      // Paused: nothing moves.
      expect(src.vm.progress()).toEqual(at);
      const again = new Uint8Array(src.region.memorySize);
      src.vm.readGuest(spec.gpaBase, again);
      expect(Buffer.from(again).equals(Buffer.from(snapshot))).toBe(true);

      // Migrate: memory (every slot, internal ones too) and vCPU state into a fresh VM.
      const states = Array.from({ length: vcpus }, (_, v) => JSON.parse(JSON.stringify(src.vm.saveVcpuState(v))));
      expect(states.map((s) => s.progress)).toEqual(at);
      const dst = await vmWithWorkload(engine, vcpus, spec);
      for (const s of src.vm.memslots()) {
        const buf = new Uint8Array(s.memorySize);
        src.vm.readGuest(s.guestPhysAddr, buf);
        dst.vm.writeGuest(s.guestPhysAddr, buf);
      }
      for (const st of states) dst.vm.loadVcpuState(st);
      expect(dst.vm.progress()).toEqual(at);

      // Both continue to the same pass count and must hold exactly the model's memory.
      src.vm.resume();
      await src.vm.waitForPasses(total, 60_000);
      dst.vm.allowPasses(total);
      await dst.vm.waitForPasses(total, 60_000);
      const model = new WorkloadModel(spec, vcpus);
      model.run(total);
      await src.vm.pause();
      await dst.vm.pause();
      expectMemory(src.vm, spec, model);
      expectMemory(dst.vm, spec, model);
      expect(dst.vm.progress().map((p) => p.passesCompleted)).toEqual([total, total]);
    });
  });
}

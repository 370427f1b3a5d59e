// Differential test: the same deterministic workload (fixed seed, passes paced by the host) on
// the soft engine and on real KVM. Round by round the dirty bitmaps must be identical, and so
// must guest memory. Where they disagree the soft engine is wrong (DESIGN.md).
import { describe, it, expect, afterEach } from 'vitest';
import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, type Engine, type Vm } from '../../src/vmm/engine.ts';
import { workload, type WorkloadKind, type WorkloadSpec } from '../../src/guest/workload.ts';
import { bitmapDiff, diffPages, firstWords } from '../conformance/model.ts';
import { enginesUnderTest } from '../conformance/engines.ts';

const { engines, unavailable } = await enginesUnderTest('differential');
const soft = engines.find((e) => e.kind === 'soft');
const kvm = engines.find((e) => e.kind === 'kvm');
const why = unavailable.map((u) => `${u.engine}: ${u.missing}`).join('; ');

const live: Vm[] = [];
afterEach(async () => {
  await Promise.all(live.splice(0).map((vm) => vm.destroy()));
});

const SLOT = 0;
const VCPUS = 2;

async function start(engine: Engine, spec: WorkloadSpec): Promise<{ vm: Vm; pages: number }> {
  const vm = await engine.createVm({ manualDirtyLogProtect: engine.capabilities().manualDirtyLogProtect });
  live.push(vm);
  const bytes = VCPUS * spec.bytesPerVcpu;
  const host = vm.mapHostMemory(bytes, 'anonymous');
  vm.setUserMemoryRegion({ slot: SLOT, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: host.hva });
  await vm.createVcpus(VCPUS, spec);
  return { vm, pages: bytes / PAGE_SIZE };
}

/** One host-paced round: allow the pass, wait, harvest (get + clear when manual). */
async function round(vm: Vm, pass: number, pages: number): Promise<Uint32Array> {
  vm.allowPasses(pass);
  await vm.waitForPasses(pass, 30_000);
  const bitmap = vm.getDirtyLog(SLOT);
  if (vm.config.manualDirtyLogProtect) vm.clearDirtyLog(SLOT, 0, pages, bitmap);
  return bitmap;
}

describe('differential: soft vs kvm', () => {
  const cases: { kind: WorkloadKind; seed: number }[] = [
    { kind: 'random', seed: 1234 },
    { kind: 'rwmix', seed: 99 },
  ];
  for (const c of cases) {
    it.skipIf(!soft || !kvm)(`${c.kind} (seed ${c.seed}): identical dirty bitmaps round by round and identical memory${!soft || !kvm ? ` — skipped: ${why}` : ''}`, async () => {
      const spec = workload(c.kind, 2 << 20, { seed: c.seed, writePercent: 40 });
      const a = await start(soft!, spec);
      const b = await start(kvm!, spec);
      const region = (vm: Vm) => vm.memslots().find((s) => s.slot === SLOT)!;
      for (const { vm } of [a, b]) {
        vm.allowPasses(1);
        await vm.waitForPasses(1, 30_000);
        vm.setUserMemoryRegion({ ...region(vm), flags: KVM_MEM_LOG_DIRTY_PAGES });
      }
      for (let pass = 2; pass <= 8; pass++) {
        const [da, db] = await Promise.all([round(a.vm, pass, a.pages), round(b.vm, pass, b.pages)]);
        expect({ pass, ...bitmapDiff(da, db) }).toEqual({ pass, missing: [], extra: [] });
        const ma = firstWords((g, d) => a.vm.readGuest(g, d), spec.gpaBase, a.pages);
        const mb = firstWords((g, d) => b.vm.readGuest(g, d), spec.gpaBase, b.pages);
        expect({ pass, diff: diffPages(ma.words, mb.words) }).toEqual({ pass, diff: [] });
        expect(ma.restNonZero).toEqual(mb.restNonZero);
      }
      // Whole memory, byte for byte.
      const bytes = VCPUS * spec.bytesPerVcpu;
      const ra = new Uint8Array(bytes);
      const rb = new Uint8Array(bytes);
      a.vm.readGuest(spec.gpaBase, ra);
      b.vm.readGuest(spec.gpaBase, rb);
      expect(Buffer.from(ra).equals(Buffer.from(rb))).toBe(true);
    });
  }
});

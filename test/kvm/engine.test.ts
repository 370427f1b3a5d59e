// kvm-engine specifics the conformance suite cannot see: what open() says when something is
// missing, kernel errors carrying the ioctl and errno names, the internal memslot, guest RAM as a
// real SharedArrayBuffer, capabilities, and KVM's binary stats.
import { describe, it, expect, afterEach } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EngineUnavailableError, KVM_MEM_LOG_DIRTY_PAGES, type Vm } from '../../src/vmm/engine.ts';
import { workload } from '../../src/guest/workload.ts';
import { KvmEngine } from '../../src/kvm/engine.ts';
import { loadAddon } from '../../src/kvm/addon.ts';
import { projectRoot } from '../../src/util/worker.ts';
import { INTERNAL_SLOT } from '../../src/kvm/guest/layout.ts';
import { openKvmOrReason } from './kvm-env.ts';

const { engine, reason } = await openKvmOrReason();
const live: Vm[] = [];
afterEach(async () => {
  await Promise.all(live.splice(0).map((vm) => vm.destroy()));
});

describe('KvmEngine.open', () => {
  it('says the addon is not built when it is missing', async () => {
    const root = mkdtempSync(join(tmpdir(), 'stage2-noaddon-'));
    const err = await KvmEngine.open(root).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(EngineUnavailableError);
    expect((err as EngineUnavailableError).missing).toBe('addon not built (run npm run build:addon)');
  });

  it.skipIf(!loadAddon(projectRoot))('names the errno when a device cannot be opened', () => {
    const addon = loadAddon(projectRoot)!;
    expect(() => addon.open('/dev/nonexistent-kvm')).toThrow('open /dev/nonexistent-kvm: ENOENT (No such file or directory)');
  });
});

describe(`kvm engine${engine ? '' : ` — skipped: ${reason}`}`, () => {
  it.skipIf(!engine)('reports the capabilities this host has', () => {
    const caps = engine!.capabilities();
    expect(caps.kind).toBe('kvm');
    expect(caps.backings).toContain('anonymous');
    expect(caps.maxVcpus).toBeGreaterThan(0);
  });

  it.skipIf(!engine)('kernel errors carry the ioctl name and errno name', async () => {
    const vm = await engine!.createVm({ manualDirtyLogProtect: true });
    live.push(vm);
    const host = vm.mapHostMemory(1 << 20, 'anonymous');
    vm.setUserMemoryRegion({ slot: 1, flags: 0, guestPhysAddr: 2 ** 32, memorySize: 1 << 20, userspaceAddr: host.hva });
    expect(() => vm.getDirtyLog(1)).toThrow('KVM_GET_DIRTY_LOG: ENOENT (No such file or directory)');
    vm.setUserMemoryRegion({ slot: 1, flags: KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: 2 ** 32, memorySize: 1 << 20, userspaceAddr: host.hva });
    // KVM_CLEAR_DIRTY_LOG requires first_page to be a multiple of 64.
    expect(() => vm.clearDirtyLog(1, 3, 64, new Uint32Array(2))).toThrow('KVM_CLEAR_DIRTY_LOG: EINVAL (Invalid argument)');
  });

  it.skipIf(!engine)('keeps its own code and page tables in an internal slot below 4 GiB, which VMM slots cannot touch', async () => {
    const vm = await engine!.createVm({ guestPageSize: 4096 });
    live.push(vm);
    const spec = workload('sequential', 1 << 20);
    const host = vm.mapHostMemory(1 << 20, 'anonymous');
    vm.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: 1 << 20, userspaceAddr: host.hva });
    await vm.createVcpus(1, spec);
    const internal = vm.memslots().filter((s) => s.internal);
    expect(internal.map((s) => s.slot)).toEqual([INTERNAL_SLOT]);
    expect(internal[0]!.guestPhysAddr + internal[0]!.memorySize).toBeLessThanOrEqual(2 ** 32);
    expect(() => vm.setUserMemoryRegion({ ...internal[0]!, memorySize: 0 })).toThrow(/kvm engine's own memslot/);
    const h2 = vm.mapHostMemory(1 << 20, 'anonymous');
    expect(() => vm.setUserMemoryRegion({ slot: 5, flags: 0, guestPhysAddr: internal[0]!.guestPhysAddr, memorySize: 1 << 20, userspaceAddr: h2.hva })).toThrow(/overlap/);
  });

  it.skipIf(!engine)('guest RAM is a SharedArrayBuffer aliasing the mapping the guest writes', async () => {
    const addon = loadAddon(projectRoot)!;
    const { hva, buffer } = addon.mmapGuest(2 << 20, 'anonymous_thp');
    expect(buffer).toBeInstanceOf(SharedArrayBuffer);
    expect(hva % (2 << 20)).toBe(0);
    const words = new Int32Array(buffer);
    Atomics.store(words, 5, 42);
    expect(Atomics.wait(words, 5, 0, 1)).toBe('not-equal'); // only a real SAB may wait
    addon.releaseGuest(hva, 2 << 20);
  });

  it.skipIf(!engine)('guests at CPL 0 (hlt for idle) produce the same memory as the default CPL 3 guests', async () => {
    const cpl0 = await KvmEngine.open(undefined, { guestCpl: 0 });
    for (const kind of ['sequential', 'idle'] as const) {
      const contents: string[] = [];
      for (const e of [engine!, cpl0]) {
        const vm = await e.createVm();
        live.push(vm);
        const spec = workload(kind, 256 << 10);
        const host = vm.mapHostMemory(2 * spec.bytesPerVcpu, 'anonymous');
        vm.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: 2 * spec.bytesPerVcpu, userspaceAddr: host.hva });
        await vm.createVcpus(2, spec);
        vm.allowPasses(3);
        await vm.waitForPasses(3, 30_000);
        expect(vm.stats().guestCpl).toBe(e.guestCpl);
        expect(vm.progress().map((p) => [p.passesCompleted, p.halted])).toEqual(kind === 'idle' ? [[1, true], [1, true]] : [[3, false], [3, false]]);
        await vm.pause(); // a halted vCPU pauses too
        const mem = new Uint8Array(2 * spec.bytesPerVcpu);
        vm.readGuest(spec.gpaBase, mem);
        contents.push(Buffer.from(mem).toString('base64'));
        vm.resume();
      }
      expect(contents[0] === contents[1]).toBe(true);
    }
  });

  it.skipIf(!engine)("exposes KVM's binary stats and its own counters", async () => {
    const vm = await engine!.createVm();
    live.push(vm);
    const spec = workload('sequential', 1 << 20);
    const host = vm.mapHostMemory(1 << 20, 'anonymous');
    vm.setUserMemoryRegion({ slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: 1 << 20, userspaceAddr: host.hva });
    await vm.createVcpus(1, spec);
    vm.allowPasses(3);
    await vm.waitForPasses(3, 30_000);
    const s = vm.stats();
    expect(s.passesCompleted).toBe(3);
    expect(s.vcpuExits).toBeGreaterThanOrEqual(3);
    expect(Object.keys(s)).toContain('remote_tlb_flush');
    for (const v of Object.values(s)) expect(Number.isInteger(v)).toBe(true);
  });
});

// What the destination refuses, the source hears, by name: a CONFIG or vCPU state changed in
// flight (between the source's state machine and the wire) is refused by the destination before
// the guest starts there, with an ERROR code and a message naming the field, and the source
// reports exactly that, keeps its guest running and its memory intact.
import { describe, expect, it } from 'vitest';
import { openEngine } from '../../src/vmm/factory.ts';
import type { VcpuState } from '../../src/vmm/engine.ts';
import type { SourceRecord } from '../../src/migration/link.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { interceptSend, migrateInProcess } from './helpers.ts';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const engine = await openEngine('soft');

/** Migrate a small running guest with `change` applied to each record as it is sent. */
async function migrateWith(change: (r: SourceRecord) => SourceRecord) {
  const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 1 << 20, backing: 'anonymous', workload: 'sequential' });
  try {
    const result = await migrateInProcess(vm, engine, { workload: spec, maxRounds: 2, wrapLink: (l) => interceptSend(l, (r, ch) => l.send(change(r), ch)) });
    // The source's guest keeps running after the refusal.
    const before = Math.max(...vm.progress().map((p) => p.passesCompleted));
    await vm.waitForPasses(before + 1, 10_000);
    return result;
  } finally {
    await vm.destroy();
  }
}

const configLie = (f: (c: Json) => void) => (r: SourceRecord): SourceRecord => {
  if (r.type !== 'config') return r;
  const config = structuredClone(r.config) as unknown as Json;
  f(config);
  return { type: 'config', config: config as never };
};
const vcpuLie = (f: (s: Json) => void) => (r: SourceRecord): SourceRecord => {
  if (r.type !== 'vcpu' || r.state.vcpu !== 1) return r;
  const state = structuredClone(r.state) as unknown as Json;
  f(state);
  return { type: 'vcpu', state: state as VcpuState };
};

describe('the source reports why the destination refused', () => {
  const cases: [string, (r: SourceRecord) => SourceRecord, RegExp][] = [
    ['an unsupported lock mode in CONFIG', configLie((c) => (c.vmConfig.lock = 'turbo')), /BAD_CONFIG \(6\): .*CONFIG\.vmConfig\.lock: "turbo" is not one of global-write, global, parallel/],
    ['guest RAM beyond what the receiver hosts', configLie((c) => {
      const s = c.memslots.find((m: Json) => !m.internal);
      s.memorySize = 2 ** 40;
      s.pages = 2 ** 40 / 4096;
      c.ramBytes = c.memslots.reduce((a: number, m: Json) => a + m.memorySize, 0);
    }), /BAD_CONFIG \(6\): .*cannot host this VM: \d+ bytes of guest RAM, this receiver accepts at most/],
    ['a memslot twice the size, consistently', configLie((c) => {
      const s = c.memslots.find((m: Json) => !m.internal);
      c.ramBytes += s.memorySize;
      s.memorySize *= 2;
      s.pages *= 2;
    }), /VERIFY_FAILED \(8\): .*CONFIG differs from what the source sent/],
    ['a vCPU position past its slice', vcpuLie((s) => (s.arch.pos = 1 << 20)), /BAD_VCPU_STATE \(9\): .*VCPU_STATE record 2: vCPU state arch\.pos: 1048576 is outside 0\.\.256/],
    ['a pass counter moved on, consistently', vcpuLie((s) => {
      s.arch.passes += 1;
      s.progress.passesCompleted += 1;
    }), /VERIFY_FAILED \(8\): .*vCPU state differs from what the source sent/],
  ];
  for (const [name, change, expected] of cases) {
    it(`${name}: refused before the guest starts there; the source names it and runs on`, async () => {
      const { stats, dest, destError } = await migrateWith(change);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/nothing was kept/);
      expect(stats.status).toBe('failed');
      expect(stats.verified).toBe(false);
      expect(stats.error).toMatch(expected);
      expect(stats.sourceIntact).toBe(true);
      expect(stats.sourceRunning).toBe(true);
    });
  }
});

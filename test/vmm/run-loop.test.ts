// The run loop itself (vmm/run/), with a scripted guest on real threads: every exit reason is
// produced and handled where it belongs (IO / HLT / INTR on the vCPU thread; MMIO, MEMORY_FAULT,
// DIRTY_RING_FULL on the VMM thread), the vCPU re-enters after each non-terminal one (the
// script only advances on entry), SHUTDOWN / INTERNAL_ERROR / a throw stop it with a VcpuError
// that says why, and stats count every exit per reason and per vCPU.
import { describe, it, expect, afterEach } from 'vitest';
import { startWorker } from '../../src/util/worker.ts';
import { VcpuError } from '../../src/vmm/errors.ts';
import { newControlBlock } from '../../src/vmm/run/control-block.ts';
import type { PostedExit } from '../../src/vmm/run/exits.ts';
import { VcpuRunControl } from '../../src/vmm/run/run-control.ts';
import type { ScriptStep } from './scripted-vcpu-worker.ts';

const running: VcpuRunControl[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((rc) => rc.stop()));
});

async function scripted(scripts: ScriptStep[][]): Promise<VcpuRunControl> {
  const ctl = newControlBlock(scripts.length);
  const rc = new VcpuRunControl(ctl, scripts.length, {
    startThread: (v) => startWorker(new URL('./scripted-vcpu-worker.ts', import.meta.url), { ctl: ctl.buffer, vcpu: v, script: scripts[v]! }),
  });
  running.push(rc);
  await rc.start();
  return rc;
}

describe('run loop (scripted guest)', () => {
  it('produces and handles every non-terminal exit, re-entering after each; stats count them', async () => {
    const script = (v: number): ScriptStep[] => [
      { exit: 'io', pass: 1 },
      { exit: 'memoryFault', gpa: 0x1000 * (v + 1) },
      { exit: 'intr' },
      { exit: 'io', pass: 2 },
      { exit: 'dirtyRingFull' },
      { exit: 'mmio', gpa: 0xfee0_0000 + v },
      { exit: 'io', pass: 3 },
      { exit: 'hlt' },
    ];
    const rc = await scripted([script(0), script(1)]);
    const seen: PostedExit[] = [];
    const record = (e: PostedExit): void => {
      seen.push(e);
    };
    rc.onExit('memoryFault', async (e) => {
      await new Promise((r) => setTimeout(r, 5)); // a handler may take its time (fetch a page)
      record(e);
    });
    rc.onExit('dirtyRingFull', record);
    rc.onExit('mmio', record);
    rc.allowPasses(Infinity);
    await rc.waitForPasses(3, 10_000);
    // The HLT exit follows pass 3's report: wait for it too.
    for (let i = 0; i < 1000 && !rc.progress().every((p) => p.halted); i++) await new Promise((r) => setTimeout(r, 5));
    expect(rc.progress()).toEqual([
      { vcpu: 0, passesCompleted: 3, halted: true },
      { vcpu: 1, passesCompleted: 3, halted: true },
    ]);
    for (const v of [0, 1]) {
      expect(seen.filter((e) => e.vcpu === v).map((e) => [e.reason, e.gpa])).toEqual([
        ['memoryFault', 0x1000 * (v + 1)],
        ['dirtyRingFull', 0],
        ['mmio', 0xfee0_0000 + v],
      ]);
    }
    const s = rc.exitStats();
    for (const v of [0, 1]) {
      expect(s[`vcpu${v}.exitsIo`]).toBe(3);
      expect(s[`vcpu${v}.exitsHlt`]).toBe(1);
      expect(s[`vcpu${v}.exitsMemoryFault`]).toBe(1);
      expect(s[`vcpu${v}.exitsDirtyRingFull`]).toBe(1);
      expect(s[`vcpu${v}.exitsMmio`]).toBe(1);
      expect(s[`vcpu${v}.exitsIntr`]).toBe(1);
    }
    expect(s.vcpuExits).toBe(16);
  });

  it('the allowance holds a vCPU between passes; raising it lets it re-enter', async () => {
    const rc = await scripted([[{ exit: 'io', pass: 1 }, { exit: 'io', pass: 2 }, { exit: 'io', pass: 3 }]]);
    rc.allowPasses(1);
    await rc.waitForPasses(1, 10_000);
    await new Promise((r) => setTimeout(r, 20));
    expect(rc.progress()[0]!.passesCompleted).toBe(1);
    rc.allowPasses(3);
    await rc.waitForPasses(3, 10_000);
  });

  it.each([
    ['shutdown', 'shutdown', /vCPU 0 exited: the guest shut down: triple fault/],
    ['internalError', 'internal', /vCPU 0 exited: internal error: KVM_EXIT_FAIL_ENTRY/],
    ['throw', 'crash', /vCPU 0 thread failed: .*scripted throw/],
  ] as const)('%s is terminal: the vCPU never re-enters and waitForPasses says why', async (exit, reason, message) => {
    const cause = exit === 'shutdown' ? 'triple fault' : exit === 'internalError' ? 'KVM_EXIT_FAIL_ENTRY' : undefined;
    const rc = await scripted([[{ exit: 'io', pass: 1 }, { exit, ...(cause ? { cause } : {}) }, { exit: 'io', pass: 2 }]]);
    rc.allowPasses(Infinity);
    const err = await rc.waitForPasses(2, 10_000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(VcpuError);
    expect((err as VcpuError).reason).toBe(reason);
    expect((err as VcpuError).message).toMatch(message);
    expect(rc.progress()[0]!.passesCompleted).toBe(1);
  });

  it('only MMIO, MEMORY_FAULT and DIRTY_RING_FULL can be handed to the VMM', async () => {
    const rc = await scripted([[{ exit: 'io', pass: 1 }]]);
    for (const r of ['io', 'hlt', 'intr', 'shutdown', 'internalError'] as const) expect(() => rc.onExit(r, () => {})).toThrow(RangeError);
    for (const r of ['mmio', 'memoryFault', 'dirtyRingFull'] as const) rc.onExit(r, () => {});
  });

  it('an exit with no VMM handler stops the vCPU (the default for MEMORY_FAULT)', async () => {
    const rc = await scripted([[{ exit: 'memoryFault', gpa: 0x5000 }]]);
    rc.allowPasses(1);
    await expect(rc.waitForPasses(1, 10_000)).rejects.toThrow(/could not provide the page at gpa 0x5000/);
  });

  it('pause resolves while a vCPU waits for the VMM; the answered exit then parks it in Paused', async () => {
    let release: () => void = () => {};
    const rc = await scripted([[{ exit: 'memoryFault', gpa: 0x7000 }, { exit: 'io', pass: 1 }]]);
    rc.onExit('memoryFault', () => new Promise<void>((r) => (release = r)));
    rc.allowPasses(1);
    await new Promise((r) => setTimeout(r, 20));
    await rc.pause();
    expect(rc.isStopped(0)).toBe(true);
    release();
    await new Promise((r) => setTimeout(r, 20));
    expect(rc.progress()[0]!.passesCompleted).toBe(0); // still paused: did not re-enter
    rc.resume();
    await rc.waitForPasses(1, 10_000);
  });
});

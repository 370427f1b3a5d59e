// Starting a kvm VM's vCPU threads under the shared run control (vmm/run/run-control.ts), and
// how to kick them: the only run-control parts that are the kvm engine's own. The KVM_RUN side
// is vcpu-worker.ts.
//
// A kick is immediate_exit = 1 in the vCPU's kvm_run, then a signal to its thread: the signal
// makes a blocked KVM_RUN return EINTR, and immediate_exit covers the window in which the
// thread has checked the control words but not yet entered the kernel. Runs on the VMM thread.
import { startWorker } from '../util/worker.ts';
import { newControlBlock, vcpuBase, V_STATE, VcpuRunState_Exited } from '../vmm/run/control-block.ts';
import { VcpuRunControl } from '../vmm/run/run-control.ts';
import type { KvmAddon } from './addon.ts';
import { RUN } from './abi.ts';
import { VCPU_TID_HI, VCPU_TID_LO, VCPU_TID_VALID } from './control.ts';
import type { VcpuWorkerData } from './vcpu-worker.ts';

export interface RunnerVcpu {
  fd: number;
  /** The vCPU's kvm_run mapping. */
  run: SharedArrayBuffer;
}

/**
 * Start the worker threads and wait until each has loaded the addon and parked waiting for an
 * allowance, so thread start-up (~0.1-0.3 s: bundling, isolate, addon) is not charged to the
 * first pass (dirty_log_perf_test likewise starts its vCPU threads before timing populate).
 */
export async function startKvmVcpus(addon: KvmAddon, vcpus: RunnerVcpu[], haltsAfterFirstPass: boolean): Promise<VcpuRunControl> {
  const ctl = newControlBlock(vcpus.length);
  const runBytes = vcpus.map((v) => new Uint8Array(v.run));
  const immediateExit = (on: number): void => runBytes.forEach((r) => Atomics.store(r, RUN.immediateExit, on));
  const rc = new VcpuRunControl(ctl, vcpus.length, {
    startThread(v) {
      const data: VcpuWorkerData = { vcpu: v, vcpuFd: vcpus[v]!.fd, run: vcpus[v]!.run, control: ctl.buffer as SharedArrayBuffer, haltsAfterFirstPass, progressClock: rc.clock.sab, vcpus: vcpus.length };
      return startWorker(new URL('./vcpu-worker.ts', import.meta.url), { ...data });
    },
    beforeStop: () => immediateExit(1),
    beforeResume: () => immediateExit(0),
    kick() {
      immediateExit(1);
      vcpus.forEach((_, v) => {
        const b = vcpuBase(v);
        if (Atomics.load(ctl, b + VCPU_TID_VALID) === 1 && Atomics.load(ctl, b + V_STATE) !== VcpuRunState_Exited) {
          addon.kick((BigInt(Atomics.load(ctl, b + VCPU_TID_HI) >>> 0) << 32n) | BigInt(Atomics.load(ctl, b + VCPU_TID_LO) >>> 0));
        }
      });
    },
  });
  await rc.start();
  return rc;
}

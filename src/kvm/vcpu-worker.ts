// A kvm vCPU thread: the shared run loop (vmm/run/vcpu-loop.ts) over KVM_RUN. Started by
// vcpu-runner.ts (src/util/worker.ts bundles it); it loads the addon by absolute path from
// workerData.__stage2Root.
//
// Concurrency: control-block.ts for the shared words, control.ts for this engine's. This thread
// writes only its own vCPU line and its own progress-clock ring (one stamp per pass report); it never touches guest memory: the guest does, and the VMM
// reads it through its own mapping. This file only turns kvm_run into the engine-neutral exit
// (vmm/run/exits.ts); the loop handles it.
import { workerData, parentPort } from 'node:worker_threads';
import { EAGAIN, EINTR, loadAddon } from './addon.ts';
import { EXIT, KVM_EXIT_IO_OUT, RUN, exitName } from './abi.ts';
import { VCPU_RUN_US_HI, VCPU_TID_HI, VCPU_TID_LO, VCPU_TID_VALID } from './control.ts';
import { SYNC_PORT } from '../guest/workload.ts';
import { HALT_PORT } from './guest/workload-code.ts';
import { linuxThreadId } from '../util/thread-sched.ts';
import { V_HALTED, V_LINUX_TID, storeWide, vcpuBase } from '../vmm/run/control-block.ts';
import {
  EXIT_DIRTY_RING_FULL, EXIT_HLT, EXIT_INTERNAL_ERROR, EXIT_INTR, EXIT_IO, EXIT_MEMORY_FAULT, EXIT_MMIO, EXIT_SHUTDOWN,
  MEMORY_FAULT_FLAG_WRITE, type VcpuExit,
} from '../vmm/run/exits.ts';
import { VcpuLoop, type GuestEntry } from '../vmm/run/vcpu-loop.ts';
import { ProgressStamper } from '../vmm/run/progress-clock.ts';

export interface VcpuWorkerData {
  vcpu: number;
  vcpuFd: number;
  run: SharedArrayBuffer;
  control: SharedArrayBuffer;
  /** idle workload: the first completed pass halts the vCPU. */
  haltsAfterFirstPass: boolean;
  /**
   * The guest's progress clock (vmm/run/progress-clock.ts). The kvm guest has no clock and
   * leaves the guest only at its pass report, so this thread stamps one unit per pass (SYNC_PORT
   * exit): coarser than the soft engine's 64 page accesses.
   */
  progressClock: SharedArrayBuffer;
  vcpus: number;
}

/** KVM_RUN returns -EFAULT together with KVM_EXIT_MEMORY_FAULT (KVM_CAP_MEMORY_FAULT_INFO). */
const EFAULT = 14;
/** struct kvm_run's memory_fault { u64 flags; u64 gpa; u64 size } in the exit union at 32. */
const MEMORY_FAULT_FLAGS = 32;
const MEMORY_FAULT_GPA = 40;
const MEMORY_FAULT_SIZE = 48;

const data = workerData as VcpuWorkerData & { __stage2Root: string };
const addon = loadAddon(data.__stage2Root);
if (!addon) throw new Error('kvm vcpu worker: addon not built');
const ctl = new Int32Array(data.control);
const base = vcpuBase(data.vcpu);
const run = new Uint8Array(data.run);
const runView = new DataView(data.run);
const clock = new ProgressStamper(data.progressClock, data.vcpus, data.vcpu);

let runNs = 0n;
/** An exit whose I/O KVM completes on the next KVM_RUN (pause must let it, see quiesce). */
let needsCompletion = false;
/** The guest halted in a way that exits to us (hlt without irqchip, HALT_PORT): never re-enter. */
let halted = false;

function kvmRun(): number {
  const t0 = process.hrtime.bigint();
  const r = addon!.ioctl(data.vcpuFd, 'KVM_RUN', 0, [EINTR, EAGAIN, EFAULT]);
  // Time inside KVM_RUN, so the VMM can tell its own overhead from the guest's (stats()).
  runNs += process.hrtime.bigint() - t0;
  storeWide(ctl, base + VCPU_RUN_US_HI, Number(runNs / 1000n));
  return r;
}

const entry: GuestEntry = {
  enter(x: VcpuExit): void {
    x.cause = '';
    if (halted) {
      x.reason = EXIT_HLT;
      return;
    }
    const r = kvmRun();
    needsCompletion = true;
    const reason = runView.getUint32(RUN.exitReason, true);
    if (r === -EFAULT && reason === EXIT.MEMORY_FAULT) {
      x.reason = EXIT_MEMORY_FAULT;
      x.flags = Number(runView.getBigUint64(MEMORY_FAULT_FLAGS, true));
      x.gpa = Number(runView.getBigUint64(MEMORY_FAULT_GPA, true));
      x.size = Number(runView.getBigUint64(MEMORY_FAULT_SIZE, true));
      return;
    }
    if (r === -EFAULT) {
      x.reason = EXIT_INTERNAL_ERROR;
      x.cause = `vcpu ${data.vcpu}: KVM_RUN failed with EFAULT (${exitName(reason)})`;
      return;
    }
    if (r < 0) {
      x.reason = EXIT_INTR; // kicked (or immediate_exit): the loop re-reads the run-control words
      return;
    }
    switch (reason) {
      case EXIT.IO: {
        const port = runView.getUint16(RUN.ioPort, true);
        if (port === SYNC_PORT && run[RUN.ioDirection] === KVM_EXIT_IO_OUT) {
          clock.stamp();
          x.reason = EXIT_IO;
          x.pass = runView.getUint32(Number(runView.getBigUint64(RUN.ioDataOffset, true)), true);
          x.halted = data.haltsAfterFirstPass;
          return;
        }
        if (port === HALT_PORT) {
          halted = true;
          x.reason = EXIT_HLT;
          return;
        }
        x.reason = EXIT_INTERNAL_ERROR;
        x.cause = `vcpu ${data.vcpu}: unexpected I/O to port 0x${port.toString(16)}`;
        return;
      }
      case EXIT.HLT:
        // No in-kernel irqchip: hlt comes to us. The guest stays halted until stopped.
        halted = true;
        x.reason = EXIT_HLT;
        return;
      case EXIT.DIRTY_RING_FULL:
        x.reason = EXIT_DIRTY_RING_FULL;
        return;
      case EXIT.INTR:
        x.reason = EXIT_INTR;
        return;
      case EXIT.MMIO:
        x.reason = EXIT_MMIO;
        x.gpa = Number(runView.getBigUint64(RUN.mmioPhysAddr, true));
        x.size = runView.getUint32(RUN.mmioLen, true);
        x.flags = run[RUN.mmioIsWrite] ? MEMORY_FAULT_FLAG_WRITE : 0;
        return;
      case EXIT.SHUTDOWN:
        x.reason = EXIT_SHUTDOWN;
        x.cause = `vcpu ${data.vcpu}: KVM_EXIT_SHUTDOWN`;
        return;
      default:
        x.reason = EXIT_INTERNAL_ERROR;
        x.cause = `vcpu ${data.vcpu}: ${exitName(reason)} (detail 0x${runView.getBigUint64(RUN.failReason, true).toString(16)})`;
    }
  },
  // The registers live in the kernel (KVM_GET_*/SET_* from the VMM while stopped); the loop
  // publishes V_PASSES / V_HALTED, which the VMM sets when it loads a state.
  saveRegs(): void {},
  loadRegs(): void {
    halted = Atomics.load(ctl, base + V_HALTED) !== 0;
  },
  quiesce(): void {
    // immediate_exit is set: this returns EINTR at once, after completing pending I/O, so the
    // registers the VMM saves are consistent (KVM API doc, KVM_RUN / immediate_exit).
    if (needsCompletion) addon!.ioctl(data.vcpuFd, 'KVM_RUN', 0, [EINTR, EAGAIN]);
    needsCompletion = false;
  },
};

const tid = addon.threadSelf();
Atomics.store(ctl, base + VCPU_TID_LO, Number(tid & 0xffffffffn) | 0);
Atomics.store(ctl, base + VCPU_TID_HI, Number(tid >> 32n) | 0);
Atomics.store(ctl, base + VCPU_TID_VALID, 1);
Atomics.store(ctl, base + V_LINUX_TID, linuxThreadId());
new VcpuLoop(ctl, data.vcpu, entry, (cause) => parentPort?.postMessage({ type: 'vcpu-cause', vcpu: data.vcpu, cause })).run();

// A vCPU thread: the KVM_RUN loop of one vCPU. Started by engine.ts (src/util/worker.ts bundles
// it); it loads the addon by absolute path from workerData.__stage2Root.
//
// Concurrency: see control.ts. This thread writes only its own VCPU_* words (and, on stop,
// nothing else); it reads VM_* words and waits on VM_DOORBELL. It never touches guest memory:
// the guest does, and the VMM reads it through its own mapping.
import { workerData, parentPort } from 'node:worker_threads';
import { EAGAIN, EINTR, loadAddon } from './addon.ts';
import { EXIT, KVM_EXIT_IO_OUT, RUN, exitName } from './abi.ts';
import {
  VCPU_EXITED, VCPU_EXITS, VCPU_FAILED, VCPU_HALTED, VCPU_PASSES, VCPU_PAUSED, VCPU_RING_FULL,
  VCPU_LINUX_TID, VCPU_RUN_US_HI, VCPU_RUN_US_LO, VCPU_STARTED, VCPU_TID_HI, VCPU_TID_LO, VCPU_TID_VALID, VM_ALLOWANCE, VM_DOORBELL, VM_EVENTS,
  VM_PAUSE, VM_STOP, vcpuBase,
} from './control.ts';
import { SYNC_PORT } from '../guest/workload.ts';
import { HALT_PORT } from './guest/workload-code.ts';
import { linuxThreadId } from '../util/thread-sched.ts';

export interface VcpuWorkerData {
  vcpu: number;
  vcpuFd: number;
  run: SharedArrayBuffer;
  control: SharedArrayBuffer;
  /** idle workload: the first completed pass halts the vCPU. */
  haltsAfterFirstPass: boolean;
}

const data = workerData as VcpuWorkerData & { __stage2Root: string };
const addon = loadAddon(data.__stage2Root);
if (!addon) throw new Error('kvm vcpu worker: addon not built');
const ctl = new Int32Array(data.control);
const base = vcpuBase(data.vcpu);
const run = new Uint8Array(data.run);
const runView = new DataView(data.run);

function publish(word: number, value: number): void {
  Atomics.store(ctl, base + word, value);
  Atomics.add(ctl, VM_EVENTS, 1);
  Atomics.notify(ctl, VM_EVENTS);
}

function fail(reason: number, message: string): void {
  parentPort?.postMessage({ type: 'failed', vcpu: data.vcpu, message });
  publish(VCPU_FAILED, reason + 1);
}

/** Enter the guest once. Returns false when the loop must stop. */
let runNs = 0n;

function runOnce(): boolean {
  const t0 = process.hrtime.bigint();
  const r = addon!.ioctl(data.vcpuFd, 'KVM_RUN', 0, [EINTR, EAGAIN]);
  // Time inside KVM_RUN, so the VMM can tell its own overhead from the guest's (stats()).
  runNs += process.hrtime.bigint() - t0;
  const us = Number(runNs / 1000n);
  Atomics.store(ctl, base + VCPU_RUN_US_LO, us % 2 ** 32 | 0);
  Atomics.store(ctl, base + VCPU_RUN_US_HI, Math.floor(us / 2 ** 32));
  Atomics.add(ctl, base + VCPU_EXITS, 1);
  if (r < 0) return true; // kicked (or immediate_exit): the loop re-reads the VM words
  const reason = runView.getUint32(RUN.exitReason, true);
  switch (reason) {
    case EXIT.IO: {
      const port = runView.getUint16(RUN.ioPort, true);
      if (port === SYNC_PORT && run[RUN.ioDirection] === KVM_EXIT_IO_OUT) {
        const pass = runView.getUint32(Number(runView.getBigUint64(RUN.ioDataOffset, true)), true);
        if (data.haltsAfterFirstPass) Atomics.store(ctl, base + VCPU_HALTED, 1);
        publish(VCPU_PASSES, pass);
        return true;
      }
      if (port === HALT_PORT) {
        parked = true;
        publish(VCPU_HALTED, 1);
        return true;
      }
      fail(reason, `vcpu ${data.vcpu}: unexpected I/O to port 0x${port.toString(16)}`);
      return false;
    }
    case EXIT.HLT:
      // No in-kernel irqchip: hlt comes to us. The guest stays halted until stopped.
      parked = true;
      publish(VCPU_HALTED, 1);
      return true;
    case EXIT.DIRTY_RING_FULL:
      publish(VCPU_RING_FULL, 1);
      return true;
    case EXIT.INTR:
      return true;
    case EXIT.MMIO: {
      const gpa = runView.getBigUint64(RUN.mmioPhysAddr, true);
      fail(reason, `vcpu ${data.vcpu}: guest access to gpa 0x${gpa.toString(16)} outside every memslot (KVM_EXIT_MMIO, ${run[RUN.mmioIsWrite] ? 'write' : 'read'})`);
      return false;
    }
    default:
      fail(reason, `vcpu ${data.vcpu}: ${exitName(reason)} (detail 0x${runView.getBigUint64(RUN.failReason, true).toString(16)})`);
      return false;
  }
}

/** The guest halted in a way that exits to us (hlt without irqchip, HALT_PORT): never re-enter. */
let parked = false;

function mayRun(): boolean {
  if (parked) return false;
  if (Atomics.load(ctl, base + VCPU_RING_FULL) === 1) return false;
  return Atomics.load(ctl, base + VCPU_PASSES) < Atomics.load(ctl, VM_ALLOWANCE);
}

let ringFullBell = -1;

function loop(): void {
  const tid = addon!.threadSelf();
  Atomics.store(ctl, base + VCPU_TID_LO, Number(tid & 0xffffffffn) | 0);
  Atomics.store(ctl, base + VCPU_TID_HI, Number(tid >> 32n) | 0);
  Atomics.store(ctl, base + VCPU_TID_VALID, 1);
  Atomics.store(ctl, base + VCPU_LINUX_TID, linuxThreadId());
  publish(VCPU_STARTED, 1);
  let needsCompletion = false; // an exit whose I/O KVM completes on the next KVM_RUN
  for (;;) {
    const bell = Atomics.load(ctl, VM_DOORBELL);
    if (Atomics.load(ctl, VM_STOP) === 1) return;
    if (Atomics.load(ctl, VM_PAUSE) === 1) {
      if (Atomics.load(ctl, base + VCPU_PAUSED) === 0) {
        // immediate_exit is set: this returns EINTR at once, after completing pending I/O, so
        // the registers the VMM saves are consistent (KVM API doc, KVM_RUN / immediate_exit).
        if (needsCompletion) addon!.ioctl(data.vcpuFd, 'KVM_RUN', 0, [EINTR, EAGAIN]);
        needsCompletion = false;
        publish(VCPU_PAUSED, 1);
      }
      Atomics.wait(ctl, VM_DOORBELL, bell);
      continue;
    }
    if (Atomics.load(ctl, base + VCPU_PAUSED) === 1) publish(VCPU_PAUSED, 0);
    if (Atomics.load(ctl, base + VCPU_RING_FULL) === 1 && bell !== ringFullBell) publish(VCPU_RING_FULL, 0);
    if (!mayRun()) {
      Atomics.wait(ctl, VM_DOORBELL, bell);
      continue;
    }
    if (!runOnce()) return;
    needsCompletion = true;
    // The VMM harvests only after seeing RING_FULL, so its doorbell comes after `bell`.
    if (Atomics.load(ctl, base + VCPU_RING_FULL) === 1) ringFullBell = bell;
  }
}

try {
  loop();
} catch (e) {
  fail(-1, `vcpu ${data.vcpu}: ${(e as Error).message}`);
} finally {
  publish(VCPU_EXITED, 1);
}

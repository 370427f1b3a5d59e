// Entry point of a vCPU worker thread (started by vcpu/threads.ts with startWorker).
//
// Attaches to the VM's shared state (host memory, host address space, stage-2 table, MMU lock,
// control block, stats, memslot generations) and runs the shared run loop (vmm/run/vcpu-loop.ts)
// over this engine's guest entry (runner.ts) until the VMM asks it to exit.
// Everything shared is described in the files that own it; this thread owns only its vCPU line
// of the control block and its stats line.
import { parentPort, workerData } from 'node:worker_threads';
import { HostMemory } from '../hostmem/host-memory.ts';
import { HostAddressSpace } from '../hostmm/host-address-space.ts';
import { MmuLock } from '../locking/mmu-lock.ts';
import { Stage2PageTable } from '../pgtable/stage2.ts';
import { FaultHandler } from '../mmu/fault.ts';
import { MemslotInvalidation } from '../mmu/memslot-inval.ts';
import { SlotReader } from '../mmu/slot-table.ts';
import { VcpuStage2 } from '../mmu/vcpu-mmu.ts';
import { VcpuRunner } from './runner.ts';
import { SoftDirtyRingProducer, SoftDirtyRings } from '../dirty/dirty-ring.ts';
import { bitmapDirtySink } from '../dirty/dirty-sink.ts';
import { VcpuStats, S_REMOTE_FLUSHES } from './stats.ts';
import { flushRemoteTlbs } from './tlb-flush.ts';
import type { VcpuWorkerData } from './threads.ts';
import { V_LINUX_TID, vcpuBase } from './control.ts';
import { VcpuLoop } from '../../vmm/run/vcpu-loop.ts';
import { ProgressStamper } from '../../vmm/run/progress-clock.ts';
import { linuxThreadId } from '../../util/thread-sched.ts';
import { DemandPagingEntry } from '../uffd/vcpu-entry.ts';

const d = workerData as VcpuWorkerData;
const ctl = new Int32Array(d.ctl);
Atomics.store(ctl, vcpuBase(d.vcpu) + V_LINUX_TID, linuxThreadId());
const mem = HostMemory.attach(d.mem);
const mm = HostAddressSpace.attach(d.mm, mem);
const lock = MmuLock.attach(d.lock);
const stats = new VcpuStats(d.stats, d.vcpu);
const pgt = Stage2PageTable.attach(d.pgt, {
  tlbFlush: () => {
    stats.add(S_REMOTE_FLUSHES, 1);
    flushRemoteTlbs(ctl, d.vcpus, d.vcpu);
  },
});
lock.onExclusiveUnlock = () => {
  pgt.reclaim();
};
const slots = new SlotReader(ctl, d.vcpu, d.port, d.slots);
const r = d.dirtyRings;
const ring = r ? new SoftDirtyRingProducer(new SoftDirtyRings(r.sab, r.lines, r.entries), d.vcpu) : null;
const faults = new FaultHandler(mem, mm, pgt, lock, slots, new MemslotInvalidation(d.inval), stats, ring ?? bitmapDirtySink);
const runner = new VcpuRunner(ctl, d.vcpu, d.spec, mem.windows, new VcpuStage2(pgt, faults), stats, ring, new ProgressStamper(d.progressClock, d.vcpus, d.vcpu));
try {
  // MISSING memory faults are taken on this thread while the VM pages on demand (soft/uffd/).
  const entry = new DemandPagingEntry(runner, d.vcpu, ctl, d.uffdPort, mm, mem);
  new VcpuLoop(ctl, d.vcpu, entry, (cause) => parentPort?.postMessage({ type: 'vcpu-cause', vcpu: d.vcpu, cause })).run();
} finally {
  pgt.detach();
  d.port.close();
  d.uffdPort.close();
}

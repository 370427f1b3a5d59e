// The vCPU thread's side of demand paging: a GuestEntry around the soft runner that takes
// MEMORY_FAULT exits flagged MISSING on the vCPU's own thread (vcpu-loop.ts handleOnThread)
// instead of posting them to the VMM.
//
//   path 'exit': the exit is the memory-fault exit of KVM_MEM_EXIT_ON_MISSING; this thread
//                fetches the page (local source) and COPYs it, or asks the main thread.
//   path 'uffd': the soft model's handle_userfault: queue the event on the uffd and sleep until
//                a reader installs the page. The sleep happens here, after the runner left guest
//                mode, rather than inside the stage-2 fault handler: there the vCPU holds the
//                memslot SRCU reader and the stage-2 RCU section, which a memslot change on the
//                main thread (the thread that may have to install the page) would wait for.
// Either way the vCPU re-enters afterwards and repeats the access (the loop head first honours
// a pause or stop request that cut the wait short).
//
// Concurrency: the shared memory is the userfaultfd model's (userfaultfd.ts). The attachment
// arrives as a message on this vCPU's demand-paging port, posted by the main thread BEFORE it
// registers anything, so the first MISSING exit finds it there (receiveMessageOnPort is
// synchronous; the worker's event loop never runs while it is in the run loop).

import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { EXIT_MEMORY_FAULT, MEMORY_FAULT_FLAG_MISSING, type VcpuExit } from '../../vmm/run/exits.ts';
import type { GuestEntry } from '../../vmm/run/vcpu-loop.ts';
import type { HostMemory } from '../hostmem/host-memory.ts';
import type { HostAddressSpace } from '../hostmm/host-address-space.ts';
import { pageOfGfn } from './layout.ts';
import { SoftUserfaultfd, type UffdShared } from './userfaultfd.ts';

/** The message that attaches a vCPU to a VM's demand paging (or detaches it: null). */
export interface UffdAttachMessage {
  type: 'uffd-attach';
  shared: UffdShared | null;
}

export class DemandPagingEntry implements GuestEntry {
  private uffd: SoftUserfaultfd | null = null;

  constructor(
    private readonly inner: GuestEntry,
    private readonly vcpu: number,
    private readonly ctl: Int32Array,
    private readonly port: MessagePort,
    private readonly mm: HostAddressSpace,
    private readonly mem: HostMemory,
  ) {}

  enter(x: VcpuExit): void {
    this.inner.enter(x);
  }

  saveRegs(): void {
    this.inner.saveRegs();
  }

  loadRegs(): void {
    this.inner.loadRegs();
  }

  onCrash(): void {
    this.inner.onCrash?.();
  }

  handleOnThread(x: VcpuExit): boolean {
    if (x.reason !== EXIT_MEMORY_FAULT || (x.flags & MEMORY_FAULT_FLAG_MISSING) === 0) return this.inner.handleOnThread?.(x) ?? false;
    this.drainPort();
    const u = this.uffd;
    if (u === null) return false; // not demand paging: the VMM's memoryFault handler decides
    const i = pageOfGfn(u.sh.layout, Math.floor(x.gpa / 4096));
    if (i < 0) return false;
    const t0 = performance.now();
    if (u.fault(i, this.vcpu)) u.histogram.record(this.vcpu, (performance.now() - t0) / 1000);
    return true;
  }

  private drainPort(): void {
    for (;;) {
      const m = receiveMessageOnPort(this.port);
      if (m === undefined) return;
      const msg = m.message as UffdAttachMessage;
      if (msg?.type !== 'uffd-attach') continue;
      this.uffd = msg.shared ? new SoftUserfaultfd(msg.shared, this.mm, this.mem, this.ctl) : null;
    }
  }
}

// A uffd reader thread (demand_paging_test's uffd_handler_thread_fn): read fault events from one
// uffd's queue and resolve each (fetch from the local source with its delay, COPY / CONTINUE,
// which wakes the waiters; WAKE alone when the page arrived by another path; or hand the request
// to the main thread). Started by pager.ts, `readers` per uffd; leaves when the queue stops.
//
// Shared memory: the userfaultfd model's (userfaultfd.ts), the host memory and address space;
// this thread owns nothing of its own there.
import { parentPort, workerData } from 'node:worker_threads';
import { HostMemory, type HostMemoryShared } from '../hostmem/host-memory.ts';
import { HostAddressSpace, type HostAddressSpaceShared } from '../hostmm/host-address-space.ts';
import { SoftUserfaultfd, type UffdShared } from './userfaultfd.ts';

export interface UffdReaderData {
  shared: UffdShared;
  mem: HostMemoryShared;
  mm: HostAddressSpaceShared;
  uffd: number;
}

const d = workerData as UffdReaderData;
const mem = HostMemory.attach(d.mem);
const mm = HostAddressSpace.attach(d.mm, mem);
const u = new SoftUserfaultfd(d.shared, mm, mem, null);
const q = u.queues[d.uffd]!;
parentPort?.postMessage('ready');
for (;;) {
  const i = q.popWait();
  if (i < 0) break;
  u.serve(i, q.vcpu);
}

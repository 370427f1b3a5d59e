// Demand paging of guest RAM (seed 002): what a post-copy destination, and `bench
// demand-paging`, ask of an engine. One contract, two engines:
//   soft  the host model's userfaultfd (a fault queue in shared memory between threads) and the
//         stage-2 fault handler's MEMORY_FAULT exits for KVM_MEM_EXIT_ON_MISSING memslots;
//   kvm   the addon's real userfaultfd on the guest RAM mapping (and KVM_EXIT_MEMORY_FAULT where
//         the kernel reports one; exit-on-missing itself was never merged upstream).
//
// The life of a missing page:
//   1. startDemandPaging() registers guest RAM: every page not populated yet is missing, and
//      discard() makes populated ones missing again (QEMU's postcopy discard of pages dirtied
//      after they were sent).
//   2. A vCPU touches a missing page. path 'uffd': the touching thread waits on the userfaultfd
//      queue; reader threads read the event. path 'exit': the vCPU leaves the guest with
//      MEMORY_FAULT (MEMORY_FAULT_FLAG_MISSING) and its own thread takes the fault; the uffd stays
//      registered for other paths (the VMM's own reads).
//   3. Whoever took the fault asks for the page: from `localSource` directly on that thread
//      (benchmarks), else the VMM's onRequest handler on the main thread (post-copy: a request
//      on the page-request channel). One request per page however many threads wait for it.
//   4. install() (COPY for MISSING; write into the shared mapping + CONTINUE for MINOR) puts the
//      page in and wakes every waiter (WAKE on its own where it arrived by another path). A page
//      installed twice (pushed and requested) is installed once: the second gets 'exists'
//      (COPY's EEXIST) and changes nothing.
//   5. When nothing is missing, finish() unregisters; the VM runs as any other.
//
// Plain types; the shared memory lives in each engine's implementation.

/** How a vCPU's touch of a missing page reaches the VMM. */
export type FaultPath = 'uffd' | 'exit';

/** MISSING: anonymous memory, resolved by COPY. MINOR: shared memory / hugetlb, resolved by CONTINUE. */
export type UffdMode = 'missing' | 'minor';

export const FAULT_PATHS: readonly FaultPath[] = ['uffd', 'exit'];
export const UFFD_MODES: readonly UffdMode[] = ['missing', 'minor'];

/** Pages served from memory every resolving thread can read (demand_paging_test's source buffer). */
export interface LocalPageSource {
  /**
   * Guest RAM's contents: the VMM's memslots (not the engine's internal ones) back to back in
   * guest-physical order, so page i of that sequence is bytes [i*4096, (i+1)*4096). (Test
   * memory starts at 4 GiB: a buffer indexed by gpa would be mostly hole.)
   */
  buffer: SharedArrayBuffer;
  /** Delay per fetch, microseconds (demand_paging_test -d). */
  delayUs: number;
}

export interface DemandPagingConfig {
  path: FaultPath;
  mode: UffdMode;
  /** One uffd for the whole VM (demand_paging_test -a), else one per vCPU's memory slice. */
  sharedUffd: boolean;
  /** Reader threads per uffd (demand_paging_test -r). */
  readers: number;
  /** Serve faults from here on the resolving thread; without it, requests go to onRequest. */
  localSource?: LocalPageSource;
}

/** A page some thread waits for, in the (slot, page) vocabulary of the migration stream. */
export interface PageRequest {
  slot: number;
  /** Page index within the slot (gpa = slot base + page * 4096). */
  page: number;
  /** The vCPU that touched it first, or -1 for a thread that is no vCPU (the VMM's own read). */
  vcpu: number;
}

export type InstallResult = 'installed' | 'exists';

/** How long one vCPU waited for missing pages, seconds (from fault to re-entry). */
export interface VcpuPageWaits {
  vcpu: number;
  faults: number;
  p50: number;
  p99: number;
  max: number;
  total: number;
}

export interface DemandPagingStats {
  /** Faults taken on missing pages (every waiting thread counts). */
  faults: number;
  /** Distinct pages requested (onRequest calls or localSource fetches). */
  requests: number;
  installed: number;
  /** install() calls that found the page already there. */
  duplicates: number;
  missing: number;
}

export interface DemandPager {
  readonly config: Readonly<DemandPagingConfig>;
  /**
   * Make populated pages missing again (MADV_DONTNEED), before the vCPUs run. pages: indices
   * within `slot`.
   */
  discard(slot: number, pages: Iterable<number>): void;
  /** The main thread's handler for page requests (required unless config.localSource). */
  onRequest(handler: (req: PageRequest) => void): void;
  /** Put one page in and wake its waiters; main thread. data: 4096 bytes. */
  install(slot: number, page: number, data: Uint8Array): InstallResult;
  isMissing(slot: number, page: number): boolean;
  missingCount(): number;
  /** Per-vCPU waits so far. */
  waits(): VcpuPageWaits[];
  stats(): DemandPagingStats;
  /** Nothing is missing any more (or the VM is going away): unregister, drop exit-on-missing. */
  finish(): void;
}

/** The engine cannot page this VM on demand as asked; `reason` says what is absent. */
export class DemandPagingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DemandPagingError';
  }
}

// THE engine interface: what the soft engine (TypeScript second-stage MMU) and the kvm engine
// (/dev/kvm through a native addon) both implement. Everything above the engine line
// (dirty-tracking policy, migration, benchmarks, CLI) sees engines only through this file.
//
// Each method says which KVM ioctl it mirrors. Addresses and sizes are plain numbers (all fit in
// 2^53). A dirty bitmap is a Uint32Array whose byte layout equals KVM's `unsigned long` bitmap on
// little-endian x86-64: page i of a memslot is bit (i & 31) of word (i >> 5).
//
// Threading: a Vm object is owned by the thread that created it (the VMM's main thread). vCPUs
// run on worker threads the engine starts; every method here is called from the owning thread
// only. Methods that must wait for vCPU threads (pause, waitForPasses) are async.
//
// This file imports no engine.

import type { WorkloadSpec } from '../guest/workload.ts';
import type { ExitHandler, ExitName } from './run/exits.ts';
import type { ProgressClock } from './run/progress-clock.ts';
import type { DemandPager, DemandPagingConfig, FaultPath } from './demand-paging.ts';

export type EngineKind = 'soft' | 'kvm';

/** How the host memory behind a memslot is backed (dirty_log_perf_test's -s). */
export type Backing = 'anonymous' | 'anonymous_thp' | 'hugetlb';

/** Guest-side page size the guest maps its own memory with (kvm: guest page tables). */
export type GuestPageSize = 4096 | 2097152;

/** Memslot flags, with KVM's bit values. */
export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0;
export const KVM_MEM_READONLY = 1 << 1;
/**
 * stage2's own memslot flag, not KVM's: a stage-2 fault on a page the host does not have yet
 * exits to the VMM with MEMORY_FAULT (flag MISSING) instead of faulting the page in. Proposed
 * upstream as KVM_MEM_EXIT_ON_MISSING (bit 3, for post-copy; Anish Moorthy's series, 2023) and
 * never merged, so the kvm engine refuses it ('flags'); the soft engine implements it.
 */
export const KVM_MEM_EXIT_ON_MISSING = 1 << 3;

export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;

/** What an engine can do on this host (KVM_CHECK_EXTENSION and friends). */
export interface EngineCapabilities {
  kind: EngineKind;
  /** KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: get and clear of the dirty log are separate calls. */
  manualDirtyLogProtect: boolean;
  /** KVM_CAP_DIRTY_LOG_RING: the largest ring (entries per vCPU), 0 when unsupported. */
  dirtyRingMaxEntries: number;
  /** KVM_CAP_MEMORY_FAULT_INFO: faults the engine cannot resolve exit to the VMM. */
  memoryFaultExit: boolean;
  /** userfaultfd can serve this engine's guest memory. */
  userfaultfd: boolean;
  /** Vm.startDemandPaging's fault paths on this host ([] when the engine cannot page on demand). */
  demandPagingPaths?: FaultPath[];
  /** Backings this host can provide right now (hugetlb needs reserved pages). */
  backings: Backing[];
  /** Largest number of vCPUs the engine accepts. */
  maxVcpus: number;
}

/**
 * How the soft engine serialises stage-2 faults (the kvm engine accepts and ignores it; the host
 * kernel decides): 'global-write' = every fault takes the MMU lock for write (arm64 while
 * mmu_lock was a spinlock); 'global' = the write lock except for faults that only relax
 * permissions, which take it for read (arm64 just before seed 003's series); 'parallel' = the
 * read lock for every fault, cmpxchg and break-before-make (seed 003).
 */
export type MmuLockMode = 'global-write' | 'global' | 'parallel';

/** Every MmuLockMode, strictest first (CLI parsing, benchmarks' defaults, tests). */
export const MMU_LOCK_MODES: readonly MmuLockMode[] = ['global-write', 'global', 'parallel'];

/** KVM_CREATE_VM arguments plus VM-wide capabilities enabled at creation (KVM_ENABLE_CAP). */
export interface VmConfig {
  /** KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). Default true where supported. */
  manualDirtyLogProtect?: boolean;
  /** KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING) with this many entries per vCPU; 0 = bitmap only. */
  dirtyRingEntries?: number;
  /** Soft engine only: how stage-2 faults take the MMU lock (see MmuLockMode). Default 'parallel'. */
  lock?: MmuLockMode;
  /** Guest page size the guest uses for its own mappings (kvm engine guest page tables). */
  guestPageSize?: GuestPageSize;
}

/** Host virtual memory the VMM mapped to back guest RAM (mmap in a real VMM). */
export interface HostMapping {
  /** Host virtual address of the first byte. */
  hva: number;
  bytes: number;
  backing: Backing;
}

/** KVM_SET_USER_MEMORY_REGION's struct kvm_userspace_memory_region. memorySize 0 deletes. */
export interface MemoryRegion {
  slot: number;
  flags: number;
  guestPhysAddr: number;
  memorySize: number;
  userspaceAddr: number;
}

/** One memslot as the engine currently holds it. */
export interface MemslotInfo extends MemoryRegion {
  /** Number of 4 KiB pages (memorySize / PAGE_SIZE). */
  pages: number;
  /**
   * True for memory the engine created for itself in createVcpus (kvm: guest code, guest page
   * tables, stacks). A migration copies it like any slot; the destination's createVcpus creates
   * the same slot before the copy arrives.
   */
  internal: boolean;
}

/** A dirty-ring entry (struct kvm_dirty_gfn): slot and page offset within it. */
export interface DirtyGfn {
  slot: number;
  offset: number;
  /** The vCPU whose ring held the entry (-1: a VMM thread's own fault, soft engine tests). */
  vcpu: number;
}

/**
 * Where a vCPU stands in its workload, in engine-neutral terms. `passesCompleted` counts
 * finished passes over the vCPU's slice (the selftests' "iteration").
 */
export interface VcpuProgress {
  vcpu: number;
  passesCompleted: number;
  /** True once an `idle` workload has written its slice and halted. */
  halted: boolean;
}

/**
 * Everything needed to resume a vCPU elsewhere (KVM_GET_REGS, _SREGS, _FPU, _XCRS, _XSAVE,
 * _MSRS, _LAPIC, _VCPU_EVENTS for kvm; the interpreter's registers for soft). Opaque to the VMM:
 * it is JSON-serialisable and must be loaded into a vCPU of the same engine kind.
 */
export interface VcpuState {
  engine: EngineKind;
  vcpu: number;
  progress: VcpuProgress;
  arch: unknown;
}

/** Counters an engine exposes (KVM's binary stats: pages_4k, pages_2m, ...). Integers. */
export type VmStats = Record<string, number>;

/** Vm.mappingMap's values: how a 2 MiB of guest-physical memory is mapped in stage 2. */
export const MAPPING_NONE = 0;
/** A table of 4 KiB pages (some or none of them mapped yet). */
export const MAPPING_4K = 1;
export const MAPPING_2M = 2;
/** Part of a 1 GiB block. */
export const MAPPING_1G = 3;

export interface Engine {
  readonly kind: EngineKind;
  /** KVM_CHECK_EXTENSION over what this engine needs. */
  capabilities(): EngineCapabilities;
  /** KVM_CREATE_VM, then KVM_ENABLE_CAP for each VM capability in config. */
  createVm(config?: VmConfig): Promise<Vm>;
}

export interface Vm {
  readonly engine: EngineKind;
  readonly config: Readonly<Required<VmConfig>>;

  /** mmap(2) of guest RAM in the VMM's address space, with the backing's madvise/flags. */
  mapHostMemory(bytes: number, backing: Backing): HostMapping;

  /**
   * KVM_SET_USER_MEMORY_REGION: create a slot, move it (new guestPhysAddr, same size), change its
   * flags (KVM_MEM_LOG_DIRTY_PAGES turns dirty logging on or off), or delete it (memorySize 0).
   * Invalid regions throw a MemslotError naming the rule broken.
   */
  setUserMemoryRegion(region: MemoryRegion): void;

  /** The current memslot set (one consistent generation). */
  memslots(): readonly MemslotInfo[];

  /**
   * KVM_CREATE_VCPU for each of `count` vCPUs, load the guest code for `workload`, set initial
   * registers. Each vCPU gets its own slice of the workload's memory. vCPUs do not run yet.
   */
  createVcpus(count: number, workload: WorkloadSpec): Promise<void>;

  /** Number of vCPUs created. */
  readonly vcpuCount: number;

  /**
   * Let every vCPU run until it has completed `passes` passes in total, then wait in the VMM
   * (like the selftests' host-driven iterations). Infinity lets the guest run freely.
   * Starts the vCPU threads (KVM_RUN loops) on first call.
   */
  allowPasses(passes: number): void;

  /** Resolve once every vCPU has completed at least `passes` passes (or halted). */
  waitForPasses(passes: number, timeoutMs?: number): Promise<void>;

  /** Per-vCPU progress right now (read without stopping the vCPUs). */
  progress(): VcpuProgress[];

  /**
   * The guest's progress clock (run/progress-clock.ts): when each vCPU completed each unit of
   * work (soft: 64 page accesses; kvm: a pass), read without stopping the vCPUs. Null before
   * createVcpus.
   */
  progressClock(): ProgressClock | null;

  /**
   * Linux thread id of each vCPU thread (0 until it has started), so a benchmark can read its
   * scheduler accounting (/proc/self/task/TID/schedstat: time on a CPU, time waiting for one).
   */
  vcpuThreadIds(): number[];

  /**
   * Kick every vCPU out of KVM_RUN (signal + immediate_exit) and resolve once all are stopped
   * outside guest mode. While paused, guest memory and vCPU state are stable.
   */
  pause(): Promise<void>;

  /** Undo pause(): vCPUs re-enter the guest. */
  resume(): void;

  /**
   * Handle `reason` exits ('mmio', 'memoryFault' or 'dirtyRingFull') on this thread: the vCPU
   * waits outside the guest until `handler` returns (or its promise resolves), then re-enters
   * (repeating a MEMORY_FAULT access; an MMIO access counts as done); a throw stops the vCPU
   * with that cause. Without a handler such an exit stops the vCPU (waitForPasses then throws a
   * VcpuError). The other exits (vmm/run/exits.ts) belong to the run loop itself. Only after
   * createVcpus. The kvm engine serves 'dirtyRingFull' itself (harvest + reset).
   */
  onExit(reason: ExitName, handler: ExitHandler | undefined): void;

  /**
   * KVM_GET_DIRTY_LOG for one slot: the pages written since the last harvest. With manual
   * protect the bitmap is returned without clearing or re-protecting (use clearDirtyLog);
   * without it, the log is cleared and the pages write-protected again atomically.
   */
  getDirtyLog(slot: number): Uint32Array;

  /**
   * KVM_CLEAR_DIRTY_LOG (manual protect only): for each set bit of `bitmap` (bit 0 = page
   * firstPage), clear the dirty bit and write-protect the page again. firstPage must be a
   * multiple of 64; numPages may end at the slot's end.
   */
  clearDirtyLog(slot: number, firstPage: number, numPages: number, bitmap: Uint32Array): void;

  /**
   * Dirty ring (only when created with dirtyRingEntries > 0): collect every vCPU's published
   * entries, then KVM_RESET_DIRTY_RINGS so those pages are write-protected again.
   */
  harvestDirtyRings?(): DirtyGfn[];

  /**
   * Page guest RAM on demand (post-copy destination, bench demand-paging): after the memslots
   * exist and before the vCPUs first run. The contract: vmm/demand-paging.ts. Throws
   * DemandPagingError where this engine or host cannot do what config asks.
   */
  startDemandPaging?(config: DemandPagingConfig): DemandPager;

  /**
   * set-vcpu-dirty-limit (QEMU 8.1's dirty-limit): hold `vcpu` (every vCPU when omitted) to at
   * most `bytesPerSecond` of newly dirtied memory, 0 to lift it. Needs a dirty ring: enforced at
   * DIRTY_RING_FULL exits, where a vCPU over its limit sleeps (stats: dirtyLimitSleepMs).
   */
  setVcpuDirtyLimit(bytesPerSecond: number, vcpu?: number): void;

  /** Copy guest memory at gpa into dst (the VMM reading its own mapping of guest RAM). */
  readGuest(gpa: number, dst: Uint8Array): void;

  /** Copy src into guest memory at gpa (the VMM writing its own mapping of guest RAM). */
  writeGuest(gpa: number, src: Uint8Array): void;

  /** KVM_GET_* of every vCPU register set the guest needs. Only while paused. */
  saveVcpuState(vcpu: number): VcpuState;

  /** KVM_SET_* of the same. Only before the vCPUs first run, or while paused. */
  loadVcpuState(state: VcpuState): void;

  /** Counters (faults, splits, TLB flushes, mapped page sizes, ...). */
  stats(): VmStats;

  /**
   * The stage-2 mapping size of each 2 MiB of guest-physical memory in [gpa, gpa + bytes) (gpa
   * 2 MiB aligned): one MAPPING_* byte per 2 MiB. Read-only, never blocks a fault; for observers
   * (the dashboard). Absent where the engine cannot see its tables (kvm: the host kernel's).
   */
  mappingMap?(gpa: number, bytes: number): Uint8Array;

  /**
   * Resolves once the huge mappings dirty logging split have been re-formed after logging
   * stopped (soft engine: huge/recovery.ts). Absent where the host kernel does it (kvm).
   */
  hugeRecoveryIdle?(): Promise<void>;

  /** Stop vCPU threads, unmap everything, close the VM. Idempotent. */
  destroy(): Promise<void>;
}

/** A memslot request broke a KVM_SET_USER_MEMORY_REGION rule. */
export class MemslotError extends Error {
  constructor(
    readonly rule: 'alignment' | 'overlap' | 'size' | 'slot' | 'flags' | 'unknown-slot' | 'hva',
    message: string,
  ) {
    super(message);
    this.name = 'MemslotError';
  }
}

/** An engine cannot be used on this host; `missing` says exactly what is absent. */
export class EngineUnavailableError extends Error {
  constructor(
    readonly engine: EngineKind,
    readonly missing: string,
  ) {
    super(`${engine} engine unavailable: ${missing}`);
    this.name = 'EngineUnavailableError';
  }
}

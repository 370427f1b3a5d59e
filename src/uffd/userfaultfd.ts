// The addon's real userfaultfd (native/src/uffd.cc), typed: open with the API handshake,
// register, the resolving ioctls, reading events, and native reader threads.
//
// Concurrency: a Userfaultfd is a file descriptor; every method is one system call and may be
// used from any thread that has its own Userfaultfd object over the same fd (workers receive the
// fd number). The rules that keep waiters safe are the kernel's:
//   - a thread that touches a missing (MISSING) or unmapped-but-cached (MINOR) page of a
//     registered range sleeps in the kernel until a COPY / ZEROPAGE / CONTINUE over that page
//     wakes it (or a WAKE, where the page arrived with dontWake or by another path);
//   - a page is installed once: a second COPY of it fails with EEXIST and changes nothing, so
//     two resolvers racing for one page cannot both install it; copy() reports 'exists';
//   - every thread queued on the page is woken by the one resolve, however many faulted;
//   - a thread must never resolve a fault it takes itself (it is asleep): events are read and
//     resolved on other threads (NativeUffdHandler's pthreads, a worker, or the main thread while
//     only workers touch the memory).
// NativeUffdHandler's readers touch only source and alias memory, never registered memory.
import { loadAddon, isSysError, type KvmAddon } from '../kvm/addon.ts';
import { projectRoot } from '../util/worker.ts';

/** UFFDIO_API feature bits (linux/userfaultfd.h). */
export const UFFD_FEATURE = {
  MISSING_HUGETLBFS: 1n << 4n,
  MISSING_SHMEM: 1n << 5n,
  THREAD_ID: 1n << 8n,
  MINOR_HUGETLBFS: 1n << 9n,
  MINOR_SHMEM: 1n << 10n,
  EXACT_ADDRESS: 1n << 11n,
} as const;

export const UFFD_EVENT_PAGEFAULT = 0x12;
export const PAGEFAULT_FLAG_WRITE = 1 << 0;
export const PAGEFAULT_FLAG_MINOR = 1 << 2;
export const ENOENT = 2;
export const EEXIST = 17;

export type RegisterMode = 'missing' | 'minor';
const REGISTER_MODE_BITS: Record<RegisterMode, number> = { missing: 1, minor: 4 };

/** A failed userfaultfd operation: which one (`op`, e.g. 'UFFDIO_COPY') and the errno. */
export class UffdError extends Error {
  constructor(
    readonly op: string,
    readonly errno: number,
    readonly code: string,
    detail = '',
  ) {
    super(`${op}: ${code}${detail ? ` (${detail})` : ''}`);
    this.name = 'UffdError';
  }
}

export interface UffdEvent {
  event: number;
  /** PAGEFAULT_FLAG_* for page faults. */
  flags: number;
  /** Faulting address (page aligned unless EXACT_ADDRESS was granted). */
  address: number;
  /** Linux thread id of the faulting thread (UFFD_FEATURE_THREAD_ID), else 0. */
  ptid: number;
}

export type ResolveResult = 'installed' | 'exists';

/** A range the native readers resolve: registered `dst` is filled from `src` (via `alias` for MINOR). */
export interface HandlerRange {
  dst: number;
  len: number;
  src: number;
  alias?: number;
}

export type NativeHandlerOptions =
  | { mode: 'copy' | 'continue'; readers: number; delayUs: number; ranges: HandlerRange[]; pageSize?: number }
  /** Each fault event is passed to onFault on this (the starting) thread; nothing is resolved. */
  | { mode: 'notify'; readers: number; onFault: (address: number, ptid: number, t0Ns: number, flags: number) => void };

export interface NativeHandlerStats {
  events: number;
  resolved: number;
  /** Faults whose page was there already (EEXIST; followed by WAKE). */
  exists: number;
  errors: number;
  /** (ptid, ns from reading the event to resolving it, page address) triples, drained. */
  waits: Float64Array;
  error?: { op: string; errno: number; code: string };
}

/** The addon's uffd surface (native/src/uffd.cc). */
export interface UffdNative {
  uffdOpen(nonBlocking: boolean): { fd: number; via: string };
  uffdApi(fd: number, features: bigint): { features: bigint; ioctls: bigint };
  uffdRegister(fd: number, start: number, len: number, mode: number): bigint;
  uffdUnregister(fd: number, start: number, len: number): void;
  uffdCopy(fd: number, dst: number, src: number, len: number, dontWake: boolean, ok?: number[]): number;
  uffdZeropage(fd: number, dst: number, len: number, dontWake: boolean, ok?: number[]): number;
  uffdContinue(fd: number, dst: number, len: number, dontWake: boolean, ok?: number[]): number;
  uffdWake(fd: number, start: number, len: number): void;
  uffdRead(fd: number, max: number, timeoutMs: number): UffdEvent[];
  addressOf(a: ArrayBufferView): number;
  memfdMap(bytes: number, hugetlb: boolean): { fd: number; hva: number; buffer: SharedArrayBuffer; aliasHva: number; alias: SharedArrayBuffer };
  madvise(addr: number, len: number, advice: 'dontneed' | 'remove' | 'populate_write'): void;
  mincore(addr: number, len: number): Uint8Array;
  uffdHandlerStart(o: NativeHandlerOptions & { fd: number }): number;
  uffdHandlerStop(id: number): NativeHandlerStats;
  uffdHandlerWaits(id: number): Float64Array;
  uffdHandlerCounters(id: number): Omit<NativeHandlerStats, 'waits' | 'error'>;
  remapShared(hva: number, bytes: number): { aliasHva: number; alias: SharedArrayBuffer; resident: Uint8Array };
  close(fd: number): void;
  mmapGuest(bytes: number, backing: 'anonymous'): { hva: number; buffer: SharedArrayBuffer };
}

/** Load the addon with its uffd functions, or throw saying why not. */
export function uffdNative(root: string = projectRoot): UffdNative {
  const a = loadAddon(root) as (KvmAddon & Partial<UffdNative>) | null;
  if (!a) throw new UffdError('load addon', 0, 'ENOENT', 'the native addon is not built: run npm run build:addon');
  if (typeof a.uffdOpen !== 'function') throw new UffdError('load addon', 0, 'ENOSYS', 'the native addon predates userfaultfd: rebuild it (npm run build:addon)');
  return a as KvmAddon & UffdNative;
}

/** Run one addon call; a system-call error becomes a UffdError naming the op. */
export function sys<T>(op: string, f: () => T): T {
  try {
    return f();
  } catch (e) {
    if (isSysError(e)) throw new UffdError(e.syscall || op, e.errno, e.code, e.message);
    throw e;
  }
}

function errnoCode(errno: number): string {
  return errno === EEXIST ? 'EEXIST' : errno === ENOENT ? 'ENOENT' : `errno ${errno}`;
}

export interface UffdOpenOptions {
  /** Features wanted; those the kernel lacks are dropped (see `features` for what was granted). */
  features?: bigint;
  nonBlocking?: boolean;
  root?: string;
}

export class Userfaultfd {
  private closed = false;

  private constructor(
    readonly native: UffdNative,
    readonly fd: number,
    /** 'syscall' or '/dev/userfaultfd'. */
    readonly via: string,
    /** Features the handshake granted. */
    readonly features: bigint,
  ) {}

  /**
   * userfaultfd(2) (or /dev/userfaultfd), then UFFDIO_API. The API handshake may be done once
   * per fd, so what the kernel supports is asked on a throw-away fd first and only supported
   * features are requested.
   */
  static open(o: UffdOpenOptions = {}): Userfaultfd {
    const n = uffdNative(o.root);
    const want = o.features ?? UFFD_FEATURE.THREAD_ID | UFFD_FEATURE.MINOR_SHMEM | UFFD_FEATURE.MINOR_HUGETLBFS | UFFD_FEATURE.MISSING_SHMEM | UFFD_FEATURE.MISSING_HUGETLBFS;
    const probe = sys('userfaultfd', () => n.uffdOpen(true));
    let supported: bigint;
    try {
      supported = sys('UFFDIO_API', () => n.uffdApi(probe.fd, 0n)).features;
    } finally {
      n.close(probe.fd);
    }
    const { fd, via } = sys('userfaultfd', () => n.uffdOpen(o.nonBlocking ?? false));
    try {
      const granted = sys('UFFDIO_API', () => n.uffdApi(fd, want & supported)).features;
      return new Userfaultfd(n, fd, via, granted);
    } catch (e) {
      n.close(fd);
      throw e;
    }
  }

  /** The address of a buffer's first byte (a COPY source). */
  static addressOf(a: ArrayBufferView, root?: string): number {
    return uffdNative(root).addressOf(a);
  }

  has(feature: bigint): boolean {
    return (this.features & feature) !== 0n;
  }

  /** UFFDIO_REGISTER; returns the ioctls allowed on the range (bit _UFFDIO_*). */
  register(addr: number, len: number, modes: readonly RegisterMode[]): bigint {
    if (modes.length === 0) throw new RangeError('register: no mode given');
    const mode = modes.reduce((m, x) => m | REGISTER_MODE_BITS[x], 0);
    return sys('UFFDIO_REGISTER', () => this.native.uffdRegister(this.fd, addr, len, mode));
  }

  unregister(addr: number, len: number): void {
    sys('UFFDIO_UNREGISTER', () => this.native.uffdUnregister(this.fd, addr, len));
  }

  /** UFFDIO_COPY of len bytes from address src; 'exists' when the page was there (EEXIST). */
  copy(dst: number, src: number, len: number, dontWake = false): ResolveResult {
    return this.result('UFFDIO_COPY', sys('UFFDIO_COPY', () => this.native.uffdCopy(this.fd, dst, src, len, dontWake, [EEXIST])));
  }

  /** COPY from a JS buffer (e.g. one page fetched over the network). */
  copyFrom(dst: number, data: Uint8Array, dontWake = false): ResolveResult {
    return this.copy(dst, this.native.addressOf(data), data.length, dontWake);
  }

  zeropage(dst: number, len: number, dontWake = false): ResolveResult {
    return this.result('UFFDIO_ZEROPAGE', sys('UFFDIO_ZEROPAGE', () => this.native.uffdZeropage(this.fd, dst, len, dontWake, [EEXIST])));
  }

  /** UFFDIO_CONTINUE: map the page already in the page cache (written through another mapping). */
  continue(dst: number, len: number, dontWake = false): ResolveResult {
    return this.result('UFFDIO_CONTINUE', sys('UFFDIO_CONTINUE', () => this.native.uffdContinue(this.fd, dst, len, dontWake, [EEXIST])));
  }

  wake(addr: number, len: number): void {
    sys('UFFDIO_WAKE', () => this.native.uffdWake(this.fd, addr, len));
  }

  /** Wait up to timeoutMs for events and read at most max of them (on this thread). */
  readEvents(max = 16, timeoutMs = -1): UffdEvent[] {
    return sys('read userfaultfd', () => this.native.uffdRead(this.fd, max, timeoutMs));
  }

  /** Native reader threads on this uffd (see uffd.cc). Stop them before close(). */
  startHandler(o: NativeHandlerOptions): NativeUffdHandler {
    if (!Number.isInteger(o.readers) || o.readers < 1) throw new RangeError(`readers must be an integer >= 1, got ${o.readers}`);
    return new NativeUffdHandler(this.native, sys('uffdHandlerStart', () => this.native.uffdHandlerStart({ ...o, fd: this.fd })));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.native.close(this.fd);
  }

  private result(op: string, r: number): ResolveResult {
    if (r === -EEXIST) return 'exists';
    if (r < 0) throw new UffdError(op, -r, errnoCode(-r));
    return 'installed';
  }
}

export class NativeUffdHandler {
  private stopped: NativeHandlerStats | null = null;

  constructor(
    private readonly native: UffdNative,
    readonly id: number,
  ) {}

  /** (ptid, ns, page address) triples recorded since the last call. */
  drainWaits(): Float64Array {
    return this.stopped ? new Float64Array(0) : this.native.uffdHandlerWaits(this.id);
  }

  /** Counters so far, without stopping. */
  counters(): Omit<NativeHandlerStats, 'waits' | 'error'> {
    return this.stopped ?? this.native.uffdHandlerCounters(this.id);
  }

  /** Stop and join the readers; throws UffdError if any of them failed (op + errno). */
  stop(): NativeHandlerStats {
    if (!this.stopped) this.stopped = this.native.uffdHandlerStop(this.id);
    const e = this.stopped.error;
    if (e) throw new UffdError(e.op, e.errno, e.code, `a native uffd reader failed (${this.stopped.errors} errors)`);
    return this.stopped;
  }
}

/** Memory for MINOR faults: one memfd mapped twice (register `hva`, write through `alias`). */
export function sharedMemoryPair(bytes: number, hugetlb = false, root?: string): ReturnType<UffdNative['memfdMap']> {
  const n = uffdNative(root);
  return sys('memfdMap', () => n.memfdMap(bytes, hugetlb));
}

/** Private anonymous memory (MISSING faults), as a SharedArrayBuffer aliasing the mapping. */
export function anonymousMemory(bytes: number, root?: string): { hva: number; buffer: SharedArrayBuffer } {
  const n = uffdNative(root);
  return sys('mmap', () => n.mmapGuest(bytes, 'anonymous'));
}

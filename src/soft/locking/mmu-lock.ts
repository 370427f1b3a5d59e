// The MMU lock (kvm->mmu_lock): the one rwlock that serialises changes to the stage-2 table.
//
// Three modes, chosen when the VM is created and fixed for its life (stored in the shared words,
// so every thread that attaches agrees). A fault is either a RELAX (a write to a present,
// write-protected 4 KiB leaf: only W is added, by cmpxchg; the dirty-logging write-unprotect)
// or a MAP (anything else: install, split, collapse, remap).
//   'global-write' - every fault takes the lock for WRITE, relax and map alike (arm64 while
//                    mmu_lock was a spinlock): faults are fully serialised.
//   'global'       - MAP faults take it for WRITE, RELAX faults for READ (arm64 just before seed
//                    003's series, user_mem_abort's use_read_lock): relaxes run in parallel with
//                    each other, by cmpxchg, and never with a map or an exclusive holder.
//   'parallel'     - every fault takes it for READ and changes PTEs only by cmpxchg and
//                    break-before-make (seed 003); the vCPU's relax fast path takes no lock.
// faultLock() is the lock of a MAP fault, relaxLock() the lock of a RELAX fault; faultShared /
// relaxShared say whether Stage2PageTable ops under them must use cmpxchg (shared=true).
// exclusiveLock() is the write lock in every mode: for operations that must exclude faults
// (unmap, write-protect sweeps for dirty logging, destroy, memslot changes).
//
// Who may modify the stage-2 table: only a thread holding this lock (read: by cmpxchg only;
// write: anything), and in 'parallel' mode the lockless relax fast path (mmu/fault.ts). Lock-free
// readers (a vCPU filling its soft TLB) hold no lock; they are protected by RCU epochs instead
// (epoch.ts) and tolerate LOCKED entries (they fault and retry).
//
// exclusiveUnlock() runs the optional reclaim hook (the epoch domain's reclaim) after dropping
// the lock, so deferred table frees make progress at least as often as the VM takes the lock.

import type { MmuLockMode } from '../../vmm/engine.ts';
import { RwLock, type RwLockShared } from './rwlock.ts';
import { LockStallRecorder } from './lock-stall.ts';

export type { MmuLockMode };

export interface MmuLockShared {
  lock: RwLockShared;
  /** Word 0 of modeSab: the mode's index in MODE_CODES. */
  modeSab: SharedArrayBuffer;
  /** Fault-side lock waits (lock-stall.ts); absent in handles made before it existed. */
  stallSab?: SharedArrayBuffer;
}

const MODE_CODES: readonly MmuLockMode[] = ['global', 'parallel', 'global-write'];

export class MmuLock {
  readonly mode: MmuLockMode;
  /** Map-fault Stage2PageTable calls pass this as `shared`: true in 'parallel' mode. */
  readonly faultShared: boolean;
  /** Relax-fault Stage2PageTable calls pass this as `shared`: true unless 'global-write'. */
  readonly relaxShared: boolean;
  readonly rw: RwLock;
  /** Called after exclusiveUnlock() (e.g. epoch reclaim). */
  onExclusiveUnlock: (() => void) | undefined;
  /**
   * How long this thread's faults waited for the lock, recorded only when the try failed
   * (lock-stall.ts); every thread's handle writes its own row of the shared buffer.
   */
  readonly stalls: LockStallRecorder | null;

  private constructor(readonly shared: MmuLockShared) {
    this.rw = RwLock.attach(shared.lock);
    const mode = MODE_CODES[Atomics.load(new Int32Array(shared.modeSab), 0)];
    if (mode === undefined) throw new Error('MmuLock: unknown mode code in the shared words');
    this.mode = mode;
    this.faultShared = mode === 'parallel';
    this.relaxShared = mode !== 'global-write';
    this.stalls = shared.stallSab ? new LockStallRecorder(shared.stallSab) : null;
  }

  static create(mode: MmuLockMode): MmuLock {
    const sab = new SharedArrayBuffer(64);
    RwLock.create(sab, 0);
    const modeSab = new SharedArrayBuffer(4);
    const code = MODE_CODES.indexOf(mode);
    if (code < 0) throw new Error(`MmuLock: unknown mode '${mode}'`);
    Atomics.store(new Int32Array(modeSab), 0, code);
    return new MmuLock({ lock: { sab, offset: 0 }, modeSab, stallSab: LockStallRecorder.newBuffer() });
  }

  static attach(shared: MmuLockShared): MmuLock {
    return new MmuLock(shared);
  }

  /** Taken around a MAP fault: the read lock in 'parallel' mode, the write lock otherwise. */
  faultLock(): void {
    // Try first: only a failed try reads the clock (the contended path, lock-stall.ts).
    if (this.faultShared ? this.rw.tryReadLock() : this.rw.tryWriteLock()) return;
    this.waitTimed(this.faultShared);
  }

  /** The contended half of faultLock / relaxLock: block, and record how long. */
  private waitTimed(read: boolean): void {
    const t0 = performance.now();
    if (read) this.rw.readLock();
    else this.rw.writeLock();
    this.stalls?.record((performance.now() - t0) * 1e6);
  }

  faultUnlock(): void {
    if (this.faultShared) this.rw.readUnlock();
    else this.rw.writeUnlock();
  }

  /**
   * Taken around a RELAX fault (add W to a present 4 KiB leaf): the write lock in 'global-write'
   * mode, the read lock otherwise (in 'parallel' mode the vCPU's fast path skips even that).
   */
  relaxLock(): void {
    if (this.relaxShared ? this.rw.tryReadLock() : this.rw.tryWriteLock()) return;
    this.waitTimed(this.relaxShared);
  }

  /** relaxLock() if the lock is free right now; false (nothing taken) otherwise. Never waits. */
  tryRelaxLock(): boolean {
    return this.relaxShared ? this.rw.tryReadLock() : this.rw.tryWriteLock();
  }

  relaxUnlock(): void {
    if (this.relaxShared) this.rw.readUnlock();
    else this.rw.writeUnlock();
  }

  /** Excludes every fault and every other exclusive holder. */
  exclusiveLock(): void {
    this.rw.writeLock();
  }

  tryExclusiveLock(): boolean {
    return this.rw.tryWriteLock();
  }

  exclusiveUnlock(): void {
    this.rw.writeUnlock();
    this.onExclusiveUnlock?.();
  }

  /** The calling thread is inside faultLock() or relaxLock() (or holds the lock exclusively). */
  assertFaultHeld(): void {
    this.rw.assertHeld();
  }

  assertExclusiveHeld(): void {
    this.rw.assertWriteHeld();
  }

  /** Whether this thread holds the lock in the mode where PTE changes need no cmpxchg. */
  get holdsExclusive(): boolean {
    return this.rw.isWriteHeld;
  }
}

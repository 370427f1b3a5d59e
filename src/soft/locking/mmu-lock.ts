// The MMU lock (kvm->mmu_lock): the one rwlock that serialises changes to the stage-2 table.
//
// Two modes, chosen when the VM is created and fixed for its life (stored in the shared words,
// so every thread that attaches agrees):
//   'global'   - every stage-2 fault takes the lock for WRITE (KVM arm64 before the parallel
//                fault series): faults are serialised; Stage2PageTable ops run with shared=false.
//   'parallel' - faults take it for READ and change PTEs only by compare-and-exchange and
//                break-before-make (seed 003); Stage2PageTable ops run with shared=true.
// exclusiveLock() is the write lock in both modes: for operations that must exclude faults
// (unmap, write-protect sweeps for dirty logging, destroy, memslot changes).
//
// Who may modify the stage-2 table: only a thread holding this lock (read: by cmpxchg only;
// write: anything). Lock-free readers (a vCPU filling its soft TLB) hold no lock; they are
// protected by RCU epochs instead (epoch.ts) and tolerate LOCKED entries (they fault and retry).
//
// exclusiveUnlock() runs the optional reclaim hook (the epoch domain's reclaim) after dropping
// the lock, so deferred table frees make progress at least as often as the VM takes the lock.

import type { MmuLockMode } from '../../vmm/engine.ts';
import { RwLock, type RwLockShared } from './rwlock.ts';

export type { MmuLockMode };

export interface MmuLockShared {
  lock: RwLockShared;
  /** Word 0 of modeSab: 0 = global, 1 = parallel. */
  modeSab: SharedArrayBuffer;
}

export class MmuLock {
  readonly mode: MmuLockMode;
  /** Fault-path Stage2PageTable calls pass this as `shared`: true in parallel mode. */
  readonly faultShared: boolean;
  readonly rw: RwLock;
  /** Called after exclusiveUnlock() (e.g. epoch reclaim). */
  onExclusiveUnlock: (() => void) | undefined;

  private constructor(readonly shared: MmuLockShared) {
    this.rw = RwLock.attach(shared.lock);
    this.mode = Atomics.load(new Int32Array(shared.modeSab), 0) === 1 ? 'parallel' : 'global';
    this.faultShared = this.mode === 'parallel';
  }

  static create(mode: MmuLockMode): MmuLock {
    const sab = new SharedArrayBuffer(64);
    RwLock.create(sab, 0);
    const modeSab = new SharedArrayBuffer(4);
    Atomics.store(new Int32Array(modeSab), 0, mode === 'parallel' ? 1 : 0);
    return new MmuLock({ lock: { sab, offset: 0 }, modeSab });
  }

  static attach(shared: MmuLockShared): MmuLock {
    return new MmuLock(shared);
  }

  /** Taken around a stage-2 fault: write lock in 'global' mode, read lock in 'parallel' mode. */
  faultLock(): void {
    if (this.faultShared) this.rw.readLock();
    else this.rw.writeLock();
  }

  faultUnlock(): void {
    if (this.faultShared) this.rw.readUnlock();
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

  /** The calling thread is inside faultLock() (or holds the lock exclusively). */
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

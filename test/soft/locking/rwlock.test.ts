import { describe, it, expect } from 'vitest';
import { RwLock } from '../../../src/soft/locking/rwlock.ts';
import { MmuLock } from '../../../src/soft/locking/mmu-lock.ts';

describe('RwLock (one thread, several handles)', () => {
  it('readers share, a writer excludes everyone', () => {
    const a = RwLock.create();
    const b = RwLock.attach(a.shared);
    const c = RwLock.attach(a.shared);
    a.readLock();
    expect(b.tryReadLock()).toBe(true);
    expect(c.tryWriteLock()).toBe(false);
    expect(a.rawState().readers).toBe(2);
    a.readUnlock();
    b.readUnlock();
    expect(c.tryWriteLock()).toBe(true);
    expect(a.tryReadLock()).toBe(false);
    expect(a.rawState()).toEqual({ readers: 0, pendingWriters: 0, writer: true, waiters: 0 });
    c.writeUnlock();
    expect(a.rawState()).toEqual({ readers: 0, pendingWriters: 0, writer: false, waiters: 0 });
  });

  it('a pending writer blocks new readers', () => {
    const a = RwLock.create();
    const w = new Int32Array(a.shared.sab);
    Atomics.add(w, 0, 1 << 20); // what writeLock() does before waiting for readers to leave
    const b = RwLock.attach(a.shared);
    expect(b.tryReadLock()).toBe(false);
    expect(a.rawState().readers).toBe(0);
    Atomics.sub(w, 0, 1 << 20);
    expect(b.tryReadLock()).toBe(true);
    b.readUnlock();
  });

  it('asserts and misuse', () => {
    const a = RwLock.create();
    expect(() => a.assertHeld()).toThrow(/not held/);
    expect(() => a.readUnlock()).toThrow();
    a.readLock();
    a.assertReadHeld();
    expect(() => a.assertWriteHeld()).toThrow();
    expect(() => a.readLock()).toThrow(/already holds/);
    a.readUnlock();
    a.writeLock();
    a.assertWriteHeld();
    a.assertHeld();
    expect(() => a.writeLock()).toThrow(/already holds/);
    a.writeUnlock();
    expect(() => a.writeUnlock()).toThrow();
  });
});

describe('MmuLock', () => {
  it('global-write takes the write lock for every fault; global for map faults only, the read lock for relax faults; parallel the read lock', () => {
    const w = MmuLock.create('global-write');
    const w2 = MmuLock.attach(w.shared);
    expect(w2.mode).toBe('global-write');
    expect([w2.faultShared, w2.relaxShared]).toEqual([false, false]);
    w.relaxLock();
    expect(w2.tryRelaxLock()).toBe(false);
    w.assertExclusiveHeld();
    w.relaxUnlock();

    const g = MmuLock.create('global');
    const g2 = MmuLock.attach(g.shared);
    expect(g2.mode).toBe('global');
    expect([g2.faultShared, g2.relaxShared]).toEqual([false, true]);
    g.faultLock();
    expect(g2.rw.tryReadLock()).toBe(false);
    expect(g2.tryRelaxLock()).toBe(false);
    g.assertExclusiveHeld();
    g.faultUnlock();
    // Relax faults share the lock with each other, never with a map fault or an exclusive holder.
    g.relaxLock();
    expect(g2.tryRelaxLock()).toBe(true);
    g2.assertFaultHeld();
    expect(MmuLock.attach(g.shared).tryExclusiveLock()).toBe(false);
    g2.relaxUnlock();
    g.relaxUnlock();

    const p = MmuLock.create('parallel');
    const p2 = MmuLock.attach(p.shared);
    expect(p2.mode).toBe('parallel');
    expect(p2.faultShared).toBe(true);
    p.faultLock();
    p2.faultLock();
    expect(() => p.assertExclusiveHeld()).toThrow();
    p.assertFaultHeld();
    expect(MmuLock.attach(p.shared).tryExclusiveLock()).toBe(false);
    p.faultUnlock();
    p2.faultUnlock();
    let reclaimed = 0;
    p.onExclusiveUnlock = () => reclaimed++;
    p.exclusiveLock();
    p.exclusiveUnlock();
    expect(reclaimed).toBe(1);
  });
});

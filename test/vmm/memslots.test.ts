import { describe, it, expect } from 'vitest';
import { MemslotSet, gfnToHva, KVM_USER_MEM_SLOTS } from '../../src/vmm/memslots.ts';
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemslotError, type MemoryRegion } from '../../src/vmm/engine.ts';

const MiB = 1 << 20;
const HVA = 0x7f00_0000_0000;

function region(over: Partial<MemoryRegion> = {}): MemoryRegion {
  return { slot: 1, flags: 0, guestPhysAddr: 0x1_0000_0000, memorySize: 4 * MiB, userspaceAddr: HVA, ...over };
}

function rule(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MemslotError);
    return (e as MemslotError).rule;
  }
  throw new Error('expected a MemslotError');
}

describe('MemslotSet: create, lookups, info', () => {
  it('creates slots, keeps them sorted by gfn, finds by id and by gfn', () => {
    let set = MemslotSet.empty();
    expect(set.generation).toBe(0);
    const a = set.apply(region({ slot: 5, guestPhysAddr: 0x4000_0000 }));
    expect(a.change).toBe('create');
    expect(a.old).toBeUndefined();
    set = a.set;
    set = set.apply(region({ slot: 2, guestPhysAddr: 0, memorySize: 2 * MiB, userspaceAddr: HVA + 16 * MiB }), { internal: true }).set;
    expect(set.generation).toBe(2);
    expect(set.slots.map((s) => s.id)).toEqual([2, 5]);
    expect(set.bySlot(5)).toMatchObject({ baseGfn: 0x40000, npages: 1024, userspaceAddr: HVA, flags: 0, internal: false });
    expect(set.bySlot(2)!.internal).toBe(true);
    expect(set.bySlot(9)).toBeUndefined();
    expect(set.findByGfn(0)!.id).toBe(2);
    expect(set.findByGfn(511)!.id).toBe(2);
    expect(set.findByGfn(512)).toBeUndefined();
    expect(set.findByGfn(0x40000 + 1023)!.id).toBe(5);
    expect(set.findByGfn(0x40000 + 1024)).toBeUndefined();
    expect(gfnToHva(set.bySlot(5)!, 0x40003)).toBe(HVA + 3 * 4096);
    expect(set.toInfo()).toEqual([
      { slot: 2, flags: 0, guestPhysAddr: 0, memorySize: 2 * MiB, userspaceAddr: HVA + 16 * MiB, pages: 512, internal: true },
      { slot: 5, flags: 0, guestPhysAddr: 0x4000_0000, memorySize: 4 * MiB, userspaceAddr: HVA, pages: 1024, internal: false },
    ]);
  });

  it('findByGfn works across many slots', () => {
    let set = MemslotSet.empty();
    for (let i = 99; i >= 0; i--) set = set.apply(region({ slot: i, guestPhysAddr: i * 8 * MiB, memorySize: 4 * MiB, userspaceAddr: HVA + i * 4 * MiB })).set;
    for (let i = 0; i < 100; i++) {
      expect(set.findByGfn(i * 2048)!.id).toBe(i);
      expect(set.findByGfn(i * 2048 + 1023)!.id).toBe(i);
      expect(set.findByGfn(i * 2048 + 1024)).toBeUndefined();
    }
  });

  it('sets are immutable: applying leaves the old set untouched', () => {
    const s0 = MemslotSet.empty();
    const s1 = s0.apply(region()).set;
    const s2 = s1.apply(region({ flags: KVM_MEM_LOG_DIRTY_PAGES })).set;
    expect(s0.slots).toHaveLength(0);
    expect(s1.bySlot(1)!.flags).toBe(0);
    expect(s2.bySlot(1)!.flags).toBe(KVM_MEM_LOG_DIRTY_PAGES);
    expect(Object.isFrozen(s1.slots)).toBe(true);
    expect(Object.isFrozen(s1.bySlot(1))).toBe(true);
  });
});

describe('MemslotSet: changes to existing slots', () => {
  const base = MemslotSet.empty().apply(region()).set;

  it('flags-only toggles dirty logging', () => {
    const r = base.apply(region({ flags: KVM_MEM_LOG_DIRTY_PAGES }));
    expect(r.change).toBe('flags-only');
    expect(r.old!.flags).toBe(0);
    expect(r.new!.flags).toBe(KVM_MEM_LOG_DIRTY_PAGES);
    expect(r.set.generation).toBe(base.generation + 1);
  });

  it('move changes guestPhysAddr and keeps internal', () => {
    const internal = MemslotSet.empty().apply(region(), { internal: true }).set;
    const r = internal.apply(region({ guestPhysAddr: 0x2_0000_0000 }));
    expect(r.change).toBe('move');
    expect(r.new).toMatchObject({ baseGfn: 0x200000, internal: true });
    expect(r.set.findByGfn(0x100000)).toBeUndefined();
    expect(r.set.findByGfn(0x200000)!.id).toBe(1);
  });

  it('an identical region is no change and keeps the set', () => {
    const r = base.apply(region());
    expect(r.change).toBe('none');
    expect(r.set).toBe(base);
  });

  it('delete with memorySize 0; deleting a missing slot fails', () => {
    const r = base.apply(region({ memorySize: 0 }));
    expect(r.change).toBe('delete');
    expect(r.old!.id).toBe(1);
    expect(r.set.slots).toHaveLength(0);
    expect(rule(() => r.set.apply(region({ memorySize: 0 })))).toBe('unknown-slot');
    expect(rule(() => base.apply(region({ slot: 7, memorySize: 0 })))).toBe('unknown-slot');
  });

  it('changing size or userspaceAddr is invalid; toggling READONLY is invalid', () => {
    expect(rule(() => base.apply(region({ memorySize: 8 * MiB })))).toBe('size');
    expect(rule(() => base.apply(region({ userspaceAddr: HVA + 4096 })))).toBe('hva');
    expect(rule(() => base.apply(region({ flags: KVM_MEM_READONLY })))).toBe('flags');
    const ro = MemslotSet.empty().apply(region({ flags: KVM_MEM_READONLY })).set;
    expect(rule(() => ro.apply(region({ flags: 0 })))).toBe('flags');
    expect(ro.apply(region({ flags: KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES })).change).toBe('flags-only');
  });
});

describe('MemslotSet: validation rules', () => {
  const empty = MemslotSet.empty();

  it('flags outside LOG_DIRTY_PAGES | READONLY', () => {
    expect(rule(() => empty.apply(region({ flags: 1 << 2 })))).toBe('flags');
    expect(rule(() => MemslotSet.empty({ readonlySupported: false }).apply(region({ flags: KVM_MEM_READONLY })))).toBe('flags');
  });

  it('alignment of size, gpa and hva', () => {
    expect(rule(() => empty.apply(region({ memorySize: 4096 + 1 })))).toBe('alignment');
    expect(rule(() => empty.apply(region({ guestPhysAddr: 0x1000_0800 })))).toBe('alignment');
    expect(rule(() => empty.apply(region({ userspaceAddr: HVA + 12 })))).toBe('alignment');
  });

  it('hva range must stay inside user space', () => {
    expect(rule(() => empty.apply(region({ userspaceAddr: 2 ** 47 - 4096, memorySize: 8192 })))).toBe('hva');
    expect(rule(() => empty.apply(region({ userspaceAddr: -4096 })))).toBe('hva');
  });

  it('slot id below the limit', () => {
    expect(rule(() => empty.apply(region({ slot: KVM_USER_MEM_SLOTS })))).toBe('slot');
    expect(empty.apply(region({ slot: KVM_USER_MEM_SLOTS - 1 })).change).toBe('create');
    expect(rule(() => MemslotSet.empty({ maxSlots: 4 }).apply(region({ slot: 4 })))).toBe('slot');
    expect(rule(() => empty.apply(region({ slot: -1 })))).toBe('slot');
  });

  it('gpa + size must not overflow and must fit the guest physical address bits', () => {
    expect(rule(() => empty.apply(region({ guestPhysAddr: 2 ** 53 - 4096, memorySize: 8192 })))).toBe('size');
    expect(rule(() => empty.apply(region({ guestPhysAddr: 2 ** 48 - 4096, memorySize: 8192 })))).toBe('size');
    expect(empty.apply(region({ guestPhysAddr: 2 ** 48 - 8192, memorySize: 8192 })).change).toBe('create');
    expect(rule(() => MemslotSet.empty({ maxGpaBits: 36 }).apply(region({ guestPhysAddr: 2 ** 36 }))))
      .toBe('size');
  });

  it('too many pages in one slot', () => {
    expect(rule(() => MemslotSet.empty({ maxPagesPerSlot: 100 }).apply(region({ memorySize: 101 * 4096 })))).toBe('size');
  });

  it('create and move must not overlap another slot', () => {
    const two = empty
      .apply(region({ slot: 1, guestPhysAddr: 0, memorySize: 4 * MiB }))
      .set.apply(region({ slot: 2, guestPhysAddr: 8 * MiB, memorySize: 4 * MiB, userspaceAddr: HVA + 64 * MiB })).set;
    expect(rule(() => two.apply(region({ slot: 3, guestPhysAddr: 4 * MiB - 4096, memorySize: 8192 })))).toBe('overlap');
    expect(rule(() => two.apply(region({ slot: 3, guestPhysAddr: 2 * MiB, memorySize: 16 * MiB })))).toBe('overlap');
    expect(two.apply(region({ slot: 3, guestPhysAddr: 4 * MiB, memorySize: 4 * MiB })).change).toBe('create');
    expect(rule(() => two.apply(region({ slot: 1, guestPhysAddr: 6 * MiB, memorySize: 4 * MiB })))).toBe('overlap');
    // moving onto part of its own old range is fine
    expect(two.apply(region({ slot: 1, guestPhysAddr: 2 * MiB, memorySize: 4 * MiB })).change).toBe('move');
  });

  it('messages name the slot and the values', () => {
    try {
      empty.apply(region({ slot: 3, guestPhysAddr: 0x1234 }));
      expect.unreachable();
    } catch (e) {
      expect((e as Error).message).toMatch(/slot 3/);
      expect((e as Error).message).toMatch(/0x1234/);
    }
  });
});

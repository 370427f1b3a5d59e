import { describe, it, expect } from 'vitest';
import { MemslotSet } from '../../src/vmm/memslots.ts';
import { guestSegments } from '../../src/vmm/guest-segments.ts';
import { VmError } from '../../src/vmm/errors.ts';
import { resolveVmConfig } from '../../src/vmm/vm-config.ts';

function twoSlots(): MemslotSet {
  let s = MemslotSet.empty();
  s = s.apply({ slot: 1, flags: 0, guestPhysAddr: 0x10000, memorySize: 0x2000, userspaceAddr: 0x7000_0000 }).set;
  s = s.apply({ slot: 2, flags: 0, guestPhysAddr: 0x12000, memorySize: 0x1000, userspaceAddr: 0x9000_0000 }).set;
  return s;
}

describe('guestSegments: one gpa -> (slot, offset, hva) segmenter for both engines', () => {
  it('cuts a range at memslot ends and names slot, offset and hva', () => {
    const segs = guestSegments(twoSlots(), 0x11ff0, 0x20);
    expect(segs.map((g) => [g.slot.id, g.slotOffset, g.hva, g.done, g.bytes])).toEqual([
      [1, 0x1ff0, 0x7000_1ff0, 0, 0x10],
      [2, 0, 0x9000_0000, 0x10, 0x10],
    ]);
  });

  it('throws VmError(address) before visiting anything when a byte has no slot', () => {
    let e: unknown;
    try {
      guestSegments(twoSlots(), 0x12ff0, 0x20);
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(VmError);
    expect((e as VmError).kind).toBe('address');
    expect((e as VmError).message).toMatch(/gpa 0x13000 is in no memslot/);
  });
});

describe('resolveVmConfig: one default per setting', () => {
  it('defaults', () => {
    expect(resolveVmConfig({}, { manualDirtyLogProtect: true })).toEqual({ manualDirtyLogProtect: true, dirtyRingEntries: 0, lock: 'parallel', guestPageSize: 2097152 });
    expect(resolveVmConfig({ guestPageSize: 4096 }, { manualDirtyLogProtect: false }).manualDirtyLogProtect).toBe(false);
  });
});

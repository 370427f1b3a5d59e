// The one segmenter from guest physical addresses to memslots, for both engines: a VMM access to
// [gpa, gpa + length) is cut where memslots end, and each piece is named by (slot, offset in the
// slot, hva). A byte in no memslot throws VmError('address') before anything is visited, so a
// copy never half-happens.
//
// Pure: reads the MemslotSet it is given (an immutable generation, see memslots.ts).
import { PAGE_SIZE } from './engine.ts';
import { VmError } from './errors.ts';
import type { Memslot, MemslotSet } from './memslots.ts';

export interface GuestSegment {
  slot: Memslot;
  /** Byte offset of the piece within the slot. */
  slotOffset: number;
  /** Host virtual address of the piece (the slot's userspaceAddr + slotOffset). */
  hva: number;
  /** Offset of the piece within the caller's buffer. */
  done: number;
  bytes: number;
}

/** Cut [gpa, gpa + length) at memslot boundaries; throws before visiting if any byte has no slot. */
export function guestSegments(slots: MemslotSet, gpa: number, length: number): GuestSegment[] {
  const out: GuestSegment[] = [];
  let done = 0;
  while (done < length) {
    const at = gpa + done;
    const s = slots.findByGfn(Math.floor(at / PAGE_SIZE));
    if (!s) throw new VmError('address', `gpa 0x${at.toString(16)} is in no memslot`);
    const slotStart = s.baseGfn * PAGE_SIZE;
    const bytes = Math.min(length - done, slotStart + s.npages * PAGE_SIZE - at);
    out.push({ slot: s, slotOffset: at - slotStart, hva: s.userspaceAddr + (at - slotStart), done, bytes });
    done += bytes;
  }
  return out;
}

// The guest memory shape a stream is checked against: which memslots exist and how many 4 KiB
// pages each holds. The receiver builds it from CONFIG's memslots before it accepts any page; a
// RAM, ZERO or POSTCOPY_REQUEST record naming anything outside it is rejected.

import { MAX_CONFIG_BYTES, MigrationStreamError, type StreamConfig } from './format.ts';

export interface SlotPages {
  slot: number;
  pages: number;
}

const MAX_SLOT_PAGES = 2 ** 32; // firstPage and count are u32 on the wire
const MAX_SLOTS = 4096;

export class StreamLayout {
  private readonly pagesBySlot = new Map<number, number>();
  readonly slots: readonly SlotPages[];
  readonly totalPages: number;

  constructor(slots: readonly SlotPages[]) {
    if (slots.length > MAX_SLOTS) {
      throw new MigrationStreamError('bad-config', `CONFIG memslots: ${slots.length} slots, at most ${MAX_SLOTS}`);
    }
    let total = 0;
    const copy: SlotPages[] = [];
    for (const [i, s] of slots.entries()) {
      if (s === null || typeof s !== 'object') {
        throw new MigrationStreamError('bad-config', `CONFIG memslots[${i}] is not an object`);
      }
      const { slot, pages } = s;
      if (!Number.isInteger(slot) || slot < 0 || slot > 0xffffffff) {
        throw new MigrationStreamError('bad-config', `CONFIG memslots[${i}].slot = ${String(slot)}: not a u32`);
      }
      if (!Number.isInteger(pages) || pages < 0 || pages > MAX_SLOT_PAGES) {
        throw new MigrationStreamError('bad-config', `CONFIG memslots[${i}].pages = ${String(pages)}: not in 0..2^32`);
      }
      if (this.pagesBySlot.has(slot)) {
        throw new MigrationStreamError('bad-config', `CONFIG memslots[${i}].slot = ${slot}: duplicate slot`);
      }
      this.pagesBySlot.set(slot, pages);
      copy.push({ slot, pages });
      total += pages;
    }
    this.slots = copy;
    this.totalPages = total;
  }

  /** Pages in `slot`, or undefined when the slot does not exist. */
  pagesOf(slot: number): number | undefined {
    return this.pagesBySlot.get(slot);
  }

  /** Throw unless [firstPage, firstPage+count) lies inside `slot`; `what` names the record. */
  checkRange(what: string, slot: number, firstPage: number, count: number): void {
    const pages = this.pagesBySlot.get(slot);
    if (pages === undefined) {
      throw new MigrationStreamError('out-of-range', `${what}: slot ${slot} is not a memslot of this VM`);
    }
    if (count < 1 || firstPage + count > pages) {
      throw new MigrationStreamError(
        'out-of-range',
        `${what}: slot ${slot} firstPage ${firstPage} count ${count} outside the slot's ${pages} pages`,
      );
    }
  }

  /** Build from a parsed CONFIG object (anything JSON.parse produced). */
  static fromConfig(config: unknown): StreamLayout {
    if (config === null || typeof config !== 'object' || Array.isArray(config)) {
      throw new MigrationStreamError('bad-config', 'CONFIG is not a JSON object');
    }
    const memslots = (config as Partial<StreamConfig>).memslots;
    if (!Array.isArray(memslots)) {
      throw new MigrationStreamError('bad-config', 'CONFIG.memslots is missing or not an array');
    }
    return new StreamLayout(memslots as SlotPages[]);
  }
}

/** JSON.parse bounded and typed: a bad byte sequence becomes a MigrationStreamError. */
export function parseJsonPayload(what: string, bytes: Uint8Array, maxBytes = MAX_CONFIG_BYTES): unknown {
  if (bytes.length > maxBytes) {
    throw new MigrationStreamError('oversize', `${what}: ${bytes.length} bytes of JSON, at most ${maxBytes}`);
  }
  let text: string;
  try {
    text = jsonDecoder.decode(bytes);
  } catch {
    throw new MigrationStreamError('bad-json', `${what}: payload is not valid UTF-8`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new MigrationStreamError('bad-json', `${what}: payload is not valid JSON (${(e as Error).message})`);
  }
}

const jsonDecoder = new TextDecoder('utf-8', { fatal: true });

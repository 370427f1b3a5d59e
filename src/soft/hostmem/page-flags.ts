// Per-frame flag bits ("struct page" flags) kept in HostMemory's shared flags array.
//
// PG_VALID means the pfn has a struct page (Linux's pfn_valid). Holes and device MMIO ranges have
// no struct page: nothing else in their flag word may be read or trusted.

/** The pfn has a struct page (pfn_valid). */
export const PG_VALID = 1 << 0;
/** PageReserved: not ordinary RAM owned by the allocator (boot-reserved or driver-owned). */
export const PG_RESERVED = 1 << 1;
/** First frame of a 2 MiB compound frame; its refcount is the compound's. */
export const PG_COMPOUND_HEAD = 1 << 2;
/** Frames 1..511 of a compound frame; the head is `pfn & ~(HUGE_FRAME_PAGES - 1)`. */
export const PG_COMPOUND_TAIL = 1 << 3;

/** Frames in a 2 MiB compound frame (order 9). Compound frames are always 512-aligned. */
export const HUGE_FRAME_PAGES = 512;
export const HUGE_FRAME_SHIFT = 9;
export const HUGE_FRAME_BYTES = HUGE_FRAME_PAGES * 4096;

/** Frames per data window (1 GiB): one SharedArrayBuffer each. */
export const WINDOW_SHIFT = 18;
export const WINDOW_FRAMES = 1 << WINDOW_SHIFT;
export const WINDOW_MASK = WINDOW_FRAMES - 1;
/** Int32 words per 4 KiB frame. */
export const FRAME_WORDS = 1024;
export const FRAME_WORDS_SHIFT = 10;

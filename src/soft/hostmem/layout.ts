// The host's physical memory map, as firmware (e820) and drivers leave it.
//
// A layout is a list of pfn regions; any pfn inside [0, totalFrames) that no region covers is a
// hole (no struct page). Kinds:
//   ram       ordinary RAM handed out by the frame allocator (pfn_valid, not reserved)
//   reserved  valid frames with PG_RESERVED: boot-reserved or RAM a driver took over and maps to
//             userspace with remap_pfn_range (VM_PFNMAP). Real RAM, but never refcounted.
//   mmio      device BARs: no struct page (pfn_valid false), mapped only through VM_PFNMAP
//   hole      no struct page, nothing behind it

import { HUGE_FRAME_PAGES } from './page-flags.ts';

export type PhysRegionKind = 'ram' | 'reserved' | 'mmio' | 'hole';

export interface PhysRegion {
  kind: PhysRegionKind;
  startPfn: number;
  frames: number;
}

export interface HostMemoryLayout {
  /** Guest RAM the host must be able to back; the default layout adds headroom. */
  ramBytes?: number;
  /** Extra RAM frames on top of ramBytes (default: ramBytes/8 + 128 MiB). */
  headroomFrames?: number;
  /** An explicit physical map; when given, ramBytes and headroomFrames are ignored. */
  regions?: PhysRegion[];
}

/** Where the default layout puts its non-RAM regions (tests and the engine may rely on these). */
export const DEFAULT_RESERVED_START_PFN = 0;
export const DEFAULT_RESERVED_FRAMES = 512; // one 2 MiB driver-owned block, every subpage reserved
export const DEFAULT_HOLE_START_PFN = 512;
export const DEFAULT_HOLE_FRAMES = 512;
export const DEFAULT_MMIO_START_PFN = 1024;
export const DEFAULT_MMIO_FRAMES = 4096; // a 16 MiB device BAR
export const DEFAULT_RAM_START_PFN = 5120; // 2 MiB aligned, so RAM splits into whole compound frames

export class HostLayoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HostLayoutError';
  }
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/**
 * A small machine: a driver-owned reserved block at pfn 0 (so pfn 0 is never a RAM frame), a hole,
 * a device BAR, then RAM for `ramBytes` plus headroom (allocator slack: per-thread chunks, THP
 * alignment, the VMM's own buffers).
 */
export function defaultHostLayout(ramBytes: number, headroomFrames?: number): PhysRegion[] {
  if (!Number.isSafeInteger(ramBytes) || ramBytes < 0) throw new HostLayoutError(`ramBytes must be a non-negative integer, got ${ramBytes}`);
  const guestFrames = Math.ceil(ramBytes / 4096);
  const headroom = headroomFrames ?? Math.ceil(guestFrames / 8) + 32768;
  const ramFrames = roundUp(guestFrames + headroom, HUGE_FRAME_PAGES);
  return [
    { kind: 'reserved', startPfn: DEFAULT_RESERVED_START_PFN, frames: DEFAULT_RESERVED_FRAMES },
    { kind: 'hole', startPfn: DEFAULT_HOLE_START_PFN, frames: DEFAULT_HOLE_FRAMES },
    { kind: 'mmio', startPfn: DEFAULT_MMIO_START_PFN, frames: DEFAULT_MMIO_FRAMES },
    { kind: 'ram', startPfn: DEFAULT_RAM_START_PFN, frames: ramFrames },
  ];
}

/** Validate a layout and return its regions sorted by pfn plus the total frame count. */
export function resolveLayout(layout: HostMemoryLayout): { regions: PhysRegion[]; totalFrames: number } {
  const regions = (layout.regions ?? defaultHostLayout(layout.ramBytes ?? 0, layout.headroomFrames))
    .map((r) => ({ ...r }))
    .sort((a, b) => a.startPfn - b.startPfn);
  let end = 0;
  for (const r of regions) {
    if (!Number.isSafeInteger(r.startPfn) || r.startPfn < 0 || !Number.isSafeInteger(r.frames) || r.frames < 0) {
      throw new HostLayoutError(`bad ${r.kind} region: startPfn ${r.startPfn}, frames ${r.frames}`);
    }
    if (r.startPfn < end) throw new HostLayoutError(`${r.kind} region at pfn ${r.startPfn} overlaps the region ending at pfn ${end}`);
    end = r.startPfn + r.frames;
  }
  // pte values are pfn + 1 in an Int32Array; keep every pfn well inside that.
  if (end >= 2 ** 30) throw new HostLayoutError(`physical map of ${end} frames is larger than 4 TiB`);
  if (end === 0) throw new HostLayoutError('physical map is empty');
  return { regions, totalFrames: end };
}

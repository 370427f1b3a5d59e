// Where the kvm engine's own guest memory lives and what goes in it. The engine keeps guest
// code, stacks and guest page tables in one memslot of its own (reported with internal: true),
// below 4 GiB and far from DEFAULT_TEST_MEM_GPA (4 GiB) where the VMM puts test memory:
//
//   INTERNAL_GPA + 0x0000  GDT (read by nothing while the guest reloads no segment; kept valid)
//   INTERNAL_GPA + 0x0800  TSS (TR must point at a 64-bit TSS for VM entry) and its I/O
//                          permission bitmap, which lets CPL 3 code `out` to our ports
//   INTERNAL_GPA + 0x1000  workload code (one routine shared by all vCPUs)
//   INTERNAL_GPA + 0x2000  one 4 KiB stack per vCPU
//   after the stacks        guest page tables (identity map: gva == gpa)
// The slot's size is rounded up to 2 MiB so the region is mapped with 2 MiB guest pages.
import type { GuestPageSize } from '../../vmm/engine.ts';
import { buildIdentityPageTables, type PageTables } from './page-tables.ts';

/** Memslot id of the engine's internal slot: far above any slot a VMM uses. */
export const INTERNAL_SLOT = 32000;
export const INTERNAL_GPA = 0xc000_0000;
export const GDT_OFFSET = 0x0;
export const TSS_OFFSET = 0x800;
export const CODE_OFFSET = 0x1000;
export const CODE_MAX_BYTES = 0x1000;
export const STACKS_OFFSET = 0x2000;
export const STACK_BYTES = 0x1000;
const HUGE = 2 * 1024 * 1024;

export interface InternalLayout {
  gpa: number;
  bytes: number;
  codeGpa: number;
  stackTop(vcpu: number): number;
  tables: PageTables;
}

export function planInternalMemory(vcpus: number, testGpa: number, testBytes: number, guestPageSize: GuestPageSize): InternalLayout {
  const tablesGpa = INTERNAL_GPA + STACKS_OFFSET + vcpus * STACK_BYTES;
  // The internal region's size depends on the tables and the tables map the internal region:
  // plan with a generous 2 MiB-rounded guess, grow until it holds.
  let bytes = HUGE;
  for (;;) {
    const tables = buildIdentityPageTables(tablesGpa, [
      { gpa: INTERNAL_GPA, bytes, pageSize: HUGE },
      { gpa: testGpa, bytes: testBytes, pageSize: guestPageSize },
    ]);
    const need = tablesGpa + tables.pages.size * 4096 - INTERNAL_GPA;
    if (need <= bytes) {
      return {
        gpa: INTERNAL_GPA,
        bytes,
        codeGpa: INTERNAL_GPA + CODE_OFFSET,
        stackTop: (v) => INTERNAL_GPA + STACKS_OFFSET + (v + 1) * STACK_BYTES,
        tables,
      };
    }
    bytes = Math.ceil(need / HUGE) * HUGE;
  }
}

/** Selectors of writeGdt's descriptors (user ones with RPL 3). */
export const SEL = { kernelCode: 0x08, kernelData: 0x10, tss: 0x18, userCode: 0x2b, userData: 0x33 } as const;
export const GDT_LIMIT = 0x37;
/** TSS limit covering the 0x68-byte TSS and an I/O bitmap for ports 0..IO_BITMAP_PORTS-1. */
export const IO_BITMAP_PORTS = 0x600;
export const TSS_LIMIT = 0x68 + IO_BITMAP_PORTS / 8; // includes the trailing 0xff byte

/**
 * A flat 64-bit GDT: null, kernel code (0x8), kernel data (0x10), 64-bit TSS descriptor (0x18,
 * 16 bytes), user code (0x28), user data (0x30).
 */
export function writeGdt(mem: DataView, offset: number, tssBase: number): void {
  mem.setBigUint64(offset + 0x08, 0x00af9b000000ffffn, true); // code: L=1, P, DPL0, exec/read
  mem.setBigUint64(offset + 0x10, 0x00cf93000000ffffn, true); // data: G, D/B, P, read/write
  const limit = 0x67n;
  const base = BigInt(tssBase);
  const low = limit | ((base & 0xffffffn) << 16n) | (0x8bn << 40n) | (((base >> 24n) & 0xffn) << 56n);
  mem.setBigUint64(offset + 0x18, low, true);
  mem.setBigUint64(offset + 0x20, base >> 32n, true);
  mem.setBigUint64(offset + 0x28, 0x00affb000000ffffn, true); // user code: L=1, P, DPL3
  mem.setBigUint64(offset + 0x30, 0x00cff3000000ffffn, true); // user data: P, DPL3
}

/** The TSS's I/O permission bitmap: every port below IO_BITMAP_PORTS allowed (bits clear). */
export function writeTssIoBitmap(mem: DataView, tssOffset: number): void {
  mem.setUint16(tssOffset + 0x66, 0x68, true); // iomap_base
  for (let i = 0; i < IO_BITMAP_PORTS / 8; i++) mem.setUint8(tssOffset + 0x68 + i, 0);
  mem.setUint8(tssOffset + 0x68 + IO_BITMAP_PORTS / 8, 0xff); // the CPU may read one byte past
}

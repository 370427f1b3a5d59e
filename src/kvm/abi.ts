// KVM's userspace ABI on x86-64 as this engine uses it: capability and exit numbers, and the
// byte layouts of the structs it builds or reads (linux/kvm.h, asm/kvm.h). Structs are little-
// endian byte arrays handed to the addon's ioctl().

export const KVM_API_VERSION = 12;

export const CAP = {
  IRQCHIP: 0,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_MEMSLOTS: 10,
  MP_STATE: 14,
  VCPU_EVENTS: 41,
  DEBUGREGS: 50,
  XSAVE: 55,
  XCRS: 56,
  MAX_VCPUS: 66,
  READONLY_MEM: 81,
  IMMEDIATE_EXIT: 136,
  MANUAL_DIRTY_LOG_PROTECT2: 168,
  DIRTY_LOG_RING: 192,
  BINARY_STATS_FD: 203,
  XSAVE2: 208,
  DIRTY_LOG_RING_ACQ_REL: 223,
  USER_MEMORY2: 231,
  MEMORY_FAULT_INFO: 232,
} as const;

export const EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
  DIRTY_RING_FULL: 31,
  MEMORY_FAULT: 39,
} as const;

export function exitName(reason: number): string {
  for (const [k, v] of Object.entries(EXIT)) if (v === reason) return `KVM_EXIT_${k}`;
  return `exit reason ${reason}`;
}

export const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1;
/** The dirty ring lives at this page offset of the vCPU fd (asm/kvm.h on x86). */
export const KVM_DIRTY_LOG_PAGE_OFFSET = 64;

/** struct kvm_run offsets (the fields this engine reads). */
export const RUN = {
  immediateExit: 1,
  exitReason: 8,
  // union at 32: io { u8 direction; u8 size; u16 port; u32 count; u64 data_offset }
  ioDirection: 32,
  ioSize: 33,
  ioPort: 34,
  ioCount: 36,
  ioDataOffset: 40,
  // mmio { u64 phys_addr; u8 data[8]; u32 len; u8 is_write }
  mmioPhysAddr: 32,
  mmioLen: 48,
  mmioIsWrite: 52,
  // fail_entry { u64 hardware_entry_failure_reason; u32 cpu }, internal { u32 suberror; ... }
  failReason: 32,
  internalSuberror: 32,
} as const;
export const KVM_EXIT_IO_OUT = 1;

/** struct kvm_userspace_memory_region (32 bytes). */
export function encodeMemoryRegion(r: { slot: number; flags: number; guestPhysAddr: number; memorySize: number; userspaceAddr: number }): Uint8Array {
  const b = new Uint8Array(32);
  const v = new DataView(b.buffer);
  v.setUint32(0, r.slot, true);
  v.setUint32(4, r.flags, true);
  v.setBigUint64(8, BigInt(r.guestPhysAddr), true);
  v.setBigUint64(16, BigInt(r.memorySize), true);
  v.setBigUint64(24, BigInt(r.userspaceAddr), true);
  return b;
}

/** struct kvm_enable_cap (104 bytes). */
export function encodeEnableCap(cap: number, arg0: number | bigint): Uint8Array {
  const b = new Uint8Array(104);
  const v = new DataView(b.buffer);
  v.setUint32(0, cap, true);
  v.setBigUint64(8, BigInt(arg0), true);
  return b;
}

/** struct kvm_regs: 18 u64 in this order. */
export const REG_NAMES = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'] as const;
export type RegName = (typeof REG_NAMES)[number];
export const REGS_BYTES = 144;

export function setReg(regs: Uint8Array, name: RegName, value: bigint | number): void {
  new DataView(regs.buffer, regs.byteOffset).setBigUint64(REG_NAMES.indexOf(name) * 8, BigInt(value), true);
}

/** struct kvm_sregs (312 bytes): 8 segments of 24 bytes, gdt and idt, then control registers. */
export const SREGS_BYTES = 312;
export const SEG = { cs: 0, ds: 1, es: 2, fs: 3, gs: 4, ss: 5, tr: 6, ldt: 7 } as const;
export interface Segment {
  base: number;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}
export function setSegment(sregs: Uint8Array, which: keyof typeof SEG, s: Segment): void {
  const v = new DataView(sregs.buffer, sregs.byteOffset);
  const o = SEG[which] * 24;
  v.setBigUint64(o, BigInt(s.base), true);
  v.setUint32(o + 8, s.limit, true);
  v.setUint16(o + 12, s.selector, true);
  const bytes = [s.type, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable, 0];
  bytes.forEach((x, i) => v.setUint8(o + 14 + i, x));
}
/** kvm_dtable gdt at 192, idt at 208: { u64 base; u16 limit; u16 pad[3] }. */
export function setDtable(sregs: Uint8Array, which: 'gdt' | 'idt', base: number, limit: number): void {
  const v = new DataView(sregs.buffer, sregs.byteOffset);
  const o = which === 'gdt' ? 192 : 208;
  v.setBigUint64(o, BigInt(base), true);
  v.setUint16(o + 8, limit, true);
}
export const SREG_OFFSET = { cr0: 224, cr2: 232, cr3: 240, cr4: 248, cr8: 256, efer: 264, apicBase: 272 } as const;
export function setSreg(sregs: Uint8Array, which: keyof typeof SREG_OFFSET, value: number | bigint): void {
  new DataView(sregs.buffer, sregs.byteOffset).setBigUint64(SREG_OFFSET[which], BigInt(value), true);
}
export const X86 = {
  CR0_PE: 1n,
  CR0_MP: 2n,
  CR0_ET: 0x10n,
  CR0_NE: 0x20n,
  CR0_WP: 0x10000n,
  CR0_PG: 0x80000000n,
  CR4_PAE: 0x20n,
  CR4_OSFXSR: 0x200n,
  CR4_OSXMMEXCPT: 0x400n,
  EFER_SCE: 1n,
  EFER_LME: 0x100n,
  EFER_LMA: 0x400n,
  EFER_NX: 0x800n,
} as const;

/** Fixed sizes of the other per-vCPU state structs (asm/kvm.h). */
export const STATE_BYTES = {
  fpu: 416,
  xcrs: 392,
  xsave: 4096,
  lapic: 1024,
  vcpuEvents: 64,
  mpState: 4,
  debugregs: 128,
} as const;

/** struct kvm_msrs { u32 nmsrs; u32 pad; struct kvm_msr_entry { u32 index; u32 rsvd; u64 data }[] }. */
export function encodeMsrs(entries: { index: number; data: bigint }[]): Uint8Array {
  const b = new Uint8Array(8 + 16 * entries.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    v.setUint32(8 + i * 16, e.index, true);
    v.setBigUint64(16 + i * 16, e.data, true);
  });
  return b;
}
export function decodeMsrs(b: Uint8Array, count: number): { index: number; data: bigint }[] {
  const v = new DataView(b.buffer, b.byteOffset);
  const out = [];
  for (let i = 0; i < count; i++) out.push({ index: v.getUint32(8 + i * 16, true), data: v.getBigUint64(16 + i * 16, true) });
  return out;
}

/** MSRs a long-mode guest without interrupts may depend on (QEMU saves a superset). */
export const SAVED_MSRS = [
  0x10, // TSC
  0x174, 0x175, 0x176, // SYSENTER_CS/ESP/EIP
  0x1a0, // MISC_ENABLE
  0x277, // PAT
  0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, // STAR, LSTAR, CSTAR, SFMASK
  0xc0000100, 0xc0000101, 0xc0000102, // FS_BASE, GS_BASE, KERNEL_GS_BASE
  0xc0000103, // TSC_AUX
] as const;

// Building the guest of a kvm VM: the internal memslot's contents (GDT, TSS, workload code,
// stacks, identity page tables) and each vCPU's initial registers for 64-bit long mode entered
// straight from KVM_SET_SREGS (as the selftests' vcpu_init_sregs does: no real-mode boot code).
//
// Privilege: the workload runs at CPL 3 by default. On this kind of host (nested KVM on the
// kvm_pvm vendor module) CPL 0 guest code is emulated instruction by instruction (~4 us per
// `dec; jnz` iteration measured) while CPL 3 code runs natively (~0.8 ns), so at CPL 0 every
// timing would measure KVM's instruction emulator instead of its MMU. The workloads need no
// privilege: memory is mapped user-accessible, the TSS I/O bitmap lets them `out` to our ports,
// and the idle guest parks on HALT_PORT instead of `hlt` (which is privileged). CPL 0 stays
// available (KvmEngineOptions.guestCpl) to run like the selftests' guests do.
import type { GuestPageSize, MemoryRegion } from '../vmm/engine.ts';
import { initialRngState, pagesPerVcpu, type WorkloadSpec } from '../guest/workload.ts';
import type { KvmAddon } from './addon.ts';
import { REGS_BYTES, SREGS_BYTES, X86, setDtable, setReg, setSegment, setSreg, type Segment } from './abi.ts';
import {
  CODE_MAX_BYTES, GDT_LIMIT, GDT_OFFSET, INTERNAL_SLOT, SEL, TSS_LIMIT, TSS_OFFSET, planInternalMemory, writeGdt, writeTssIoBitmap,
} from './guest/layout.ts';
import { workloadCode } from './guest/workload-code.ts';

export interface GuestSetup {
  spec: WorkloadSpec;
  /** The internal memslot, ready for KVM_SET_USER_MEMORY_REGION. */
  region: MemoryRegion;
  initVcpu(addon: KvmAddon, vcpuFd: number, vcpu: number): void;
}

const flatSeg = (selector: number, type: number, long: boolean): Segment => ({
  base: 0, limit: 0xffffffff, selector, type, present: 1, dpl: 0, db: long ? 0 : 1, s: 1, l: long ? 1 : 0, g: 1, avl: 0, unusable: 0,
});

export type GuestCpl = 0 | 3;

export function setUpGuest(
  vcpus: number,
  spec: WorkloadSpec,
  guestPageSize: GuestPageSize,
  cpl: GuestCpl,
  map: (bytes: number) => { hva: number; buffer: SharedArrayBuffer },
): GuestSetup {
  const testBytes = vcpus * spec.bytesPerVcpu;
  const layout = planInternalMemory(vcpus, spec.gpaBase, testBytes, guestPageSize);
  const { hva, buffer } = map(layout.bytes);
  const mem = new DataView(buffer);
  const code = workloadCode(spec.kind, cpl);
  if (code.length > CODE_MAX_BYTES) throw new Error('guest code too large');
  new Uint8Array(buffer, layout.codeGpa - layout.gpa, code.length).set(code);
  writeGdt(mem, GDT_OFFSET, layout.gpa + TSS_OFFSET);
  writeTssIoBitmap(mem, TSS_OFFSET);
  for (const [gpa, table] of layout.tables.pages) new BigUint64Array(buffer, gpa - layout.gpa, 512).set(table);

  const region: MemoryRegion = { slot: INTERNAL_SLOT, flags: 0, guestPhysAddr: layout.gpa, memorySize: layout.bytes, userspaceAddr: hva };

  function initVcpu(addon: KvmAddon, fd: number, v: number): void {
    const sregs = new Uint8Array(SREGS_BYTES);
    addon.ioctl(fd, 'KVM_GET_SREGS', sregs);
    const user = cpl === 3;
    setSegment(sregs, 'cs', { ...flatSeg(user ? SEL.userCode : SEL.kernelCode, 0xb, true), dpl: cpl });
    for (const s of ['ds', 'es', 'fs', 'gs', 'ss'] as const) setSegment(sregs, s, { ...flatSeg(user ? SEL.userData : SEL.kernelData, 0x3, false), dpl: cpl });
    setSegment(sregs, 'tr', { base: layout.gpa + TSS_OFFSET, limit: TSS_LIMIT, selector: SEL.tss, type: 0xb, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 });
    setDtable(sregs, 'gdt', layout.gpa + GDT_OFFSET, GDT_LIMIT);
    setDtable(sregs, 'idt', 0, 0);
    setSreg(sregs, 'cr0', X86.CR0_PE | X86.CR0_MP | X86.CR0_ET | X86.CR0_NE | X86.CR0_WP | X86.CR0_PG);
    setSreg(sregs, 'cr4', X86.CR4_PAE | X86.CR4_OSFXSR | X86.CR4_OSXMMEXCPT);
    setSreg(sregs, 'cr3', layout.tables.root);
    setSreg(sregs, 'efer', X86.EFER_LME | X86.EFER_LMA | X86.EFER_NX);
    addon.ioctl(fd, 'KVM_SET_SREGS', sregs);

    const regs = new Uint8Array(REGS_BYTES);
    const rng = initialRngState(spec, v);
    setReg(regs, 'rdi', spec.gpaBase + v * spec.bytesPerVcpu);
    setReg(regs, 'rsi', pagesPerVcpu(spec));
    setReg(regs, 'rbx', BigInt(v + 1) << 32n);
    setReg(regs, 'r12', 0);
    setReg(regs, 'r13', (BigInt(rng.hi >>> 0) << 32n) | BigInt(rng.lo >>> 0));
    setReg(regs, 'r14', spec.writePercent);
    setReg(regs, 'rsp', layout.stackTop(v));
    setReg(regs, 'rip', layout.codeGpa);
    setReg(regs, 'rflags', 0x2);
    addon.ioctl(fd, 'KVM_SET_REGS', regs);
    // With an in-kernel LAPIC every vCPU but 0 starts waiting for INIT/SIPI; ours start running.
    addon.ioctl(fd, 'KVM_SET_MP_STATE', new Uint8Array(4)); // KVM_MP_STATE_RUNNABLE = 0
  }

  return { spec, region, initVcpu };
}

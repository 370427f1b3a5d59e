// The workloads of src/guest/workload.ts compiled to x86-64 long-mode code. One routine per
// workload kind; everything that differs between vCPUs is in registers set by the VMM, so all
// vCPUs share the code and a saved register file is the whole of a guest's progress:
//   rdi = first gva of the vCPU's slice (identity mapped: gva == gpa)
//   rsi = pages in the slice (< 2^32)
//   rbx = (vcpu + 1) << 32, the high half of every value written
//   r12 = passes started (the pass number once a pass begins; 1-based)
//   r13 = xorshift64 state (random, rwmix), never zero
//   r14 = write percentage (rwmix)
// Scratch: rax, rcx, rdx, r8 (value of this pass), r9 (pages left), r10.
// After each pass: `out SYNC_PORT, eax` with eax = pass number. The idle guest then halts:
// `hlt` at CPL 0; at CPL 3, where hlt is privileged, it writes HALT_PORT in a loop instead and
// the vCPU thread parks it (a halt as far as the VMM can tell).
import { SYNC_PORT, type WorkloadKind } from '../../guest/workload.ts';

/** I/O port an idle guest running at CPL 3 writes once it has nothing left to do. */
export const HALT_PORT = SYNC_PORT + 1;
import { Assembler, R } from './asm.ts';

function xorshift64(a: Assembler): void {
  // x ^= x << 13; x ^= x >> 7; x ^= x << 17 on r13, with rax as scratch
  a.movRR(R.rax, R.r13).shlRI(R.rax, 13).xorRR(R.r13, R.rax);
  a.movRR(R.rax, R.r13).shrRI(R.rax, 7).xorRR(R.r13, R.rax);
  a.movRR(R.rax, R.r13).shlRI(R.rax, 17).xorRR(R.r13, R.rax);
}

export function workloadCode(kind: WorkloadKind, cpl: 0 | 3 = 3): Uint8Array {
  const a = new Assembler();
  a.label('pass');
  a.incR(R.r12);
  a.movRR(R.r8, R.rbx).orRR(R.r8, R.r12);
  a.movRR(R.rcx, R.rdi);
  a.movRR(R.r9, R.rsi);
  a.testRR(R.r9, R.r9).jz('done');
  a.label('page');
  switch (kind) {
    case 'sequential':
    case 'idle':
      a.store64(R.rcx, R.r8);
      a.addRI(R.rcx, 4096);
      break;
    case 'random':
      xorshift64(a);
      a.movRR32(R.rax, R.r13); // low 32 bits of the draw
      a.xorRR32(R.rdx, R.rdx);
      a.divR32(R.rsi); // edx = draw % pages
      a.shlRI(R.rdx, 12);
      a.store64(R.rdi, R.r8, R.rdx);
      break;
    case 'rwmix':
      xorshift64(a);
      a.movRR32(R.rax, R.r13);
      a.xorRR32(R.rdx, R.rdx);
      a.movRI32(R.r10, 100);
      a.divR32(R.r10); // edx = draw % 100
      a.cmpRR32(R.rdx, R.r14).jae('read');
      a.store64(R.rcx, R.r8).jmp('next');
      a.label('read').load64(R.rax, R.rcx);
      a.label('next').addRI(R.rcx, 4096);
      break;
  }
  a.decR(R.r9).jnz('page');
  a.label('done');
  a.movRR32(R.rax, R.r12);
  a.movRI32(R.rdx, SYNC_PORT);
  a.outDxEax();
  if (kind === 'idle' && cpl === 0) {
    a.label('halt').hlt().jmp('halt');
  } else if (kind === 'idle') {
    a.movRI32(R.rdx, HALT_PORT);
    a.label('halt').outDxEax().jmp('halt');
  } else {
    a.jmp('pass');
  }
  return a.assemble();
}

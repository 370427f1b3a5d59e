// A tiny x86-64 encoder: exactly the instructions the workload guests need, with labels and
// rel32 fixups. Register operands are numbers 0..15 (R.rax .. R.r15). Memory operands are
// [base] or [base + index] with no scale and no displacement.

export const R = {
  rax: 0, rcx: 1, rdx: 2, rbx: 3, rsp: 4, rbp: 5, rsi: 6, rdi: 7,
  r8: 8, r9: 9, r10: 10, r11: 11, r12: 12, r13: 13, r14: 14, r15: 15,
} as const;
export type Reg = number;

export class Assembler {
  private readonly bytes: number[] = [];
  private readonly labels = new Map<string, number>();
  private readonly fixups: { at: number; label: string }[] = [];

  get offset(): number {
    return this.bytes.length;
  }

  label(name: string): this {
    if (this.labels.has(name)) throw new Error(`asm: label ${name} defined twice`);
    this.labels.set(name, this.bytes.length);
    return this;
  }

  private emit(...b: number[]): void {
    for (const x of b) this.bytes.push(x & 0xff);
  }

  private imm32(v: number): void {
    this.emit(v, v >>> 8, v >>> 16, v >>> 24);
  }

  /** REX prefix; omitted when no bit is set and w is false. */
  private rex(w: boolean, reg: Reg, index: Reg, base: Reg, force = false): void {
    const b = 0x40 | (w ? 8 : 0) | ((reg >> 3) << 2) | ((index >> 3) << 1) | (base >> 3);
    if (b !== 0x40 || force) this.emit(b);
  }

  /** opcode with a register-direct ModRM (mod=11). */
  private rr(w: boolean, opcode: number[], reg: Reg, rm: Reg): void {
    this.rex(w, reg, 0, rm);
    this.emit(...opcode, 0xc0 | ((reg & 7) << 3) | (rm & 7));
  }

  /** opcode with a memory ModRM [base] or [base+index]. */
  private rm(w: boolean, opcode: number[], reg: Reg, base: Reg, index?: Reg): void {
    if (index === R.rsp) throw new Error('asm: rsp cannot be an index');
    this.rex(w, reg, index ?? 0, base);
    this.emit(...opcode);
    const needsDisp = (base & 7) === 5; // rbp/r13 as base with mod=00 means rip/disp32
    const mod = needsDisp ? 0x40 : 0x00;
    if (index !== undefined || (base & 7) === 4) {
      this.emit(mod | ((reg & 7) << 3) | 4, (((index ?? R.rsp) & 7) << 3) | (base & 7));
    } else {
      this.emit(mod | ((reg & 7) << 3) | (base & 7));
    }
    if (needsDisp) this.emit(0);
  }

  movRR(dst: Reg, src: Reg): this { this.rr(true, [0x89], src, dst); return this; }
  movRR32(dst: Reg, src: Reg): this { this.rr(false, [0x89], src, dst); return this; }
  orRR(dst: Reg, src: Reg): this { this.rr(true, [0x09], src, dst); return this; }
  xorRR(dst: Reg, src: Reg): this { this.rr(true, [0x31], src, dst); return this; }
  xorRR32(dst: Reg, src: Reg): this { this.rr(false, [0x31], src, dst); return this; }
  testRR(a: Reg, b: Reg): this { this.rr(true, [0x85], b, a); return this; }
  cmpRR32(a: Reg, b: Reg): this { this.rr(false, [0x39], b, a); return this; }
  incR(r: Reg): this { this.rr(true, [0xff], 0, r); return this; }
  decR(r: Reg): this { this.rr(true, [0xff], 1, r); return this; }
  /** div r32: edx:eax / r -> eax quotient, edx remainder. */
  divR32(r: Reg): this { this.rr(false, [0xf7], 6, r); return this; }
  shlRI(r: Reg, n: number): this { this.rr(true, [0xc1], 4, r); this.emit(n); return this; }
  shrRI(r: Reg, n: number): this { this.rr(true, [0xc1], 5, r); this.emit(n); return this; }
  addRI(r: Reg, imm: number): this { this.rr(true, [0x81], 0, r); this.imm32(imm); return this; }

  /** mov r32, imm32 (zero-extends into the 64-bit register). */
  movRI32(r: Reg, imm: number): this {
    this.rex(false, 0, 0, r);
    this.emit(0xb8 + (r & 7));
    this.imm32(imm);
    return this;
  }
  /** mov r64, imm64. */
  movRI64(r: Reg, imm: bigint): this {
    this.rex(true, 0, 0, r);
    this.emit(0xb8 + (r & 7));
    for (let i = 0n; i < 8n; i++) this.emit(Number((imm >> (8n * i)) & 0xffn));
    return this;
  }
  /** mov qword [base (+ index)], src. */
  store64(base: Reg, src: Reg, index?: Reg): this { this.rm(true, [0x89], src, base, index); return this; }
  /** mov dst, qword [base (+ index)]. */
  load64(dst: Reg, base: Reg, index?: Reg): this { this.rm(true, [0x8b], dst, base, index); return this; }

  outDxEax(): this { this.emit(0xef); return this; }
  hlt(): this { this.emit(0xf4); return this; }

  private rel32(opcode: number[], label: string): this {
    this.emit(...opcode);
    this.fixups.push({ at: this.bytes.length, label });
    this.imm32(0);
    return this;
  }
  jmp(label: string): this { return this.rel32([0xe9], label); }
  jz(label: string): this { return this.rel32([0x0f, 0x84], label); }
  jnz(label: string): this { return this.rel32([0x0f, 0x85], label); }
  /** jump if unsigned above or equal (CF=0). */
  jae(label: string): this { return this.rel32([0x0f, 0x83], label); }

  /** Resolve labels and return the machine code. */
  assemble(): Uint8Array {
    const out = Uint8Array.from(this.bytes);
    const v = new DataView(out.buffer);
    for (const f of this.fixups) {
      const target = this.labels.get(f.label);
      if (target === undefined) throw new Error(`asm: undefined label ${f.label}`);
      v.setInt32(f.at, target - (f.at + 4), true);
    }
    return out;
  }
}

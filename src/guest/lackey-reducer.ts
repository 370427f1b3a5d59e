// Reduces valgrind lackey's memory trace (`valgrind --tool=lackey --trace-mem=yes`) to a page
// trace (trace-format.ts) on the fly, as the bytes arrive from the pipe: lackey prints one line
// per guest instruction and data access, tens of millions of lines for a small run, so the
// lines are never kept, never turned into strings, and parsed byte by byte.
//
// Lackey's lines:  "I  0401ab70,3"  an instruction (its address, size): the epoch clock
//                  " S 1fff000778,8"  a store      -> the page(s) it covers were written
//                  " M 1fff000778,8"  a modify (read-modify-write) -> written (and read)
//                  " L 04022e38,8"    a load       -> read (kept only when reads are recorded)
//                  "==1234== ..."     valgrind's own messages: skipped
// An access belongs to the epoch of the instruction line before it. An access that straddles a
// page boundary touches both pages.

import { EPOCH_UNIT_INSTRUCTIONS, type Trace } from './trace-format.ts';

const CH_NL = 10;
const CH_SPACE = 32;
const CH_COMMA = 44;
const CH_I = 73;
const CH_S = 83;
const CH_M = 77;
const CH_L = 76;

export interface ReducerOptions {
  /** Instructions per epoch. */
  epochLength: number;
  /** Also record the pages each epoch read. */
  reads: boolean;
}

export class LackeyReducer {
  private instructions = 0;
  private epochEnd: number;
  private writes: Set<number>[] = [new Set()];
  private reads: Set<number>[] = [new Set()];
  private curW: Set<number>;
  private curR: Set<number>;
  /** The page last added to curW / curR: most accesses repeat it, and a Set lookup costs more. */
  private lastW = -1;
  private lastR = -1;
  /** The unfinished line at the end of the last chunk. */
  private carry: Buffer = Buffer.alloc(0);
  /** Lines that were neither instructions, accesses nor valgrind messages (a broken pipe shows here). */
  unparsed = 0;

  constructor(private readonly opts: ReducerOptions) {
    if (!Number.isSafeInteger(opts.epochLength) || opts.epochLength < 1) throw new RangeError(`epoch length ${opts.epochLength} must be a positive integer`);
    this.epochEnd = opts.epochLength;
    this.curW = this.writes[0]!;
    this.curR = this.reads[0]!;
  }

  /** Feed the next bytes of lackey's output. */
  push(chunk: Buffer): void {
    let buf = chunk;
    if (this.carry.length > 0) buf = Buffer.concat([this.carry, chunk]);
    const end = buf.lastIndexOf(CH_NL);
    if (end < 0) {
      this.carry = Buffer.from(buf);
      return;
    }
    this.parse(buf, end + 1);
    this.carry = Buffer.from(buf.subarray(end + 1));
  }

  /** Parse the complete lines in buf[0, end). */
  private parse(buf: Buffer, end: number): void {
    let i = 0;
    while (i < end) {
      const c0 = buf[i]!;
      if (c0 === CH_I) {
        if (++this.instructions > this.epochEnd) this.nextEpoch();
        i = buf.indexOf(CH_NL, i) + 1;
        continue;
      }
      if (c0 === CH_SPACE) {
        const kind = buf[i + 1]!;
        // " S addr,size": the address starts at i + 3.
        let j = i + 3;
        let addr = 0;
        for (;;) {
          const c = buf[j]!;
          let d: number;
          if (c >= 48 && c <= 57) d = c - 48;
          else if (c >= 97 && c <= 102) d = c - 87;
          else if (c >= 65 && c <= 70) d = c - 55;
          else break;
          addr = addr * 16 + d;
          j++;
        }
        if (buf[j] !== CH_COMMA) {
          this.unparsed++;
          i = buf.indexOf(CH_NL, i) + 1;
          continue;
        }
        j++;
        let size = 0;
        for (let c = buf[j]!; c >= 48 && c <= 57; c = buf[++j]!) size = size * 10 + (c - 48);
        const first = Math.floor(addr / 4096);
        const last = Math.floor((addr + Math.max(size, 1) - 1) / 4096);
        if (kind === CH_S || kind === CH_M) {
          for (let p = first; p <= last; p++) this.wrote(p);
          if (kind === CH_M && this.opts.reads) for (let p = first; p <= last; p++) this.read(p);
        } else if (kind === CH_L) {
          if (this.opts.reads) for (let p = first; p <= last; p++) this.read(p);
        } else this.unparsed++;
        i = buf.indexOf(CH_NL, j) + 1;
        continue;
      }
      if (c0 !== 61 /* '=' */ && c0 !== CH_NL) this.unparsed++;
      i = buf.indexOf(CH_NL, i) + 1;
    }
  }

  private wrote(p: number): void {
    if (p === this.lastW) return;
    this.lastW = p;
    this.curW.add(p);
  }

  private read(p: number): void {
    if (p === this.lastR) return;
    this.lastR = p;
    this.curR.add(p);
  }

  private nextEpoch(): void {
    this.epochEnd += this.opts.epochLength;
    this.curW = new Set();
    this.curR = new Set();
    this.writes.push(this.curW);
    this.reads.push(this.curR);
    this.lastW = -1;
    this.lastR = -1;
  }

  get instructionCount(): number {
    return this.instructions;
  }

  /** The trace, pages renumbered densely in address order (trace-format.ts). */
  finish(program: string, nativeRunNs: number): Trace {
    if (this.carry.length > 0) this.parse(Buffer.concat([this.carry, Buffer.from('\n')]), this.carry.length + 1);
    this.carry = Buffer.alloc(0);
    if (this.instructions === 0) throw new Error('lackey printed no instructions: was the program run under --tool=lackey --trace-mem=yes?');
    const all = new Set<number>();
    for (const s of this.writes) for (const p of s) all.add(p);
    if (this.opts.reads) for (const s of this.reads) for (const p of s) all.add(p);
    const sorted = Float64Array.from(all).sort();
    const rank = new Map<number, number>();
    sorted.forEach((p, i) => rank.set(p, i));
    const dense = (s: Set<number>) => Uint32Array.from(s, (p) => rank.get(p)!).sort();
    return {
      pageSize: 4096,
      epochUnit: EPOCH_UNIT_INSTRUCTIONS,
      epochLength: this.opts.epochLength,
      totalUnits: this.instructions,
      nativeRunNs,
      distinctPages: sorted.length,
      program,
      writes: this.writes.map(dense),
      reads: this.opts.reads ? this.reads.map(dense) : null,
    };
  }
}

// The x86-64 encoder and the identity page tables, checked byte for byte against encodings
// taken from objdump and against the page-table format (no /dev/kvm needed).
import { describe, it, expect } from 'vitest';
import { Assembler, R } from '../../src/kvm/guest/asm.ts';
import { workloadCode } from '../../src/kvm/guest/workload-code.ts';
import { buildIdentityPageTables } from '../../src/kvm/guest/page-tables.ts';
import { planInternalMemory, INTERNAL_GPA } from '../../src/kvm/guest/layout.ts';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

describe('asm', () => {
  it('encodes register, memory, immediate and branch forms like GNU as', () => {
    const a = new Assembler();
    a.label('top');
    a.incR(R.r12); // 49 ff c4
    a.movRR(R.r8, R.rbx); // 49 89 d8
    a.orRR(R.r8, R.r12); // 4d 09 e0
    a.movRR32(R.rax, R.r13); // 44 89 e8
    a.divR32(R.r10); // 41 f7 f2
    a.store64(R.rdi, R.r8, R.rdx); // 4c 89 04 17
    a.store64(R.r13, R.rax); // 49 89 45 00 (r13 base needs a disp8)
    a.store64(R.r12, R.rax); // 49 89 04 24 (r12 base needs a SIB)
    a.load64(R.rax, R.rcx); // 48 8b 01
    a.addRI(R.rcx, 4096); // 48 81 c1 00 10 00 00
    a.shrRI(R.rax, 7); // 48 c1 e8 07
    a.movRI32(R.rdx, 0x5c2); // ba c2 05 00 00
    a.movRI64(R.r9, 0x1122334455667788n); // 49 b9 88 77 66 55 44 33 22 11
    a.outDxEax().hlt(); // ef f4
    a.jnz('top'); // 0f 85 rel32
    expect(hex(a.assemble())).toBe(
      '49ffc4' + '4989d8' + '4d09e0' + '4489e8' + '41f7f2' + '4c890417' + '49894500' + '49890424' + '488b01' +
        '4881c100100000' + '48c1e807' + 'bac2050000' + '49b98877665544332211' + 'eff4' + '0f85' + 'c0ffffff',
    );
  });

  it('the random workload routine is the reviewed code', () => {
    // objdump -D -b binary -mi386:x86-64 of workloadCode('random'), checked by hand.
    expect(hex(workloadCode('random'))).toBe(
      '49ffc44989d84d09e04889f94989f14d85c90f84360000004c89e848c1e00d4931c54c89e848c1e8074931c54c89e848c1e0114931c54489e831d2f7f648c1e20c4c890417' +
        '49ffc90f85caffffff4489e0bac2050000efe9a4ffffff',
    );
  });

  it('rejects undefined labels', () => {
    expect(() => new Assembler().jmp('nowhere').assemble()).toThrow(/undefined label/);
  });
});

describe('identity page tables', () => {
  function walk(tables: ReturnType<typeof buildIdentityPageTables>, gva: number): { gpa: number; size: number } | null {
    let table = tables.root;
    const shifts = [39, 30, 21, 12];
    for (const s of shifts) {
      const e = tables.pages.get(table)![Math.floor(gva / 2 ** s) % 512]!;
      if ((e & 1n) === 0n) return null;
      const addr = Number(e & 0x000ffffffffff000n);
      if (s === 21 && e & 0x80n) return { gpa: addr + (gva % 2 ** 21), size: 2 ** 21 };
      if (s === 12) return { gpa: addr + (gva % 4096), size: 4096 };
      table = addr;
    }
    return null;
  }

  it('maps 4 KiB and 2 MiB ranges as asked, identity, and nothing else', () => {
    const t = buildIdentityPageTables(0x10000, [
      { gpa: 0xc000_0000, bytes: 2 << 20, pageSize: 2 << 20 },
      { gpa: 2 ** 32, bytes: 4 << 20, pageSize: 4096 },
      { gpa: 2 ** 33 + 4096, bytes: 8192, pageSize: 4096 },
    ]);
    expect(walk(t, 0xc000_1234)).toEqual({ gpa: 0xc000_1234, size: 2 << 20 });
    expect(walk(t, 2 ** 32 + 0x3ff008)).toEqual({ gpa: 2 ** 32 + 0x3ff008, size: 4096 });
    expect(walk(t, 2 ** 33 + 4096 + 8)).toEqual({ gpa: 2 ** 33 + 4096 + 8, size: 4096 });
    expect(walk(t, 2 ** 33)).toBeNull(); // below the 4 KiB range, same 2 MiB region
    expect(walk(t, 2 ** 32 + (4 << 20))).toBeNull();
    expect(walk(t, 0)).toBeNull();
  });

  it('the internal region holds its own tables and stays below 4 GiB', () => {
    const l = planInternalMemory(4, 2 ** 32, 4 * (512 << 20), 4096);
    expect(l.gpa).toBe(INTERNAL_GPA);
    expect(l.bytes % (2 << 20)).toBe(0);
    expect(l.gpa + l.bytes).toBeLessThanOrEqual(2 ** 32);
    const maxTable = Math.max(...l.tables.pages.keys());
    expect(maxTable + 4096).toBeLessThanOrEqual(l.gpa + l.bytes);
    // 2 GiB at 4 KiB pages needs 1024 page tables + directories.
    expect(l.tables.pages.size).toBeGreaterThan(1024);
  });
});

// KVM's binary statistics (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst 4.133): a header,
// descriptors with names, and u64 data read with pread. The VM fd's stats include pages_4k,
// pages_2m, pages_1g (mapped by the host MMU), mmu_shadow_zapped, remote_tlb_flush, ...
// Read on the VMM thread only; the stats fd is private to this object.
import { readSync, closeSync } from 'node:fs';

interface Desc {
  name: string;
  offset: number;
  size: number;
}

export class BinaryStats {
  private readonly descs: Desc[] = [];
  private readonly dataOffset: number;

  constructor(private readonly fd: number) {
    const header = Buffer.alloc(24);
    readSync(fd, header, 0, 24, 0);
    const nameSize = header.readUInt32LE(4);
    const numDesc = header.readUInt32LE(8);
    const descOffset = header.readUInt32LE(16);
    this.dataOffset = header.readUInt32LE(20);
    const descBytes = 16 + nameSize;
    const buf = Buffer.alloc(numDesc * descBytes);
    readSync(fd, buf, 0, buf.length, descOffset);
    for (let i = 0; i < numDesc; i++) {
      const o = i * descBytes;
      const raw = buf.subarray(o + 16, o + 16 + nameSize);
      const nul = raw.indexOf(0);
      this.descs.push({ name: raw.subarray(0, nul < 0 ? raw.length : nul).toString(), size: buf.readUInt16LE(o + 6), offset: buf.readUInt32LE(o + 8) });
    }
  }

  /** Every single-valued counter (histograms are left out), as integers. */
  read(): Record<string, number> {
    const out: Record<string, number> = {};
    const b = Buffer.alloc(8);
    for (const d of this.descs) {
      if (d.size !== 1) continue;
      readSync(this.fd, b, 0, 8, this.dataOffset + d.offset);
      out[d.name] = Number(b.readBigUInt64LE(0));
    }
    return out;
  }

  close(): void {
    closeSync(this.fd);
  }
}

// The lackey reducer (src/guest/lackey-reducer.ts): instructions make the epoch clock, stores and
// modifies are writes (both pages when an access straddles a boundary), loads only with reads,
// valgrind's own lines are skipped, and lines split across chunks anywhere parse the same.
import { describe, expect, it } from 'vitest';
import { LackeyReducer } from '../../src/guest/lackey-reducer.ts';

const LOG = [
  '==123== Lackey, an example Valgrind tool',
  '==123== ',
  'I  04001000,3', // instruction 1 (epoch 0)
  ' S 7ff000010,8', // page 0x7ff000
  'I  04001003,4', // 2
  ' L 00601000,8', // page 0x601 read
  ' M 00602ffc,8', // straddles pages 0x602, 0x603: written and read
  'I  04001007,2', // 3 (epoch 1)
  ' S 00601008,4', // page 0x601
  'I  04001009,2', // 4
  'I  0400100b,2', // 5 (epoch 2): no accesses
  'I  0400100d,2', // 6
  ' S 7FF000018,8', // upper-case hex: page 0x7ff000 again
  '==123== ',
].join('\n') + '\n';

function reduce(reads: boolean, chunk: number) {
  const r = new LackeyReducer({ epochLength: 2, reads });
  const bytes = Buffer.from(LOG);
  for (let i = 0; i < bytes.length; i += chunk) r.push(bytes.subarray(i, i + chunk));
  return r.finish('test', 1000);
}

describe('lackey reducer', () => {
  it.each([1, 3, 7, 4096])('epochs of 2 instructions, pages renumbered in address order (chunks of %i bytes)', (chunk) => {
    const t = reduce(false, chunk);
    // Written pages in address order: 0x601 -> 0, 0x602 -> 1, 0x603 -> 2, 0x7ff000 -> 3.
    expect(t.distinctPages).toBe(4);
    expect(t.totalUnits).toBe(6);
    expect(t.writes.map((w) => [...w])).toEqual([[1, 2, 3], [0], [3]]);
    expect(t.reads).toBeNull();
  });

  it('with reads: loads and modifies are reads, and read-only pages join the numbering', () => {
    const t = reduce(true, 5);
    // 0x601 is both; the numbering is the same as above since every read page is also written.
    expect(t.writes.map((w) => [...w])).toEqual([[1, 2, 3], [0], [3]]);
    expect(t.reads!.map((w) => [...w])).toEqual([[0, 1, 2], [], []]);
  });

  it('counts lines it cannot parse, and refuses an empty run', () => {
    const r = new LackeyReducer({ epochLength: 10, reads: false });
    r.push(Buffer.from('I  0400,1\n X 12,1\n S zz\ngarbage\n'));
    expect(r.unparsed).toBe(3);
    expect(() => new LackeyReducer({ epochLength: 10, reads: false }).finish('x', 1)).toThrow(/no instructions/);
  });
});

import { describe, expect, it } from 'vitest';
import { parseGuestPageSize, parseIntList, parseSize } from '../../src/cli/options.ts';
import { formatSeconds } from '../../src/bench/timing.ts';

describe('CLI option parsing', () => {
  it('accepts sizes with units', () => {
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('64K')).toBe(65536);
    expect(parseSize('512M')).toBe(512 * 2 ** 20);
    expect(parseSize('1G')).toBe(2 ** 30);
    expect(parseSize('1GiB')).toBe(2 ** 30);
    expect(() => parseSize('lots')).toThrow(/not a size/);
    expect(() => parseSize('-1M')).toThrow(/not a size/);
  });
  it('parses lists and guest page sizes', () => {
    expect(parseIntList('1,2, 4')).toEqual([1, 2, 4]);
    expect(() => parseIntList('1,0')).toThrow(/positive/);
    expect(parseGuestPageSize('4K')).toBe(4096);
    expect(parseGuestPageSize('2M')).toBe(2097152);
    expect(() => parseGuestPageSize('1G')).toThrow(/4K or 2M/);
  });
  it("prints seconds like the selftests' %ld.%.9lds", () => {
    expect(formatSeconds(1.5)).toBe('1.500000000s');
    expect(formatSeconds(0.000000123)).toBe('0.000000123s');
  });
});

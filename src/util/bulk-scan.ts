// Whole-array tests done by the runtime's native loops (memcmp, a typed array's indexOf) instead
// of a JavaScript loop. What they serve runs once per migration, on the downtime path, where no
// JavaScript loop is warm yet: a cold loop over a 1 GiB guest's 262144 page entries takes 5-10 ms
// here, these tests a few microseconds a 2 MiB block.
// Thread-neutral: they only read; on shared memory a racing writer may or may not be seen.

const ZEROS = new Uint8Array(64 << 10);

/** Every byte of `a` is zero. */
export function allZero(a: ArrayBufferView): boolean {
  for (let off = 0; off < a.byteLength; off += ZEROS.length) {
    const n = Math.min(ZEROS.length, a.byteLength - off);
    if (Buffer.compare(new Uint8Array(a.buffer, a.byteOffset + off, n), n === ZEROS.length ? ZEROS : ZEROS.subarray(0, n)) !== 0) return false;
  }
  return true;
}

/** No element of `a` is zero. */
export function noneZero(a: Int32Array | Uint8Array | Uint32Array): boolean {
  return a.indexOf(0) < 0;
}

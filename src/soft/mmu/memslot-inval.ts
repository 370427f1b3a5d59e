// The VM's memslot invalidation sequence: mmu_invalidate_seq / mmu_invalidate_in_progress for
// memslot deletes and moves (KVM marks the old slot invalid and faults on it retry).
//
// Concurrency rules: words[0] = in-progress count, words[1] = sequence. Only the VMM thread
// writes them (begin/end, with Atomics); faults read seq() before resolving a pfn and call
// retryNeeded(seq) under the MMU lock. The VMM unmaps the old range between begin() and end()
// under the exclusive MMU lock, so a fault that passed retryNeeded() under the fault lock either
// installed its mapping before that unmap (which then removes it) or saw the change and retries.
export class MemslotInvalidation {
  readonly words: Int32Array;

  constructor(sab: SharedArrayBuffer = new SharedArrayBuffer(64)) {
    this.words = new Int32Array(sab);
  }

  get sab(): SharedArrayBuffer {
    return this.words.buffer as SharedArrayBuffer;
  }

  seq(): number {
    return Atomics.load(this.words, 1);
  }

  retryNeeded(seq: number): boolean {
    return Atomics.load(this.words, 0) !== 0 || Atomics.load(this.words, 1) !== seq;
  }

  begin(): void {
    Atomics.add(this.words, 0, 1);
  }

  end(): void {
    Atomics.add(this.words, 1, 1);
    Atomics.sub(this.words, 0, 1);
  }
}

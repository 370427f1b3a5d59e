// Liveness of a migration connection: every wait on the peer is bounded by an idle timeout
// (issue 8). "Idle" is time without progress, not total time: progress is any byte received
// from the peer on any channel, and any byte the kernel takes from our socket writes (a write
// completing, or libuv's write queue shrinking under a large write), so a slow link that still
// moves never trips it. The clock runs only while this side waits on the peer:
//   - a socket write has not drained (the peer stopped reading, or the path is black-holed), in
//     every phase, and
//   - the owner says it awaits an answer (setPhase({ awaiting: true }): READY, SYNC_ACK,
//     COMPLETE, STARTED on the source; the next record or GO on the destination).
// When it fires, the owner's onStall fails every channel with a MigrationTransportError
// ('idle-timeout') that names the phase: "no progress from the destination for 10000 ms
// waiting for COMPLETE".
//
// Why DEFAULT_IDLE_TIMEOUT_MS = 10 s: on a 1 Gbit/s link (~119 MB/s) the largest single socket
// write stage2 makes (a 4 MiB RAM record; batches are 1 MiB) drains in ~35 ms, so a moving link
// shows progress many times a second, and the peer's own pauses between answers are short
// (applying a 16 MiB read window, hashing the page table at END: milliseconds; a GC pause: well
// under a second). 10 s is ~300x the slowest write and still rides out TCP's retransmission
// back-off after a few lost segments (0.2 + 0.4 + 0.8 + 1.6 + 3.2 s). Waits where the peer works
// silently for longer are given an allowance by the caller (source.ts: READY waits for the
// destination to build and preallocate the VM, ~3 s/GiB on these machines). A link slower than
// ~1 MiB per 10 s (--max-bandwidth below ~100 KiB/s) needs a larger --timeout-ms.
//
// Sampling, not per-byte bookkeeping: a timer ticks every idleTimeoutMs/4 (at most 1 s) and
// compares counters, so nothing is added to the per-chunk path. A tick that comes late (this
// process's event loop was blocked by a long synchronous step) does not blame the lost time on
// the peer, and a tick that finds a stall re-checks once after the event loop has polled for I/O
// (setImmediate), so bytes that arrived while this process was busy count first.
//
// Concurrency: single-threaded (the owning main thread); no shared memory.

import { MigrationTransportError } from './errors.ts';

export const DEFAULT_IDLE_TIMEOUT_MS = 10_000;

/** What the watch reads from each channel (channel.ts implements it). */
export interface ProgressSource {
  /** Bytes received so far. */
  readonly bytesReceived: number;
  /** Socket writes completed so far. */
  readonly writesCompleted: number;
  /** Socket writes handed to the socket and not yet completed. */
  readonly writesInFlight: number;
  /** Bytes libuv still holds for the socket (shrinks as the kernel takes a large write). */
  writeQueueBytes(): number;
}

export interface LinkPhase {
  /** Named in the error: "during active (round 3)", "waiting for COMPLETE". */
  label: string;
  /** This side now waits for an answer: the peer's silence counts, not only stuck writes. */
  awaiting: boolean;
  /** The idle timeout for this phase, ms (default: the watch's own). */
  idleTimeoutMs?: number;
}

export class IdleWatch {
  private phase: LinkPhase;
  private idleMs: number;
  private timer: NodeJS.Timeout | undefined;
  private tickMs = 0;
  private lastTick = Date.now();
  /** Last time progress was seen, or a wait began (whichever is later). */
  private since = Date.now();
  private lastReceived = -1;
  private lastCompleted = -1;
  private lastQueue = new Map<ProgressSource, number>();
  private waiting = false;
  private rechecking = false;
  private stopped = false;

  constructor(
    private readonly sources: () => readonly ProgressSource[],
    /** 'destination' or 'source': who is silent, for the message. */
    private readonly peerName: string,
    private readonly onStall: (err: MigrationTransportError) => void,
    idleTimeoutMs = DEFAULT_IDLE_TIMEOUT_MS,
    label = 'during the handshake',
  ) {
    this.idleMs = idleTimeoutMs;
    this.phase = { label, awaiting: false };
    this.arm();
  }

  get idleTimeoutMs(): number {
    return this.idleMs;
  }

  /** Set the default idle timeout (phases without their own). */
  setIdleTimeout(ms: number): void {
    this.idleMs = ms;
    this.arm();
  }

  /** What this side does now; a new wait starts its clock now. */
  setPhase(p: LinkPhase): void {
    if (p.awaiting && !this.phase.awaiting) this.since = Date.now();
    this.phase = p;
    this.arm();
  }

  get label(): string {
    return this.phase.label;
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private get limitMs(): number {
    return this.phase.idleTimeoutMs ?? this.idleMs;
  }

  private arm(): void {
    if (this.stopped) return;
    const tick = Math.max(20, Math.min(1000, Math.floor(this.limitMs / 4)));
    if (this.timer && tick === this.tickMs) return;
    clearInterval(this.timer);
    this.tickMs = tick;
    this.lastTick = Date.now();
    this.timer = setInterval(() => this.tick(), tick);
    this.timer.unref(); // the sockets keep the process alive while there is anything to watch
  }

  /** Counters moved since the last sample (then the peer made progress). */
  private sample(): { moved: boolean; writing: boolean } {
    let received = 0;
    let completed = 0;
    let writing = false;
    let drained = false;
    for (const s of this.sources()) {
      received += s.bytesReceived;
      completed += s.writesCompleted;
      if (s.writesInFlight > 0) writing = true;
      const q = s.writeQueueBytes();
      const before = this.lastQueue.get(s);
      if (before !== undefined && q < before) drained = true;
      this.lastQueue.set(s, q);
    }
    const moved = drained || received !== this.lastReceived || completed !== this.lastCompleted;
    this.lastReceived = received;
    this.lastCompleted = completed;
    return { moved, writing };
  }

  private tick(): void {
    if (this.stopped || this.rechecking) return;
    const now = Date.now();
    const late = now - this.lastTick > 2 * this.tickMs + 100;
    this.lastTick = now;
    const { moved, writing } = this.sample();
    const waiting = writing || this.phase.awaiting;
    if (moved || late || (waiting && !this.waiting)) this.since = now;
    this.waiting = waiting;
    if (!waiting || now - this.since < this.limitMs) return;
    // Looks stalled: look again once pending I/O has been polled.
    this.rechecking = true;
    setImmediate(() => {
      this.rechecking = false;
      if (this.stopped) return;
      const again = this.sample();
      if (again.moved) {
        this.since = Date.now();
        return;
      }
      if (!again.writing && !this.phase.awaiting) return;
      this.stop();
      const ms = this.limitMs;
      this.onStall(new MigrationTransportError('idle-timeout', `no progress from the ${this.peerName} for ${ms} ms ${this.phase.label}`));
    });
  }
}

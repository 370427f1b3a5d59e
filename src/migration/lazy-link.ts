// A SourceLink whose connection is opened by its first use, so that a destination that cannot
// be reached fails inside migrateVm's setup phase (status failed, source checked intact, stats
// printed) instead of before the migration exists.
import { MigrationLinkError, type DestRecord, type LinkPhase, type SourceLink, type SourceRecord } from './link.ts';

export function lazyLink(channels: number, connect: () => Promise<SourceLink>): SourceLink {
  let inner: SourceLink | null = null;
  let connecting: Promise<SourceLink> | null = null;
  let destroyedWith: Error | null = null;
  /** The last phase set before the connection existed: applied once it does. */
  let phase: LinkPhase | null = null;
  /** Rejects the pending connect at once when the link is destroyed (a cancel does not wait for it). */
  let abandon: (e: Error) => void = () => undefined;
  const abandoned = new Promise<never>((_, reject) => (abandon = reject));
  abandoned.catch(() => undefined);
  const get = (): Promise<SourceLink> => {
    if (destroyedWith) return Promise.reject(destroyedWith);
    connecting ??= Promise.race([
      connect().then((l) => {
        if (destroyedWith) {
          l.destroy(destroyedWith);
          throw destroyedWith;
        }
        inner = l;
        if (phase) l.setPhase?.(phase);
        return l;
      }),
      abandoned,
    ]);
    return connecting;
  };
  return {
    get channels() {
      return inner?.channels ?? channels;
    },
    get postcopyAllowed() {
      return inner?.postcopyAllowed ?? false;
    },
    get peerHost() {
      return inner?.peerHost;
    },
    get acksRounds() {
      return inner?.acksRounds ?? false;
    },
    send: (r: SourceRecord, channel?: number) => (inner ? inner.send(r, channel) : get().then((l) => l.send(r, channel))),
    receive: (): Promise<DestRecord> => (inner ? inner.receive() : get().then((l) => l.receive())),
    flush: () => (inner ? inner.flush() : get().then((l) => l.flush())),
    bytesSent: () => inner?.bytesSent() ?? 0,
    compression: () => inner?.compression?.() ?? { pages: 0, wireBytes: 0 },
    close: () => inner?.close(),
    setPhase: (p: LinkPhase) => {
      phase = p;
      inner?.setPhase?.(p);
    },
    destroy: (e?: Error) => {
      destroyedWith ??= e ?? new MigrationLinkError('link destroyed');
      inner?.destroy(e);
      abandon(destroyedWith);
    },
  };
}

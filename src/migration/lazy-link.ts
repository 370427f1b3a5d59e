// A SourceLink whose connection is opened by its first use, so that a destination that cannot
// be reached fails inside migrateVm's setup phase (status failed, source checked intact, stats
// printed) instead of before the migration exists.
import { MigrationLinkError, type DestRecord, type SourceLink, type SourceRecord } from './link.ts';

export function lazyLink(channels: number, connect: () => Promise<SourceLink>): SourceLink {
  let inner: SourceLink | null = null;
  let connecting: Promise<SourceLink> | null = null;
  let destroyedWith: Error | null = null;
  const get = (): Promise<SourceLink> => {
    if (destroyedWith) return Promise.reject(destroyedWith);
    connecting ??= connect().then((l) => {
      if (destroyedWith) {
        l.destroy(destroyedWith);
        throw destroyedWith;
      }
      inner = l;
      return l;
    });
    return connecting;
  };
  return {
    get channels() {
      return inner?.channels ?? channels;
    },
    get acksRounds() {
      return inner?.acksRounds ?? false;
    },
    send: (r: SourceRecord, channel?: number) => (inner ? inner.send(r, channel) : get().then((l) => l.send(r, channel))),
    receive: (): Promise<DestRecord> => (inner ? inner.receive() : get().then((l) => l.receive())),
    flush: () => (inner ? inner.flush() : get().then((l) => l.flush())),
    bytesSent: () => inner?.bytesSent() ?? 0,
    close: () => inner?.close(),
    destroy: (e?: Error) => {
      destroyedWith ??= e ?? new MigrationLinkError('link destroyed');
      inner?.destroy(e);
    },
  };
}

// `stage2 migrate --local --json` spawns `stage2 receive` and migrates a running guest to it,
// on every engine present.
import { describe, it, expect } from 'vitest';
import { engines, stage2 } from './run-cli.ts';

describe('stage2 migrate (CLI processes)', () => {
  for (const engine of engines) {
    it(`migrate --local --json on ${engine.kind}: completed, verified, workload continues on the destination`, async () => {
      const r = await stage2(['migrate', '--local', '--json', '--engine', engine.kind, '-v', '2', '-b', '8M', '--workload', 'sequential', '--channels', '2', '--dest-run-ms', '300']);
      expect(r.code, r.stderr).toBe(0);
      const lines = r.stdout.trim().split('\n');
      expect(lines).toHaveLength(1);
      const s = JSON.parse(lines[0]!);
      for (const k of ['status', 'verified', 'totalSeconds', 'setupSeconds', 'downtimeSeconds', 'transferredBytes', 'ramBytes', 'zeroPages', 'normalPages', 'dirtySyncCount', 'dirtyPagesRate', 'throughputMBps', 'postcopyRequests']) expect(s, k).toHaveProperty(k);
      expect(s.status).toBe('completed');
      expect(s.verified).toBe(true);
      expect(s.engine).toBe(engine.kind);
      expect(s.sourceHash).toBe(s.destinationHash);
      // The default policy is --postcopy auto: this guest re-dirties everything, so it may switch.
      if (s.postcopy) expect(s.postcopyRequests).toBe(s.destination.postcopy.result.remoteRequests);
      else expect(s.postcopyRequests).toBe(0);
      expect(s.params.channels).toBe(2);
      expect(s.transferredBytes).toBeGreaterThanOrEqual(s.normalPages * 4096);
      const d = s.destination;
      expect(d.status).toBe('completed');
      expect(d.hash).toBe(s.destinationHash);
      expect(d.passesAtSwitchover).toEqual(s.passesAtSwitchover);
      expect(d.memoryCheck).toBeNull();
      d.passesAfter.forEach((p: number, i: number) => expect(p).toBeGreaterThanOrEqual(d.passesAtSwitchover[i]));
    });
  }

});

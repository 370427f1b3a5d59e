// Typed failures of a migration, so the CLI can tell a cancel from a broken link from a
// destination that refused the VM.
import { ErrorCode } from './stream/format.ts';

/** SIGINT or an AbortSignal ended the migration before switchover. */
export class MigrationCancelledError extends Error {
  constructor(message = 'migration cancelled') {
    super(message);
    this.name = 'MigrationCancelledError';
  }
}

/** The destination reported an error (ERROR record). */
export class DestinationError extends Error {
  constructor(readonly remoteMessage: string) {
    super(`destination failed: ${remoteMessage}`);
    this.name = 'DestinationError';
  }
}

/**
 * The link broke (or a cancel came) after GO and before STARTED: the destination may or may not
 * run the guest, so the source stays paused. Not the destination's failure, so not a
 * DestinationError.
 */
export class SwitchoverOutcomeUnknownError extends Error {
  constructor(cause: string) {
    super(
      `switchover outcome unknown: ${cause} after GO was sent; the destination may be running the guest, ` +
        'so this side stays paused (resume it only if the destination is known not to run it)',
    );
    this.name = 'SwitchoverOutcomeUnknownError';
  }
}

/**
 * The source and destination disagree about the state they hold at switchover (memory, CONFIG
 * or vCPU state); the ERROR record that reports it says VERIFY_FAILED.
 */
export class VerificationError extends Error {
  readonly errorCode = ErrorCode.VERIFY_FAILED;
  constructor(message: string) {
    super(message);
    this.name = 'VerificationError';
  }
}

/** Pre-copy gave up above the downtime limit and the policy says fail (--on-no-convergence). */
export class NoConvergenceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NoConvergenceError';
  }
}

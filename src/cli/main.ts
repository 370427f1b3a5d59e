// stage2's command line: parse, call, print. Each command lives in its own file.
import { Command, CommanderError } from 'commander';
import { registerBench } from './bench.ts';
import { registerDemo } from './demo.ts';
import { registerMigrate } from './migrate.ts';
import { registerReceive } from './receive.ts';

export async function main(argv: string[]): Promise<void> {
  const program = new Command('stage2')
    .description('a virtual-machine memory system with live migration (soft second-stage MMU and real /dev/kvm)')
    .showHelpAfterError()
    .exitOverride();
  registerDemo(program);
  registerBench(program);
  registerMigrate(program);
  registerReceive(program);
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) process.exit(e.exitCode);
    const err = e as Error;
    process.stderr.write(`stage2: ${err.message}\n`);
    if (process.env.STAGE2_DEBUG) process.stderr.write(`${err.stack}\n`);
    process.exit(1);
  }
}

// A vCPU thread for test/vmm/run-loop.test.ts: the shared run loop over a scripted guest whose
// enter() returns the next exit of its script (then INTR forever, or HLT at the end).
import { parentPort, workerData } from 'node:worker_threads';
import { VcpuLoop, type GuestEntry } from '../../src/vmm/run/vcpu-loop.ts';
import { EXIT_NAMES, type ExitName, type VcpuExit } from '../../src/vmm/run/exits.ts';

export interface ScriptStep {
  exit: ExitName | 'throw';
  pass?: number;
  gpa?: number;
  cause?: string;
}

const d = workerData as { ctl: SharedArrayBuffer; vcpu: number; script: ScriptStep[] };
const ctl = new Int32Array(d.ctl);
let at = 0;
const entry: GuestEntry = {
  enter(x: VcpuExit): void {
    const step = d.script[at++] ?? { exit: 'hlt' };
    if (step.exit === 'throw') throw new Error(step.cause ?? 'scripted throw');
    x.reason = EXIT_NAMES.indexOf(step.exit);
    x.pass = step.pass ?? 0;
    x.halted = false;
    x.gpa = step.gpa ?? 0;
    x.size = 4096;
    x.flags = 0;
    x.cause = step.cause ?? '';
  },
  saveRegs() {},
  loadRegs() {},
};
new VcpuLoop(ctl, d.vcpu, entry, (cause) => parentPort?.postMessage({ type: 'vcpu-cause', vcpu: d.vcpu, cause })).run();

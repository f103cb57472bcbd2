/** x86-64 `struct user_regs_struct` (NT_PRSTATUS, 216 bytes), as raw bytes with named access. */
import { getRegset, NT_PRSTATUS, setRegset } from "./ptrace.ts";

export const REG_NAMES = [
  "r15",
  "r14",
  "r13",
  "r12",
  "rbp",
  "rbx",
  "r11",
  "r10",
  "r9",
  "r8",
  "rax",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "orig_rax",
  "rip",
  "cs",
  "eflags",
  "rsp",
  "ss",
  "fs_base",
  "gs_base",
  "ds",
  "es",
  "fs",
  "gs",
] as const;

export type RegName = typeof REG_NAMES[number];
export const USER_REGS_SIZE = REG_NAMES.length * 8;

/** A thread's general registers; `bytes` is exactly what NT_PRSTATUS holds. */
export class Regs {
  readonly bytes: Uint8Array;
  private view: DataView;

  constructor(bytes: Uint8Array) {
    if (bytes.length !== USER_REGS_SIZE) {
      throw new Error(`registers: ${bytes.length} bytes, expected ${USER_REGS_SIZE}`);
    }
    this.bytes = bytes.slice();
    this.view = new DataView(this.bytes.buffer);
  }

  static read(tid: number): Regs {
    return new Regs(getRegset(tid, NT_PRSTATUS, USER_REGS_SIZE));
  }

  write(tid: number): void {
    setRegset(tid, NT_PRSTATUS, this.bytes);
  }

  get(name: RegName): bigint {
    return this.view.getBigUint64(REG_NAMES.indexOf(name) * 8, true);
  }

  /** The register as a signed value (syscall results, orig_rax). */
  signed(name: RegName): bigint {
    return this.view.getBigInt64(REG_NAMES.indexOf(name) * 8, true);
  }

  set(name: RegName, value: bigint | number): this {
    this.view.setBigUint64(REG_NAMES.indexOf(name) * 8, BigInt.asUintN(64, BigInt(value)), true);
    return this;
  }

  clone(): Regs {
    return new Regs(this.bytes);
  }

  toJSON(): Record<string, string> {
    return Object.fromEntries(REG_NAMES.map((n) => [n, "0x" + this.get(n).toString(16)]));
  }
}

/**
 * A tiny static x86-64 ELF executable, generated here rather than written
 * in C: it loops on pause(2). Restore starts it, seizes it, and makes its
 * clone3 calls create the restored processes; each child starts as a copy
 * of this almost empty address space.
 *
 * It cannot outlive amber: its first instructions ask for SIGKILL when its
 * parent dies (PR_SET_PDEATHSIG) and exit if that parent is already gone
 * (getppid() is no longer amber's pid, which is built into the code). Its
 * clone3 children do not inherit the death signal.
 */

const BASE = 0x10000n;
const EHDR = 64;
const PHDR = 56;
function le32(v: number): number[] {
  return [v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >>> 24) & 0xff];
}

/** The helper's code, for a helper started by process `parent`. */
function code(parent: number): number[] {
  return [
    ...[0xbf, ...le32(1)], // mov edi, PR_SET_PDEATHSIG
    ...[0xbe, ...le32(9)], // mov esi, SIGKILL
    ...[0xb8, ...le32(157), 0x0f, 0x05], // prctl
    ...[0xb8, ...le32(110), 0x0f, 0x05], // getppid
    ...[0x3d, ...le32(parent)], // cmp eax, parent
    ...[0x75, 0x09], // jne exit
    ...[0xb8, ...le32(34), 0x0f, 0x05, 0xeb, 0xf7], // loop: pause; jmp loop
    ...[0xbf, ...le32(1)], // exit: mov edi, 1
    ...[0xb8, ...le32(231), 0x0f, 0x05], // exit_group
  ];
}

export function helperElf(parent: number): Uint8Array {
  const CODE = code(parent);
  const size = EHDR + PHDR + CODE.length;
  const buf = new Uint8Array(size);
  const v = new DataView(buf.buffer);
  buf.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]); // ELF, 64-bit, little endian, SysV
  v.setUint16(16, 2, true); // ET_EXEC
  v.setUint16(18, 0x3e, true); // EM_X86_64
  v.setUint32(20, 1, true);
  v.setBigUint64(24, BASE + BigInt(EHDR + PHDR), true); // entry
  v.setBigUint64(32, BigInt(EHDR), true); // phoff
  v.setUint16(52, EHDR, true);
  v.setUint16(54, PHDR, true);
  v.setUint16(56, 1, true); // phnum
  v.setUint16(58, 64, true); // shentsize
  // PT_LOAD, R+X, the whole file at BASE.
  v.setUint32(EHDR, 1, true);
  v.setUint32(EHDR + 4, 5, true);
  v.setBigUint64(EHDR + 16, BASE, true);
  v.setBigUint64(EHDR + 24, BASE, true);
  v.setBigUint64(EHDR + 32, BigInt(size), true);
  v.setBigUint64(EHDR + 40, BigInt(size), true);
  v.setBigUint64(EHDR + 48, 0x1000n, true);
  buf.set(CODE, EHDR + PHDR);
  return buf;
}

/** Writes the helper to a private temporary file; returns its path. */
export function writeHelperElf(): string {
  const dir = Deno.makeTempDirSync({ prefix: "amber-helper-" });
  const path = `${dir}/amber-restore-helper`;
  Deno.writeFileSync(path, helperElf(Deno.pid), { mode: 0o700 });
  return path;
}

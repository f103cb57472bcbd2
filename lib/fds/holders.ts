/**
 * Who, on the whole system, holds a descriptor on an object: found by
 * reading every process's /proc/PID/fd once per dump (the tree is frozen,
 * so its part of the picture is stable).
 */
import type { TreeDumpState } from "../context.ts";

export interface Holder {
  pid: number;
  fd: number;
  /** fdinfo flags of that descriptor. */
  flags: number;
}

/** Per dump: every process's descriptors by link ("pipe:[123]"), read lazily. */
const scans = new WeakMap<TreeDumpState, Map<string, { pid: number; fd: number }[]>>();

function numbers(dir: string): number[] {
  try {
    return [...Deno.readDirSync(dir)].filter((e) => /^\d+$/.test(e.name)).map((e) => +e.name);
  } catch {
    return []; // gone, or not ours to read
  }
}

function scanAll(): Map<string, { pid: number; fd: number }[]> {
  const byLink = new Map<string, { pid: number; fd: number }[]>();
  for (const pid of numbers("/proc")) {
    if (pid === Deno.pid) continue;
    for (const fd of numbers(`/proc/${pid}/fd`)) {
      let link: string;
      try {
        link = Deno.readLinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue; // closed meanwhile
      }
      const list = byLink.get(link) ?? [];
      list.push({ pid, fd });
      byLink.set(link, list);
    }
  }
  return byLink;
}

/** Whether `pid` is a process amber traces (one of the frozen tree's). */
export function tracedByAmber(pid: number): boolean {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    return /^TracerPid:\s*(\d+)$/m.exec(status)?.[1] === String(Deno.pid);
  } catch {
    return false;
  }
}

/** Every descriptor of any process whose /proc link is `link`, with its flags. */
export function holdersOf(tree: TreeDumpState, link: string): Holder[] {
  let scan = scans.get(tree);
  if (!scan) scans.set(tree, scan = scanAll());
  return (scan.get(link) ?? []).flatMap(({ pid, fd }) => {
    try {
      const info = Deno.readTextFileSync(`/proc/${pid}/fdinfo/${fd}`);
      return [{ pid, fd, flags: parseInt(/^flags:\s*(\d+)/m.exec(info)?.[1] ?? "0", 8) }];
    } catch {
      return []; // closed since the scan
    }
  });
}

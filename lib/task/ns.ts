/**
 * Namespaces: amber restores a process into its own namespaces, so a
 * process whose /proc/PID/ns/* differ from the dumping amber's is refused,
 * and restore refuses to run in namespaces other than the dumper's, but
 * for a migrated tree (lib/migrate.ts).
 */
import { z } from "zod";
import { definePart } from "../context.ts";
import { AmberError } from "../errors.ts";
import { procPath } from "../proc/read.ts";

const Ns = z.object({ name: z.string(), id: z.string(), dumper: z.string() });

function nsLink(pid: number | "self", name: string): string {
  try {
    return Deno.readLinkSync(`/proc/${pid}/ns/${name}`);
  } catch {
    return "";
  }
}

function nsNames(pid: number): string[] {
  return [...Deno.readDirSync(procPath(pid, "ns"))].map((e) => e.name).sort();
}

export const nsPart = definePart({
  name: "ns",
  version: 1,
  schema: z.object({ namespaces: z.array(Ns) }),
  dump: ({ pid }) => ({
    namespaces: nsNames(pid).map((name) => ({
      name,
      id: nsLink(pid, name),
      dumper: nsLink("self", name),
    })),
  }),
  unrestorable({ namespaces }) {
    const n = namespaces.find((n) => n.id !== n.dumper);
    if (n) {
      return `namespace ${n.name} ${n.id} differs from amber's own ${n.dumper}: not supported yet`;
    }
  },
  precheck({ namespaces }, { options }) {
    // A migration restores into the receiving amber's namespaces (another
    // machine's, or here other ones): their ids say nothing across hosts.
    // What belongs to the old network namespace is refused by its kind.
    if (options.migrated) return;
    const n = namespaces.find((n) => nsLink("self", n.name) !== n.dumper);
    if (n) {
      throw new AmberError(
        `namespace ${n.name}: restore would put the process in ${
          nsLink("self", n.name)
        }, it was dumped in ${n.dumper}; restore from the namespaces it was dumped from`,
      );
    }
  },
  // Nothing to do: the restored process is born in amber's namespaces.
  restore() {},
});

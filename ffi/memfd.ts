/** memfd seals, read from outside through a /proc link to the memfd. */
import { check, libc } from "./libc.ts";

const O_RDONLY = 0, O_CLOEXEC = 0o2000000;
const F_GET_SEALS = 1034;

/** The seals (F_SEAL_*) of the memfd behind `path` (a /proc/PID/fd/N or map_files link). */
export function memfdSeals(path: string): number {
  const name = new TextEncoder().encode(path + "\0");
  const fd = check(`open ${path}`, libc().open(name, O_RDONLY | O_CLOEXEC, 0));
  try {
    return check("fcntl(F_GET_SEALS)", libc().fcntl(fd, F_GET_SEALS, 0n));
  } finally {
    libc().close(fd);
  }
}

/**
 * An images directory: created 0700, files 0600, each written to a
 * temporary name and renamed when complete, so a reader never sees half a
 * file; syncAll() makes them durable. A failed dump removes everything it
 * wrote.
 */
import { AmberError, withContext } from "../errors.ts";
import { decodeImage, encodeImage, imageFileName, type ImageKind } from "./codec.ts";

export class ImageDir {
  private written = new Set<string>();
  private synced = new Set<string>();
  private createdDir = false;

  constructor(readonly path: string) {}

  /** Prepares a directory for writing: creates it 0700 or checks it is usable. */
  openForWrite(): this {
    withContext(`images directory ${this.path}`, () => {
      try {
        const st = Deno.statSync(this.path);
        if (!st.isDirectory) throw new AmberError("not a directory");
      } catch (e) {
        if (!(e instanceof Deno.errors.NotFound)) throw e;
        Deno.mkdirSync(this.path, { mode: 0o700 });
        this.createdDir = true;
      }
      Deno.chmodSync(this.path, 0o700);
      // Probe writability now rather than after the tree is frozen.
      const probe = `${this.path}/.amber-probe-${Deno.pid}`;
      Deno.writeFileSync(probe, new Uint8Array(), { mode: 0o600 });
      Deno.removeSync(probe);
    });
    return this;
  }

  file(name: string): string {
    return `${this.path}/${name}`;
  }

  /**
   * Reserves a temporary name for file `name`; once its content is written
   * and synced, commit() gives it its real name.
   */
  reserve(name: string): { tmp: string; commit: () => void; drop: () => void } {
    const tmp = this.file(`${name}.tmp`);
    this.written.add(tmp);
    return {
      tmp,
      drop: () => {
        this.written.delete(tmp);
        Deno.removeSync(tmp);
      },
      commit: () => {
        Deno.renameSync(tmp, this.file(name));
        this.written.delete(tmp);
        this.written.add(this.file(name));
        this.synced.delete(this.file(name));
      },
    };
  }

  write<T>(kind: ImageKind<T>, body: T, pid?: number): void {
    const name = imageFileName(kind, pid);
    withContext(`image ${name}`, () => {
      const { tmp, commit } = this.reserve(name);
      const data = encodeImage(kind, body);
      {
        using file = Deno.openSync(tmp, { write: true, create: true, truncate: true, mode: 0o600 });
        let done = 0;
        while (done < data.length) done += file.writeSync(data.subarray(done));
      }
      commit();
    });
  }

  read<T>(kind: ImageKind<T>, pid?: number): T {
    const name = imageFileName(kind, pid);
    let bytes: Uint8Array;
    try {
      bytes = Deno.readFileSync(this.file(name));
    } catch (e) {
      throw new AmberError(
        `${this.file(name)}: cannot read: ${e instanceof Error ? e.message : e}`,
      );
    }
    return decodeImage(kind, bytes, this.file(name));
  }

  /** Makes every file written so far, and the directory entries, durable. */
  syncAll(): void {
    for (const f of this.written) {
      if (this.synced.has(f)) continue;
      using file = Deno.openSync(f, { read: true });
      file.syncSync();
      this.synced.add(f);
    }
    using d = Deno.openSync(this.path, { read: true });
    d.syncSync();
  }

  /** Removes every file this run wrote (and the directory if it made it). */
  discard(): void {
    for (const f of this.written) {
      try {
        Deno.removeSync(f);
      } catch { /* already gone */ }
    }
    this.written.clear();
    if (this.createdDir) {
      try {
        Deno.removeSync(this.path);
      } catch { /* not empty: leave it */ }
    }
  }
}

/** Small file writes the commands share. */
import { renameSync, writeFileSync } from 'node:fs'

/**
 * Writes `text` to a temporary file next to `file`, then renames it over `file`: a crash leaves the old content or
 * the new, never half of either (a rename within one directory is atomic on POSIX file systems).
 */
export function writeFileAtomic(file: string, text: string): void {
    const temporary = `${file}.tmp`
    writeFileSync(temporary, text)
    renameSync(temporary, file)
}

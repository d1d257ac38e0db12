/** Small file reads and writes the commands share. */
import { readFileSync, renameSync, writeFileSync } from 'node:fs'

import { CheckpointError } from './errors'

/**
 * Writes `text` to a temporary file next to `file`, then renames it over `file`: a crash leaves the old content or
 * the new, never half of either (a rename within one directory is atomic on POSIX file systems).
 */
export function writeFileAtomic(file: string, text: string): void {
    const temporary = `${file}.tmp`
    writeFileSync(temporary, text)
    renameSync(temporary, file)
}

/**
 * Reads a checkpoint file as JSON, before its shape is checked: undefined when it does not exist yet (a first
 * run).
 * An unreadable or damaged file is a CheckpointError naming --checkpoint, the file and `fix`.
 */
export function readCheckpointJson(file: string, fix: string): unknown {
    let text: string
    try {
        text = readFileSync(file, 'utf8')
    } catch (error) {
        const code = (error as NodeJS.ErrnoException).code ?? 'error'
        if (code === 'ENOENT') {
            return undefined
        }
        throw new CheckpointError(`--checkpoint ${file}: cannot read it (${code}); fix that, or pass another file`)
    }
    try {
        return JSON.parse(text) as unknown
    } catch {
        throw new CheckpointError(`--checkpoint ${file} is damaged (not valid JSON): ${fix}`)
    }
}

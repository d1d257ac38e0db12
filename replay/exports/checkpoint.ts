/**
 * The checkpoint of a replay of export files: which files are done, and how far the current one is, each file
 * bound to its name, size and a hash of its first bytes. A file that changed after its events were sent stops
 * the run (resuming would skip or resend the wrong events); files that appear later are simply not done yet.
 */

import { CheckpointError } from '../../pipeline/errors'
import { readCheckpointJson, writeFileAtomic } from '../../pipeline/files'
import { ExportFile } from './discover'

export const EXPORTS_CHECKPOINT_KIND = 'export-files'
export const EXPORTS_CHECKPOINT_VERSION = 1

/** A file as the checkpoint knows it. */
export interface FileStamp {
    name: string
    size: number
    /** sha256 of its first HEAD_BYTES bytes. */
    head: string
}

export interface ExportsCheckpoint {
    kind: typeof EXPORTS_CHECKPOINT_KIND
    version: number
    /** sha256 of the event filters, the excluded properties and --dedupe. */
    options: string
    /** sha256 of the webhook URL (never the URL itself). */
    destination: string
    done: FileStamp[]
    /** The file being read, and its first row not yet handled. */
    current: (FileStamp & { next: number }) | null
}

/** A file in a checkpoint and in the input: where to start in it, or that it is done. */
export type Resume = { file: ExportFile; from: number } | { file: ExportFile; done: true }

const START_OVER = 'or use a new --checkpoint file to replay everything from the start'

export function stampOf(file: ExportFile): FileStamp {
    return { name: file.name, size: file.size, head: file.head }
}

function isValid(parsed: Partial<ExportsCheckpoint> | null): boolean {
    return (
        parsed !== null &&
        typeof parsed === 'object' &&
        parsed.kind === EXPORTS_CHECKPOINT_KIND &&
        parsed.version === EXPORTS_CHECKPOINT_VERSION &&
        Array.isArray(parsed.done) &&
        typeof parsed.options === 'string' &&
        typeof parsed.destination === 'string' &&
        (parsed.current === null || Number.isInteger(parsed.current?.next))
    )
}

/** Reads an export-files checkpoint; null when the file does not exist. */
export function readExportsCheckpoint(file: string): ExportsCheckpoint | null {
    const fix = 'remove it to start over, or pass the --checkpoint file these files were replayed with'
    const parsed = readCheckpointJson(file, fix) as Partial<ExportsCheckpoint> | null | undefined
    if (parsed === undefined) {
        return null
    }
    if (!isValid(parsed)) {
        throw new CheckpointError(`--checkpoint ${file} is not a checkpoint of a replay of export files: ${fix}`)
    }
    return parsed as ExportsCheckpoint
}

/** Stops with the fix when a file the checkpoint passed has changed since. */
function checkUnchanged(checkpointFile: string, saved: FileStamp, file: ExportFile): void {
    const what =
        saved.size !== file.size ? `its size was ${saved.size} bytes, now ${file.size}` : 'its first bytes differ'
    if (saved.size !== file.size || saved.head !== file.head) {
        throw new CheckpointError(
            `${file.name} changed after --checkpoint ${checkpointFile} recorded events of it as sent (${what}): ` +
                `put back the file that was replayed, or move the changed one out of the input and replay it ` +
                `alone with a new --checkpoint file, ${START_OVER}`
        )
    }
}

/** Checks the options and webhook a checkpoint was written with. */
export function checkBinding(file: string, saved: ExportsCheckpoint, options: string, destination: string): void {
    if (saved.options !== options) {
        throw new CheckpointError(
            `--checkpoint ${file} was written with another --allowed-events, --excluded-events, ` +
                `--excluded-properties or --dedupe, and resuming would skip events those options left out: ` +
                `run with the same options, ${START_OVER}`
        )
    }
    if (saved.destination !== destination) {
        throw new CheckpointError(`--checkpoint ${file} was written for another webhook URL: ${START_OVER.slice(3)}`)
    }
}

/** Where each listed file starts, per the checkpoint; files it finished before that are gone are counted. */
export function resumePlan(
    checkpointFile: string,
    saved: ExportsCheckpoint | null,
    files: ExportFile[]
): { plan: Resume[]; gone: number } {
    const done = new Map((saved?.done ?? []).map((stamp) => [stamp.name, stamp]))
    const current = saved?.current ?? null
    let seen = 0
    const plan = files.map((file): Resume => {
        const finished = done.get(file.name)
        if (finished) {
            seen++
            checkUnchanged(checkpointFile, finished, file)
            return { file, done: true }
        }
        if (current && current.name === file.name) {
            checkUnchanged(checkpointFile, current, file)
            return { file, from: current.next }
        }
        return { file, from: 0 }
    })
    return { plan, gone: done.size - seen }
}

/** Saves the checkpoint so that a crash leaves the old one or the new one, never half of one. */
export function saveExportsCheckpoint(file: string, checkpoint: ExportsCheckpoint): void {
    writeFileAtomic(file, JSON.stringify(checkpoint))
}

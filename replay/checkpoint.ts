/**
 * Replay's checkpoint file: how far the input is handled, bound to that input. It records a fingerprint of the
 * input's first bytes, of the options that decide what is sent, and of the webhook, so resuming with another
 * input, other filters or another webhook stops with a clear message instead of skipping what was never sent.
 */
import { createHash } from 'node:crypto'

import { ParsedConfig } from '../index'
import { AheadRange } from '../pipeline'
import { CheckpointError } from '../pipeline/errors'
import { readCheckpointJson, writeFileAtomic } from '../pipeline/files'
import { InputFormat } from './input'

export const CHECKPOINT_VERSION = 2

/**
 * Every record before `next` is handled, and so is every range in `done` (batches acknowledged while an earlier
 * one was still out). Ordinals count input records, whatever the format.
 */
export interface Checkpoint {
    version: number
    /** sha256 of the input's first `bytes` bytes. */
    input: { bytes: number; sha256: string }
    /** sha256 of the format, the event filters and the excluded properties. */
    options: string
    /** sha256 of the webhook URL (never the URL itself). */
    destination: string
    next: number
    done: Array<[number, number]>
}

/** A checkpoint that cannot be used: bad usage, so the run stops before sending anything (exit code 2). */
export { CheckpointError }

const sha256 = (data: string | Buffer): string => createHash('sha256').update(data).digest('hex')

/** What a checkpoint is bound to: the input's first bytes, and the options that change what is sent. */
export function binding(start: Buffer, format: InputFormat, config: ParsedConfig) {
    const sorted = (values: Iterable<string>): string[] => [...values].sort()
    const options = {
        format,
        allowedEvents: config.allowedEvents ? sorted(config.allowedEvents) : null,
        excludedEvents: sorted(config.excludedEvents),
        excludedProperties: sorted(config.excludedProperties),
    }
    return {
        input: { bytes: start.length, sha256: sha256(start) },
        options: sha256(JSON.stringify(options)),
        destination: sha256(`patterns-connector webhook ${config.webhookUrl}`),
        start,
    }
}

export type Binding = ReturnType<typeof binding>

/** Reads and checks the shape of a checkpoint file; null when there is none. */
export function readCheckpoint(file: string): Checkpoint | null {
    const fix = 'remove it to start over, or pass the --checkpoint file this input was replayed with'
    const parsed = readCheckpointJson(file, fix) as Partial<Checkpoint> | null | undefined
    if (parsed === undefined) {
        return null
    }
    const valid =
        parsed !== null &&
        typeof parsed === 'object' &&
        parsed.version === CHECKPOINT_VERSION &&
        Number.isInteger(parsed.next) &&
        Array.isArray(parsed.done) &&
        typeof parsed.input?.sha256 === 'string' &&
        Number.isInteger(parsed.input.bytes) &&
        typeof parsed.options === 'string' &&
        typeof parsed.destination === 'string'
    if (!valid) {
        throw new CheckpointError(`--checkpoint ${file} is not a checkpoint written by this version of replay: ${fix}`)
    }
    return parsed as Checkpoint
}

/** The checkpoint to resume from: a fresh one when the file does not exist, else one bound to this input. */
export function loadCheckpoint(file: string | null, bound: Binding): Checkpoint {
    const fresh = { version: CHECKPOINT_VERSION, input: bound.input, options: bound.options }
    const saved = file ? readCheckpoint(file) : null
    if (!saved || !file) {
        return { ...fresh, destination: bound.destination, next: 0, done: [] }
    }
    const newFile = 'use a new --checkpoint file to replay it from the start'
    const sameInput =
        saved.input.bytes <= bound.start.length &&
        saved.input.sha256 === sha256(bound.start.subarray(0, saved.input.bytes))
    if (!sameInput) {
        throw new CheckpointError(
            `--checkpoint ${file} belongs to another input (the first ${saved.input.bytes} bytes differ): ` +
                `pass the checkpoint file of this input, or ${newFile}`
        )
    }
    if (saved.options !== bound.options) {
        throw new CheckpointError(
            `--checkpoint ${file} was written with another --format, --allowed-events, --excluded-events or ` +
                `--excluded-properties, and resuming would skip events those options left out: ` +
                `run with the same options, or ${newFile}`
        )
    }
    if (saved.destination !== bound.destination) {
        throw new CheckpointError(`--checkpoint ${file} was written for another webhook URL: ${newFile}`)
    }
    return saved
}

/** Write to a temporary file, then rename: a crash leaves the old checkpoint or the new one, never half of one. */
export function writeCheckpoint(file: string, checkpoint: Checkpoint): void {
    writeFileAtomic(file, JSON.stringify(checkpoint))
}

export function isHandled(checkpoint: Pick<Checkpoint, 'next' | 'done'>, ordinal: number): boolean {
    return ordinal < checkpoint.next || checkpoint.done.some(([start, end]) => ordinal >= start && ordinal < end)
}

/** The checkpoint after the pipeline committed `last` (and acknowledged the `ahead` batches beyond it). */
export function advanced(checkpoint: Checkpoint, last: number, ahead: AheadRange<number>[]): Checkpoint {
    let next = Math.max(checkpoint.next, last + 1)
    const ranges = [...checkpoint.done, ...ahead.map(({ after, last }): [number, number] => [after + 1, last + 1])]
        .filter(([start, end]) => end > start)
        .sort((a, b) => a[0] - b[0])
    const done: Array<[number, number]> = []
    for (const [start, end] of ranges) {
        if (start <= next) {
            next = Math.max(next, end)
        } else {
            done.push([start, end])
        }
    }
    return { ...checkpoint, next, done }
}

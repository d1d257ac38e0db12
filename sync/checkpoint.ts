/**
 * The sync checkpoint: the cursor of the last event acknowledged in order, bound to where it came from (host,
 * project, event filters, --since). Written atomically, so a crash leaves the old one or the new one.
 */

import { CheckpointError } from '../pipeline/errors'
import { readCheckpointJson, writeFileAtomic } from '../pipeline/files'
import type { Cursor } from './query'

export { CheckpointError }

export const SYNC_CHECKPOINT_VERSION = 1

/** What a cursor means only together with: another host, project or filter reads another sequence of events. */
export interface SourceBinding {
    host: string
    projectId: string
    allowedEvents: string[] | null
    excludedEvents: string[]
    /** The --since of the first run, ISO 8601. */
    since: string
    /** `--where`: the events PostHog lets through. Absent in checkpoints from before the flag: none. */
    where?: string | null
    /** `--with-person`: the shape of what was sent. Absent in checkpoints from before the flag: false. */
    withPerson?: boolean
}

/** The filter and the shape: what a resume must keep, or the feed would mix two kinds of events. */
const SHAPE_FLAGS = ['--where', '--with-person']

export interface SyncCheckpoint {
    version: number
    kind: 'posthog-sync'
    source: SourceBinding
    cursor: Cursor
    updatedAt: string
}

/** Filters as a set: the order they were typed in does not change what is read. */
export function normaliseBinding(binding: SourceBinding): SourceBinding {
    return {
        ...binding,
        allowedEvents: binding.allowedEvents ? [...new Set(binding.allowedEvents)].sort() : null,
        excludedEvents: [...new Set(binding.excludedEvents)].sort(),
        where: binding.where?.trim() || null,
        withPerson: binding.withPerson === true,
    }
}

/** --where and --with-person as they differ between the checkpoint's run and this one. */
function shapeDifferences(a: SourceBinding, b: SourceBinding): string[] {
    const differences: string[] = []
    const where = (w: string | null | undefined): string => (w ? JSON.stringify(w) : 'none')
    if (a.where !== b.where) {
        differences.push(`--where ${where(a.where)} then, ${where(b.where)} now`)
    }
    if (a.withPerson !== b.withPerson) {
        const person = (on: boolean | undefined): string => (on ? 'on' : 'off')
        differences.push(`--with-person ${person(a.withPerson)} then, ${person(b.withPerson)} now`)
    }
    return differences
}

/** The fields that differ between the checkpoint's source and this run's, described for the error message. */
export function bindingDifferences(saved: SourceBinding, current: SourceBinding, sinceGiven: boolean): string[] {
    const a = normaliseBinding(saved)
    const b = normaliseBinding(current)
    const differences: string[] = []
    const show = (v: unknown): string => JSON.stringify(v)
    if (a.host !== b.host) {
        differences.push(`--posthog-url ${show(a.host)} then, ${show(b.host)} now`)
    }
    if (a.projectId !== b.projectId) {
        differences.push(`--project-id ${show(a.projectId)} then, ${show(b.projectId)} now`)
    }
    if (show(a.allowedEvents) !== show(b.allowedEvents)) {
        differences.push(
            `--allowed-events ${show(a.allowedEvents ?? 'all')} then, ${show(b.allowedEvents ?? 'all')} now`
        )
    }
    if (show(a.excludedEvents) !== show(b.excludedEvents)) {
        differences.push(`--excluded-events ${show(a.excludedEvents)} then, ${show(b.excludedEvents)} now`)
    }
    if (sinceGiven && Date.parse(a.since) !== Date.parse(b.since)) {
        differences.push(`--since ${a.since} then, ${b.since} now`)
    }
    return [...differences, ...shapeDifferences(a, b)]
}

function isCursor(value: unknown): value is Cursor {
    const c = value as Cursor
    return (
        typeof c === 'object' &&
        c !== null &&
        Number.isSafeInteger(c.ms) &&
        (c.uuid === null || typeof c.uuid === 'string')
    )
}

/** The saved checkpoint, or null when the file does not exist yet (a first run). */
export function readSyncCheckpoint(file: string): SyncCheckpoint | null {
    const parsed = readCheckpointJson(file, 'remove it to start over from --since') as
        Partial<SyncCheckpoint> | null | undefined
    if (parsed === undefined) {
        return null
    }
    if (
        parsed === null ||
        parsed.version !== SYNC_CHECKPOINT_VERSION ||
        parsed.kind !== 'posthog-sync' ||
        !isCursor(parsed.cursor) ||
        typeof parsed.source?.host !== 'string'
    ) {
        throw new CheckpointError(
            `--checkpoint: ${file} is not a sync checkpoint written by this tool (a replay checkpoint?); ` +
                'use another file, or remove it to start over'
        )
    }
    return parsed as SyncCheckpoint
}

/**
 * Where this run starts: the saved cursor if the checkpoint belongs to the same source, the --since cursor on a
 * first run. A checkpoint from another source is an error, never silently reused or overwritten.
 */
export function resumeFrom(
    file: string | null,
    current: SourceBinding,
    sinceGiven: boolean
): { cursor: Cursor; binding: SourceBinding; resumed: boolean } {
    const saved = file ? readSyncCheckpoint(file) : null
    if (!saved) {
        return { cursor: { ms: Date.parse(current.since), uuid: null }, binding: current, resumed: false }
    }
    const differences = bindingDifferences(saved.source, current, sinceGiven)
    if (differences.length === 1 && differences[0]?.startsWith('--since')) {
        throw new CheckpointError(
            `--checkpoint: ${file} started from --since ${saved.source.since}, and resumes from there; ` +
                `--since ${current.since} would leave a gap or read twice. Leave --since out to resume, or use a ` +
                'new --checkpoint file to start from the new --since.'
        )
    }
    if (differences.length > 0 && differences.every((d) => SHAPE_FLAGS.some((flag) => d.startsWith(`${flag} `)))) {
        throw new CheckpointError(
            `--checkpoint: ${file} was written for another filter or shape (${differences.join('; ')}): the events ` +
                'before its position were sent with the old ones, so resuming would change the feed halfway (and a ' +
                'new --where would miss the earlier events it lets through). Run with the same --where and ' +
                '--with-person to resume, or start over with a new --checkpoint file ' +
                '(and --since where the new feed should begin).'
        )
    }
    if (differences.length > 0) {
        throw new CheckpointError(
            `--checkpoint: ${file} belongs to another source (${differences.join('; ')}). ` +
                'Use another --checkpoint file for this source, or run with the same options.'
        )
    }
    return { cursor: saved.cursor, binding: saved.source, resumed: true }
}

/** Write to a temporary file, then rename over the old one: readers see the old checkpoint or the new one. */
export function writeSyncCheckpoint(file: string, binding: SourceBinding, cursor: Cursor, nowMs: number): void {
    const checkpoint: SyncCheckpoint = {
        version: SYNC_CHECKPOINT_VERSION,
        kind: 'posthog-sync',
        source: normaliseBinding(binding),
        cursor,
        updatedAt: new Date(nowMs).toISOString(),
    }
    writeFileAtomic(file, JSON.stringify(checkpoint) + '\n')
}

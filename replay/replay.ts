/**
 * Replays exported events into the webhook with the plugin's own filters, shaping, signing, retries and
 * redaction: K requests in flight, batches bounded by count and bytes, a checkpoint for resuming, and a
 * dead-letter file for what the webhook permanently refused.
 */
import { appendFileSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { Readable } from 'node:stream'

import { deliver, DeliveryResult, ParsedConfig, SenderEnv, shapeEvent, shouldSend } from '../index'
import { InputFormat, readRecords } from './input'

/** Replay has no host guard, so a batch may keep retrying this long before the run stops. */
export const REPLAY_BATCH_DEADLINE_MS = 120_000
export const DEFAULT_CONCURRENCY = 4
export const CHECKPOINT_VERSION = 1

/**
 * The checkpoint: every record before `next` is handled, and so is every range in `done` (batches acknowledged
 * while an earlier one was still out). Ordinals count input records, whatever the format.
 */
export interface Checkpoint {
    version: number
    next: number
    done: Array<[number, number]>
}

export interface ReplayProgress {
    read: number
    delivered: number
    filtered: number
    deadLettered: number
    retries: number
    requests: number
    inFlight: number
}

export interface ReplayReport extends ReplayProgress {
    format: InputFormat
    skipped: number
    malformed: number
    batches: number
    bytesSent: number
    checkpoint: number
    /** Why the run stopped early, or null if it read everything. */
    stopped: string | null
    durationMs: number
}

export interface ReplayOptions {
    input: Readable
    format?: InputFormat | 'auto'
    config: ParsedConfig
    env: SenderEnv
    concurrency?: number
    checkpointFile?: string | null
    deadLetterFile?: string | null
    dryRun?: boolean
    /** Aborting stops reading; requests in flight finish and the checkpoint is written. */
    signal?: AbortSignal
    onProgress?: (progress: ReplayProgress) => void
    /** Told of each unreadable record and each refused batch, so they are reported and not only counted. */
    onWarning?: (message: string) => void
}

export function readCheckpoint(file: string | null | undefined): Checkpoint {
    const fresh: Checkpoint = { version: CHECKPOINT_VERSION, next: 0, done: [] }
    if (!file) {
        return fresh
    }
    let text: string
    try {
        text = readFileSync(file, 'utf8')
    } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
            return fresh
        }
        throw new Error(`--checkpoint: cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? 'error'}`)
    }
    const parsed = JSON.parse(text) as Partial<Checkpoint>
    if (parsed.version !== CHECKPOINT_VERSION || typeof parsed.next !== 'number' || !Array.isArray(parsed.done)) {
        throw new Error(`--checkpoint: ${file} is not a checkpoint written by this tool; remove it to start over`)
    }
    return { version: CHECKPOINT_VERSION, next: parsed.next, done: parsed.done }
}

/** Write to a temporary file, then rename: a crash leaves the old checkpoint or the new one, never half of one. */
export function writeCheckpoint(file: string, checkpoint: Checkpoint): void {
    const temporary = `${file}.tmp`
    writeFileSync(temporary, JSON.stringify(checkpoint))
    renameSync(temporary, file)
}

export function isHandled(checkpoint: Checkpoint, ordinal: number): boolean {
    return ordinal < checkpoint.next || checkpoint.done.some(([start, end]) => ordinal >= start && ordinal < end)
}

interface Range {
    start: number
    end: number
    done: boolean
}

interface Item {
    uuid: string
    json: string
    bytes: number
}

export async function replay(options: ReplayOptions): Promise<ReplayReport> {
    const started = Date.now()
    const { config, env } = options
    const concurrency = options.concurrency ?? DEFAULT_CONCURRENCY
    const previous = readCheckpoint(options.checkpointFile)
    const { format, chunks } = await readRecords(options.input, options.format ?? 'auto')
    const report: ReplayReport = {
        format,
        read: 0,
        skipped: 0,
        delivered: 0,
        filtered: 0,
        deadLettered: 0,
        malformed: 0,
        retries: 0,
        requests: 0,
        inFlight: 0,
        batches: 0,
        bytesSent: 0,
        checkpoint: previous.next,
        stopped: null,
        durationMs: 0,
    }
    const deadLetter = (line: string): void => {
        if (options.deadLetterFile) {
            appendFileSync(options.deadLetterFile, line + '\n')
        }
    }
    // Ranges dispatched and not yet folded into the checkpoint, in input order.
    const window: Range[] = []
    const earlierDone = previous.done.slice()
    let acknowledged = previous.next
    const saveCheckpoint = (): void => {
        while (window[0]?.done) {
            acknowledged = window.shift()?.end ?? acknowledged
        }
        // Ranges acknowledged out of order are kept, so a resume never resends them.
        const done: Array<[number, number]> = [
            ...earlierDone.filter(([, end]) => end > acknowledged),
            ...window.filter((r) => r.done && r.end > r.start).map((r): [number, number] => [r.start, r.end]),
        ]
        report.checkpoint = acknowledged
        if (options.checkpointFile && !options.dryRun) {
            writeCheckpoint(options.checkpointFile, { version: CHECKPOINT_VERSION, next: acknowledged, done })
        }
    }

    const inFlight = new Set<Promise<void>>()
    let lastProgress = 0
    const progress = (force = false): void => {
        if (!options.onProgress || (!force && Date.now() - lastProgress < 250)) {
            return
        }
        lastProgress = Date.now()
        report.inFlight = inFlight.size
        options.onProgress({ ...report })
    }

    const settle = (range: Range, results: DeliveryResult<Item>[]): void => {
        let retryable: string | null = null
        for (const { items, error } of results) {
            if (!error) {
                report.delivered += items.length
            } else if (error.name === 'RetryError') {
                // Not acknowledged and not refused: the range stays open so a resume sends it again.
                retryable = error.message
            } else {
                report.deadLettered += items.length
                options.onWarning?.(`${items.length} event(s) refused: ${error.message}`)
                for (const item of items) {
                    deadLetter(`{"reason":${JSON.stringify(error.message)},"event":${item.json}}`)
                }
            }
        }
        if (retryable) {
            report.stopped ??= `the webhook kept failing: ${retryable}`
            return
        }
        range.done = true
        saveCheckpoint()
        progress()
    }

    const dispatch = async (items: Item[], start: number, end: number): Promise<void> => {
        const range: Range = { start, end, done: false }
        window.push(range)
        if (items.length === 0) {
            range.done = true
            saveCheckpoint()
            return
        }
        report.batches++
        const bytes = items.reduce((sum, item) => sum + item.bytes + 1, 1)
        if (options.dryRun) {
            report.bytesSent += bytes
            report.delivered += items.length
            range.done = true
            saveCheckpoint()
            return
        }
        while (inFlight.size >= concurrency) {
            await Promise.race(inFlight)
        }
        if (report.stopped || options.signal?.aborted) {
            // Stopping: this batch is not sent, and its range stays open so a resume sends it.
            return
        }
        report.bytesSent += bytes
        const task = deliver(items, config, env, env.now() + config.deadlineMs, {
            onAttempt: (outcome) => {
                report.requests++
                if (outcome.kind === 'retry') {
                    report.retries++
                }
            },
        }).then(
            (results) => settle(range, results),
            (error: unknown) => {
                report.stopped ??= `unexpected ${(error as Error).name ?? 'error'} while sending`
            }
        )
        const tracked = task.finally(() => inFlight.delete(tracked))
        inFlight.add(tracked)
    }

    let batch: Item[] = []
    let batchBytes = 2
    let batchStart = previous.next
    let nextOrdinal = previous.next
    try {
        reading: for await (const chunk of chunks) {
            for (const record of chunk) {
                nextOrdinal = record.ordinal + 1
                if (isHandled(previous, record.ordinal)) {
                    report.skipped++
                    // A skipped record closes the open batch, so ranges never straddle handled records.
                    if (batch.length > 0) {
                        await dispatch(batch, batchStart, record.ordinal)
                        batch = []
                        batchBytes = 2
                    }
                    batchStart = record.ordinal + 1
                    continue
                }
                if (options.signal?.aborted || report.stopped) {
                    nextOrdinal = record.ordinal
                    break reading
                }
                report.read++
                if (record.kind === 'malformed') {
                    report.malformed++
                    const where = record.line !== null ? `line ${record.line}: ` : ''
                    options.onWarning?.(`${where}${record.reason}`)
                    deadLetter(
                        JSON.stringify({ reason: `${where}${record.reason}`, line: record.line, raw: record.raw })
                    )
                    continue
                }
                const event = record.event
                if (!shouldSend(String(event.event), config)) {
                    report.filtered++
                    continue
                }
                // With nothing to remove, the event is sent as read: its line is already valid JSON.
                const json =
                    record.text !== undefined && config.excludedProperties.length === 0
                        ? record.text
                        : JSON.stringify(shapeEvent(event, config.excludedProperties))
                const item: Item = { uuid: String(event.uuid ?? ''), json, bytes: Buffer.byteLength(json) }
                if (batch.length > 0 && batchBytes + 1 + item.bytes > config.maxBatchBytes) {
                    await dispatch(batch, batchStart, record.ordinal)
                    batch = []
                    batchBytes = 2
                    batchStart = record.ordinal
                }
                batch.push(item)
                batchBytes += item.bytes + (batch.length > 1 ? 1 : 0)
                if (batch.length >= config.maxBatchEvents) {
                    await dispatch(batch, batchStart, record.ordinal + 1)
                    batch = []
                    batchBytes = 2
                    batchStart = record.ordinal + 1
                }
                progress()
            }
        }
    } catch (error) {
        // Unreadable input (a broken JSON array, say) stops the run; what was sent so far is still checkpointed.
        report.stopped ??= (error as Error).message
    }
    if (!report.stopped && !options.signal?.aborted && (batch.length > 0 || batchStart < nextOrdinal)) {
        await dispatch(batch, batchStart, nextOrdinal)
    }
    await Promise.all(inFlight)
    if (options.signal?.aborted) {
        report.stopped ??= 'interrupted'
    }
    saveCheckpoint()
    report.inFlight = 0
    report.durationMs = Date.now() - started
    progress(true)
    return report
}

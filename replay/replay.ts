/**
 * Replays exported events into the webhook: the file reader as a source, then the shared pipeline (the plugin's
 * filters, shaping, signing, retries and redaction; K requests in flight; an ordered checkpoint), with a
 * checkpoint file bound to its input and a dead-letter file for what the webhook refused.
 */
import { Outcome, ParsedConfig, SenderEnv } from '../index'
import { PipelineProgress, PipelineReport, runPipeline, Source, SourceRecord } from '../pipeline'
import { DEFAULT_RETRY_FOR_MS } from '../pipeline/cli-options'
import { deadLetterWriter } from '../pipeline/dead-letter'
import { commandName } from '../pipeline/usage'
import { advanced, binding, Checkpoint, isHandled, loadCheckpoint, writeCheckpoint } from './checkpoint'
import { InputFormat, InputRecord, readRecords } from './input'

export { DEFAULT_CONCURRENCY } from '../pipeline'
export type { Checkpoint } from './checkpoint'
export { CHECKPOINT_VERSION, CheckpointError, readCheckpoint } from './checkpoint'

/** Replay has no host guard, so a batch may keep retrying this long before the run stops (--retry-for's default). */
export const REPLAY_BATCH_DEADLINE_MS = DEFAULT_RETRY_FOR_MS

/** How to run replay on standard input, for messages: as this process was started, so the hint runs as shown. */
export const REPLAY_FROM_STDIN = `${commandName()} replay - [options]`

export type ReplayProgress = PipelineProgress

export interface ReplayReport extends PipelineReport<number> {
    format: InputFormat
    /** Records already handled by an earlier run, per the checkpoint. */
    skipped: number
    /** The checkpoint: every record before this one is handled. */
    checkpoint: number
}

export interface ReplayOptions {
    input: AsyncIterable<Buffer | string>
    /** Names the input in messages, e.g. its path. */
    inputLabel?: string | null
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
    /** Told of every webhook attempt's outcome (health, metrics). */
    onOutcome?: (outcome: Outcome) => void
}

/** The source stage: input records the checkpoint does not cover, positioned by their ordinal. */
async function* unhandledRecords(
    chunks: AsyncIterable<InputRecord[]>,
    checkpoint: Checkpoint,
    counts: { skipped: number }
): Source<number> {
    for await (const chunk of chunks) {
        const records: SourceRecord<number>[] = []
        for (const record of chunk) {
            if (isHandled(checkpoint, record.ordinal)) {
                counts.skipped++
            } else if (record.kind === 'event') {
                records.push({ position: record.ordinal, kind: 'event', event: record.event, text: record.text })
            } else {
                const { reason, raw, line } = record
                records.push({ position: record.ordinal, kind: 'malformed', reason, raw, line })
            }
        }
        yield records
    }
}

export async function replay(options: ReplayOptions): Promise<ReplayReport> {
    const { config, checkpointFile } = options
    const label = options.inputLabel ?? null
    const opened = await readRecords(options.input, options.format ?? 'auto', label, REPLAY_FROM_STDIN)
    let checkpoint = loadCheckpoint(checkpointFile ?? null, binding(opened.start, opened.format, config))
    const counts = { skipped: 0 }
    const report = await runPipeline<number>({
        ...options,
        source: unhandledRecords(opened.chunks, checkpoint, counts),
        start: checkpoint.next - 1,
        commit: (last, ahead) => {
            checkpoint = advanced(checkpoint, last, ahead)
            if (checkpointFile) {
                writeCheckpoint(checkpointFile, checkpoint)
            }
        },
        deadLetter: deadLetterWriter<number>(options.deadLetterFile),
    })
    return { ...report, format: opened.format, skipped: counts.skipped, checkpoint: checkpoint.next }
}

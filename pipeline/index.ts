/**
 * One delivery pipeline for every source (replay's file reader, sync's PostHog pager):
 * source → filter and shape → batch → K in flight → ordered checkpoint, plus dead letters, progress and a report.
 * See README.md for the contract a source can rely on.
 */
import { Outcome, ParsedConfig, SenderEnv } from '../index'
import { batchItems } from './batch'
import { Commit, orderedCheckpoint } from './checkpoint'
import { sendBatch, WaitOut } from './send'
import { shapeRecords } from './shape'
import { DeadLetter, emptyReport, PipelineProgress, PipelineReport, Source } from './types'
import { runWindow } from './window'

export { bodyBytes } from './batch'
export type { AheadRange, Commit } from './checkpoint'
export * from './types'

export const DEFAULT_CONCURRENCY = 4
/** Progress is reported at most this often, and once at the end. */
export const PROGRESS_INTERVAL_MS = 250

export interface PipelineOptions<P> {
    source: Source<P>
    config: ParsedConfig
    env: SenderEnv
    /** Batches in flight at most. */
    concurrency?: number
    /** Told of the last position such that it and every record before it is handled; in order, one at a time. */
    commit?: Commit<P>
    /** The position committed before this run, if any (the source resumes after it). */
    start?: P
    deadLetter?: (entry: DeadLetter<P>) => void
    onProgress?: (progress: PipelineProgress) => void
    onWarning?: (message: string) => void
    /** Send a partial batch at the end of every source chunk, for live sources. */
    flushEachChunk?: boolean
    dryRun?: boolean
    /** Aborting stops reading; batches in flight finish and are committed. */
    signal?: AbortSignal
    /** Told of every webhook attempt's outcome (health, metrics). */
    onOutcome?: (outcome: Outcome) => void
    /** A batch the webhook will not take is retried in capped rounds within this budget (see send.ts). */
    waitOut?: WaitOut
}

function throttledProgress(report: PipelineReport<unknown>, onProgress?: (progress: PipelineProgress) => void) {
    let last = 0
    return (force = false): void => {
        if (onProgress && (force || Date.now() - last >= PROGRESS_INTERVAL_MS)) {
            last = Date.now()
            const { read, delivered, filtered, deadLettered, malformed, retries, requests, inFlight } = report
            onProgress({ read, delivered, filtered, deadLettered, malformed, retries, requests, inFlight })
        }
    }
}

export async function runPipeline<P>(options: PipelineOptions<P>): Promise<PipelineReport<P>> {
    const started = Date.now()
    const { config, signal } = options
    const report = emptyReport<P>()
    const progress = throttledProgress(report, options.onProgress)
    const commit: Commit<P> = async (position, ahead) => {
        await options.commit?.(position, ahead)
        report.committed = position
    }
    const checkpoint = orderedCheckpoint(options.dryRun ? () => undefined : commit, options.start)
    const shaped = shapeRecords(options.source, config, report, (record) => {
        const reason = `${record.line != null ? `line ${record.line}: ` : ''}${record.reason}`
        options.onWarning?.(reason)
        options.deadLetter?.({ position: record.position, reason, raw: record.raw, line: record.line })
        progress()
    })
    const batches = batchItems(shaped, config, options.flushEachChunk)
    const sendOptions = { ...options, counts: report }
    try {
        await runWindow(batches, {
            concurrency: options.concurrency ?? DEFAULT_CONCURRENCY,
            stopping: () => report.stopped !== null || Boolean(signal?.aborted) || checkpoint.failure() !== null,
            onInFlight: (count) => (report.inFlight = count),
            send: async (batch) => {
                const acknowledge = checkpoint.open(batch.last)
                if (await sendBatch(batch, sendOptions)) {
                    acknowledge()
                }
                progress()
            },
        })
    } catch (error) {
        // Unreadable input (a broken JSON array, say) stops the run; what was acknowledged is still committed.
        report.stopped ??= (error as Error).message
    }
    try {
        await checkpoint.settled()
    } catch (error) {
        report.stopped ??= `could not save the checkpoint: ${(error as Error).message}`
    }
    if (signal?.aborted) {
        report.stopped ??= 'interrupted'
    }
    report.inFlight = 0
    report.durationMs = Date.now() - started
    progress(true)
    return report
}

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
/**
 * Progress is reported at most this often, once more after the last change (so a run that goes quiet, a feed
 * between polls, is never left showing a count from before its last batches), and once at the end.
 */
export const PROGRESS_INTERVAL_MS = 250

/** How long until the next progress report may go out: 0 for now, else the rest of the interval since the last. */
export function progressDelayMs(lastMs: number | null, nowMs: number, intervalMs = PROGRESS_INTERVAL_MS): number {
    return lastMs === null ? 0 : Math.max(0, lastMs + intervalMs - nowMs)
}

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

/**
 * Progress reports, throttled with a trailing report: a change within the interval is reported when it ends,
 * with the counters as they are then. `final` reports at once and cancels what is pending.
 */
function throttledProgress(report: PipelineReport<unknown>, onProgress?: (progress: PipelineProgress) => void) {
    let last: number | null = null
    let trailing: ReturnType<typeof setTimeout> | null = null
    const send = (): void => {
        trailing = null
        last = Date.now()
        const { read, delivered, filtered, deadLettered, malformed, retries, requests, inFlight } = report
        onProgress?.({ read, delivered, filtered, deadLettered, malformed, retries, requests, inFlight })
    }
    const changed = (): void => {
        if (!onProgress || trailing !== null) {
            return
        }
        const delayMs = progressDelayMs(last, Date.now())
        if (delayMs === 0) {
            send()
        } else {
            trailing = setTimeout(send, delayMs)
        }
    }
    const final = (): void => {
        if (trailing !== null) {
            clearTimeout(trailing)
        }
        if (onProgress) {
            send()
        }
    }
    return { changed, final }
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
        progress.changed()
    })
    const batches = batchItems(shaped, config, options.flushEachChunk)
    const sendOptions = { ...options, counts: report }
    try {
        await runWindow(batches, {
            concurrency: options.concurrency ?? DEFAULT_CONCURRENCY,
            stopping: () => report.stopped !== null || Boolean(signal?.aborted) || checkpoint.failure() !== null,
            // A batch going out or settling is a change to report: the last one settling brings in flight to 0.
            onInFlight: (count) => {
                report.inFlight = count
                progress.changed()
            },
            send: async (batch) => {
                const acknowledge = checkpoint.open(batch.last)
                if (await sendBatch(batch, sendOptions)) {
                    acknowledge()
                }
                progress.changed()
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
    progress.final()
    return report
}

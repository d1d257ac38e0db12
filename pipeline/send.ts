/**
 * The sink: delivers one batch with the plugin's `deliver` (signing, retries within the per-batch budget, 413
 * splits, redaction) and says whether the batch is acknowledged. Refused events are dead-lettered, which also
 * acknowledges them; a batch that ran out of retries is not acknowledged and stops the run.
 */
import { deliver, ParsedConfig, SenderEnv } from '../index'
import { bodyBytes } from './batch'
import { Batch, DeadLetter, Item, PipelineReport } from './types'

type Counts = Pick<
    PipelineReport<unknown>,
    'delivered' | 'deadLettered' | 'retries' | 'requests' | 'batches' | 'bytesSent' | 'stopped'
>

export interface SendOptions<P> {
    config: ParsedConfig
    env: SenderEnv
    counts: Counts
    deadLetter?: (entry: DeadLetter<P>) => void
    onWarning?: (message: string) => void
    dryRun?: boolean
}

/** Returns true when every item of the batch was delivered or dead-lettered. Never throws. */
export async function sendBatch<P>(batch: Batch<P>, options: SendOptions<P>): Promise<boolean> {
    const { config, env, counts } = options
    if (batch.items.length === 0) {
        return true
    }
    counts.batches++
    counts.bytesSent += bodyBytes(batch.items)
    if (options.dryRun) {
        counts.delivered += batch.items.length
        return true
    }
    // A retry is an attempt beyond the first of one request body; a 413 half is a new body, numbered from 1.
    const onAttempt = (_outcome: unknown, _durationMs: number, attempt: number): void => {
        counts.requests++
        if (attempt > 1) {
            counts.retries++
        }
    }
    let results
    try {
        results = await deliver<Item<P>>(batch.items, config, env, env.now() + config.deadlineMs, { onAttempt })
    } catch (error) {
        counts.stopped ??= `unexpected ${(error as Error).name ?? 'error'} while sending`
        return false
    }
    let acknowledged = true
    for (const { items, error, retryable } of results) {
        if (!error) {
            counts.delivered += items.length
        } else if (retryable) {
            // Neither delivered nor refused: the batch stays unacknowledged, so a resume sends it again.
            counts.stopped ??= `the webhook kept failing: ${error.message}`
            acknowledged = false
        } else {
            counts.deadLettered += items.length
            options.onWarning?.(`${items.length} event(s) refused: ${error.message}`)
            for (const item of items) {
                options.deadLetter?.({ position: item.position, reason: error.message, event: item.json })
            }
        }
    }
    return acknowledged
}

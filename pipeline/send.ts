/**
 * The sink: delivers one batch with the plugin's `deliver` (signing, retries within the per-batch budget, 413
 * splits, redaction) and says whether the batch is acknowledged. Refused events are dead-lettered, which also
 * acknowledges them; a batch that ran out of retries is not acknowledged and stops the run.
 *
 * With `waitOut` (a live feed run as a service), a batch the webhook will not take is not given up after the
 * plugin's own retries: each round is one attempt per body, and the rounds go on with a backoff capped at a
 * minute, honouring Retry-After, until the webhook takes it, the budget is spent, or the run is interrupted.
 */
import { batchWebhookId, deliver, DeliveryResult, Outcome, ParsedConfig, redactText, SenderEnv } from '../index'
import { bodyBytes } from './batch'
import { seconds } from './cli-output'
import { outageWaitMs, waitUnlessAborted, withinBudget } from './outage'
import { Batch, DeadLetter, Item, PipelineReport } from './types'

type Counts = Pick<
    PipelineReport<unknown>,
    'delivered' | 'deadLettered' | 'retries' | 'requests' | 'batches' | 'bytesSent' | 'stopped'
>

/** How long one round of single attempts may take at most: 413 halves each get their own attempt within it. */
const WAIT_OUT_ROUND_MS = 10 * 60_000

export interface WaitOut {
    /** How long one batch may keep failing before the run stops (Infinity: never). */
    budgetMs: number
    /** Aborting ends the waits at once; the batch is then left unacknowledged, for a resume. */
    signal?: AbortSignal
}

export interface SendOptions<P> {
    config: ParsedConfig
    env: SenderEnv
    counts: Counts
    deadLetter?: (entry: DeadLetter<P>) => void
    onWarning?: (message: string) => void
    /** Told of every webhook attempt's outcome, for health and metrics. */
    onOutcome?: (outcome: Outcome) => void
    dryRun?: boolean
    waitOut?: WaitOut
}

/** Returns true when every item of the batch was delivered or dead-lettered. Never throws. */
export async function sendBatch<P>(batch: Batch<P>, options: SendOptions<P>): Promise<boolean> {
    const { counts } = options
    if (batch.items.length === 0) {
        return true
    }
    counts.batches++
    counts.bytesSent += bodyBytes(batch.items)
    if (options.dryRun) {
        counts.delivered += batch.items.length
        return true
    }
    return options.waitOut ? sendWaitingOut(batch.items, options, options.waitOut) : sendOnce(batch.items, options)
}

/** The plugin's retries within --retry-for, then the verdict. */
async function sendOnce<P>(items: Item<P>[], options: SendOptions<P>): Promise<boolean> {
    const { config, env, counts } = options
    // A retry is an attempt beyond the first of one request body; a 413 half is a new body, numbered from 1.
    const onAttempt = (outcome: Outcome, _durationMs: number, attempt: number): void => {
        counts.requests++
        if (attempt > 1) {
            counts.retries++
        }
        options.onOutcome?.(outcome)
    }
    let results
    try {
        results = await deliver<Item<P>>(items, config, env, env.now() + config.deadlineMs, { onAttempt })
    } catch (error) {
        counts.stopped ??= `unexpected ${(error as Error).name ?? 'error'} while sending`
        return false
    }
    const pending = settle(results, options)
    for (const { error } of pending) {
        // Neither delivered nor refused: the batch stays unacknowledged, so a resume sends it again.
        counts.stopped ??= `the webhook kept failing: ${error?.message ?? 'unknown error'}`
    }
    return pending.length === 0
}

/** Counts what was delivered, dead-letters what was refused, and returns the groups still to send. */
function settle<P>(results: DeliveryResult<Item<P>>[], options: SendOptions<P>): DeliveryResult<Item<P>>[] {
    const { counts } = options
    const pending: DeliveryResult<Item<P>>[] = []
    for (const result of results) {
        const { items, error, retryable } = result
        if (!error) {
            counts.delivered += items.length
        } else if (retryable) {
            pending.push(result)
        } else {
            counts.deadLettered += items.length
            options.onWarning?.(`${items.length} event(s) refused: ${error.message}`)
            for (const item of items) {
                options.deadLetter?.({ position: item.position, reason: error.message, event: item.json })
            }
        }
    }
    return pending
}

/** Rounds of one attempt per body until nothing is left to send, the budget is spent, or the run is stopped. */
async function sendWaitingOut<P>(items: Item<P>[], options: SendOptions<P>, waitOut: WaitOut): Promise<boolean> {
    const { config, env, counts } = options
    // One attempt per body and round: the waits between rounds are this loop's, capped and abortable.
    const oneAttempt: ParsedConfig = { ...config, maxAttempts: 1 }
    let pending = items
    let last: Extract<Outcome, { kind: 'retry' }> | null = null
    const failingSince = env.now()
    for (let round = 0; ; round++) {
        const hooks = {
            // The same id on every round of the same body, so a receiver can deduplicate across rounds too.
            webhookIdFor: batchWebhookId,
            onAttempt: (outcome: Outcome) => {
                counts.requests++
                counts.retries += round > 0 ? 1 : 0
                last = outcome.kind === 'retry' ? outcome : last
                options.onOutcome?.(outcome)
            },
        }
        let results
        try {
            results = await deliver<Item<P>>(pending, oneAttempt, env, env.now() + WAIT_OUT_ROUND_MS, hooks)
        } catch (error) {
            counts.stopped ??= `unexpected ${(error as Error).name ?? 'error'} while sending`
            return false
        }
        pending = settle(results, options).flatMap((result) => result.items)
        if (pending.length === 0) {
            return true
        }
        const lastRetry = last as Extract<Outcome, { kind: 'retry' }> | null
        const waitMs = outageWaitMs(round, lastRetry?.retryAfterMs ?? null, env.random)
        if (!withinBudget(failingSince, env.now(), waitMs, waitOut.budgetMs)) {
            const reason = redactText(lastRetry?.reason ?? 'no answer', config.secrets)
            counts.stopped ??=
                `the webhook kept failing for ${seconds(env.now() - failingSince)} ` +
                `(${round + 1} rounds, last: ${reason})`
            return false
        }
        if (!(await waitUnlessAborted(waitMs, waitOut.signal))) {
            return false
        }
    }
}

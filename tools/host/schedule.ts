/**
 * The host's scheduler for runEveryMinute: a timer in the main thread that hands each run to one VM (the direct
 * path's, or one Kafka worker's as a task), as PostHog's main thread did under a Redis lock across servers. A run
 * still going when the next minute comes is skipped (debounced). The minute can be scaled, like the job waits.
 * Where a host has no scheduled tasks, only calls drain the plugin's outbox: after an outage, traffic that goes on
 * (a held-back share of the events, sent one call at a time) stands in for production's steady stream.
 */
import type { ScheduledOutcome } from './instance'

export interface ScheduleFigures {
    /** Runs that finished, failures included. */
    runs: number
    failures: number
    /** Minutes that came while the previous run was still going: not run. */
    debounced: number
    /** Minutes the plugin was not set up: the host ran nothing. */
    skipped: number
    /** The scaled minute, in real ms. */
    minuteMs: number
}

export class MinuteScheduler {
    readonly figures: ScheduleFigures
    private timer: NodeJS.Timeout | null = null
    private running: Promise<void> | null = null
    /** Set once a run found no runEveryMinute export: the scheduler stops. */
    private noTask = false
    private readonly started = Date.now()

    constructor(
        readonly minuteMs: number,
        private readonly runOnce: () => Promise<ScheduledOutcome>,
        private readonly log: (line: string) => void
    ) {
        this.figures = { runs: 0, failures: 0, debounced: 0, skipped: 0, minuteMs }
    }

    start(): void {
        this.timer = setInterval(() => this.tick(), this.minuteMs)
    }

    /** True while the scheduler runs the plugin's task: it exports runEveryMinute and the host has not stopped. */
    get active(): boolean {
        return this.timer !== null && !this.noTask
    }

    /** Scaled minutes since the scheduler started. */
    minutesPassed(): number {
        return (Date.now() - this.started) / this.minuteMs
    }

    private tick(): void {
        if (this.running) {
            this.figures.debounced++
            return
        }
        this.running = this.runOnce()
            .then((outcome) => this.record(outcome))
            .catch((error: unknown) => {
                // Only a crashed worker thread gets here.
                this.figures.runs++
                this.figures.failures++
                this.log(`host: runEveryMinute could not run: ${(error as Error).message}`)
            })
            .finally(() => {
                this.running = null
            })
    }

    private record(outcome: ScheduledOutcome): void {
        if (outcome.kind === 'absent') {
            this.noTask = true
            void this.stop()
        } else if (outcome.kind === 'skipped') {
            this.figures.skipped++
        } else {
            this.figures.runs++
            if (outcome.kind === 'failed') {
                this.figures.failures++
            }
        }
    }

    /** No more runs; resolves once the run in flight, if any, settled. */
    async stop(): Promise<void> {
        if (this.timer) {
            clearInterval(this.timer)
            this.timer = null
        }
        await this.running
    }
}

/** How long a run goes on after its events: until `until()` holds, or `maxMinutes` scaled minutes have passed. */
export interface DrainOptions {
    until: () => boolean | Promise<boolean>
    maxMinutes: number
}

/** How often the drain condition is checked, in scaled minutes. */
const DRAIN_CHECKS_PER_MINUTE = 4

/**
 * Keeps the host running while scheduled tasks can still deliver: returns at once if the plugin has no
 * runEveryMinute (nothing will change), else once the condition holds or the bound passed.
 */
export async function drainWhileScheduled(scheduler: MinuteScheduler | null, drain: DrainOptions): Promise<void> {
    const deadline = Date.now() + drain.maxMinutes * (scheduler?.minuteMs ?? 0)
    while (scheduler && Date.now() < deadline && !(await drain.until())) {
        // The first run tells whether the plugin has the task at all: without it, waiting changes nothing.
        if (!scheduler.active) {
            return
        }
        await new Promise((resolve) => setTimeout(resolve, scheduler.minuteMs / DRAIN_CHECKS_PER_MINUTE))
    }
}

/** The share of the events held back to be sent after an outage, where the host has no scheduled tasks. */
export const HELD_BACK_SHARE = 0.1
/** A file's length is not known ahead: at most this many of its last events are held back. */
export const HELD_BACK_FROM_FILE = 100
/**
 * The held-back calls spread over this much real time after the outage: longer than the plugin's 60 s probe
 * interval (real time, not scaled), so a call comes when the plugin tries the webhook again.
 */
export const TRAFFIC_SPAN_MS = 90_000
/** Held-back calls come at most this often, however many there are. */
export const TRAFFIC_MIN_GAP_MS = 3_000
/** Real time past the outage after which whatever is still held goes at once, and the run stops waiting. */
export const TRAFFIC_BOUND_MS = 120_000
/** How often the traffic checks the receiver and the clock. */
const TRAFFIC_POLL_MS = 250

/** How many events to hold back: a share of a known count (at least 1), or a fixed number of a file's last. */
export function heldBackCount(count: number | null): number {
    return count === null ? HELD_BACK_FROM_FILE : Math.max(1, Math.ceil(count * HELD_BACK_SHARE))
}

/** Real ms between two held-back calls: spread over TRAFFIC_SPAN_MS, never closer than TRAFFIC_MIN_GAP_MS. */
export function trafficGapMs(held: number): number {
    return Math.max(TRAFFIC_MIN_GAP_MS, TRAFFIC_SPAN_MS / Math.max(1, held))
}

/**
 * Whether the index-th held-back call is due: never during the outage; at once when the receiver has caught up
 * (nothing is waiting in the outbox, so there is no reason to wait); else on its slot, or at the bound.
 */
export function lateCallDue(now: number, index: number, gapMs: number, backUpAt: number | null, caughtUp: boolean) {
    if (backUpAt === null) {
        return false
    }
    return caughtUp || now >= backUpAt + Math.min((index + 1) * gapMs, TRAFFIC_BOUND_MS)
}

/** What the traffic after an outage watches. */
export interface LateTraffic {
    /** The real ms at which the webhook came back, or null while it is still down. */
    backUpAt: () => number | null
    /** Whether the receiver holds every event sent so far. */
    caughtUp: () => boolean
}

/**
 * Streams all but the last `held` events; `tail()` gives those last ones once the stream has run out. Memory stays
 * at `held` events whatever the stream's length.
 */
export function holdBack<T>(events: Iterable<T> | AsyncIterable<T>, held: number) {
    const tail: T[] = []
    async function* leading(): AsyncGenerator<T> {
        for await (const event of events) {
            tail.push(event)
            if (tail.length > held) {
                yield tail.shift() as T
            }
        }
    }
    return { leading: leading(), tail: (): readonly T[] => tail }
}

/**
 * The held-back events, one call per slot after the outage, the rest at once once the receiver caught up or the
 * bound passed. After the last, waits (within the bound) until the receiver caught up: the run must not end in
 * the middle of the drain a call started.
 */
export async function* trafficAfterOutage<T>(held: () => readonly T[], traffic: LateTraffic): AsyncGenerator<T> {
    const events = [...held()]
    const gapMs = trafficGapMs(events.length)
    for (const [index, event] of events.entries()) {
        await pollUntil(() => lateCallDue(Date.now(), index, gapMs, traffic.backUpAt(), traffic.caughtUp()))
        yield event
    }
    await pollUntil(() => lateCallDue(Date.now(), Infinity, gapMs, traffic.backUpAt(), traffic.caughtUp()))
}

async function pollUntil(done: () => boolean): Promise<void> {
    while (!done()) {
        await new Promise((resolve) => setTimeout(resolve, TRAFFIC_POLL_MS))
    }
}

/**
 * The host's scheduler for runEveryMinute: a timer in the main thread that hands each run to one VM (the direct
 * path's, or one Kafka worker's as a task), as PostHog's main thread did under a Redis lock across servers. A run
 * still going when the next minute comes is skipped (debounced). The minute can be scaled, like the job waits.
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

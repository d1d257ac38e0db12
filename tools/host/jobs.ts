/**
 * The host's job queue, in memory: the export path puts a batch here when exportEvents threw a RetryError, and
 * the job runs later in a VM of its own, whose `meta.global` is not the one that enqueued it (PostHog's queue
 * handed jobs to whichever thread or server was free). Waits are multiplied by `timeScale`, so a test or
 * `npm start` can live through hours of retries in seconds.
 */
import type { ExportJob } from './export-path'

export interface QueueFigures {
    enqueued: number
    ran: number
    /** Jobs still waiting when the run stopped waiting for them. */
    left: number
}

export class JobQueue {
    /** Every job as the queue stored it (JSON), for scans of what a job's payload holds. */
    readonly payloads: string[] = []
    private readonly timers = new Set<NodeJS.Timeout>()
    private running = 0
    private ran = 0
    private idleWaiters: Array<() => void> = []

    constructor(
        readonly timeScale: number,
        private readonly run: (job: ExportJob) => Promise<void>
    ) {}

    enqueue(job: ExportJob, seconds: number): void {
        const stored = JSON.stringify(job)
        this.payloads.push(stored)
        const timer = setTimeout(
            () => {
                this.timers.delete(timer)
                this.running++
                void this.run(JSON.parse(stored) as ExportJob).finally(() => {
                    this.running--
                    this.ran++
                    this.notifyIfIdle()
                })
            },
            seconds * 1000 * this.timeScale
        )
        this.timers.add(timer)
    }

    get busy(): boolean {
        return this.timers.size > 0 || this.running > 0
    }

    /** Resolves once no job waits or runs, or after `maxMs`, whichever comes first. */
    idle(maxMs = Infinity): Promise<void> {
        if (!this.busy) {
            return Promise.resolve()
        }
        return new Promise((resolve) => {
            const timer = Number.isFinite(maxMs) ? setTimeout(resolve, maxMs) : null
            this.idleWaiters.push(() => {
                if (timer) {
                    clearTimeout(timer)
                }
                resolve()
            })
        })
    }

    /** Drops the jobs still waiting (the run is over) and says how many ran and were left. */
    stop(): QueueFigures {
        const left = this.timers.size
        for (const timer of this.timers) {
            clearTimeout(timer)
        }
        this.timers.clear()
        return { enqueued: this.payloads.length, ran: this.ran, left }
    }

    private notifyIfIdle(): void {
        if (!this.busy) {
            for (const waiter of this.idleWaiters.splice(0)) {
                waiter()
            }
        }
    }
}

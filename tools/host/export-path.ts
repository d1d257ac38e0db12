/**
 * The export path of the classic hosts (2021 to November 2023), for plugins that export `exportEvents`.
 *
 * Before setupPlugin the host "upgrades" such a plugin: it puts three keys on `meta.global` (its buffer, the
 * event names to ignore and its retry function), wraps onEvent so that every event goes into the buffer before
 * the plugin's own onEvent runs, and wraps teardownPlugin so that the buffer is flushed. A full or old buffer is
 * handed to `exportEvents` as one array. A RetryError re-queues the whole batch as a job in the host's durable
 * job queue, run later in whatever VM picks it up; any other error is final. What changed era by era (the
 * buffer, whether adding to it is awaited, the retry ladder, the metrics shown) is in ExportPathPolicy.
 */
import type { PluginMethod, PluginMethods } from './loader'

export type ExportMetricsKind = 'plugin-metrics' | 'none' | 'app-metrics'

export interface ExportPathPolicy {
    /** The era's letter in docs/hosts.md: A (2021) to D (late 2023). */
    label: string
    /**
     * `contrib`: the 2021 buffer from plugin-contrib, whose add and flush are not awaited (a failed flush is an
     * unhandled rejection). `host`: the host's own buffer from February 2022, whose add is awaited and which
     * waits once a worker has too many flushes pending.
     */
    buffer: 'contrib' | 'host'
    defaultBytes: number
    defaultSeconds: number
    /** Retries of a RetryError through the job queue; 0: the batch is dropped at once. */
    maxRetries: number
    /** What the plugin's page showed. */
    metrics: ExportMetricsKind
}

const MIB = 1024 * 1024
export const EXPORT_PATH_A: ExportPathPolicy = {
    label: 'A',
    buffer: 'contrib',
    defaultBytes: MIB,
    defaultSeconds: 10,
    maxRetries: 15,
    metrics: 'plugin-metrics',
}
export const EXPORT_PATH_B: ExportPathPolicy = { ...EXPORT_PATH_A, label: 'B', buffer: 'host', maxRetries: 10 }
export const EXPORT_PATH_C: ExportPathPolicy = { ...EXPORT_PATH_B, label: 'C', maxRetries: 3, metrics: 'none' }
export const EXPORT_PATH_D: ExportPathPolicy = { ...EXPORT_PATH_C, label: 'D', metrics: 'app-metrics' }
/** From August 2023: a smaller default buffer and no retries at all. */
export const EXPORT_PATH_D_LATE: ExportPathPolicy = {
    ...EXPORT_PATH_D,
    label: 'D (from Aug 2023)',
    defaultBytes: 900 * 1024,
    maxRetries: 0,
}

/** The limits the host clamps the plugin's buffer settings to. */
export const BUFFER_BYTES_RANGE = [1, 100 * MIB] as const
export const BUFFER_SECONDS_RANGE = [1, 600] as const
/** Flushes a worker may have pending before adding to the host buffer waits (the promise manager's cap). */
export const MAX_PENDING_FLUSHES = 100

/** The wait before retry n+1 of a batch: 6 s, 12 s, 24 s, … (3 × 2^(n+1) seconds). */
export function retryDelaySeconds(retriesSoFar: number): number {
    return 3 * 2 ** (retriesSoFar + 1)
}

/** A config string as the host reads a number from it: not a number means the default; out of range is clamped. */
export function clampSetting(value: unknown, fallback: number, [min, max]: readonly [number, number]): number {
    const parsed = typeof value === 'string' ? parseInt(value, 10) : NaN
    return Number.isNaN(parsed) ? fallback : Math.min(max, Math.max(min, parsed))
}

/** What the plugin's page showed about its exports, summed over every VM of one plugin config. */
export interface ExportMetrics {
    seen: number
    delivered: number
    deliveredOnRetry: number
    retryErrors: number
    otherErrors: number
    undelivered: number
    batches: number
    jobsEnqueued: number
    /** Not on the page: how many times the host's wrapper called the plugin's own onEvent (a call into the VM). */
    pluginOnEventCalls: number
}

export function emptyMetrics(): ExportMetrics {
    return {
        seen: 0,
        delivered: 0,
        deliveredOnRetry: 0,
        retryErrors: 0,
        otherErrors: 0,
        undelivered: 0,
        batches: 0,
        jobsEnqueued: 0,
        pluginOnEventCalls: 0,
    }
}

export function addMetrics(total: ExportMetrics, more: ExportMetrics): ExportMetrics {
    const sum = { ...total }
    for (const key of Object.keys(sum) as Array<keyof ExportMetrics>) {
        sum[key] += more[key]
    }
    return sum
}

/** The metrics as the era's UI showed them, or why there are none. */
export function metricsLine(policy: ExportPathPolicy, m: ExportMetrics): string {
    if (policy.metrics === 'plugin-metrics') {
        return (
            `plugin metrics: events seen ${m.seen}, delivered successfully ${m.delivered}, retry errors ` +
            `${m.retryErrors}, other errors ${m.otherErrors}, undelivered ${m.undelivered}`
        )
    }
    if (policy.metrics === 'app-metrics') {
        const failed = m.undelivered
        return `app metrics: delivered ${m.delivered}, delivered on retry ${m.deliveredOnRetry}, failed ${failed}`
    }
    return 'no export metrics in this era (removed in May 2022, back as app metrics in October 2022)'
}

/** One batch as the job queue stores it. */
export interface ExportJob {
    batch: unknown[]
    batchId: number
    retriesPerformedSoFar: number
}

export interface ExportPathHooks {
    policy: ExportPathPolicy
    config: Record<string, string>
    /** The era's RetryError class: only its instances are retried (the host's own `instanceof`). */
    RetryError: new (message?: string) => Error
    /** Puts a job in the host's queue, to run after `seconds`, in whatever VM picks it up. */
    enqueue: (job: ExportJob, seconds: number) => void
    metrics: ExportMetrics
    /** Told of each batch the host gave up on, so a run can check that no event was lost without a record. */
    onUndelivered: (batch: unknown[]) => void
    log: (line: string) => void
}

/** What the upgrade leaves: the wrapped methods and the function a job runs. */
export interface ExportPath {
    methods: PluginMethods
    runJob: (job: ExportJob) => Promise<void>
    buffer: ExportBuffer
}

/**
 * Upgrades a plugin that exports exportEvents, as the host does before setupPlugin: the three `meta.global`
 * keys, and onEvent and teardownPlugin wrapped. The wrappers read the keys from `meta.global` on every call, as
 * the host's did, so a plugin that overwrote them would break its own export path.
 */
export function upgradeExportEvents(
    methods: PluginMethods,
    global: Record<string, unknown>,
    hooks: ExportPathHooks
): ExportPath {
    const exportEvents = methods.exportEvents as PluginMethod
    const runJob = (job: ExportJob): Promise<void> => exportWithRetry(job, exportEvents, hooks)
    const { policy, config } = hooks
    const limit = clampSetting(config.exportEventsBufferBytes, policy.defaultBytes, BUFFER_BYTES_RANGE)
    const seconds = clampSetting(config.exportEventsBufferSeconds, policy.defaultSeconds, BUFFER_SECONDS_RANGE)
    const onFlush = (batch: unknown[]): Promise<void> =>
        runJob({ batch, batchId: Math.floor(Math.random() * 1_000_000), retriesPerformedSoFar: 0 })
    const report = (error: unknown): void => hooks.log(`host: unhandled rejection in the export buffer: ${text(error)}`)
    const buffer = new ExportBuffer(limit, seconds, onFlush, policy.buffer, report)
    global.exportEventsBuffer = buffer
    global.exportEventsToIgnore = new Set(parseIgnored(config.exportEventsToIgnore))
    global.exportEventsWithRetry = runJob
    const onEvent = methods.onEvent
    const teardownPlugin = methods.teardownPlugin
    const wrapped: PluginMethods = {
        ...methods,
        onEvent: async (event: unknown) => {
            const buffer = global.exportEventsBuffer as ExportBuffer
            if (!(global.exportEventsToIgnore as Set<string>).has((event as { event: string }).event)) {
                const added = buffer.add(event, JSON.stringify(event).length)
                if (policy.buffer === 'host') {
                    await added
                }
            }
            if (!onEvent) {
                return undefined
            }
            hooks.metrics.pluginOnEventCalls++
            return await onEvent(event)
        },
        teardownPlugin: async () => {
            await Promise.all([(global.exportEventsBuffer as ExportBuffer).flush(), teardownPlugin?.()])
        },
    }
    return { methods: wrapped, runJob, buffer }
}

function parseIgnored(value: string | undefined): string[] {
    return value ? value.split(',').map((name) => name.trim()) : []
}

function text(error: unknown): string {
    const e = error as { message?: unknown }
    return typeof e?.message === 'string' ? e.message : String(error)
}

/** One try of a batch, then the era's ladder: re-queue a RetryError while retries are left, count the rest. */
async function exportWithRetry(job: ExportJob, exportEvents: PluginMethod, hooks: ExportPathHooks): Promise<void> {
    const { metrics, policy } = hooks
    const size = job.batch.length
    if (job.retriesPerformedSoFar === 0) {
        metrics.seen += size
        metrics.batches++
    }
    try {
        await exportEvents(job.batch)
        metrics.delivered += size
        if (job.retriesPerformedSoFar > 0) {
            metrics.deliveredOnRetry += size
        }
    } catch (error) {
        if (!(error instanceof hooks.RetryError)) {
            metrics.otherErrors += size
            metrics.undelivered += size
            hooks.onUndelivered(job.batch)
            throw error
        }
        metrics.retryErrors += size
        if (job.retriesPerformedSoFar >= policy.maxRetries) {
            metrics.undelivered += size
            hooks.onUndelivered(job.batch)
            hooks.log(`host: dropped batch ${job.batchId} (${size} events) after ${job.retriesPerformedSoFar} retries`)
            return
        }
        const seconds = retryDelaySeconds(job.retriesPerformedSoFar)
        metrics.jobsEnqueued++
        hooks.enqueue({ ...job, retriesPerformedSoFar: job.retriesPerformedSoFar + 1 }, seconds)
        hooks.log(`host: enqueued batch ${job.batchId} for retry #${job.retriesPerformedSoFar + 1} in ${seconds}s`)
    }
}

/**
 * The host's buffer: events and their sizes, handed over when adding one would pass the limit, when it is
 * passed, or `seconds` after the first event. `contrib` flushes are fired and forgotten; `host` flushes are
 * tracked, and adding waits only while MAX_PENDING_FLUSHES of them are pending.
 */
export class ExportBuffer {
    private events: unknown[] = []
    private points = 0
    private timer: NodeJS.Timeout | null = null
    private readonly pending = new Set<Promise<void>>()

    constructor(
        readonly limit: number,
        readonly seconds: number,
        private readonly onFlush: (batch: unknown[]) => Promise<void>,
        private readonly kind: 'contrib' | 'host',
        private readonly unhandled: (error: unknown) => void
    ) {}

    get size(): number {
        return this.events.length
    }

    async add(event: unknown, points: number): Promise<void> {
        if (this.points > 0 && this.points + points > this.limit) {
            await this.handOver()
        }
        this.points += points
        this.events.push(event)
        if (this.points > this.limit) {
            await this.handOver()
        } else if (!this.timer) {
            this.timer = setTimeout(() => void this.handOver(), this.seconds * 1000)
            this.timer.unref()
        }
    }

    /**
     * The teardown flush: hands over what is buffered. The 2021 buffer waits for that batch's export; the later
     * host buffer only starts it (and waits while too many flushes are pending).
     */
    async flush(): Promise<void> {
        if (this.kind === 'contrib') {
            await this.take()
            return
        }
        await this.handOver()
    }

    /** Resolves once no flush is pending: for the emulator's runs, which end when every batch was handled. */
    async drained(): Promise<void> {
        while (this.pending.size > 0) {
            await Promise.all(this.pending)
        }
    }

    /** A flush from add or the timer: fired and forgotten in 2021; capped per worker later. Both are tracked. */
    private async handOver(): Promise<void> {
        const tracked: Promise<void> = this.take()
            .catch(this.unhandled)
            .finally(() => this.pending.delete(tracked))
        this.pending.add(tracked)
        while (this.kind === 'host' && this.pending.size > MAX_PENDING_FLUSHES) {
            await Promise.race(this.pending)
        }
    }

    private take(): Promise<void> {
        if (this.timer) {
            clearTimeout(this.timer)
            this.timer = null
        }
        if (this.events.length === 0) {
            return Promise.resolve()
        }
        const batch = this.events
        this.events = []
        this.points = 0
        return this.onFlush(batch)
    }
}

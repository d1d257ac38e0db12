/**
 * One plugin config as one host thread holds it: a lazily set-up VM (setupPlugin retried with growing waits, as
 * the 2021 LazyPluginVM did, events skipped without any record meanwhile), and the host's side of each call.
 * The direct path uses one in the main thread; the Kafka path one per worker thread.
 */
import type { SenderStats } from '../../index'
import { Era, getEra, setupRetryWaits } from './eras'
import { emptyMetrics, ExportJob, ExportMetrics, ExportPath, upgradeExportEvents } from './export-path'
import { createPluginVm, PluginConsole, PluginVm } from './loader'
import { PluginMetrics } from './plugin-metrics'
import { DEFAULT_PLUGIN_CONFIG_ID, metaCache, metaStorage, StoreTransport } from './storage'

/**
 * The shortest real TTL a scaled minute leaves a cache key: the plugin's outbox lock trusts 30 s of its own clock
 * (half its 60 s TTL), and the plugin's clock is never scaled.
 */
export const CACHE_TTL_FLOOR_MS = 30_000
/** PostHog's minute: runEveryMinute's period, and the clock cache TTLs are measured against. */
export const MINUTE_MS = 60_000

export interface InstanceOptions {
    era: string
    /** Plugin code already transpiled for the era. */
    code: string
    config: Record<string, string>
    /** Scales the host's waits between setupPlugin attempts (3 s, 6 s, …), so tests need not sit through them. */
    setupRetryScale: number
    /** Scales the vm2022 host's own retry waits of a RetryError (3 s, 6 s). */
    hostRetryScale: number
    /** false: no host retry of a RetryError even where the era has one (tests of a single call's bounds). */
    hostRetry?: boolean
    /** Every plugin log line and host line, as it comes. */
    log: (line: string) => void
    now?: () => number
    onGuard?: () => void
    /** The host's job queue, where the export path re-queues a batch that threw a RetryError. */
    enqueueJob?: (job: ExportJob, seconds: number) => void
    /** The install's database (storage.ts): this thread's HostStore, or a worker's channel to it. */
    store: StoreTransport
    /** The plugin config whose rows meta.storage reads and writes (default 1). */
    pluginConfigId?: number
    /** The host's scaled minute (default 60 000 ms): cache TTLs shrink with it. */
    minuteMs?: number
}

/** What the host saw of one scheduled run. */
export type ScheduledOutcome =
    | { kind: 'ok'; ms: number }
    | { kind: 'failed'; message: string; ms: number }
    /** The plugin was not set up: the host does not run its tasks. */
    | { kind: 'skipped' }
    /** The plugin exports no runEveryMinute. */
    | { kind: 'absent' }

/** What the host saw of one onEvent call. */
export type CallOutcome =
    | { kind: 'ok'; hostRetries: number; ms: number }
    /** The plugin was not set up (setup failing or the plugin disabled): the host skipped it without a record. */
    | { kind: 'skipped' }
    | { kind: 'failed'; name: string; message: string; retryable: boolean; hostRetries: number; ms: number }

export interface SetupStatus {
    state: 'loading' | 'ready' | 'retrying' | 'disabled'
    attempts: number
    /** The last setupPlugin error, as the host logged it. */
    lastError: string | null
    /** The wait before the next attempt, unscaled, while retrying. */
    nextWaitMs: number | null
}

function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, ms))
}

export function pluginConsole(log: (line: string) => void): PluginConsole {
    const record =
        (level: string) =>
        (...args: unknown[]): void =>
            log(`${level}: ${args.map(String).join(' ')}`)
    return {
        log: record('log'),
        info: record('info'),
        warn: record('warn'),
        error: record('error'),
        debug: record('debug'),
    }
}

/** What a VM's meta reaches outside the sandbox: the install's database and this VM's metrics. */
export interface HostMetaServices {
    store: StoreTransport
    pluginConfigId: number
    minuteMs: number
    metrics: PluginMetrics
}

export function hostMetaFor(
    era: Era,
    config: Record<string, string>,
    log: (line: string) => void,
    services: HostMetaServices
) {
    // Frozen, as PostHog's vm.freeze leaves it: the plugin's writes are ignored.
    const frozenConfig = Object.freeze({ ...config })
    if (era.metaFetch) {
        return { config: frozenConfig, logger: pluginConsole(log), fetch: era.metaFetch, geoip: {} }
    }
    const { store, pluginConfigId } = services
    const offered = era.services
    return {
        config: frozenConfig,
        attachments: {},
        ...(offered.cache
            ? { cache: metaCache(store, pluginConfigId, services.minuteMs / MINUTE_MS, CACHE_TTL_FLOOR_MS) }
            : {}),
        ...(offered.storage ? { storage: metaStorage(store, pluginConfigId) } : {}),
        jobs: {},
        // Only where PostHog had plugin metrics (July 2021 to April 2022): later hosts have no such member, and
        // the plugin reads its presence while it loads as the sign that the host buffers for exportEvents.
        ...(offered.pluginMetrics ? { metrics: services.metrics.meta } : {}),
        utils: {},
        geoip: {},
    }
}

export class PluginInstance {
    readonly era: Era
    readonly setup: SetupStatus = { state: 'loading', attempts: 0, lastError: null, nextWaitMs: null }
    private vm: Promise<PluginVm | null>
    private retryTimer: NodeJS.Timeout | null = null
    private settledListeners: Array<() => void> = []
    private readonly hostMeta: Record<string, unknown>
    /** Set when the era has an export path and the plugin exports exportEvents. */
    private exportPath: ExportPath | null = null
    /** What this VM's export path counted, as the plugin's page showed it. */
    readonly exportMetrics: ExportMetrics = emptyMetrics()
    /** uuids of the events in batches the export path gave up on (a final error, or no retry left). */
    readonly undeliveredUuids: string[] = []
    /** meta.metrics values, where the era has plugin metrics. */
    readonly pluginMetrics = new PluginMetrics()

    constructor(readonly options: InstanceOptions) {
        this.era = getEra(options.era)
        this.hostMeta = hostMetaFor(this.era, options.config, options.log, {
            store: options.store,
            pluginConfigId: options.pluginConfigId ?? DEFAULT_PLUGIN_CONFIG_ID,
            minuteMs: options.minuteMs ?? MINUTE_MS,
            metrics: this.pluginMetrics,
        })
        this.vm = this.attempt()
    }

    /** Resolves once the first setup attempt has finished, whatever its outcome. */
    async started(): Promise<void> {
        await this.vm
    }

    /** Resolves once setup succeeded or the plugin was disabled (tests use it with scaled waits). */
    settled(): Promise<void> {
        if (this.setup.state === 'ready' || this.setup.state === 'disabled') {
            return Promise.resolve()
        }
        return new Promise((resolve) => this.settledListeners.push(resolve))
    }

    /** A fresh VM and setupPlugin in it, like each attempt of the host's lazy VM. */
    private async attempt(): Promise<PluginVm | null> {
        this.setup.attempts++
        this.setup.state = 'loading'
        try {
            const vm = createPluginVm(this.options.code, this.era, {
                console: pluginConsole(this.options.log),
                hostMeta: this.hostMeta,
                now: this.options.now,
                onGuard: this.options.onGuard,
            })
            if (this.era.services.pluginMetrics) {
                this.pluginMetrics.declare(vm.metrics, this.options.log)
            }
            // The host upgrades the plugin before setupPlugin, so setupPlugin already sees its keys on meta.global.
            const upgraded = this.upgrade(vm)
            await upgraded.methods.setupPlugin?.()
            this.setup.state = 'ready'
            this.setup.nextWaitMs = null
            this.notifySettled()
            return upgraded
        } catch (error) {
            return this.setupFailed(error)
        }
    }

    /** The export path's upgrade, where the era has one and the plugin exports exportEvents. */
    private upgrade(vm: PluginVm): PluginVm {
        const policy = this.era.exportPath
        if (!policy || !vm.methods.exportEvents) {
            return vm
        }
        const enqueue = this.options.enqueueJob
        this.exportPath = upgradeExportEvents(vm.methods, vm.global, {
            policy,
            config: this.options.config,
            RetryError: this.era.RetryError,
            enqueue: (job, seconds) => {
                if (!enqueue) {
                    throw new Error('this host has no job queue')
                }
                // The queue stores the batch as JSON, as the host's Postgres-backed queue did.
                enqueue(JSON.parse(JSON.stringify(job)) as ExportJob, seconds)
            },
            metrics: this.exportMetrics,
            onUndelivered: (batch) => {
                for (const event of batch) {
                    this.undeliveredUuids.push(String((event as { uuid?: unknown }).uuid))
                }
            },
            log: this.options.log,
        })
        return { ...vm, methods: this.exportPath.methods }
    }

    /** Runs one export job in this VM, as whichever host thread picked it up; a final error is logged. */
    async runExportJob(job: ExportJob): Promise<void> {
        const vm = await this.vm
        if (!vm || !this.exportPath) {
            this.options.log(`host: export job for batch ${job.batchId} skipped: the plugin is not set up`)
            return
        }
        try {
            await this.exportPath.runJob(job)
        } catch (error) {
            this.options.log(`host: export job for batch ${job.batchId} failed: ${(error as Error).message}`)
        }
    }

    /** Resolves once every batch this VM's buffer handed over was handled. */
    async exportsDrained(): Promise<void> {
        await this.exportPath?.buffer.drained()
    }

    private setupFailed(error: unknown): null {
        const e = error as { name?: string; message?: string }
        this.setup.lastError = `${e.name ?? 'Error'}: ${e.message ?? String(error)}`
        const policy = this.era.setup
        const wait = setupRetryWaits(policy)[this.setup.attempts - 1]
        const retried = !policy.onlyRetryError || error instanceof this.era.RetryError
        if (wait === undefined || !retried) {
            this.setup.state = 'disabled'
            this.setup.nextWaitMs = null
            this.options.log(
                `host: setupPlugin failed (${this.setup.lastError}); plugin disabled after ${this.setup.attempts} attempt(s)`
            )
            this.notifySettled()
            return null
        }
        this.setup.state = 'retrying'
        this.setup.nextWaitMs = wait
        this.options.log(
            `host: setupPlugin failed (${this.setup.lastError}); retrying in ${wait / 1000} s, skipping every event meanwhile`
        )
        this.retryTimer = setTimeout(() => {
            this.retryTimer = null
            this.vm = this.attempt()
        }, wait * this.options.setupRetryScale)
        return null
    }

    private notifySettled(): void {
        for (const listener of this.settledListeners.splice(0)) {
            listener()
        }
    }

    /** The plugin's own counters, from `meta.global.sender`, copied out of the sandbox. */
    async senderStats(): Promise<SenderStats | null> {
        const vm = await this.vm
        const sender = vm?.global.sender as { stats?: SenderStats } | undefined
        return sender?.stats ? (JSON.parse(JSON.stringify(sender.stats)) as SenderStats) : null
    }

    /** The host's processEvent step: the plugin's processEvent if it has one, then the host's bookkeeping. */
    async processEvent(event: Record<string, unknown>): Promise<Record<string, unknown> | null> {
        const vm = await this.vm
        let processed: Record<string, unknown> | null = event
        const processEvent = vm?.methods.processEvent
        if (processEvent) {
            try {
                processed = ((await processEvent(event)) as Record<string, unknown> | null) ?? null
            } catch {
                // The host records the error and passes the event on unchanged.
            }
            if (!processed) {
                return null
            }
        }
        if (vm?.methods.onEvent) {
            // The host marks the plugins that will see the event later, in its properties.
            processed.properties = {
                ...(processed.properties as Record<string, unknown>),
                $plugins_succeeded: processEvent ? ['plugin (1)'] : [],
                $plugins_failed: [],
                $plugins_deferred: ['plugin (1)'],
            }
        }
        return processed
    }

    /** One onEvent call as the host makes it, with the vm2022 host's own retries of a RetryError. */
    async onEvent(event: unknown, extraMeta?: Record<string, unknown>): Promise<CallOutcome> {
        const vm = await this.vm
        const onEvent = vm?.methods.onEvent
        if (!vm || !onEvent) {
            return { kind: 'skipped' }
        }
        // The longest single attempt: the host's guard kills an attempt at 30 s.
        let longest = 0
        for (let attempt = 0; ; attempt++) {
            const started = Date.now()
            try {
                await (extraMeta ? vm.callWith('onEvent', extraMeta, [event]) : onEvent(event))
                return { kind: 'ok', hostRetries: attempt, ms: Math.max(longest, Date.now() - started) }
            } catch (error) {
                longest = Math.max(longest, Date.now() - started)
                const retryable = error instanceof this.era.RetryError
                const delay = this.options.hostRetry === false ? undefined : this.era.hostRetryDelaysMs[attempt]
                if (retryable && delay !== undefined) {
                    await sleep(delay * this.options.hostRetryScale)
                    continue
                }
                const e = error as { name?: string; message?: string }
                return {
                    kind: 'failed',
                    name: typeof e.name === 'string' ? e.name : 'Error',
                    message: typeof e.message === 'string' ? e.message : String(error),
                    retryable,
                    hostRetries: attempt,
                    ms: longest,
                }
            }
        }
    }

    /** One runEveryMinute, as the host's scheduler hands it to this VM (guarded by 30 s like any method). */
    async runEveryMinute(): Promise<ScheduledOutcome> {
        const vm = await this.vm
        const run = vm?.methods.runEveryMinute
        if (!vm) {
            return { kind: 'skipped' }
        }
        if (!run || !this.era.services.scheduledTasks) {
            return { kind: 'absent' }
        }
        const started = Date.now()
        try {
            await run()
            return { kind: 'ok', ms: Date.now() - started }
        } catch (error) {
            const e = error as { name?: string; message?: string }
            const message = `${e.name ?? 'Error'}: ${e.message ?? String(error)}`
            this.options.log(`host: runEveryMinute failed: ${message}`)
            return { kind: 'failed', message, ms: Date.now() - started }
        }
    }

    async teardown(): Promise<void> {
        if (this.retryTimer) {
            clearTimeout(this.retryTimer)
            this.retryTimer = null
        }
        const vm = await this.vm
        try {
            await vm?.methods.teardownPlugin?.()
        } catch (error) {
            this.options.log(`host: teardownPlugin failed: ${(error as Error).message}`)
        }
    }
}

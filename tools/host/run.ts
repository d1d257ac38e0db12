/**
 * Runs a plugin through an emulated PostHog host: transpile for the era, set up the plugin, then hand it the
 * events. Classic eras default to the production Kafka path (host/kafka.ts: worker threads, processEvent before
 * onEvent); `path: 'direct'` starts the calls of each micro-batch together in this thread instead.
 */
import type { ProcessedPluginEvent } from '@posthog/plugin-scaffold'

import type { PatternsConfig, SenderStats } from '../../index'
import { Era, getEra } from './eras'
import { addMetrics, emptyMetrics, ExportJob, ExportMetrics, metricsLine } from './export-path'
import { Install, InstallFigures, InstallOptions } from './install'
import {
    CallOutcome,
    hostMetaFor,
    MINUTE_MS,
    pluginConsole,
    PluginInstance,
    ScheduledOutcome,
    SetupStatus,
} from './instance'
import { JobQueue, QueueFigures } from './jobs'
import { DEFAULT_TASKS_PER_WORKER, DEFAULT_WORKERS, eachMessage, microBatches, WorkerPool, WorkerReport } from './kafka'
import { createPluginVm, PluginLoadError, PluginVm, readPluginSource, transpileForEra } from './loader'
import { PluginMetrics, PluginMetricValues } from './plugin-metrics'
import { DEFAULT_PLUGIN_CONFIG_ID, HostStore } from './storage'

/** Microtask turns between two calls of the same burst on the direct path. */
export const CALL_STAGGER_MICROTASKS = 2
/** Messages per Kafka batch handed to the consumer; it cuts each into micro-batches. */
export const KAFKA_BATCH_MESSAGES = 500

export const PATHS = ['kafka', 'direct'] as const
export type HostPath = (typeof PATHS)[number]

export interface JobOptions extends InstallOptions {
    era: string
    webhookUrl: string
    /** Other plugin config fields, as strings like PostHog passes them. */
    config?: Partial<PatternsConfig> & Record<string, string | undefined>
    events: Iterable<ProcessedPluginEvent> | AsyncIterable<ProcessedPluginEvent>
    /**
     * Events that come after `events`, one at a time: each is handed to the plugin as its own call as soon as it
     * comes, as traffic that goes on (where a host has no scheduled tasks, only calls drain the plugin's outbox).
     */
    lateEvents?: AsyncIterable<ProcessedPluginEvent>
    /** Plugin folder (plugin.json + main). Defaults to the project root. */
    pluginDir: string
    /** Plugin source to load instead of the folder's main file. */
    source?: string
    /** `kafka` (default for the classic eras) or `direct` (the only path of cdp2025). */
    path?: HostPath
    /** Kafka path: worker threads (WORKER_CONCURRENCY, default: one per core). */
    workers?: number
    /** Kafka path: tasks in flight per worker thread (TASKS_PER_WORKER, default 10). */
    tasksPerWorker?: number
    /** Direct path: calls started together, instead of the era's own. */
    concurrency?: number
    /** Scales the host's own retry waits (vm2022), so tests need not sit through 3 s and 6 s. */
    hostRetryScale?: number
    /** false: no host retry of a RetryError even in vm2022 (for tests of a single call's bounds). */
    hostRetry?: boolean
    /** Scales the waits between setupPlugin attempts (3 s, 6 s, … about 25 minutes in the 2021 host). */
    setupRetryScale?: number
    /** Before finishing, wait until setup succeeded or the plugin was disabled (use with a small scale). */
    settleSetup?: boolean
    /** Multiplies the job queue's waits (6 s, 12 s, … up to about 54 hours in 2021); default 1. */
    jobTimeScale?: number
    /** How long, in real ms, the run waits for queued jobs after the events (default: until none is left). */
    jobWaitMs?: number
    onProgress?: (progress: { done: number; failed: number; skipped: number }) => void
    /** Also hand each of the plugin's log lines (and the host's setup lines) to this, as they come. */
    log?: (line: string) => void
}

export interface JobResult extends InstallFigures {
    era: string
    path: HostPath
    events: number
    /** Calls to onEvent that resolved: the webhook accepted the event or the plugin filtered it. */
    resolved: number
    failed: number
    /** Events the host never gave the plugin because its setup had failed: lost without any record. */
    skipped: number
    hostRetries: number
    /**
     * Failures grouped by a short cause. The label is "RetryError" when the error is an instance of the era's
     * RetryError class (whose `name` is "Error" in 2021), otherwise the error's name.
     */
    failuresByCause: Record<string, number>
    /** uuids of the events whose onEvent call threw in the end. */
    failedUuids: string[]
    /** "label: message" of every error that reached the host: for secret scans. */
    errorMessages: string[]
    /** Every plugin log line and host line. */
    logs: string[]
    /** The plugin's own counters, read from meta.global (summed over the worker threads). */
    sender: SenderStats | null
    /** setupPlugin as each VM saw it (one per worker thread on the Kafka path). */
    setup: SetupStatus[]
    /** The longest single onEvent attempt, delivered or not: the host kills a call at 30 s. */
    maxCallMs: number
    latencyP50Ms: number
    latencyP95Ms: number
    durationMs: number
    /** From the first event handed to the host to the last call settled: no loading, setup or thread start. */
    eventsMs: number
    /** CPU time of the whole process (every thread) over eventsMs: steadier than wall time on a busy machine. */
    eventsCpuMs: number
    /**
     * From the first event to the end of the host's work for them: every call settled, the export buffer's last
     * flush (at teardown) handled, and the job queue empty or given up on.
     */
    deliveredMs: number
    /** CPU time of the whole process over deliveredMs. */
    deliveredCpuMs: number
    /** The export path, where the era has one and the plugin exports exportEvents. */
    exportPath: ExportPathResult | null
}

export interface ExportPathResult {
    era: string
    metrics: ExportMetrics
    /** The metrics as that era's UI showed them. */
    line: string
    jobs: QueueFigures
    /** Every job payload as the queue stored it: for scans. */
    jobPayloads: string[]
    /** uuids of the events in batches the host gave up on, each recorded in its metrics and log. */
    undeliveredUuids: string[]
}

export function percentile(sorted: readonly number[], p: number): number {
    if (sorted.length === 0) {
        return 0
    }
    const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)
    return sorted[Math.max(0, index)] ?? 0
}

/** A short, secret-free label for grouping failures. */
export function failureCause(label: string, message: string): string {
    const detail =
        /HTTP \d{3}/.exec(message)?.[0] ??
        /network error( \w+)?/.exec(message)?.[0] ??
        (/timed out/.test(message) ? 'timeout' : null) ??
        (/deadline/.test(message) ? 'deadline' : null) ??
        'other'
    return `${label}: ${detail}`
}

/** Loads the plugin for an era into one VM, without setup: for tests that drive the methods themselves. */
export function loadForEra(
    options: {
        era: string
        pluginDir: string
        source?: string
        now?: () => number
        config?: Record<string, string>
        /** The database behind meta.storage and meta.cache; default: a new one, started at its first call. */
        store?: HostStore
    },
    logs: string[],
    echo?: (line: string) => void
): { era: Era; methods: PluginVm['methods']; vm: PluginVm; store: HostStore } {
    const era = getEra(options.era)
    const code = transpileForEra(options.source ?? readPluginSource(options.pluginDir), era)
    const log = (line: string): void => {
        logs.push(line)
        echo?.(line)
    }
    const store = options.store ?? new HostStore()
    const hostMeta = hostMetaFor(era, options.config ?? {}, log, {
        store: store.call,
        pluginConfigId: DEFAULT_PLUGIN_CONFIG_ID,
        minuteMs: MINUTE_MS,
        metrics: new PluginMetrics(),
    })
    const vm = createPluginVm(code, era, { console: pluginConsole(log), hostMeta, now: options.now })
    // A plugin may leave onEvent out where the era buffers for its exportEvents (this plugin does, where the
    // sandbox shows plugin metrics): the host's export path then wraps an onEvent of its own.
    if (!vm.methods.onEvent && !(era.exportPath && vm.methods.exportEvents)) {
        throw new PluginLoadError('the plugin exports no onEvent')
    }
    return { era, methods: vm.methods, vm, store }
}

function addStats(total: SenderStats | null, more: SenderStats | null): SenderStats | null {
    if (!total || !more) {
        return total ?? more
    }
    const sum = { ...total, failuresByCause: { ...total.failuresByCause } }
    for (const [key, value] of Object.entries(more)) {
        if (typeof value === 'number') {
            ;(sum as unknown as Record<string, number>)[key] =
                ((total as unknown as Record<string, number>)[key] ?? 0) + value
        }
    }
    for (const [cause, count] of Object.entries(more.failuresByCause ?? {})) {
        sum.failuresByCause[cause] = (sum.failuresByCause[cause] ?? 0) + count
    }
    return sum
}

/** Tallies what the host saw of each call. */
class Tally {
    readonly latencies: number[] = []

    constructor(readonly result: JobResult) {}

    record(uuid: string, outcome: CallOutcome | null, calledAt: number): void {
        const result = this.result
        if (!outcome) {
            // processEvent dropped the event: nothing for onEvent to do.
            result.resolved++
            return
        }
        if (outcome.kind === 'skipped') {
            result.skipped++
            return
        }
        result.hostRetries += outcome.hostRetries
        result.maxCallMs = Math.max(result.maxCallMs, outcome.ms)
        if (outcome.kind === 'ok') {
            result.resolved++
            this.latencies.push(Date.now() - calledAt)
            return
        }
        const label = outcome.retryable ? 'RetryError' : outcome.name
        result.failed++
        result.failedUuids.push(uuid)
        result.errorMessages.push(`${label}: ${outcome.message}`)
        const cause = failureCause(label, outcome.message)
        result.failuresByCause[cause] = (result.failuresByCause[cause] ?? 0) + 1
    }

    progress(options: JobOptions): void {
        const { resolved, failed, skipped } = this.result
        options.onProgress?.({ done: resolved + failed + skipped, failed, skipped })
    }
}

/**
 * The host's job side: the queue and the VM its jobs run in, made at the first job, with its own setupPlugin
 * and its own `meta.global`, like another thread of the host picking the job up.
 */
class JobHost {
    readonly queue: JobQueue
    private instance: PluginInstance | null = null

    constructor(
        private readonly options: JobOptions,
        private readonly era: Era,
        private readonly code: string,
        private readonly log: (line: string) => void,
        private readonly install: Install
    ) {
        this.queue = new JobQueue(options.jobTimeScale ?? 1, (job) => this.run(job))
    }

    readonly enqueue = (job: ExportJob, seconds: number): void => this.queue.enqueue(job, seconds)

    private run(job: ExportJob): Promise<void> {
        // A job's fresh VM reaches the same database as every other VM of the install.
        this.instance ??= new PluginInstance({
            ...instanceOptions(this.options, this.era, this.code, this.install),
            log: this.log,
            enqueueJob: this.enqueue,
            store: this.install.store.call,
        })
        return this.instance.runExportJob(job)
    }

    /** The job VM's meta.metrics values, if a job ran. */
    pluginMetrics() {
        return this.instance?.pluginMetrics.values ?? {}
    }

    /** The job VM's own sender counters: what its exportEvents calls delivered. */
    async senderStats(): Promise<SenderStats | null> {
        return (await this.instance?.senderStats()) ?? null
    }

    /** Waits for the queue (up to jobWaitMs), then ends: the jobs left are counted, the job VM torn down. */
    async finish(result: JobResult, metrics: ExportMetrics[], undelivered: string[]): Promise<void> {
        await this.queue.idle(this.options.jobWaitMs)
        const jobs = this.queue.stop()
        await this.instance?.teardown()
        const policy = this.era.exportPath
        if (!policy || (!metrics.some((m) => m.batches > 0) && jobs.enqueued === 0)) {
            return
        }
        const total = [...metrics, this.instance?.exportMetrics ?? emptyMetrics()].reduce(addMetrics, emptyMetrics())
        result.exportPath = {
            era: policy.label,
            metrics: total,
            line: metricsLine(policy, total),
            jobs,
            jobPayloads: this.queue.payloads,
            undeliveredUuids: [...undelivered, ...(this.instance?.undeliveredUuids ?? [])],
        }
    }
}

async function microtaskTurns(count: number): Promise<void> {
    for (let turn = 0; turn < count; turn++) {
        await Promise.resolve()
    }
}

/** What a path needs besides the options: the era, the transpiled code, the tally, the log and the install. */
interface RunContext {
    options: JobOptions
    era: Era
    code: string
    tally: Tally
    log: (line: string) => void
    install: Install
}

/** The direct path's events: micro-batches of calls started together, a few microtask turns apart. */
async function feedDirect({ options, era, tally }: RunContext, instance: PluginInstance): Promise<void> {
    const runOne = async (event: ProcessedPluginEvent, position: number): Promise<void> => {
        await microtaskTurns(position * CALL_STAGGER_MICROTASKS)
        const shaped = era.shapeEvent(event)
        const calledAt = Date.now()
        const outcome = await instance.onEvent(shaped.event, shaped.person ? { person: shaped.person } : undefined)
        tally.record(event.uuid, outcome, calledAt)
    }
    let group: ProcessedPluginEvent[] = []
    const flush = async (): Promise<void> => {
        const calls = group.map((event, position) => runOne(event, position))
        group = []
        await Promise.all(calls)
        tally.progress(options)
    }
    for await (const event of options.events) {
        tally.result.events++
        group.push(event)
        if (group.length >= (options.concurrency ?? era.concurrency)) {
            await flush()
        }
    }
    if (group.length > 0) {
        await flush()
    }
    for await (const event of options.lateEvents ?? []) {
        tally.result.events++
        group.push(event)
        await flush()
    }
}

/**
 * PostHog's Postgres is up before its host loads a plugin: where the era offers plugin storage, the emulator's
 * database is started first, before the plugin's setup and the clock, so its start-up (a WASM engine) is not
 * charged to the first plugin that touches storage. In Kafka runs of the bench it cost the plugin about 1 s of
 * CPU in every run.
 */
async function openStorage(era: Era, install: Install): Promise<void> {
    if (era.services.storage) {
        await install.store.open()
    }
}

/** The direct path: one VM in this thread gets the events and the scheduled runs. */
async function runDirect(context: RunContext) {
    const { options, era, code, tally, log, install } = context
    await openStorage(era, install)
    const jobs = new JobHost(options, era, code, log, install)
    const instance = new PluginInstance({
        ...instanceOptions(options, era, code, install),
        log,
        enqueueJob: jobs.enqueue,
        store: install.store.call,
    })
    await instance.started()
    install.schedule(() => instance.runEveryMinute())
    const eventsStarted = Date.now()
    const cpuStarted = process.cpuUsage()
    await feedDirect(context, instance)
    tally.result.eventsMs = Date.now() - eventsStarted
    tally.result.eventsCpuMs = cpuMs(process.cpuUsage(cpuStarted))
    if (options.settleSetup) {
        await instance.settled()
    }
    await install.stopScheduling()
    // Teardown flushes the export buffer: the run ends once that batch and any retry jobs were handled.
    await instance.teardown()
    await instance.exportsDrained()
    await jobs.finish(tally.result, [instance.exportMetrics], instance.undeliveredUuids)
    tally.result.deliveredMs = Date.now() - eventsStarted
    tally.result.deliveredCpuMs = cpuMs(process.cpuUsage(cpuStarted))
    tally.result.sender = addStats(await instance.senderStats(), await jobs.senderStats())
    tally.result.setup = [{ ...instance.setup }]
    return [instance.pluginMetrics.values, jobs.pluginMetrics()]
}

type KafkaMessage = { uuid: string; json: string }

/** The Kafka path's events: Kafka batches cut into micro-batches, each message through eachMessage. */
async function feedKafka({ options, era, tally }: RunContext, pool: WorkerPool, workers: number): Promise<void> {
    const consume = async (messages: KafkaMessage[]): Promise<void> => {
        for (const group of microBatches(messages, workers * pool.tasksPerWorker)) {
            await Promise.all(
                group.map(async ({ uuid, json }) => {
                    const calledAt = Date.now()
                    tally.record(uuid, await eachMessage(pool, json), calledAt)
                })
            )
            tally.progress(options)
        }
    }
    const message = (event: ProcessedPluginEvent): KafkaMessage => {
        tally.result.events++
        return { uuid: event.uuid, json: JSON.stringify(era.shapeEvent(event).event) }
    }
    let batch: KafkaMessage[] = []
    for await (const event of options.events) {
        batch.push(message(event))
        if (batch.length >= KAFKA_BATCH_MESSAGES) {
            await consume(batch)
            batch = []
        }
    }
    await consume(batch)
    for await (const event of options.lateEvents ?? []) {
        await consume([message(event)])
    }
}

/** The Kafka path: worker threads, each message's processEvent task before its onEvent task. */
async function runKafka(context: RunContext) {
    const { options, era, code, tally, log, install } = context
    const workers = options.workers ?? DEFAULT_WORKERS
    const tasksPerWorker = options.tasksPerWorker ?? DEFAULT_TASKS_PER_WORKER
    await openStorage(era, install)
    const jobs = new JobHost(options, era, code, log, install)
    const data = instanceOptions(options, era, code, install)
    const pool = new WorkerPool(workers, tasksPerWorker, data, (line) => log(line), jobs.enqueue, install.store.call)
    let reports: WorkerReport[] = []
    try {
        await pool.started()
        // Each scheduled run is a task for whichever worker thread has room, as the host handed it to piscina.
        install.schedule(() => pool.run('runEveryMinute', {}) as Promise<ScheduledOutcome>)
        const eventsStarted = Date.now()
        const cpuStarted = process.cpuUsage()
        await feedKafka(context, pool, workers)
        tally.result.eventsMs = Date.now() - eventsStarted
        tally.result.eventsCpuMs = cpuMs(process.cpuUsage(cpuStarted))
        if (options.settleSetup) {
            await pool.reports(true)
        }
        await install.stopScheduling()
        await pool.teardown()
        reports = await pool.reports()
        const undelivered = reports.flatMap((report) => report.undeliveredUuids)
        await jobs.finish(
            tally.result,
            reports.map((report) => report.exportMetrics),
            undelivered
        )
        tally.result.deliveredMs = Date.now() - eventsStarted
        tally.result.deliveredCpuMs = cpuMs(process.cpuUsage(cpuStarted))
    } finally {
        await pool.close()
    }
    const workerStats = reports.reduce<SenderStats | null>((sum, report) => addStats(sum, report.stats), null)
    tally.result.sender = addStats(workerStats, await jobs.senderStats())
    tally.result.setup = reports.map((report) => report.setup)
    return [...reports.map((report) => report.pluginMetrics), jobs.pluginMetrics()]
}

function cpuMs(usage: NodeJS.CpuUsage): number {
    return (usage.user + usage.system) / 1000
}

/** What each VM is made from: the same on the direct path and in every worker thread. */
function instanceOptions(options: JobOptions, era: Era, code: string, install: Install) {
    return {
        ...install.vmOptions(),
        era: era.name,
        code,
        config: configOf(options),
        setupRetryScale: options.setupRetryScale ?? 1,
        hostRetryScale: options.hostRetryScale ?? 1,
        hostRetry: options.hostRetry,
    }
}

function configOf(options: JobOptions): Record<string, string> {
    const config: Record<string, string> = { webhookUrl: options.webhookUrl }
    for (const [key, value] of Object.entries(options.config ?? {})) {
        if (typeof value === 'string') {
            config[key] = value
        }
    }
    return config
}

export function defaultPath(era: Era): HostPath {
    return era.name === 'cdp2025' ? 'direct' : 'kafka'
}

function emptyResult(era: Era, path: HostPath): JobResult {
    return {
        era: era.name,
        path,
        events: 0,
        resolved: 0,
        failed: 0,
        skipped: 0,
        hostRetries: 0,
        failuresByCause: {},
        failedUuids: [],
        errorMessages: [],
        logs: [],
        sender: null,
        setup: [],
        maxCallMs: 0,
        latencyP50Ms: 0,
        latencyP95Ms: 0,
        durationMs: 0,
        eventsMs: 0,
        eventsCpuMs: 0,
        deliveredMs: 0,
        deliveredCpuMs: 0,
        exportPath: null,
        storage: {
            reads: 0,
            writes: 0,
            deletes: 0,
            failedWrites: 0,
            cacheCalls: 0,
            injectedStorageFaults: 0,
            injectedCacheFaults: 0,
            storedBytes: 0,
            peakStoredBytes: 0,
        },
        scheduled: null,
        pluginMetrics: null,
    }
}

export async function runJob(options: JobOptions): Promise<JobResult> {
    const started = Date.now()
    const era = getEra(options.era)
    const path = options.path ?? defaultPath(era)
    if (path === 'kafka' && era.name === 'cdp2025') {
        throw new Error('cdp2025 has no classic Kafka path: its consumer starts a whole batch at once (use direct)')
    }
    // The host would retry a plugin that fails to transpile like any setup failure; here it stops the run at once.
    const code = transpileForEra(options.source ?? readPluginSource(options.pluginDir), era)
    const result = emptyResult(era, path)
    const log = (line: string): void => {
        result.logs.push(line)
        options.log?.(line)
    }
    const tally = new Tally(result)
    const install = new Install(options, era, log)
    const context: RunContext = { options, era, code, tally, log, install }
    let metrics: PluginMetricValues[] = []
    try {
        metrics = path === 'kafka' ? await runKafka(context) : await runDirect(context)
    } finally {
        // Stops the scheduler and closes the run's own database, whatever happened.
        Object.assign(result, await install.finish(metrics))
    }
    tally.latencies.sort((a, b) => a - b)
    result.latencyP50Ms = percentile(tally.latencies, 50)
    result.latencyP95Ms = percentile(tally.latencies, 95)
    result.durationMs = Date.now() - started
    return result
}

/** Runs a plugin through an emulated PostHog host: load, setupPlugin, then onEvent at the era's concurrency. */
import type { ProcessedPluginEvent } from '@posthog/plugin-scaffold'

import type { PatternsConfig, SenderStats } from '../index'
import { getEra } from './eras'
import { guard, GUARD_MS, loadPlugin, PluginLoadError, PluginMethods, readPluginSource } from './loader'

/** Microtask turns between two calls of the same burst. */
export const CALL_STAGGER_MICROTASKS = 2

export interface JobOptions {
    era: string
    webhookUrl: string
    /** Other plugin config fields, as strings like PostHog passes them. */
    config?: Partial<PatternsConfig>
    events: Iterable<ProcessedPluginEvent> | AsyncIterable<ProcessedPluginEvent>
    /** Plugin folder (plugin.json + main). Defaults to the project root. */
    pluginDir: string
    /** Plugin source to load instead of the folder's main file. */
    source?: string
    /** Scales the host's own retry waits (vm2022), so tests need not sit through 3 s and 6 s. */
    hostRetryScale?: number
    onProgress?: (progress: { done: number; failed: number }) => void
    /** Calls started together, instead of the era's own (for benchmarks). */
    concurrency?: number
    /** Also hand each of the plugin's log lines to this, as they come. */
    log?: (line: string) => void
}

export interface JobResult {
    era: string
    events: number
    /** Calls to onEvent that resolved: the webhook accepted the event or the plugin filtered it. */
    resolved: number
    failed: number
    hostRetries: number
    failuresByCause: Record<string, number>
    /** uuids of the events whose onEvent call threw in the end. */
    failedUuids: string[]
    /** Every message of every error that reached the host, and every log line: for secret scans. */
    errorMessages: string[]
    logs: string[]
    /** The plugin's own counters, read from meta.global. */
    sender: SenderStats | null
    /** The longest single onEvent call, delivered or not: the host kills a call at 30 s. */
    maxCallMs: number
    latencyP50Ms: number
    latencyP95Ms: number
    durationMs: number
}

export function percentile(sorted: readonly number[], p: number): number {
    if (sorted.length === 0) {
        return 0
    }
    const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)
    return sorted[Math.max(0, index)] ?? 0
}

/** A short, secret-free label for grouping failures. */
export function failureCause(error: { name?: string; message?: string }): string {
    const message = error.message ?? ''
    const detail =
        /HTTP \d{3}/.exec(message)?.[0] ??
        /network error( \w+)?/.exec(message)?.[0] ??
        (/timed out/.test(message) ? 'timeout' : null) ??
        (/deadline/.test(message) ? 'deadline' : null) ??
        'other'
    return `${error.name ?? 'Error'}: ${detail}`
}

function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, ms))
}

/** Loads the plugin for an era. Throws PluginLoadError with PostHog's text when it cannot load. */
export function loadForEra(
    options: Pick<JobOptions, 'era' | 'pluginDir' | 'source'> & { now?: () => number },
    logs: string[],
    echo?: (line: string) => void
) {
    const era = getEra(options.era)
    const record =
        (level: string) =>
        (...args: unknown[]): void => {
            const line = `${level}: ${args.map(String).join(' ')}`
            logs.push(line)
            echo?.(line)
        }
    const pluginConsole = {
        log: record('log'),
        info: record('info'),
        warn: record('warn'),
        error: record('error'),
        debug: record('debug'),
    }
    const source = options.source ?? readPluginSource(options.pluginDir)
    const methods = loadPlugin(source, {
        fetch: era.fetch,
        console: pluginConsole,
        timers: era.timers,
        now: options.now,
    })
    if (!methods.onEvent) {
        throw new PluginLoadError('the plugin exports no onEvent')
    }
    return { era, methods, pluginConsole }
}

export async function runJob(options: JobOptions): Promise<JobResult> {
    const started = Date.now()
    const logs: string[] = []
    const { era, methods, pluginConsole } = loadForEra(options, logs, options.log)
    const global: Record<string, unknown> = {}
    const config = { webhookUrl: options.webhookUrl, ...options.config }
    const baseMeta: Record<string, unknown> = era.metaFetch
        ? { config, global, logger: pluginConsole, fetch: era.metaFetch, geoip: {} }
        : {
              config,
              global,
              attachments: {},
              cache: {},
              storage: {},
              jobs: {},
              metrics: {},
              utils: {},
              geoip: {},
          }
    const call = (name: keyof PluginMethods & string, ...args: unknown[]) =>
        guard(
            Promise.resolve().then(() => methods[name]?.(...args)),
            GUARD_MS,
            name
        )

    if (methods.setupPlugin) {
        await call('setupPlugin', baseMeta)
    }

    const result: JobResult = {
        era: era.name,
        events: 0,
        resolved: 0,
        failed: 0,
        hostRetries: 0,
        failuresByCause: {},
        failedUuids: [],
        errorMessages: [],
        logs,
        sender: null,
        maxCallMs: 0,
        latencyP50Ms: 0,
        latencyP95Ms: 0,
        durationMs: 0,
    }
    const latencies: number[] = []

    const runOne = async (event: ProcessedPluginEvent, position: number): Promise<void> => {
        // Calls of one burst reach the plugin a few microtask turns apart, as the host's own awaits space them.
        for (let turn = 0; turn < position * CALL_STAGGER_MICROTASKS; turn++) {
            await Promise.resolve()
        }
        const shaped = era.shapeEvent(event)
        const meta = shaped.person ? { ...baseMeta, person: shaped.person } : baseMeta
        const calledAt = Date.now()
        for (let attempt = 0; ; attempt++) {
            const attemptStarted = Date.now()
            try {
                await call('onEvent', shaped.event, meta).finally(() => {
                    result.maxCallMs = Math.max(result.maxCallMs, Date.now() - attemptStarted)
                })
                result.resolved++
                latencies.push(Date.now() - calledAt)
                return
            } catch (error) {
                const e = error as { name?: string; message?: string }
                const delay = era.hostRetryDelaysMs[attempt]
                if (e.name === 'RetryError' && delay !== undefined) {
                    result.hostRetries++
                    await sleep(delay * (options.hostRetryScale ?? 1))
                    continue
                }
                result.failed++
                result.failedUuids.push(event.uuid)
                result.errorMessages.push(`${e.name ?? 'Error'}: ${e.message ?? String(error)}`)
                const cause = failureCause(e)
                result.failuresByCause[cause] = (result.failuresByCause[cause] ?? 0) + 1
                return
            }
        }
    }

    // Micro-batches started together; the next one starts only after every call of this one settled.
    let group: ProcessedPluginEvent[] = []
    const flush = async (): Promise<void> => {
        const calls = group.map((event, position) => runOne(event, position))
        group = []
        await Promise.all(calls)
        options.onProgress?.({ done: result.resolved + result.failed, failed: result.failed })
    }
    for await (const event of options.events) {
        result.events++
        group.push(event)
        if (group.length >= (options.concurrency ?? era.concurrency)) {
            await flush()
        }
    }
    if (group.length > 0) {
        await flush()
    }
    if (methods.teardownPlugin) {
        await call('teardownPlugin', baseMeta)
    }
    const sender = global.sender as { stats?: SenderStats } | undefined
    result.sender = sender?.stats ? { ...sender.stats } : null
    latencies.sort((a, b) => a - b)
    result.latencyP50Ms = percentile(latencies, 50)
    result.latencyP95Ms = percentile(latencies, 95)
    result.durationMs = Date.now() - started
    return result
}

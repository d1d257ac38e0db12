/**
 * What makes a command a service, shared by `replay` and `sync`: the flags (--metrics-port, --metrics-host,
 * --log-format), the health of each side it talks to with the lines that say when one starts and stops failing,
 * and the metrics server. The commands wire it to their pipeline; nothing here knows a source.
 */
import { Outcome, SenderEnv } from '../index'
import { CliOutput, LOG_FORMATS, LogFormat, seconds } from './cli-output'
import { UsageError } from './errors'
import type { FeedMetrics, FeedState, MetricsServer } from './metrics'
import { HealthChange, HealthState } from './outage'
import type { PipelineProgress } from './types'

export const DEFAULT_METRICS_HOST = '127.0.0.1'

/** The service flags both commands take, as node:util parseArgs options. */
export const SERVICE_OPTIONS = {
    'metrics-port': { type: 'string' },
    'metrics-host': { type: 'string' },
    'log-format': { type: 'string' },
} as const

export const SERVICE_HELP = `Service:
  --metrics-port PORT          serve GET /metrics (Prometheus) and GET /healthz on this port (0: any free port)
  --metrics-host HOST          the address to listen on (default: ${DEFAULT_METRICS_HOST}; 0.0.0.0 for all)
  --log-format FORMAT          human (default) or json: one JSON object per line (time, level, msg, fields)`

export interface ServiceSettings {
    metricsPort: number | null
    metricsHost: string
    logFormat: LogFormat
}

const MAX_PORT = 65_535

/** The service flags, checked; each error names its flag and the fix. */
export function serviceSettings(values: {
    'metrics-port'?: string
    'metrics-host'?: string
    'log-format'?: string
}): ServiceSettings {
    const portText = values['metrics-port']
    const port = portText === undefined ? null : Number(portText)
    if (port !== null && (!/^\d+$/.test(portText ?? '') || port > MAX_PORT)) {
        throw new UsageError(`--metrics-port: expected a port from 0 to ${MAX_PORT}, got "${portText}"`)
    }
    const host = values['metrics-host'] ?? DEFAULT_METRICS_HOST
    if (!host.trim()) {
        throw new UsageError(`--metrics-host: give an address to listen on, e.g. ${DEFAULT_METRICS_HOST} or 0.0.0.0`)
    }
    if (values['metrics-host'] !== undefined && port === null) {
        throw new UsageError('--metrics-host needs --metrics-port: it says where the metrics are served')
    }
    return { metricsPort: port, metricsHost: host.trim(), logFormat: logFormatOf(values['log-format']) }
}

function logFormatOf(text: string | undefined): LogFormat {
    const format = text ?? 'human'
    if (!(LOG_FORMATS as readonly string[]).includes(format)) {
        throw new UsageError(`--log-format: expected ${LOG_FORMATS.join(' or ')}, got "${format}"`)
    }
    return format as LogFormat
}

/**
 * The log format asked for on the command line, read before the flags are checked, so that even a usage error
 * is written as JSON when JSON was asked for. An unknown value is left to the check, which names it.
 */
export function logFormatIn(argv: readonly string[]): LogFormat {
    for (let i = 0; i < argv.length; i++) {
        const value = argv[i] === '--log-format' ? argv[i + 1] : /^--log-format=(.*)$/.exec(argv[i] ?? '')?.[1]
        if (value === 'json') {
            return 'json'
        }
    }
    return 'human'
}

/** The line for a side that went down or came back, or null for no change. */
export function healthChangeLine(side: string, change: HealthChange): string | null {
    if (change?.kind === 'down') {
        const since = new Date(change.sinceMs).toISOString()
        return `warning: ${side} has been failing since ${since} (${change.reason}); retrying, the checkpoint holds`
    }
    if (change?.kind === 'up') {
        return `${side} answers again, after ${seconds(change.downMs)} of failures`
    }
    return null
}

/** The progress line's part for a failing side: "webhook failing since …", or null while it is up. */
export function failingPart(side: string, health: HealthState): string | null {
    return health.failingSinceMs === null
        ? null
        : `${side} failing since ${new Date(health.failingSinceMs).toISOString()}`
}

export interface Service {
    state: FeedState
    webhook: HealthState
    /** The sender environment with each webhook request counted by status. */
    env: SenderEnv
    /** Feed to the pipeline's onOutcome: the webhook's health from each attempt. */
    onOutcome: (outcome: Outcome) => void
    /** Feed to the pipeline's onProgress. */
    onProgress: (progress: PipelineProgress) => void
    /** Marks good progress now (a poll that found the feed caught up). */
    succeeded: () => void
    close: () => Promise<void>
}

export interface ServiceOptions {
    settings: ServiceSettings
    output: CliOutput
    env: SenderEnv
    posthog?: HealthState
    lagSeconds?: () => number | null
}

/** Counts every webhook request by status through the metrics, on the way in and out of the transport. */
function countingEnv(env: SenderEnv, metrics: FeedMetrics | null): SenderEnv {
    if (!metrics) {
        return env
    }
    return {
        ...env,
        transport: async (request) => {
            try {
                const response = await env.transport(request)
                metrics.countRequest(response.status)
                return response
            } catch (error) {
                metrics.countRequest(null)
                throw error
            }
        },
    }
}

/**
 * metrics.ts, loaded only when asked for: prom-client and the process metrics cost a run about 12 MB. A require,
 * not an import(): from a checkout, tsx runs the sources through require only, and a native import() of
 * './metrics' finds no file (ES modules take no extension for granted, and the file is metrics.ts there,
 * metrics.js in dist/). Compiled to CommonJS an import() is this same require.
 */
function loadMetrics(): typeof import('./metrics') {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- see above: the one loader both ways run
    return require('./metrics') as typeof import('./metrics')
}

/** The health states, the metrics and their server (with --metrics-port), for one run. */
export async function startService(options: ServiceOptions): Promise<Service> {
    const { settings, output } = options
    const webhook = new HealthState()
    let progress: PipelineProgress | null = null
    let lastSuccessMs: number | null = null
    const state: FeedState = {
        progress: () => progress,
        webhook,
        posthog: options.posthog,
        lagSeconds: options.lagSeconds,
        lastSuccessMs: () => lastSuccessMs,
    }
    let metrics: FeedMetrics | null = null
    let server: MetricsServer | null = null
    if (settings.metricsPort !== null) {
        const { feedMetrics, startMetricsServer } = loadMetrics()
        metrics = feedMetrics(state)
        server = await startMetricsServer(settings.metricsHost, settings.metricsPort, metrics, state)
        output.line(`Serving metrics on ${server.url}/metrics and health on ${server.url}/healthz`)
    }
    return {
        state,
        webhook,
        env: countingEnv(options.env, metrics),
        onOutcome: (outcome) => {
            const now = Date.now()
            const change = outcome.kind === 'retry' ? webhook.failed(now, outcome.reason) : webhook.ok(now)
            if (outcome.kind === 'delivered') {
                lastSuccessMs = now
            }
            const line = healthChangeLine('the webhook', change)
            if (line) {
                output.line(line)
            }
        },
        onProgress: (p) => (progress = p),
        succeeded: () => (lastSuccessMs = Date.now()),
        close: async () => server?.close(),
    }
}

/**
 * `--metrics-port`: Prometheus metrics and a health check over HTTP, as a feed run as a service is watched.
 * prom-client writes the text format and the process metrics; the values are read from the run's own counters
 * and health states when Prometheus scrapes, so the pipeline knows nothing of them. No label or value holds a
 * secret: statuses are numbers, causes and sides are fixed words.
 */
import { createServer, IncomingMessage, Server, ServerResponse } from 'node:http'
import { AddressInfo } from 'node:net'

import {
    collectDefaultMetrics,
    Counter,
    Gauge,
    GaugeConfiguration,
    MetricObjectWithValues,
    MetricValue,
    Registry,
} from 'prom-client'

import { HealthState } from './outage'
import type { PipelineProgress } from './types'

export const METRIC_PREFIX = 'patterns_connector_'
/** /healthz turns 503 once PostHog has failed this many queries in a row (a few polls, retries included). */
export const UNHEALTHY_AFTER_FAILED_QUERIES = 3

/** What the run knows, read at each scrape. */
export interface FeedState {
    /** The pipeline's latest counters, or null before the first report. */
    progress: () => PipelineProgress | null
    webhook: HealthState
    /** sync only: PostHog's query API. */
    posthog?: HealthState
    /** sync only: how far behind now the feed is, in seconds (sync/service.ts), or null while it is unknown. */
    lagSeconds?: () => number | null
    /** When the feed last made good progress (ms), or null. */
    lastSuccessMs: () => number | null
}

export interface FeedMetrics {
    registry: Registry
    /** Counts one webhook request by its HTTP status, or 'error' for no answer (network, timeout). */
    countRequest: (status: number | null) => void
}

/** A counter that follows a running total read at scrape time (the pipeline's own counts). */
function followTotal(counter: Counter<string>, read: () => number | undefined, labels: Record<string, string> = {}) {
    let seen = 0
    return (): void => {
        const total = read() ?? 0
        if (total > seen) {
            counter.inc(labels, total - seen)
            seen = total
        }
    }
}

function deliveryCounters(registry: Registry, state: FeedState) {
    const progress = (): PipelineProgress | null => state.progress()
    const delivered = new Counter({
        name: `${METRIC_PREFIX}events_delivered_total`,
        help: 'Events the webhook accepted (2xx).',
        registers: [registry],
        collect: () => followDelivered(),
    })
    const followDelivered = followTotal(delivered, () => progress()?.delivered)
    const failed: Counter<string> = new Counter({
        name: `${METRIC_PREFIX}events_failed_total`,
        help: 'Events not delivered, by cause: refused by the webhook, or unreadable from the source.',
        labelNames: ['cause'],
        registers: [registry],
        collect: () => {
            followRefused()
            followUnreadable()
        },
    })
    const followRefused = followTotal(failed, () => progress()?.deadLettered, { cause: 'refused' })
    const followUnreadable = followTotal(failed, () => progress()?.malformed, { cause: 'unreadable' })
    failed.inc({ cause: 'refused' }, 0)
    failed.inc({ cause: 'unreadable' }, 0)
    return new Counter({
        name: `${METRIC_PREFIX}requests_total`,
        help: 'Webhook requests, by HTTP status ("error": no answer, a network error or a timeout).',
        labelNames: ['status'],
        registers: [registry],
    })
}

function upGauge(registry: Registry, side: string, health: HealthState): void {
    new Gauge({
        name: `${METRIC_PREFIX}${side}_up`,
        help: `1 while the ${side === 'posthog' ? "PostHog query API's" : "webhook's"} last answer was good, 0 while it is failing.`,
        registers: [registry],
        collect() {
            this.set(health.up ? 1 : 0)
        },
    })
}

/**
 * A gauge with no sample while its value is unknown: prom-client writes a gauge never set as 0, which for the
 * lag would read "caught up" before anything is known. Prometheus then has no series, and an alert on it waits.
 */
class KnownGauge extends Gauge {
    constructor(
        configuration: GaugeConfiguration<string>,
        private readonly read: () => number | null
    ) {
        super(configuration)
    }

    async get(): Promise<MetricObjectWithValues<MetricValue<string>>> {
        const value = this.read()
        if (value === null) {
            return { ...(await super.get()), values: [] }
        }
        this.set(value)
        return super.get()
    }
}

/**
 * prom-client's default metrics include three gauges whose names end in `_total`, a suffix Prometheus keeps for
 * counters: `promtool check metrics` fails on them, and a rate() over a gauge misleads. The handle and request
 * counts are left out; the rest of Node's process metrics stay.
 */
const GAUGES_NAMED_LIKE_COUNTERS = [
    'nodejs_active_handles_total',
    'nodejs_active_requests_total',
    'nodejs_active_resources_total',
]

/** The registry of one run: the feed's metrics and Node's process metrics. */
export function feedMetrics(state: FeedState): FeedMetrics {
    const registry = new Registry()
    collectDefaultMetrics({ register: registry })
    for (const name of GAUGES_NAMED_LIKE_COUNTERS) {
        registry.removeSingleMetric(name)
    }
    const requests = deliveryCounters(registry, state)
    upGauge(registry, 'webhook', state.webhook)
    if (state.posthog) {
        upGauge(registry, 'posthog', state.posthog)
    }
    if (state.lagSeconds) {
        new KnownGauge(
            {
                name: `${METRIC_PREFIX}lag_seconds`,
                help: 'Now minus the stored time (created_at) of the oldest event read and not yet delivered; to the horizon once caught up.',
                registers: [registry],
            },
            state.lagSeconds
        )
    }
    new Gauge({
        name: `${METRIC_PREFIX}last_success_timestamp_seconds`,
        help: 'When the feed last made good progress: a batch accepted by the webhook, or a poll that found it caught up.',
        registers: [registry],
        collect() {
            const at = state.lastSuccessMs()
            if (at !== null) {
                this.set(at / 1000)
            }
        },
    })
    return { registry, countRequest: (status) => requests.inc({ status: status === null ? 'error' : String(status) }) }
}

/** Whether the process is healthy: it answers, and PostHog (if it reads from PostHog) answered lately. */
export function healthOf(state: Pick<FeedState, 'posthog'>): { healthy: boolean; detail: string } {
    const posthog = state.posthog
    if (posthog && posthog.consecutiveFailures >= UNHEALTHY_AFTER_FAILED_QUERIES) {
        const since = posthog.failingSinceMs === null ? '' : ` since ${new Date(posthog.failingSinceMs).toISOString()}`
        return { healthy: false, detail: `PostHog failed the last ${posthog.consecutiveFailures} queries${since}` }
    }
    return { healthy: true, detail: 'ok' }
}

export interface MetricsServer {
    /** Where it listens, e.g. http://127.0.0.1:9464 (no secret: an address of this machine). */
    url: string
    close: () => Promise<void>
}

async function answer(req: IncomingMessage, res: ServerResponse, metrics: FeedMetrics, state: FeedState) {
    const path = (req.url ?? '/').split('?')[0]
    if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { Allow: 'GET, HEAD' }).end()
    } else if (path === '/metrics') {
        const text = await metrics.registry.metrics()
        res.writeHead(200, { 'Content-Type': metrics.registry.contentType }).end(text)
    } else if (path === '/healthz') {
        const health = healthOf(state)
        res.writeHead(health.healthy ? 200 : 503, { 'Content-Type': 'text/plain; charset=utf-8' })
        res.end(`${health.detail}\n`)
    } else {
        res.writeHead(404, { 'Content-Type': 'text/plain; charset=utf-8' }).end('GET /metrics or /healthz\n')
    }
}

/** Listens on host:port (0: any free port); a port in use or a host that cannot be bound is named with its flag. */
export function startMetricsServer(
    host: string,
    port: number,
    metrics: FeedMetrics,
    state: FeedState
): Promise<MetricsServer> {
    const server: Server = createServer((req, res) => {
        answer(req, res, metrics, state).catch(() => {
            if (!res.headersSent) {
                res.writeHead(500).end()
            }
        })
    })
    return new Promise((resolve, reject) => {
        server.once('error', (error: NodeJS.ErrnoException) => {
            const why = error.code === 'EADDRINUSE' ? 'the port is in use' : (error.code ?? error.message)
            reject(new Error(`--metrics-port ${port} on --metrics-host ${host}: cannot listen (${why})`))
        })
        server.listen(port, host, () => {
            const address = server.address() as AddressInfo
            const shown = address.family === 'IPv6' ? `[${address.address}]` : address.address
            resolve({
                url: `http://${shown}:${address.port}`,
                close: () =>
                    new Promise<void>((done) => {
                        server.closeAllConnections()
                        server.close(() => done())
                    }),
            })
        })
    })
}

/** `patterns-connector sync`: a live, batched, resumable feed from PostHog's query API to the webhook. */
import { parseArgs } from 'node:util'

import {
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    ParsedConfig,
    redactText,
} from '../index'
import {
    DELIVERY_OPTIONS,
    deliverySettings,
    joinNegativeNumbers,
    UsageError,
    usageMessage,
    webhookUrlFrom,
    wholeNumber,
} from '../pipeline/cli-options'
import { nodeEnv } from '../replay/cli'
import { DEFAULT_CONCURRENCY, REPLAY_BATCH_DEADLINE_MS } from '../replay/replay'
import { CheckpointError, resumeFrom, SourceBinding } from './checkpoint'
import {
    DEFAULT_QUERIES_PER_HOUR,
    DEFAULT_QUERIES_PER_MINUTE,
    DEFAULT_QUERY_RETRY_FOR_MS,
    DEFAULT_QUERY_TIMEOUT_MS,
    POSTHOG_QUERIES_PER_HOUR,
    POSTHOG_QUERIES_PER_MINUTE,
    PostHogQueryError,
    QueryClient,
} from './posthog'
import { MAX_QUERY_ROWS } from './query'
import { DEFAULT_LAG_MS, DEFAULT_LATE_WINDOW_MS, DEFAULT_PAGE_SIZE, DEFAULT_POLL_INTERVAL_MS } from './source'
import { sync, SyncProgress, SyncReport } from './sync'

const LOOPBACK_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]'])

export const SYNC_HELP = `Usage: patterns-connector sync --posthog-url URL --project-id ID [options]

Reads events from PostHog's query API (today's PostHog, Cloud or self-hosted) in the order PostHog stored
them, and sends them to the webhook in batches with the plugin's own filters, property removal, signing,
retries and 413 splitting. Resumable: the same command continues where the checkpoint stands.

Secrets come from the environment, so they stay out of shell history and process lists:
  PATTERNS_WEBHOOK_URL         the webhook (or --webhook-url). Never printed.
  POSTHOG_API_KEY              a personal API key (phx_...) with the query:read scope (or --posthog-api-key).
                               Never printed, and sent only to --posthog-url.

Source:
  --posthog-url URL            e.g. https://us.posthog.com or https://eu.posthog.com (http only for localhost)
  --project-id ID              the project's numeric id (in its URL: /project/ID)
  --since ISO                  first run only: start at events PostHog stored from this time (default: now)
  --until ISO                  stop once every event stored before this time is sent (default: now minus --lag)
  --follow                     keep polling after catching up, instead of exiting
  --lag DURATION               stay this far behind now, for events still being written (default: ${DEFAULT_LAG_MS / 1000}s)
  --poll-interval DURATION     with --follow, the pause between polls once caught up (default: ${DEFAULT_POLL_INTERVAL_MS / 1000}s)
  --late-window DURATION       how long after its own timestamp an event may reach PostHog and still be read
                               (default: ${DEFAULT_LATE_WINDOW_MS / 86_400_000}d); longer scans more partitions per query
  --page-size N                events per query, at most ${MAX_QUERY_ROWS} (default: ${DEFAULT_PAGE_SIZE})
  --query-timeout DURATION     one query's time limit before it is retried (default: ${DEFAULT_QUERY_TIMEOUT_MS / 1000}s)
  --max-queries-per-minute N   client-side limit (default: ${DEFAULT_QUERIES_PER_MINUTE}; PostHog allows ${POSTHOG_QUERIES_PER_MINUTE} per team)
  --max-queries-per-hour N     client-side limit (default: ${DEFAULT_QUERIES_PER_HOUR}; PostHog allows ${POSTHOG_QUERIES_PER_HOUR} per team)

Delivery (as replay):
  --allowed-events LIST        comma-separated event names to send (default: all); read by the query itself
  --excluded-events LIST       comma-separated event names to skip; read by the query itself
  --excluded-properties LIST   property names to remove, e.g. "$ip,email"
  --custom-headers JSON        or PATTERNS_CUSTOM_HEADERS
  --signing-secret SECRET      or PATTERNS_SIGNING_SECRET (whsec_...)
  --concurrency K              webhook requests in flight (default: ${DEFAULT_CONCURRENCY})
  --batch-events N             events per request at most (default: ${DEFAULT_MAX_BATCH_EVENTS})
  --batch-bytes N              bytes per request at most (default: ${DEFAULT_MAX_BATCH_BYTES})
  --timeout SECONDS            per webhook request (default: ${DEFAULT_REQUEST_TIMEOUT_MS / 1000})
  --retry-for SECONDS          how long one batch keeps retrying before the run stops (default: ${REPLAY_BATCH_DEADLINE_MS / 1000})
  --checkpoint FILE            resume from FILE and keep it up to date (bound to URL, project, filters, --since)
  --dead-letter FILE           append refused events here (JSON Lines)
  -h, --help                   show this help

Durations: 500ms, 30s, 2m, 1h, 7d (a bare number is seconds).
With --follow and the defaults, an event is sent within about ${(DEFAULT_LAG_MS + DEFAULT_POLL_INTERVAL_MS) / 1000 + 15} s of PostHog storing it.
Exit codes: 0 everything read was delivered or deliberately filtered; 1 some events were refused or the
run stopped early (see the summary; the same command resumes); 2 bad usage or configuration (API key,
scope, project, checkpoint of another source); 130 interrupted (Ctrl-C; the checkpoint is written).
`

/** Bad usage of `sync`: a UsageError, as the shared delivery flags throw. */
export class SyncUsageError extends UsageError {
    name = 'SyncUsageError'
}

/** "500ms", "30s", "2m", "1h", "7d", or a bare number of seconds, in milliseconds. */
export function parseDuration(flag: string, text: string): number {
    const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(text.trim())
    if (!match) {
        throw new SyncUsageError(`--${flag}: expected a duration such as 500ms, 30s, 2m, 1h or 7d; got "${text}"`)
    }
    const unit = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }[match[2] ?? 's'] ?? 1_000
    return Math.round(Number(match[1]) * unit)
}

function isoTime(flag: string, text: string): number {
    const ms = Date.parse(text)
    if (Number.isNaN(ms) || !/^\d{4}-\d\d-\d\d/.test(text)) {
        throw new SyncUsageError(`--${flag}: expected an ISO 8601 time such as 2026-11-01T00:00:00Z; got "${text}"`)
    }
    return ms
}

/** The PostHog origin: https, or http on loopback only, and nothing but scheme, host and port. */
export function parsePostHogUrl(text: string | undefined): string {
    if (!text) {
        throw new SyncUsageError('--posthog-url is required, e.g. --posthog-url https://us.posthog.com')
    }
    let url: URL
    try {
        url = new URL(text)
    } catch {
        throw new SyncUsageError(`--posthog-url: not an absolute URL: "${text}"; e.g. https://us.posthog.com`)
    }
    if (url.username || url.password) {
        throw new SyncUsageError('--posthog-url: must not contain user:password@; the API key goes in POSTHOG_API_KEY')
    }
    if (url.protocol === 'http:' && !LOOPBACK_HOSTS.has(url.hostname)) {
        throw new SyncUsageError(
            '--posthog-url: plain http would send the API key in the clear; use https (http only for localhost)'
        )
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
        throw new SyncUsageError(`--posthog-url: expected https://, got ${url.protocol}//`)
    }
    if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
        throw new SyncUsageError(`--posthog-url: give the origin only, e.g. ${url.origin} (not a page or API path)`)
    }
    return url.origin
}

function parseApiKey(value: string | undefined): string {
    const key = value?.trim()
    if (!key) {
        throw new SyncUsageError(
            'POSTHOG_API_KEY is required: a personal API key (phx_...) with the query:read scope, ' +
                'created in PostHog under Settings > Personal API keys'
        )
    }
    if (key.startsWith('phc_')) {
        throw new SyncUsageError(
            'POSTHOG_API_KEY holds a project API key (phc_...), which can only send events; the query API needs ' +
                'a personal API key (phx_...) with the query:read scope'
        )
    }
    return key
}

export interface SyncArgs {
    origin: string
    projectId: string
    apiKey: string
    config: ParsedConfig
    sinceMs: number
    sinceGiven: boolean
    untilMs: number | null
    follow: boolean
    lagMs: number
    pollIntervalMs: number
    lateWindowMs: number
    pageSize: number
    queryTimeoutMs: number
    perMinute: number
    perHour: number
    concurrency: number
    checkpointFile: string | null
    deadLetterFile: string | null
}

const OPTIONS = {
    ...DELIVERY_OPTIONS,
    'posthog-url': { type: 'string' },
    'project-id': { type: 'string' },
    'posthog-api-key': { type: 'string' },
    since: { type: 'string' },
    until: { type: 'string' },
    follow: { type: 'boolean', default: false },
    lag: { type: 'string' },
    'poll-interval': { type: 'string' },
    'late-window': { type: 'string' },
    'page-size': { type: 'string' },
    'query-timeout': { type: 'string' },
    'max-queries-per-minute': { type: 'string' },
    'max-queries-per-hour': { type: 'string' },
} as const

/** The numeric flags, whose negative values must reach the range check that names the flag. */
const NUMERIC_FLAGS = [
    'concurrency',
    'batch-events',
    'batch-bytes',
    'timeout',
    'retry-for',
    'page-size',
    'max-queries-per-minute',
    'max-queries-per-hour',
]

function readFlags(argv: string[]) {
    try {
        return parseArgs({ args: joinNegativeNumbers(argv, NUMERIC_FLAGS), strict: true, options: OPTIONS }).values
    } catch (error) {
        throw new SyncUsageError(usageMessage(error as Error))
    }
}

/** Validates every flag once, naming the flag and the fix. Returns null for --help. */
export function parseSyncArgs(argv: string[], env: Record<string, string | undefined>, nowMs: number): SyncArgs | null {
    const values = readFlags(argv)
    if (values.help) {
        return null
    }
    const origin = parsePostHogUrl(values['posthog-url'])
    const projectId = values['project-id']
    if (!projectId || !/^\d+$/.test(projectId)) {
        throw new SyncUsageError(
            `--project-id: expected the project's numeric id (the number in /project/ID/ in PostHog's URLs)` +
                (projectId ? `, got "${projectId}"` : '')
        )
    }
    const apiKey = parseApiKey(values['posthog-api-key'] ?? env.POSTHOG_API_KEY)
    const webhookUrl = webhookUrlFrom(values, env)
    if (!webhookUrl) {
        throw new SyncUsageError('PATTERNS_WEBHOOK_URL (or --webhook-url) is required')
    }
    const follow = values.follow
    if (follow && values.until !== undefined) {
        throw new SyncUsageError('--until and --follow cannot be used together: --follow never stops by itself')
    }
    const lagMs = values.lag === undefined ? DEFAULT_LAG_MS : parseDuration('lag', values.lag)
    const sinceMs = values.since === undefined ? nowMs : isoTime('since', values.since)
    const untilMs = follow ? null : values.until === undefined ? nowMs - lagMs : isoTime('until', values.until)
    if (untilMs !== null && values.until !== undefined && untilMs <= sinceMs) {
        throw new SyncUsageError(`--until must be after --since (${new Date(sinceMs).toISOString()})`)
    }
    const delivery = deliverySettings(values, env, webhookUrl, false)
    const duration = (flag: 'poll-interval' | 'late-window' | 'query-timeout', fallback: number): number => {
        const text = values[flag]
        const ms = text === undefined ? fallback : parseDuration(flag, text)
        if (ms <= 0) {
            throw new SyncUsageError(`--${flag}: must be more than 0`)
        }
        return ms
    }
    return {
        origin,
        projectId,
        apiKey,
        config: delivery.config,
        sinceMs,
        sinceGiven: values.since !== undefined,
        untilMs,
        follow,
        lagMs,
        pollIntervalMs: duration('poll-interval', DEFAULT_POLL_INTERVAL_MS),
        lateWindowMs: duration('late-window', DEFAULT_LATE_WINDOW_MS),
        queryTimeoutMs: duration('query-timeout', DEFAULT_QUERY_TIMEOUT_MS),
        pageSize: wholeNumber('page-size', values['page-size'], DEFAULT_PAGE_SIZE, MAX_QUERY_ROWS),
        perMinute: wholeNumber('max-queries-per-minute', values['max-queries-per-minute'], DEFAULT_QUERIES_PER_MINUTE),
        perHour: wholeNumber('max-queries-per-hour', values['max-queries-per-hour'], DEFAULT_QUERIES_PER_HOUR),
        concurrency: delivery.concurrency,
        checkpointFile: delivery.checkpointFile,
        deadLetterFile: delivery.deadLetterFile,
    }
}

function seconds(ms: number): string {
    const s = Math.max(0, Math.round(ms / 1000))
    return s >= 3600
        ? `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`
        : s >= 60
          ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`
          : `${s}s`
}

/** How far the feed is behind now: to the horizon once caught up, else to the newest event read. */
export function behindNowMs(
    p: Pick<SyncProgress, 'cursorMs' | 'caughtUp' | 'horizonMs'>,
    nowMs: number
): number | null {
    const at = p.caughtUp ? p.horizonMs : p.cursorMs
    return at === null ? null : nowMs - at
}

export function syncProgressLine(p: SyncProgress, elapsedMs: number, nowMs: number): string {
    const rate = p.delivered / Math.max(elapsedMs / 1000, 0.001)
    const behind = behindNowMs(p, nowMs)
    const at = p.cursorMs === null ? 'no events yet' : `at ${new Date(p.cursorMs).toISOString()}`
    return (
        `read ${p.read}, sent ${p.delivered}, ${Math.round(rate)} events/s, ${at}, ` +
        `${behind === null ? '' : `${seconds(behind)} behind now`}${p.caughtUp ? ' (caught up)' : ''}, ` +
        `queries ${p.queries}, retries ${p.retries + p.queryRetries}, failures ${p.deadLettered}, in flight ${p.inFlight}`
    )
}

export function syncSummaryText(report: SyncReport): string {
    const cursor = report.cursor.uuid
        ? `${new Date(report.cursor.ms).toISOString()} ${report.cursor.uuid}`
        : `from ${new Date(report.cursor.ms).toISOString()}`
    const rows: Array<[string, string | number]> = [
        ['events read', report.read],
        ['delivered', report.delivered],
        ['filtered out', report.filtered],
        ['refused (dead-letter)', report.deadLettered],
        ['unreadable (dead-letter)', report.malformed],
        ['webhook requests', report.requests],
        ['webhook retries', report.retries],
        ['PostHog requests', report.queries],
        ['PostHog retries', report.queryRetries],
        ['bytes', report.bytesSent],
        ['events/s', Math.round(report.delivered / Math.max(report.durationMs / 1000, 0.001))],
        ['checkpoint at', cursor],
        ['stopped early', report.stopped ?? 'no'],
    ]
    return rows.map(([k, v]) => `  ${k.padEnd(26)}${v}`).join('\n')
}

export interface SyncIO {
    stdout: NodeJS.WritableStream
    stderr: NodeJS.WritableStream & { isTTY?: boolean }
}

/** Everything printed goes through here: every known secret is removed first, as a net under messages. */
function redactingOutput(io: SyncIO, env: Record<string, string | undefined>) {
    const secrets = [env.POSTHOG_API_KEY, env.PATTERNS_WEBHOOK_URL].filter((s): s is string =>
        Boolean(s && s.length >= 4)
    )
    const tty = Boolean(io.stderr.isTTY)
    const write = (stream: NodeJS.WritableStream, text: string): void => {
        stream.write(redactText(text, secrets))
    }
    return {
        tty,
        out: (text: string) => write(io.stdout, text),
        /** A line on stderr, first clearing a progress line a terminal may show. */
        line: (text: string) => write(io.stderr, `${tty ? '\r\x1b[K' : ''}${text}\n`),
        raw: (text: string) => write(io.stderr, text),
        addSecrets: (more: string[]) => {
            secrets.push(...more)
            secrets.sort((a, b) => b.length - a.length)
        },
    }
}

type Output = ReturnType<typeof redactingOutput>

/** The progress line: redrawn in place on a terminal, every 5 s otherwise. */
function progressPrinter(output: Output): (p: SyncProgress) => void {
    const started = Date.now()
    let lastPlain = 0
    return (p) => {
        const line = syncProgressLine(p, Date.now() - started, Date.now())
        if (output.tty) {
            output.raw(`\r\x1b[K${line}`)
        } else if (Date.now() - lastPlain >= 5_000) {
            lastPlain = Date.now()
            output.raw(`${line}\n`)
        }
    }
}

function bindingOf(args: SyncArgs): SourceBinding {
    return {
        host: args.origin,
        projectId: args.projectId,
        allowedEvents: args.config.allowedEvents ? [...args.config.allowedEvents] : null,
        excludedEvents: [...args.config.excludedEvents],
        since: new Date(args.sinceMs).toISOString(),
    }
}

function queryClient(args: SyncArgs, output: Output, signal?: AbortSignal): QueryClient {
    return new QueryClient({
        origin: args.origin,
        projectId: args.projectId,
        apiKey: args.apiKey,
        timeoutMs: args.queryTimeoutMs,
        retryForMs: DEFAULT_QUERY_RETRY_FOR_MS,
        limits: { perMinute: args.perMinute, perHour: args.perHour },
        signal,
        onWait: (reason, waitMs) => {
            // Short waits for the client-side limit are routine; retries and long waits are worth a line.
            if (reason !== 'client-side rate limit' || waitMs >= 5_000) {
                output.line(`waiting ${seconds(waitMs)}: ${reason}`)
            }
        },
    })
}

/** 2 for configuration PostHog refused (key, scope, project), 130 interrupted, 1 anything left undone. */
export function syncExitCode(report: SyncReport, aborted: boolean): number {
    if (report.sourceError instanceof PostHogQueryError && report.sourceError.isConfig) {
        return 2
    }
    if (aborted) {
        return 130
    }
    return !report.stopped && report.deadLettered === 0 && report.malformed === 0 ? 0 : 1
}

/** The whole command, with injectable output; returns the exit code. Every line is redacted before printing. */
export async function runSyncCli(
    argv: string[],
    env: Record<string, string | undefined>,
    io: SyncIO,
    signal?: AbortSignal
): Promise<number> {
    const output = redactingOutput(io, env)
    let args: SyncArgs | null
    let start: ReturnType<typeof resumeFrom>
    try {
        args = parseSyncArgs(argv, env, Date.now())
        if (!args) {
            output.out(SYNC_HELP)
            return 0
        }
        output.addSecrets([args.apiKey, ...args.config.secrets])
        start = resumeFrom(args.checkpointFile, bindingOf(args), args.sinceGiven)
    } catch (error) {
        output.line(`error: ${(error as Error).message}`)
        return error instanceof UsageError || error instanceof CheckpointError ? 2 : 1
    }
    const from = start.resumed
        ? `resuming after ${new Date(start.cursor.ms).toISOString()}`
        : `from ${start.binding.since}`
    const to = args.follow ? 'following' : `until ${new Date(args.untilMs ?? 0).toISOString()}`
    output.line(`Syncing project ${args.projectId} from ${args.origin} to ${args.config.redactedUrl}, ${from}, ${to}`)
    let report: SyncReport
    try {
        report = await sync({
            ...args,
            client: queryClient(args, output, signal),
            start: start.cursor,
            teamId: Number(args.projectId),
            allowedEvents: start.binding.allowedEvents,
            excludedEvents: start.binding.excludedEvents,
            env: nodeEnv(),
            binding: start.binding,
            signal,
            onProgress: progressPrinter(output),
            onWarning: (message) => output.line(`warning: ${message}`),
        })
    } catch (error) {
        output.line(`error: ${(error as Error).message}`)
        return 1
    }
    if (output.tty) {
        output.raw('\n')
    }
    if (report.sourceError instanceof PostHogQueryError) {
        output.line(`error: ${report.sourceError.message}`)
    }
    output.out(`Sync ${report.stopped ? 'stopped' : 'finished'}\n${syncSummaryText(report)}\n`)
    return syncExitCode(report, Boolean(signal?.aborted))
}

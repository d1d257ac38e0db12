/** `patterns-connector sync`: a live, batched, resumable feed from PostHog's query API to the webhook. */
import { parseArgs } from 'node:util'

import {
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    LOOPBACK_HOSTS,
    ParsedConfig,
} from '../index'
import { DEFAULT_CONCURRENCY, emptyReport } from '../pipeline'
import {
    DEFAULT_RETRY_FOR_MS,
    DELIVERY_OPTIONS,
    deliverySettings,
    DURATION_FORMS,
    durationFlag,
    joinNegativeNumbers,
    nodeEnv,
    UsageError,
    usageMessage,
    WEBHOOK_URL_REQUIRED,
    webhookUrlFrom,
    wholeNumber,
} from '../pipeline/cli-options'
import {
    CliOutput,
    cliOutput,
    CliStreams,
    deliveryRows,
    eventsPerSecond,
    PROGRESS_REDRAW_MS,
    progressParts,
    seconds,
    summaryFields,
    SummaryRow,
    summaryText,
} from '../pipeline/cli-output'
import { HealthState } from '../pipeline/outage'
import {
    failingPart,
    logFormatIn,
    Service,
    SERVICE_HELP,
    SERVICE_OPTIONS,
    ServiceSettings,
    serviceSettings,
    startService,
} from '../pipeline/service'
import { CheckpointError, resumeFrom, SourceBinding } from './checkpoint'
import {
    AbortedError,
    DEFAULT_QUERIES_PER_HOUR,
    DEFAULT_QUERIES_PER_MINUTE,
    DEFAULT_QUERY_RETRY_FOR_MS,
    DEFAULT_QUERY_TIMEOUT_MS,
    POSTHOG_QUERIES_PER_HOUR,
    POSTHOG_QUERIES_PER_MINUTE,
    PostHogQueryError,
    QueryClient,
} from './posthog'
import { buildProbeQuery, FUTURE_WINDOW_MS, MAX_QUERY_ROWS, PERSONS_ON_EVENTS_MODE, whereProblem } from './query'
import { newSyncWatch, postHogOutcome, syncProgressFields, SyncWatch, watchLagMs } from './service'
import { DEFAULT_LAG_MS, DEFAULT_LATE_WINDOW_MS, DEFAULT_PAGE_SIZE, DEFAULT_POLL_INTERVAL_MS } from './source'
import { sync, SyncProgress, SyncReport } from './sync'

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
  --since ISO                  where a first run starts: the events PostHog stored from this time on
  --until ISO                  stop once every event stored before this time is sent (default: now minus --lag)
  --follow                     keep polling after catching up, instead of exiting; without --since, a first
                               run starts now and sends new events only
  --lag DURATION               stay this far behind now, for events still being written (default: ${DEFAULT_LAG_MS / 1000}s)
  --poll-interval DURATION     with --follow, the pause between polls once caught up (default: ${DEFAULT_POLL_INTERVAL_MS / 1000}s)
  --late-window DURATION       how long after its own timestamp an event may reach PostHog and still be read
                               (default: ${DEFAULT_LATE_WINDOW_MS / 86_400_000}d); longer scans more partitions per query
  --page-size N                events per query, at most ${MAX_QUERY_ROWS} (default: ${DEFAULT_PAGE_SIZE})
  --query-timeout DURATION     one query's time limit before it is retried (default: ${DEFAULT_QUERY_TIMEOUT_MS / 1000}s)
  --max-queries-per-minute N   client-side limit (default: ${DEFAULT_QUERIES_PER_MINUTE}; PostHog allows ${POSTHOG_QUERIES_PER_MINUTE} per team)
  --max-queries-per-hour N     client-side limit (default: ${DEFAULT_QUERIES_PER_HOUR}; PostHog allows ${POSTHOG_QUERIES_PER_HOUR} per team)

Filter and shape (PostHog does the filtering: only matching events are read from the query budget):
  --where EXPR                 a HogQL boolean expression, as in PostHog's SQL editor, e.g.
                               "properties.plan = 'pro'" or "person.properties.email ILIKE '%@acme.com'";
                               tried once at start (a bad one exits 2 with PostHog's message)
  --with-person                add each event's person: {id, properties, name, url}, its properties as they
                               were when the event was stored (what PostHog's webhook destination sends)

Delivery (as replay):
  --allowed-events LIST        comma-separated event names to send (default: all); read by the query itself
  --excluded-events LIST       comma-separated event names to skip; read by the query itself
  --excluded-properties LIST   property names to remove, e.g. "$ip,email"
  --custom-headers JSON        or PATTERNS_CUSTOM_HEADERS
  --signing-secret SECRET      or PATTERNS_SIGNING_SECRET (whsec_...)
  --concurrency K              webhook requests in flight (default: ${DEFAULT_CONCURRENCY})
  --batch-events N             events per request at most (default: ${DEFAULT_MAX_BATCH_EVENTS})
  --batch-bytes N              bytes per request at most (default: ${DEFAULT_MAX_BATCH_BYTES})
  --timeout DURATION           per webhook request (default: ${DEFAULT_REQUEST_TIMEOUT_MS / 1000}s)
  --retry-for DURATION         the whole budget of one batch: retries with backoff and Retry-After waits
                               until it is spent, then the run stops (default: ${DEFAULT_RETRY_FOR_MS / 1000}s; with
                               --follow: no limit, an outage of the webhook or of PostHog is waited out, retried
                               at least once a minute, with the checkpoint held)
  --checkpoint FILE            resume from FILE and keep it up to date (bound to URL, project, filters, --since);
                               never share one file between two syncs running at once
  --dead-letter FILE           append refused events and unreadable rows here (JSON Lines)
  -h, --help                   show this help

${SERVICE_HELP}

A first run needs --since (copy history from then, and stop once caught up), --follow (send new events as
they arrive), or both. The same command with the same --checkpoint resumes where the last run stopped; it
needs neither, and --since may be left out (the checkpoint keeps the first run's). A different --since is
refused for that checkpoint, since events before it were never read: start it with a new --checkpoint file.
A PostHog that cannot be reached, or that does not answer as PostHog, stops the first query within seconds
(exit 2); once it has answered, network errors and 5xx are retried for up to ${DEFAULT_QUERY_RETRY_FOR_MS / 60_000} min per query.

Every DURATION: ${DURATION_FORMS}.
With --follow and the defaults, an event is sent within about ${(DEFAULT_LAG_MS + DEFAULT_POLL_INTERVAL_MS) / 1000 + 15} s of PostHog storing it.
Exit codes: 0 everything read was delivered or deliberately filtered; 1 some events were refused or the
run stopped early (see the summary; the same command resumes); 2 bad usage or configuration (API key,
scope, project, a --posthog-url that is not PostHog, a checkpoint of another source); 130 interrupted
(Ctrl-C), 143 stopped by SIGTERM: the requests in flight get up to 10 s, the checkpoint is written.
`

function isoTime(flag: string, text: string): number {
    const ms = Date.parse(text)
    if (Number.isNaN(ms) || !/^\d{4}-\d\d-\d\d/.test(text)) {
        throw new UsageError(`--${flag}: expected an ISO 8601 time such as 2026-11-01T00:00:00Z; got "${text}"`)
    }
    return ms
}

/** The PostHog origin: https, or http on loopback only, and nothing but scheme, host and port. */
export function parsePostHogUrl(text: string | undefined): string {
    if (!text) {
        throw new UsageError('--posthog-url is required, e.g. --posthog-url https://us.posthog.com')
    }
    let url: URL
    try {
        url = new URL(text)
    } catch {
        throw new UsageError(`--posthog-url: not an absolute URL: "${text}"; e.g. https://us.posthog.com`)
    }
    if (url.username || url.password) {
        throw new UsageError('--posthog-url: must not contain user:password@; the API key goes in POSTHOG_API_KEY')
    }
    if (url.protocol === 'http:' && !LOOPBACK_HOSTS.has(url.hostname)) {
        throw new UsageError(
            '--posthog-url: plain http would send the API key in the clear; use https (http only for localhost)'
        )
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
        throw new UsageError(`--posthog-url: expected https://, got ${url.protocol}//`)
    }
    if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
        throw new UsageError(`--posthog-url: give the origin only, e.g. ${url.origin} (not a page or API path)`)
    }
    return url.origin
}

function parseApiKey(value: string | undefined): string {
    const key = value?.trim()
    if (!key) {
        throw new UsageError(
            'POSTHOG_API_KEY is required: a personal API key (phx_...) with the query:read scope, ' +
                'created in PostHog under Settings > Personal API keys'
        )
    }
    if (key.startsWith('phc_')) {
        throw new UsageError(
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
    /** How long one batch, or one query, may keep failing (Infinity with --follow unless --retry-for is given). */
    retryForMs: number
    service: ServiceSettings
    /** `--where`: a HogQL boolean expression PostHog filters on, or null. */
    where: string | null
    /** `--with-person`: each event carries its person. */
    withPerson: boolean
}

const OPTIONS = {
    ...DELIVERY_OPTIONS,
    ...SERVICE_OPTIONS,
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
    where: { type: 'string' },
    'with-person': { type: 'boolean', default: false },
} as const

/** The numeric and duration flags, whose negative values must reach the check that names the flag. */
const NUMERIC_FLAGS = [
    'lag',
    'poll-interval',
    'late-window',
    'query-timeout',
    'concurrency',
    'batch-events',
    'batch-bytes',
    'timeout',
    'retry-for',
    'page-size',
    'max-queries-per-minute',
    'max-queries-per-hour',
    'metrics-port',
]

function readFlags(argv: string[]) {
    try {
        return parseArgs({ args: joinNegativeNumbers(argv, NUMERIC_FLAGS), strict: true, options: OPTIONS }).values
    } catch (error) {
        throw new UsageError(usageMessage(error as Error, Object.keys(OPTIONS)))
    }
}

type SyncFlags = ReturnType<typeof readFlags>

function parseProjectId(projectId: string | undefined): string {
    if (!projectId || !/^\d+$/.test(projectId)) {
        throw new UsageError(
            `--project-id: expected the project's numeric id (the number in /project/ID/ in PostHog's URLs)` +
                (projectId ? `, got "${projectId}"` : '')
        )
    }
    return projectId
}

/** --since, --until, --follow and --lag: the stretch of PostHog's storage this run reads. */
function timeRange(values: SyncFlags, nowMs: number) {
    const follow = values.follow
    if (follow && values.until !== undefined) {
        throw new UsageError('--until and --follow cannot be used together: --follow never stops by itself')
    }
    const lagMs = durationFlag('lag', values.lag, DEFAULT_LAG_MS, true)
    const sinceMs = values.since === undefined ? nowMs : isoTime('since', values.since)
    const untilMs = follow ? null : values.until === undefined ? nowMs - lagMs : isoTime('until', values.until)
    if (untilMs !== null && values.until !== undefined && untilMs <= sinceMs) {
        throw new UsageError(`--until must be after --since (${new Date(sinceMs).toISOString()})`)
    }
    if (untilMs !== null && values.since !== undefined && untilMs <= sinceMs) {
        throw new UsageError(
            `--since ${values.since} is after now minus --lag (${new Date(untilMs).toISOString()}), so there is ` +
                'nothing to read yet: give an earlier --since, or add --follow to wait for new events'
        )
    }
    return { sinceMs, sinceGiven: values.since !== undefined, untilMs, follow, lagMs }
}

/** --where, trimmed, once it cannot reach outside its parentheses in the query; PostHog judges the rest. */
export function parseWhere(text: string | undefined): string | null {
    if (text === undefined) {
        return null
    }
    const problem = whereProblem(text)
    if (problem) {
        throw new UsageError(
            `--where: the expression ${problem}; give one HogQL boolean expression, e.g. ` +
                `--where "properties.plan = 'pro' AND person.properties.email ILIKE '%@acme.com'"`
        )
    }
    return text.trim()
}

/** Validates every flag once, naming the flag and the fix. Returns null for --help. */
export function parseSyncArgs(argv: string[], env: Record<string, string | undefined>, nowMs: number): SyncArgs | null {
    const values = readFlags(argv)
    if (values.help) {
        return null
    }
    const origin = parsePostHogUrl(values['posthog-url'])
    const projectId = parseProjectId(values['project-id'])
    const apiKey = parseApiKey(values['posthog-api-key'] ?? env.POSTHOG_API_KEY)
    const webhookUrl = webhookUrlFrom(values, env)
    if (!webhookUrl) {
        throw new UsageError(WEBHOOK_URL_REQUIRED)
    }
    const range = timeRange(values, nowMs)
    // --retry-for is the whole budget of a batch, as in replay: not cut short by the plugin's count of attempts.
    // A feed that follows is a service: by default it outlasts any outage instead of exiting.
    const delivery = deliverySettings(values, env, webhookUrl, true, range.follow ? Infinity : DEFAULT_RETRY_FOR_MS)
    return {
        origin,
        projectId,
        apiKey,
        config: delivery.config,
        ...range,
        pollIntervalMs: durationFlag('poll-interval', values['poll-interval'], DEFAULT_POLL_INTERVAL_MS),
        lateWindowMs: durationFlag('late-window', values['late-window'], DEFAULT_LATE_WINDOW_MS),
        queryTimeoutMs: durationFlag('query-timeout', values['query-timeout'], DEFAULT_QUERY_TIMEOUT_MS),
        pageSize: wholeNumber('page-size', values['page-size'], DEFAULT_PAGE_SIZE, MAX_QUERY_ROWS),
        perMinute: wholeNumber('max-queries-per-minute', values['max-queries-per-minute'], DEFAULT_QUERIES_PER_MINUTE),
        perHour: wholeNumber('max-queries-per-hour', values['max-queries-per-hour'], DEFAULT_QUERIES_PER_HOUR),
        concurrency: delivery.concurrency,
        checkpointFile: delivery.checkpointFile,
        deadLetterFile: delivery.deadLetterFile,
        retryForMs: delivery.retryForMs,
        service: serviceSettings(values),
        where: parseWhere(values.where),
        withPerson: values['with-person'],
    }
}

/** How far the feed is behind now: to the horizon once caught up, else to the newest event read. */
export function behindNowMs(
    p: Pick<SyncProgress, 'cursorMs' | 'caughtUp' | 'horizonMs'>,
    nowMs: number
): number | null {
    const at = p.caughtUp ? p.horizonMs : p.cursorMs
    return at === null ? null : nowMs - at
}

/** read, sent, rate, where the feed stands and how far behind now, queries, retries, failures, in flight. */
export function syncProgressLine(
    p: SyncProgress,
    elapsedMs: number,
    nowMs: number,
    health: { webhook?: HealthState | null; posthog?: HealthState } = {}
): string {
    const behind = behindNowMs(p, nowMs)
    const behindText = behind === null ? null : `${seconds(behind)} behind now${p.caughtUp ? ' (caught up)' : ''}`
    return progressParts({ ...p, retries: p.retries + p.queryRetries }, elapsedMs, [
        p.cursorMs === null ? 'no events yet' : `at ${new Date(p.cursorMs).toISOString()}`,
        behindText,
        `queries ${p.queries}`,
        health.webhook ? failingPart('webhook', health.webhook) : null,
        health.posthog ? failingPart('PostHog', health.posthog) : null,
    ])
}

/** The summary: every row true for this run (no checkpoint row without --checkpoint, say). */
export function syncSummaryText(
    report: SyncReport,
    run: { checkpointFile: string | null; deadLetterFile: string | null }
): string {
    return summaryText(syncSummaryRows(report, run))
}

function syncSummaryRows(
    report: SyncReport,
    run: { checkpointFile: string | null; deadLetterFile: string | null }
): SummaryRow[] {
    const cursor = report.cursor.uuid
        ? `${new Date(report.cursor.ms).toISOString()} ${report.cursor.uuid}`
        : `${new Date(report.cursor.ms).toISOString()} (its start: nothing sent yet)`
    return [
        ['events read', report.read],
        ...deliveryRows(report, run.deadLetterFile),
        ['webhook requests', report.requests],
        ['webhook retries', report.retries],
        ['PostHog requests', report.queries],
        ['PostHog retries', report.queryRetries],
        ['bytes', report.bytesSent],
        ['events/s', eventsPerSecond(report.delivered, report.durationMs)],
        run.checkpointFile ? ['checkpoint at', cursor] : null,
        ['stopped early', report.stopped ?? 'no'],
    ]
}

export type SyncIO = CliStreams

function bindingOf(args: SyncArgs): SourceBinding {
    return {
        host: args.origin,
        projectId: args.projectId,
        allowedEvents: args.config.allowedEvents ? [...args.config.allowedEvents] : null,
        excludedEvents: [...args.config.excludedEvents],
        since: new Date(args.sinceMs).toISOString(),
        where: args.where,
        withPerson: args.withPerson,
    }
}

interface QueryClientWiring {
    args: SyncArgs
    output: CliOutput
    watch: SyncWatch
    /** The checkpoint's cursor has events: PostHog answered this source before. */
    answeredBefore: boolean
    signal?: AbortSignal
}

function queryClient({ args, output, watch, answeredBefore, signal }: QueryClientWiring): QueryClient {
    return new QueryClient({
        origin: args.origin,
        projectId: args.projectId,
        apiKey: args.apiKey,
        timeoutMs: args.queryTimeoutMs,
        // Following: as long as the webhook's budget (no limit by default), with a service's capped waits.
        retryForMs: args.follow ? args.retryForMs : DEFAULT_QUERY_RETRY_FOR_MS,
        outage: args.follow,
        answeredBefore: args.follow && answeredBefore,
        limits: { perMinute: args.perMinute, perHour: args.perHour },
        // Always the same persons-on-events mode, so --where on person properties means the same on every project.
        modifiers: { personsOnEventsMode: PERSONS_ON_EVENTS_MODE },
        signal,
        onWait: (reason, waitMs) => {
            // Short waits for the client-side limit are routine; retries and long waits are worth a line.
            if (reason !== 'client-side rate limit' || waitMs >= 5_000) {
                output.line(`waiting ${seconds(waitMs)}: ${reason}`)
            }
        },
        onOutcome: (ok, reason) => {
            const line = postHogOutcome(watch, ok, reason, Date.now())
            if (line) {
                output.line(line)
            }
        },
    })
}

/** 2 for configuration PostHog refused (key, scope, project, not reachable), 130 interrupted, 1 anything left undone. */
export function syncExitCode(report: SyncReport, aborted: boolean): number {
    if (report.sourceError instanceof PostHogQueryError && report.sourceError.isConfig) {
        return 2
    }
    if (aborted) {
        return 130
    }
    return !report.stopped && report.deadLettered === 0 && report.malformed === 0 ? 0 : 1
}

/** The message for a first run that was told neither where to start nor to follow: it would read nothing. */
export const FIRST_RUN_NEEDS_START =
    'a first sync needs --since ISO (send the events PostHog stored from then on, e.g. ' +
    '--since 2026-11-01T00:00:00Z), --follow (send new events as they arrive), or both; ' +
    'with --checkpoint FILE, later runs resume from it and need neither'

type Prepared = { args: SyncArgs; start: ReturnType<typeof resumeFrom> } | { exit: number }

/** The flags and the checkpoint: where this run starts, or the exit code of a usage error. */
function prepare(argv: string[], env: Record<string, string | undefined>, output: CliOutput): Prepared {
    try {
        const args = parseSyncArgs(argv, env, Date.now())
        if (!args) {
            output.out(SYNC_HELP)
            return { exit: 0 }
        }
        output.addSecrets([args.apiKey, ...args.config.secrets])
        const start = resumeFrom(args.checkpointFile, bindingOf(args), args.sinceGiven)
        if (!start.resumed && !args.sinceGiven && !args.follow) {
            throw new UsageError(FIRST_RUN_NEEDS_START)
        }
        return { args, start }
    } catch (error) {
        output.line(`error: ${(error as Error).message}`)
        return { exit: error instanceof UsageError || error instanceof CheckpointError ? 2 : 1 }
    }
}

/** The opening lines: what is read, from where to where, and what the checkpoint will pin. */
function announce(args: SyncArgs, start: ReturnType<typeof resumeFrom>, output: CliOutput): void {
    const from = start.resumed
        ? `resuming after ${new Date(start.cursor.ms).toISOString()}`
        : `from ${start.binding.since}`
    const to = args.follow ? 'following' : `until ${new Date(args.untilMs ?? 0).toISOString()}`
    output.line(`Syncing project ${args.projectId} from ${args.origin} to ${args.config.redactedUrl}, ${from}, ${to}`)
    if (args.checkpointFile && !start.resumed) {
        output.line(
            `Saving progress in ${args.checkpointFile}: the same command resumes from it. It keeps this run's ` +
                `start (${start.binding.since}); to start elsewhere later, use a new --checkpoint file.`
        )
    }
}

/** The whole command, with injectable output; returns the exit code. Every line is redacted before printing. */
export async function runSyncCli(
    argv: string[],
    env: Record<string, string | undefined>,
    io: SyncIO,
    signal?: AbortSignal
): Promise<number> {
    const output = cliOutput(io, [env.POSTHOG_API_KEY, env.PATTERNS_WEBHOOK_URL], logFormatIn(argv))
    const prepared = prepare(argv, env, output)
    if ('exit' in prepared) {
        return prepared.exit
    }
    const { args, start } = prepared
    announce(args, start, output)
    const watch = newSyncWatch(start.cursor.uuid === null ? null : start.cursor.ms)
    let service: Service
    try {
        service = await startService({
            settings: args.service,
            output,
            env: nodeEnv(),
            posthog: watch.posthog,
            lagSeconds: () => {
                const lag = watchLagMs(watch, Date.now())
                return lag === null ? null : lag / 1000
            },
        })
    } catch (error) {
        output.line(`error: ${(error as Error).message}`)
        return 2
    }
    watch.webhook = service.webhook
    try {
        return await runSync({ args, start, output, watch, service, signal })
    } finally {
        await service.close()
    }
}

interface SyncRun {
    args: SyncArgs
    start: ReturnType<typeof resumeFrom>
    output: CliOutput
    watch: SyncWatch
    service: Service
    signal?: AbortSignal
}

/** The progress line before the first report: nothing read or sent yet. */
const NO_PROGRESS: SyncProgress = {
    ...emptyReport<never>(),
    cursorMs: null,
    caughtUp: false,
    horizonMs: null,
    queries: 0,
    queryRetries: 0,
}

/**
 * The progress line: shown at each report, and redrawn every PROGRESS_REDRAW_MS with the latest counts and each
 * side's health as they are now, so that off a terminal a line is written every PLAIN_PROGRESS_INTERVAL_MS even
 * when nothing reports (an outage of the webhook or of PostHog, a quiet feed between polls).
 */
function progressView(output: CliOutput, watch: SyncWatch, started: number) {
    let latest = NO_PROGRESS
    const show = (): void => {
        const now = Date.now()
        const fields = syncProgressFields(latest, watch, now - started, now)
        output.progress(syncProgressLine(latest, now - started, now, watch), fields)
    }
    const timer = setInterval(show, PROGRESS_REDRAW_MS)
    timer.unref()
    return {
        update: (p: SyncProgress): void => {
            latest = p
            show()
        },
        stop: () => clearInterval(timer),
    }
}

/**
 * --where, tried once with PostHog before anything is read or saved: null when PostHog took it, else the exit code
 * (2 with PostHog's own message when it refused the expression).
 */
async function probeWhere(client: QueryClient, args: SyncArgs, start: SyncRun['start'], output: CliOutput) {
    if (!args.where) {
        return null
    }
    const query = buildProbeQuery({
        cursor: start.cursor,
        lateWindowMs: args.lateWindowMs,
        futureWindowMs: FUTURE_WINDOW_MS,
        allowedEvents: start.binding.allowedEvents,
        excludedEvents: start.binding.excludedEvents,
        withPerson: args.withPerson,
        where: args.where,
    })
    try {
        ;(await client.run(query)).release()
        return null
    } catch (error) {
        const refused = error instanceof PostHogQueryError && error.kind === 'query'
        output.line(
            refused
                ? `error: --where: PostHog refused the expression (HTTP 400${error.answer?.detail ?? ''}). Fix it ` +
                      "and run again: it is HogQL, as in PostHog's SQL editor (try it there on the events table)."
                : `error: ${(error as Error).message}`
        )
        if (refused || (error instanceof PostHogQueryError && error.isConfig)) {
            return 2
        }
        return error instanceof AbortedError ? 130 : 1
    }
}

/** The sync itself, wired to the output and the service; returns the exit code. */
async function runSync({ args, start, output, watch, service, signal }: SyncRun): Promise<number> {
    const started = Date.now()
    const answeredBefore = start.cursor.uuid !== null
    const client = queryClient({ args, output, watch, answeredBefore, signal })
    const refused = await probeWhere(client, args, start, output)
    if (refused !== null) {
        return refused
    }
    const view = progressView(output, watch, started)
    let report: SyncReport
    try {
        report = await sync({
            ...args,
            client,
            start: start.cursor,
            teamId: Number(args.projectId),
            allowedEvents: start.binding.allowedEvents,
            excludedEvents: start.binding.excludedEvents,
            env: service.env,
            binding: start.binding,
            signal,
            onProgress: (p) => {
                service.onProgress(p)
                view.update(p)
            },
            onPage: (page) => {
                watch.page = page
                if (page.caughtUp && service.webhook.up) {
                    service.succeeded()
                }
            },
            onRead: (keys) => watch.waiting.read(keys),
            onCommit: (cursor) => {
                watch.committedMs = cursor.ms
                watch.waiting.committed(cursor)
            },
            onWarning: (message) => output.line(`warning: ${message}`),
            onOutcome: service.onOutcome,
            waitOut: args.follow ? { budgetMs: args.retryForMs, signal } : undefined,
        })
    } catch (error) {
        output.endProgress()
        output.line(`error: ${(error as Error).message}`)
        return 1
    } finally {
        view.stop()
    }
    return finish(report, args, output, Boolean(signal?.aborted))
}

/** The closing lines: the error that stopped the source, a run that found nothing, the summary; the exit code. */
function finish(report: SyncReport, args: SyncArgs, output: CliOutput, aborted: boolean): number {
    output.endProgress()
    if (report.sourceError instanceof PostHogQueryError) {
        output.line(`error: ${report.sourceError.message}`)
    }
    if (report.read === 0 && !report.stopped) {
        output.line(`PostHog has no events for project ${args.projectId} in that time: nothing to send`)
    }
    const rows = syncSummaryRows(report, args)
    output.out(`Sync ${report.stopped ? 'stopped' : 'finished'}\n${summaryText(rows)}\n`, summaryFields(rows))
    return syncExitCode(report, aborted)
}

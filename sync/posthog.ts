/**
 * PostHog's query API, as the pager needs it: one HogQL query per call, sent with the personal API key, under
 * a client-side rate limit, with 429/5xx/network retries. Policy (what a response means, how long to wait) is
 * pure and exported; `runQuery` is the one small effectful loop, with its clock and sleep injectable.
 */
import { backoffDelay, parseRetryAfter, redactText } from '../index'
import { seconds } from '../pipeline/cli-output'
import { outageWaitMs } from '../pipeline/outage'
import { BodyBuffers, BodyTooLargeError, readPage } from './body'
import { PostAnswer, postJson } from './http'

/** PostHog's limits for query API calls, per team (see the README for the sources). */
export const POSTHOG_QUERIES_PER_MINUTE = 240
export const POSTHOG_QUERIES_PER_HOUR = 2_400
/**
 * By default sync stays a sixth under them, so a 429 from PostHog's own throttles is the exception (another client
 * with the same key), not the way the pace is set.
 */
export const DEFAULT_QUERIES_PER_MINUTE = 200
export const DEFAULT_QUERIES_PER_HOUR = 2_000
/**
 * How long one query may take before the request is abandoned and retried: PostHog stops API queries after 10 s
 * of execution, and a query over the concurrency limit may first wait up to 30 s in PostHog's queue.
 */
export const DEFAULT_QUERY_TIMEOUT_MS = 60_000
/** How long one query keeps retrying (429, 5xx, network, timeouts) before the run stops; a resume continues. */
export const DEFAULT_QUERY_RETRY_FOR_MS = 600_000
export const QUERY_BACKOFF_BASE_MS = 1_000
export const QUERY_BACKOFF_CAP_MS = 30_000
/**
 * Before PostHog has answered once, a refused connection or an answer that is not PostHog's is retried only this
 * long: it is a wrong --posthog-url far more often than an outage, and the user should hear so in seconds.
 */
export const FIRST_CONTACT_RETRY_FOR_MS = 3_000
/** A connection not made within this long is a network error (a host that drops packets never refuses). */
export const CONNECT_TIMEOUT_MS = 5_000
/**
 * The most a query response may take. A full page of PostHog's largest events fits; anything bigger is a server
 * that will not stop talking, and reading on would exhaust memory.
 */
export const MAX_RESPONSE_BYTES = 512 * 1024 * 1024
/** Quoted from an error body at most, e.g. PostHog's `detail`. */
export const DETAIL_CHARS = 300

/**
 * A detail cut to DETAIL_CHARS, keeping its start and its end: a parser's message quotes the query up to the point
 * where it failed, so the end is where the error is (a --where comes last in the query).
 */
export function shortDetail(text: string): string {
    if (text.length <= DETAIL_CHARS) {
        return text
    }
    const half = Math.floor((DETAIL_CHARS - 3) / 2)
    return `${text.slice(0, half)} … ${text.slice(text.length - half)}`
}
/** Of an error body, only this much is read for its `detail` (PostHog's are a few hundred bytes). */
const ERROR_TEXT_BYTES = 64 * 1024

export interface RateLimits {
    perMinute: number
    perHour: number
}

export type QueryFailureKind =
    | 'auth'
    | 'scope'
    | 'project'
    | 'query'
    | 'redirect'
    | 'unreachable'
    | 'not-posthog'
    | 'gave-up'
    | 'too-large'
    | 'unexpected'

/** Kinds that mean the command is set up wrong (key, scope, project, URL): exit code 2, like bad usage. */
const CONFIG_KINDS: ReadonlySet<QueryFailureKind> = new Set([
    'auth',
    'scope',
    'project',
    'redirect',
    'unreachable',
    'not-posthog',
])

/** A query that cannot succeed as configured, or that kept failing: the message says what and how to fix it. */
/** An error answer, as far as messages need it: its status, its quoted detail, and whether it had PostHog's shape. */
export interface ErrorAnswer {
    status: number
    /** ": " and the detail or the start of the body, or ''. */
    detail: string
    /** The body was PostHog's (DRF's) error object, with a `detail`: the answer came from PostHog itself. */
    fromPostHog: boolean
}

export class PostHogQueryError extends Error {
    name = 'PostHogQueryError'
    constructor(
        readonly kind: QueryFailureKind,
        message: string,
        /** The HTTP answer the error came from, if it came from one. */
        readonly answer: ErrorAnswer | null = null
    ) {
        super(message)
    }
    /** Key, scope, project and URL problems are configuration: exit code 2, like bad usage. */
    get isConfig(): boolean {
        return CONFIG_KINDS.has(this.kind)
    }
}

export interface QueryResponse {
    columns: string[]
    rowCount: number
    /** Row `index` of `results` (an array in the order of `columns`), parsed when asked for. */
    row(index: number): unknown
    hasMore: boolean | null
    /** Hands the body's buffer back for a later response; the rows must not be read after this. */
    release(): void
}

export type QueryOutcome =
    | { kind: 'ok'; response: QueryResponse }
    /** `unreached`: no connection, or an answer that is not PostHog's (a wrong URL, before the first good answer). */
    | { kind: 'retry'; reason: string; waitMs: number | null; unreached?: boolean }
    | { kind: 'fatal'; error: PostHogQueryError }

/** PostHog's error bodies carry a `detail` (DRF); HogQL errors put the parser's message there. */
export function errorDetail(body: string): string {
    try {
        const parsed = JSON.parse(body) as { detail?: unknown; error?: unknown }
        const detail = parsed.detail ?? parsed.error
        if (typeof detail === 'string' && detail) {
            return shortDetail(detail)
        }
    } catch {
        // Not JSON: quote the start of the text.
    }
    return body.replace(/\s+/g, ' ').trim().slice(0, DETAIL_CHARS)
}

/** Whether an error body is PostHog's (DRF's) error object: JSON with a string `detail`. */
export function hasPostHogShape(body: string): boolean {
    try {
        return typeof (JSON.parse(body) as { detail?: unknown } | null)?.detail === 'string'
    } catch {
        return false
    }
}

export interface QueryTarget {
    /** Origin only, e.g. https://us.posthog.com: safe to print. */
    origin: string
    projectId: string
}

/** The outcome ladder for one response of the query API. */
export function classifyQueryResponse(
    status: number,
    bytes: Buffer | string,
    retryAfter: string | null,
    nowMs: number,
    target: QueryTarget
): QueryOutcome {
    // Decoded only for an error, and only its start: a 200's page is megabytes, and nothing quotes it.
    const body = (): string => (typeof bytes === 'string' ? bytes : bytes.toString('utf8', 0, ERROR_TEXT_BYTES))
    const detail = (): string => {
        const text = errorDetail(body())
        return text ? `: ${text}` : ''
    }
    const fatal = (kind: QueryFailureKind, message: string): QueryOutcome => {
        const answer = { status, detail: detail(), fromPostHog: hasPostHogShape(body()) }
        return { kind: 'fatal', error: new PostHogQueryError(kind, message, answer) }
    }
    if (status >= 200 && status < 300) {
        return parseQueryBody(bytes)
    }
    // A redirect would carry the API key elsewhere, and a moved API is a configuration change: never followed.
    if (status >= 300 && status < 400) {
        return fatal(
            'redirect',
            `PostHog answered HTTP ${status} (a redirect); set --posthog-url to the API's own origin`
        )
    }
    // 401: the key itself is wrong, revoked or not a personal API key.
    if (status === 401) {
        return fatal(
            'auth',
            `PostHog refused the API key (HTTP 401${detail()}). Set POSTHOG_API_KEY to a personal API key (phx_...) ` +
                `for ${target.origin}.`
        )
    }
    // 403: a valid key without the scope, or without access to this project.
    if (status === 403) {
        return fatal(
            'scope',
            `PostHog denied the query (HTTP 403${detail()}). The personal API key needs the query:read scope and ` +
                `access to project ${target.projectId}.`
        )
    }
    // 404: no such project for this key at this host (EU and US Cloud are separate hosts).
    if (status === 404) {
        return fatal(
            'project',
            `PostHog has no project ${target.projectId} at ${target.origin} (HTTP 404). Check --project-id and ` +
                '--posthog-url (https://us.posthog.com or https://eu.posthog.com).'
        )
    }
    // 429: over PostHog's rate limit. Wait as long as Retry-After says.
    if (status === 429) {
        return { kind: 'retry', reason: `HTTP 429${detail()}`, waitMs: parseRetryAfter(retryAfter, nowMs) }
    }
    // 408 and 5xx: PostHog or its ClickHouse is busy or the query ran out of time; the same query may succeed.
    if (status === 408 || status >= 500) {
        return { kind: 'retry', reason: `HTTP ${status}${detail()}`, waitMs: parseRetryAfter(retryAfter, nowMs) }
    }
    // 400: the query was refused (a HogQL error): retrying the same text cannot help.
    if (status === 400) {
        return fatal('query', `PostHog refused the query (HTTP 400${detail()})`)
    }
    return fatal('unexpected', `PostHog answered HTTP ${status}${detail()}`)
}

/** A 2xx body: `results` and `columns` are required; rows are parsed as the source reads them (body.ts). */
function parseQueryBody(bytes: Buffer | string): QueryOutcome {
    let head: { results?: unknown; columns?: unknown; hasMore?: unknown }
    let rowCount: number
    let row: (index: number) => unknown
    try {
        const page = typeof bytes === 'string' ? null : readPage(bytes)
        if (page) {
            head = page.head as typeof head
            rowCount = page.rowCount
            row = page.row
        } else {
            head = JSON.parse(typeof bytes === 'string' ? bytes : bytes.toString('utf8')) as typeof head
            const results = Array.isArray(head.results) ? (head.results as unknown[]) : []
            rowCount = results.length
            row = (index) => results[index]
        }
    } catch {
        // A truncated body (a proxy cut it short) is worth another try.
        return { kind: 'retry', reason: 'the response was not JSON', waitMs: null, unreached: true }
    }
    if (!Array.isArray(head.results) || !Array.isArray(head.columns)) {
        return {
            kind: 'fatal',
            error: new PostHogQueryError('unexpected', 'the query API answered without "results" and "columns"'),
        }
    }
    return {
        kind: 'ok',
        response: {
            columns: head.columns.map(String),
            rowCount,
            row,
            hasMore: typeof head.hasMore === 'boolean' ? head.hasMore : null,
            release: () => undefined,
        },
    }
}

/** The plugin's full-jitter backoff with the query's own base and cap. Pure, for tests to assert. */
export function queryBackoffMs(attempt: number, random: () => number): number {
    return backoffDelay(attempt, random, QUERY_BACKOFF_BASE_MS, QUERY_BACKOFF_CAP_MS)
}

/** How to find the right --posthog-url, for messages about a wrong one. */
const POSTHOG_URL_FIX =
    'Check --posthog-url: it is the address you open PostHog at, e.g. https://us.posthog.com, https://eu.posthog.com ' +
    "or your self-hosted PostHog's"

/** Refusals that PostHog words as an object with a `detail`: without one, it was another server that refused. */
const NOT_POSTHOG_WITHOUT_ITS_SHAPE: ReadonlySet<QueryFailureKind> = new Set([
    'auth',
    'scope',
    'project',
    'query',
    'unexpected',
])

/**
 * What the first query's failure means when PostHog never answered well: an answer that is not PostHog's (a web
 * page's 404, a JSON API's 200 without results) is a URL to check, named with its host, not a key or a project.
 */
export function firstContactError(origin: string, error: PostHogQueryError): PostHogQueryError {
    const { answer } = error
    if (!NOT_POSTHOG_WITHOUT_ITS_SHAPE.has(error.kind) || answer?.fromPostHog) {
        return error
    }
    const what = answer ? `HTTP ${answer.status}${answer.detail}` : error.message
    const host = new URL(origin).host
    return new PostHogQueryError(
        'not-posthog',
        `${host} does not answer as PostHog (${what}). ${POSTHOG_URL_FIX}`,
        answer
    )
}

/** Why a query stopped being retried: an unreachable PostHog before its first answer, or a budget spent after it. */
export function gaveUpError(
    origin: string,
    outcome: { reason: string; unreached?: boolean },
    attempts: number,
    elapsedMs: number,
    answered: boolean
): PostHogQueryError {
    const host = new URL(origin).host
    const tries = `${attempts} attempt${attempts === 1 ? '' : 's'} in ${seconds(elapsedMs)}, last: ${outcome.reason}`
    if (answered || !outcome.unreached) {
        return new PostHogQueryError(
            'gave-up',
            `the query to PostHog at ${host} kept failing (${tries}); run the same command again to resume`
        )
    }
    return outcome.reason.startsWith('network error')
        ? new PostHogQueryError(
              'unreachable',
              `cannot reach PostHog at ${host} (${tries}). ${POSTHOG_URL_FIX}, and that this machine can reach it`
          )
        : new PostHogQueryError('not-posthog', `${host} does not answer as PostHog (${tries}). ${POSTHOG_URL_FIX}`)
}

/**
 * How long to wait before the next query so that at most `perMinute` start in any 60 s and `perHour` in any
 * hour. `starts` are earlier start times, oldest first.
 */
export function rateLimitWaitMs(starts: readonly number[], nowMs: number, limits: RateLimits): number {
    let wait = 0
    for (const [windowMs, max] of [
        [60_000, limits.perMinute],
        [3_600_000, limits.perHour],
    ] as const) {
        const recent = starts.filter((t) => t > nowMs - windowMs)
        if (recent.length >= max) {
            // The oldest start that must leave the window before one more fits.
            const oldest = recent[recent.length - max] ?? nowMs
            wait = Math.max(wait, oldest + windowMs - nowMs)
        }
    }
    return wait
}

export interface QueryClientOptions {
    /** The API's origin, e.g. https://us.posthog.com; already validated (https, or http on loopback). */
    origin: string
    projectId: string
    apiKey: string
    timeoutMs?: number
    retryForMs?: number
    /** The most one response may take (default MAX_RESPONSE_BYTES). */
    maxResponseBytes?: number
    limits?: RateLimits
    now?: () => number
    sleep?: (ms: number, signal?: AbortSignal) => Promise<void>
    random?: () => number
    signal?: AbortSignal
    /** Told of each retry and each wait for the rate limit, with the reason (never the key). */
    onWait?: (reason: string, waitMs: number) => void
    /** Told of each attempt's outcome: answered well, or failing with a reason (for health and metrics). */
    onOutcome?: (ok: boolean, reason: string) => void
    /**
     * A service's retries (sync --follow): waits capped at a minute, honouring Retry-After, as for the webhook
     * (pipeline/outage.ts), instead of the query's own 30 s backoff.
     */
    outage?: boolean
    /**
     * PostHog answered this source before (a resumed checkpoint): a refused connection is then an outage to wait
     * out, not a --posthog-url to check within seconds.
     */
    answeredBefore?: boolean
    /** HogQL query modifiers sent with every query (they take precedence over the project's settings). */
    modifiers?: Record<string, string>
}

export class AbortedError extends Error {
    name = 'AbortedError'
}

export function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
        if (signal?.aborted) {
            reject(new AbortedError('interrupted'))
            return
        }
        const timer = setTimeout(() => {
            signal?.removeEventListener('abort', onAbort)
            resolve()
        }, ms)
        const onAbort = (): void => {
            clearTimeout(timer)
            reject(new AbortedError('interrupted'))
        }
        signal?.addEventListener('abort', onAbort, { once: true })
    })
}

/** Runs HogQL queries against one project. Holds the rate-limit window between queries. */
export class QueryClient {
    readonly url: string
    private readonly endpoint: URL
    readonly target: QueryTarget
    private readonly starts: number[] = []
    private readonly buffers = new BodyBuffers()
    private readonly options: Required<Omit<QueryClientOptions, 'signal' | 'onWait' | 'onOutcome' | 'modifiers'>> &
        Pick<QueryClientOptions, 'signal' | 'onWait' | 'onOutcome' | 'modifiers'>
    queries = 0
    retries = 0
    /** Whether PostHog has answered a query well once: failures before that point at the URL, not an outage. */
    private answered = false

    constructor(options: QueryClientOptions) {
        this.options = {
            timeoutMs: DEFAULT_QUERY_TIMEOUT_MS,
            retryForMs: DEFAULT_QUERY_RETRY_FOR_MS,
            maxResponseBytes: MAX_RESPONSE_BYTES,
            limits: { perMinute: DEFAULT_QUERIES_PER_MINUTE, perHour: DEFAULT_QUERIES_PER_HOUR },
            now: () => Date.now(),
            sleep: abortableSleep,
            random: Math.random,
            outage: false,
            answeredBefore: false,
            ...options,
        }
        this.answered = this.options.answeredBefore
        this.url = `${options.origin}/api/projects/${encodeURIComponent(options.projectId)}/query/`
        this.endpoint = new URL(this.url)
        this.target = { origin: options.origin, projectId: options.projectId }
    }

    /** Runs one query, retrying what can be retried within the budget. Throws PostHogQueryError or AbortedError. */
    async run(hogql: string): Promise<QueryResponse> {
        const { now, origin } = this.options
        const started = now()
        for (let attempt = 0; ; attempt++) {
            await this.waitForRateLimit()
            const outcome = await this.attempt(hogql)
            if (outcome.kind !== 'fatal') {
                this.options.onOutcome?.(outcome.kind === 'ok', outcome.kind === 'retry' ? outcome.reason : '')
            }
            if (outcome.kind === 'ok') {
                this.answered = true
                return outcome.response
            }
            if (outcome.kind === 'fatal') {
                throw this.answered ? outcome.error : firstContactError(origin, outcome.error)
            }
            const waitMs = this.options.outage
                ? outageWaitMs(attempt, outcome.waitMs, this.options.random)
                : (outcome.waitMs ?? queryBackoffMs(attempt, this.options.random))
            if (now() + waitMs - started > this.retryBudgetMs(outcome)) {
                throw gaveUpError(origin, outcome, attempt + 1, now() - started, this.answered)
            }
            this.retries++
            this.options.onWait?.(`query retry after ${outcome.reason}`, waitMs)
            await this.options.sleep(waitMs, this.options.signal)
        }
    }

    /** How long a failing query is retried: seconds when PostHog was never reached, --retry-for's budget after. */
    private retryBudgetMs(outcome: { unreached?: boolean }): number {
        const { retryForMs } = this.options
        return !this.answered && outcome.unreached ? Math.min(FIRST_CONTACT_RETRY_FOR_MS, retryForMs) : retryForMs
    }

    private async waitForRateLimit(): Promise<void> {
        const { now, limits } = this.options
        const hourAgo = now() - 3_600_000
        while (this.starts.length > 0 && (this.starts[0] ?? 0) <= hourAgo) {
            this.starts.shift()
        }
        const waitMs = rateLimitWaitMs(this.starts, now(), limits)
        if (waitMs > 0) {
            this.options.onWait?.('client-side rate limit', waitMs)
            await this.options.sleep(waitMs, this.options.signal)
        }
        this.starts.push(now())
    }

    /** One POST. Never throws for HTTP or network trouble: it becomes an outcome. */
    private async attempt(hogql: string): Promise<QueryOutcome> {
        const { timeoutMs } = this.options
        this.queries++
        const controller = new AbortController()
        const timer = setTimeout(() => controller.abort(), timeoutMs)
        const onAbort = (): void => controller.abort()
        this.options.signal?.addEventListener('abort', onAbort, { once: true })
        try {
            return this.outcomeOf(await this.post(hogql, controller.signal))
        } catch (error) {
            if (this.options.signal?.aborted) {
                throw new AbortedError('interrupted')
            }
            return failureOutcome(error, controller.signal.aborted, timeoutMs)
        } finally {
            clearTimeout(timer)
            this.options.signal?.removeEventListener('abort', onAbort)
        }
    }

    private post(hogql: string, signal: AbortSignal): Promise<PostAnswer> {
        const { modifiers } = this.options
        // Bytes, not text, into a kept buffer: a page's rows are cut out and parsed one by one (body.ts).
        return postJson(this.endpoint, {
            headers: {
                Authorization: `Bearer ${this.options.apiKey}`,
                'Content-Type': 'application/json',
                'User-Agent': 'patterns-connector/1.0.0 (sync)',
            },
            // force_blocking: always compute, never a cached result that predates the newest events.
            body: JSON.stringify({
                query: { kind: 'HogQLQuery', query: hogql, ...(modifiers ? { modifiers } : {}) },
                refresh: 'force_blocking',
            }),
            signal,
            connectTimeoutMs: CONNECT_TIMEOUT_MS,
            read: (stream, expectedBytes) => this.buffers.read(stream, this.options.maxResponseBytes, expectedBytes),
        })
    }

    /** The answer's outcome; its buffer is kept only while an ok page's rows are read. */
    private outcomeOf(answer: PostAnswer): QueryOutcome {
        const lease = answer.body
        const outcome = classifyQueryResponse(
            answer.status,
            lease.bytes,
            answer.header('retry-after'),
            this.options.now(),
            this.target
        )
        if (outcome.kind === 'ok') {
            // The rows are read from the buffer until the source is done with the page.
            return { kind: 'ok', response: { ...outcome.response, release: lease.release } }
        }
        lease.release()
        if (outcome.kind === 'retry') {
            return outcome
        }
        const { kind, message, answer: refused } = outcome.error
        const facts = refused && { ...refused, detail: this.redact(refused.detail) }
        return { kind: 'fatal', error: new PostHogQueryError(kind, this.redact(message), facts) }
    }

    /** The key is never put in a message; this is the net under that rule (a server could echo it back). */
    redact(text: string): string {
        return redactText(text, [this.options.apiKey])
    }
}

/** A request that got no answer: a response too large to take, a timeout, or a network error. */
function failureOutcome(error: unknown, timedOut: boolean, timeoutMs: number): QueryOutcome {
    if (error instanceof BodyTooLargeError) {
        return {
            kind: 'fatal',
            error: new PostHogQueryError(
                'too-large',
                `${error.message} (the most one page may take); lower --page-size`
            ),
        }
    }
    if (timedOut) {
        // An answer that is slow to come still came from a server that took the request: retried as usual.
        return { kind: 'retry', reason: `no answer within ${Math.round(timeoutMs / 1000)} s`, waitMs: null }
    }
    return { kind: 'retry', reason: `network error ${networkCode(error)}`, waitMs: null, unreached: true }
}

function networkCode(error: unknown): string {
    const cause = (error as { cause?: { code?: unknown } }).cause
    const code = cause?.code ?? (error as { code?: unknown }).code
    return typeof code === 'string' ? code : (error as Error).name || 'error'
}

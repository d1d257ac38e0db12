/**
 * Patterns Connector: a classic PostHog plugin that sends events to a Patterns webhook, or any JSON webhook,
 * in batches, and never drops an event silently.
 *
 * The whole plugin is this one file because PostHog loads exactly one file and refuses relative imports.
 * It imports only modules every PostHog era whitelists (`@posthog/plugin-scaffold`, `crypto`), and it
 * feature-detects timers and `AbortController`, which the classic sandbox does not have.
 *
 * Layout: constants, types, config parsing, pure policy functions, the one I/O function (`postOnce`),
 * delivery with retries, the batching sender, and finally the PostHog hooks.
 */
import type { Meta, Plugin, PluginEvent, ProcessedPluginEvent } from '@posthog/plugin-scaffold'
import { RetryError } from '@posthog/plugin-scaffold'
import { createHash, createHmac, randomBytes } from 'crypto'

// ---------------------------------------------------------------------------------------------------------------
// Constants: quoted by plugin.json hints, the README and the tests.
// ---------------------------------------------------------------------------------------------------------------

export const CONNECTOR_VERSION = '1.0.0'
export const USER_AGENT = `patterns-connector/${CONNECTOR_VERSION} (PostHog plugin)`

/** Per-request timeout. Hosts kill a call at 30 s, so a single request must be well below that. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000
/**
 * The longest a host's own fetch may hold a request that the plugin cannot cut short: vm2024's undici fetch
 * replaces any signal with its own 10 s timeout (3 s in 2025). Where no timeout can be enforced, an attempt is
 * started only with at least this long left before the deadline.
 */
export const HOST_FETCH_TIMEOUT_MS = 10_000
/** Every onEvent call settles within this long of being called: the host's guard kills it at 30 s. */
export const CALL_DEADLINE_MS = 25_000
/** Don't start an attempt with less time than this left: it could not finish anyway. */
export const MIN_ATTEMPT_MS = 1_000
/** An attempt's timeout ends this long before the deadline, leaving time to settle the calls. */
export const DEADLINE_MARGIN_MS = 250
/** Upper bounds for one POST. A burst larger than this goes out as several POSTs in a row. */
export const DEFAULT_MAX_BATCH_EVENTS = 500
export const DEFAULT_MAX_BATCH_BYTES = 1_000_000
/** Backoff with full jitter where timers exist: random(0, min(cap, base * 2^attempt)). */
export const BACKOFF_BASE_MS = 250
export const BACKOFF_CAP_MS = 5_000
/** A Retry-After longer than this is treated as "not within this call". */
export const RETRY_AFTER_CAP_MS = 20_000
/** The shortest wait honoured for a Retry-After: `Retry-After: 0` must not turn retries into a tight loop. */
export const MIN_RETRY_AFTER_MS = BACKOFF_BASE_MS
/** Where timers exist, attempts are bounded by the deadline and by this, so a fast-failing webhook isn't hammered. */
export const MAX_ATTEMPTS_WITH_TIMERS = 12
/**
 * Where there are no timers (the classic sandbox) retries can only be immediate. Five attempts turn a 19%
 * per-request fault rate into a 0.025% batch loss rate, while a webhook that is down sees only 5 requests per batch.
 */
export const MAX_ATTEMPTS_WITHOUT_TIMERS = 5
/**
 * 413 answers one batch may get while it is split in halves. Enough to isolate one oversized event in a batch of
 * 500 (9 halvings), while a receiver that refuses everything sees 16 requests, not 999.
 */
export const MAX_TOO_LARGE_PER_BATCH = 16
/** Microtask turns a turn lasts on a host with neither setImmediate nor crypto callbacks (a last resort). */
export const BURST_GATHER_MICROTASKS = 5
/**
 * How long the first call of a burst may wait for the rest before its POST goes. On the Kafka path the calls of a
 * micro-batch arrive spread over several milliseconds; sending the first one alone costs a whole extra POST.
 */
export const BURST_GATHER_MAX_MS = 20
/** The gather ends once no call has arrived for this long: the burst is over. */
export const BURST_IDLE_MS = 3
/** And after this many turns whatever the clock says, so a clock that stands still can't keep it going. */
export const BURST_GATHER_MAX_TURNS = 400
/** Hex characters of a derived `webhook-id` (128 bits of SHA-256): unique per batch, short in a header. */
export const WEBHOOK_ID_HEX_CHARS = 32
/** How much of each end of an export batch's body its `webhook-id` hashes (see bodyWebhookId). */
export const WEBHOOK_ID_SAMPLE_CHARS = 16_384
/** Error bodies are quoted, redacted and cut to this length, so a receiver's explanation reaches the user. */
export const ERROR_BODY_SNIPPET_CHARS = 200
/** At most this much of an error body is read: a hostile receiver can't make the connector buffer more. */
export const ERROR_BODY_MAX_BYTES = 16_384
/**
 * A quote is withheld when it contains this many characters in a row of a secret's distinctive part, in any
 * encoding: a receiver that echoes part of the URL's token or of a header value must not get it into the log.
 */
export const SECRET_FRAGMENT_CHARS = 6
/**
 * The outbox's default size. PostHog keeps plugin storage in its main Postgres, one row per key, shared with
 * everything else the install stores: 50 MB holds about 100,000 typical events (an hour of a busy site) without
 * making that database noticeably bigger. Users who expect long outages raise it; 0 turns the outbox off.
 */
export const DEFAULT_OUTBOX_MB = 50
/** The largest outbox the config accepts: past this, PostHog's Postgres is the wrong place for a backlog. */
export const MAX_OUTBOX_MB = 1_000
export const BYTES_PER_MB = 1_000_000
/** A kept body is stored in pieces of at most this many characters, so no storage row grows past a few hundred KB. */
export const OUTBOX_PIECE_CHARS = 262_144
/** Storage and cache keys of the outbox; PostHog scopes storage to the plugin config and cache to the plugin. */
export const OUTBOX_STATE_KEY = 'outbox/state'
/** The one lock, in the cache, held by whoever changes the index: a drain, or a writer counting its entry in. */
export const OUTBOX_LOCK_KEY = 'outbox/lock'
/** A counter in the cache: each `incr` hands one writer its own entry number, so writers never wait on each other. */
export const OUTBOX_SEQ_KEY = 'outbox/seq'
/** The lock's TTL: it frees the lock of a holder that died. Holders refresh it before each step. */
export const OUTBOX_LOCK_TTL_SECONDS = 60
/**
 * A holder stops using the lock once its last refresh began this long ago (half the TTL), and then does not
 * release it either: past that point the lock may have expired and be someone else's.
 */
export const OUTBOX_LOCK_SAFE_MS = 30_000
/**
 * An entry number handed out this long ago whose entry is still missing or incomplete is given up: its writer's
 * call ended long before (PostHog stops every call at 30 s, and a writer checks its deadline before each write).
 */
export const OUTBOX_ENTRY_WRITE_MAX_MS = 60_000
/** When the counter is found behind the index (the cache lost it), it is moved this far past the index's tail. */
export const OUTBOX_SEQ_HEADROOM = 100
/** Immediate tries of each storage or cache call: a single failed call must not refuse a batch. */
export const OUTBOX_CALL_ATTEMPTS = 4
/** Time kept free at the end of an onEvent call for the outbox write, when the webhook could not take its batch. */
export const OUTBOX_WRITE_RESERVE_MS = 5_000
/** A drain starts no new entry after this long, and each entry must finish by DRAIN_DEADLINE_MS: PostHog's 30 s limit. */
export const DRAIN_START_WITHIN_MS = 15_000
export const DRAIN_DEADLINE_MS = 25_000
/** While the webhook is known down, one request a minute finds out whether it is back (runEveryMinute's drain). */
export const PROBE_INTERVAL_MS = 60_000
/** Failed requests in a row, with no success between, after which the webhook counts as down. */
export const DOWN_AFTER_FAILED_REQUESTS = 10
/** Key prefix of an export batch lent to the host's cache to be serialised there (see HostJson). */
export const HOST_JSON_KEY_PREFIX = 'json/'
/** Its TTL, only for when removing it fails: long enough that a busy host still reads it back first. */
export const HOST_JSON_TTL_SECONDS = 60
/**
 * A batch lent this long ago and still unanswered means Redis is not answering (PostHog's client waits for it to
 * come back): later batches are serialised in the sandbox, so only those already lent wait on it.
 */
export const HOST_JSON_STALL_MS = 2_000
/** Headers the connector sets itself; a custom header may not replace them. */
export const RESERVED_HEADERS = [
    'content-type',
    'content-length',
    'host',
    'user-agent',
    'webhook-id',
    'webhook-timestamp',
    'webhook-signature',
]
/** Headers that fetch implementations refuse or that change how the request is framed: undici throws on them. */
export const FORBIDDEN_HEADERS = [
    'connection',
    'expect',
    'keep-alive',
    'proxy-connection',
    'te',
    'trailer',
    'transfer-encoding',
    'upgrade',
    'http2-settings',
]
/** Loopback hosts, the only ones allowed over plain http (for local receivers and tests). */
export const LOOPBACK_HOSTS: ReadonlySet<string> = new Set(['localhost', '127.0.0.1', '[::1]', '::1'])
/** Error codes that mean the request never got a definite answer: safe and useful to retry. */
const NETWORK_ERROR_CODES = new Set([
    'ECONNRESET',
    'ECONNREFUSED',
    'ECONNABORTED',
    'EPIPE',
    'ETIMEDOUT',
    'ENOTFOUND',
    'EAI_AGAIN',
    'EHOSTUNREACH',
    'ENETUNREACH',
    'ENETDOWN',
    'UND_ERR_SOCKET',
    'UND_ERR_CONNECT_TIMEOUT',
    'UND_ERR_HEADERS_TIMEOUT',
    'UND_ERR_BODY_TIMEOUT',
    'UND_ERR_CLOSED',
])

// ---------------------------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------------------------

/** Config as PostHog passes it: strings exactly as typed; an empty optional field may be '' or missing. */
export interface PatternsConfig {
    webhookUrl: string
    allowedEventTypes?: string
    excludedEventTypes?: string
    excludedProperties?: string
    customHeaders?: string
    signingSecret?: string
    outboxMaxMb?: string
}

/** Config after `parseConfig`: validated, normalised, ready to use on every event without re-parsing. */
export interface ParsedConfig {
    webhookUrl: string
    /** Safe to log: scheme, host and the last 4 characters. */
    redactedUrl: string
    /** null means every event type is allowed. */
    allowedEvents: Set<string> | null
    excludedEvents: Set<string>
    excludedProperties: string[]
    customHeaders: Record<string, string>
    /** The raw HMAC key decoded from a `whsec_` secret, or null when requests are not signed. */
    signingKey: Buffer | null
    requestTimeoutMs: number
    deadlineMs: number
    maxBatchEvents: number
    maxBatchBytes: number
    /** Attempts per batch where timers exist (replay sets it by its --retry-for budget instead). */
    maxAttempts: number
    /** The longest Retry-After honoured; a longer one gives up at once. */
    retryAfterCapMs: number
    /** Every string that must never reach a log line or an error message, in each encoding it may take. */
    secrets: string[]
    /** The distinctive parts of the secrets: no run of SECRET_FRAGMENT_CHARS of them may be quoted from a body. */
    secretParts: string[]
    /** The most the outbox may hold, in characters of kept bodies; 0: no outbox. */
    outboxBytes: number
}

export type AnyEvent = ProcessedPluginEvent | PluginEvent

export interface Logger {
    info: (message: string) => void
    warn: (message: string) => void
    error: (message: string) => void
}

/** The response surface every host's fetch shares: status, a header by lowercase name, and text(). */
export interface TransportResponse {
    status: number
    header: (lowercaseName: string) => string | null
    /** The start of the body, read (bounded) only for responses whose body may be quoted; null otherwise. */
    body: string | null
}

export interface TransportRequest {
    url: string
    headers: Record<string, string>
    /** A string from the plugin; bytes where the environment encodes bodies itself (`SenderEnv.encodeBody`). */
    body: string | Uint8Array
    timeoutMs: number
}

export type Transport = (request: TransportRequest) => Promise<TransportResponse>

/** A fetch as the classic hosts provide it (node-fetch v2 or undici). */
export type FetchLike = (url: string, init: Record<string, unknown>) => Promise<FetchLikeResponse>
export interface FetchLikeResponse {
    status: number
    headers: unknown
    text: () => Promise<string>
    /** A WHATWG stream (undici), a Node stream (node-fetch v2), or absent (the CDP executor). */
    body?: unknown
}
/** PostHog's CDP executor fetch: `meta.fetch(url, { method, headers, body, timeoutMs })`, no `.ok`, plain headers. */
export type MetaFetch = (
    url: string,
    init: { method: string; headers: Record<string, string>; body: string; timeoutMs: number }
) => Promise<FetchLikeResponse & { json?: () => Promise<unknown> }>

/** What a response or a thrown fetch error means for the batch. */
export type Outcome =
    | { kind: 'delivered' }
    | { kind: 'retry'; reason: string; throttled: boolean; retryAfterMs: number | null }
    | { kind: 'split'; reason: string }
    | { kind: 'permanent'; reason: string }

export type RetryPlan = { retry: true; delayMs: number } | { retry: false; why: string }

/** The environment the sender runs in. Everything effectful is injectable so tests can hide timers or capture delays. */
export interface SenderEnv {
    transport: Transport
    /** False when the transport cannot enforce a timeout itself (no AbortController, no timeoutMs). */
    timeoutEnforced: boolean
    logger: Logger
    now: () => number
    /** null where the host has no timers: retries are then immediate only. */
    sleep: ((ms: number) => Promise<void>) | null
    random: () => number
    /** Waits one event-loop turn (a macrotask where the host allows it), so overlapping calls can arrive. */
    yieldTurn: () => Promise<void>
    /**
     * Builds a request body from the items' JSON: the same bytes as `batchBody`. The plugin leaves this out (a
     * string is cheapest inside the sandbox); the tools outside it write bytes directly (see pipeline/body.ts).
     */
    encodeBody?: (items: readonly { json: string; bytes?: number }[]) => string | Uint8Array
}

export interface SenderStats {
    events: number
    filtered: number
    delivered: number
    failed: number
    requests: number
    retries: number
    splits: number
    /** Events the webhook did not take that wait in the outbox instead of failing. */
    kept: number
    failuresByCause: Record<string, number>
}

/** One event on its way: its serialised form and who to tell how it went. */
export interface QueuedEvent {
    uuid: string
    json: string
    bytes: number
    deadline: number
    resolve: () => void
    reject: (error: Error) => void
}

export interface PatternsGlobal {
    config: ParsedConfig
    sender: Sender
    /**
     * Set by the host itself, before setupPlugin, on hosts with an export path (2021 to November 2023): the host
     * buffers every event and hands the batches to exportEvents. The plugin reads them and never writes them: the
     * host's own wrappers read them on every call.
     */
    readonly exportEventsBuffer?: unknown
    readonly exportEventsToIgnore?: unknown
    readonly exportEventsWithRetry?: unknown
}

export type PatternsPlugin = Plugin<{ config: PatternsConfig; global: PatternsGlobal }>
type PatternsMeta = Meta<{ config: PatternsConfig; global: PatternsGlobal }>

// ---------------------------------------------------------------------------------------------------------------
// Config parsing: once, in setupPlugin. Every error names the field and the fix.
// ---------------------------------------------------------------------------------------------------------------

export class ConfigError extends Error {
    constructor(
        public readonly field: string,
        message: string
    ) {
        super(`Invalid config "${field}": ${message}`)
        this.name = 'ConfigError'
    }
}

/** Comma-separated list: trimmed, empties dropped. */
export function parseList(value: unknown): string[] {
    if (typeof value !== 'string') {
        return []
    }
    return value
        .split(',')
        .map((item) => item.trim())
        .filter((item) => item.length > 0)
}

export function parseWebhookUrl(value: unknown): URL {
    const field = 'webhookUrl'
    const text = typeof value === 'string' ? value.trim() : ''
    if (!text) {
        throw new ConfigError(field, 'it is required. Paste the webhook URL from your Patterns webhook node.')
    }
    let url: URL
    try {
        url = new URL(text)
    } catch {
        // The value itself is a secret, so it is not repeated in the message.
        throw new ConfigError(field, 'it is not an absolute URL. Paste the full URL, starting with https://.')
    }
    if (url.username || url.password) {
        throw new ConfigError(
            field,
            'it contains credentials (user:password@). Remove them and send credentials with customHeaders instead.'
        )
    }
    if (url.protocol === 'http:' && !LOOPBACK_HOSTS.has(url.hostname)) {
        throw new ConfigError(field, 'it uses http. Use https; plain http is allowed only for localhost.')
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
        throw new ConfigError(field, `it uses ${url.protocol}. Use an https:// URL.`)
    }
    return url
}

export function parseCustomHeaders(value: unknown): Record<string, string> {
    const field = 'customHeaders'
    if (value === undefined || value === null || (typeof value === 'string' && value.trim() === '')) {
        return {}
    }
    let parsed: unknown = value
    if (typeof value === 'string') {
        try {
            parsed = JSON.parse(value)
        } catch {
            throw new ConfigError(field, 'it is not valid JSON. Use an object like {"Authorization": "Bearer ..."}.')
        }
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        throw new ConfigError(field, 'it must be a JSON object like {"Authorization": "Bearer ..."}.')
    }
    const headers: Record<string, string> = {}
    for (const [name, headerValue] of Object.entries(parsed as Record<string, unknown>)) {
        if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) {
            throw new ConfigError(field, `"${name}" is not a valid header name. Use letters, digits and dashes.`)
        }
        if (RESERVED_HEADERS.includes(name.toLowerCase())) {
            throw new ConfigError(field, `"${name}" is set by the connector itself. Remove it from customHeaders.`)
        }
        if (FORBIDDEN_HEADERS.includes(name.toLowerCase())) {
            throw new ConfigError(field, `"${name}" controls the connection, and fetch refuses it. Remove it.`)
        }
        // Values are secrets: the message names the header, never its value.
        if (typeof headerValue !== 'string') {
            throw new ConfigError(field, `the value of "${name}" must be a string. Put it in double quotes.`)
        }
        if (/[\r\n]/.test(headerValue)) {
            throw new ConfigError(field, `the value of "${name}" contains a line break. Remove it.`)
        }
        // HTTP header values are Latin-1 without control characters; fetch throws on anything else, on every request.
        if (!/^[\t\x20-\x7e\x80-\xff]*$/.test(headerValue)) {
            throw new ConfigError(
                field,
                `the value of "${name}" has a character HTTP headers cannot carry (a control character, or one ` +
                    'outside Latin-1). Percent-encode or base64-encode it.'
            )
        }
        headers[name] = headerValue.trim()
    }
    return headers
}

/** Standard Webhooks secret: `whsec_` followed by the base64 key. */
export function parseSigningSecret(value: unknown): Buffer | null {
    const field = 'signingSecret'
    const text = typeof value === 'string' ? value.trim() : ''
    if (!text) {
        return null
    }
    const match = /^whsec_([A-Za-z0-9+/]+={0,2})$/.exec(text)
    const key = match?.[1] ? Buffer.from(match[1], 'base64') : null
    if (!key || key.length < 16) {
        throw new ConfigError(
            field,
            'it must be a Standard Webhooks secret: "whsec_" followed by at least 16 base64-encoded bytes (see the README to generate one).'
        )
    }
    return key
}

export interface ConfigOverrides {
    requestTimeoutMs?: number
    deadlineMs?: number
    maxBatchEvents?: number
    maxBatchBytes?: number
    maxAttempts?: number
    retryAfterCapMs?: number
}

export function parseConfig(raw: Partial<PatternsConfig> | undefined, overrides: ConfigOverrides = {}): ParsedConfig {
    const config = raw ?? {}
    const url = parseWebhookUrl(config.webhookUrl)
    const customHeaders = parseCustomHeaders(config.customHeaders)
    const signingKey = parseSigningSecret(config.signingSecret)
    const allowed = parseList(config.allowedEventTypes)
    const webhookUrl = url.toString()
    const signingSecret = signingKey && typeof config.signingSecret === 'string' ? config.signingSecret.trim() : null
    const secretParts = distinctiveParts(url, Object.values(customHeaders), signingSecret)
    return {
        webhookUrl,
        redactedUrl: redactUrl(webhookUrl),
        allowedEvents: allowed.length > 0 ? new Set(allowed) : null,
        excludedEvents: new Set(parseList(config.excludedEventTypes)),
        excludedProperties: parseList(config.excludedProperties),
        customHeaders,
        signingKey,
        requestTimeoutMs: positiveOr(overrides.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS, 'requestTimeoutMs'),
        deadlineMs: positiveOr(overrides.deadlineMs, CALL_DEADLINE_MS, 'deadlineMs'),
        maxBatchEvents: positiveOr(overrides.maxBatchEvents, DEFAULT_MAX_BATCH_EVENTS, 'maxBatchEvents'),
        maxBatchBytes: positiveOr(overrides.maxBatchBytes, DEFAULT_MAX_BATCH_BYTES, 'maxBatchBytes'),
        maxAttempts: positiveOr(overrides.maxAttempts, MAX_ATTEMPTS_WITH_TIMERS, 'maxAttempts'),
        retryAfterCapMs: positiveOr(overrides.retryAfterCapMs, RETRY_AFTER_CAP_MS, 'retryAfterCapMs'),
        secrets: secretForms([webhookUrl, ...secretParts]),
        secretParts,
        outboxBytes: parseOutboxMb(config.outboxMaxMb) * BYTES_PER_MB,
    }
}

/** The outbox's size in MB: empty means the default, 0 turns it off. */
export function parseOutboxMb(value: unknown): number {
    const text = typeof value === 'string' ? value.trim() : ''
    if (text === '') {
        return DEFAULT_OUTBOX_MB
    }
    const mb = Number(text)
    if (!/^\d+(\.\d+)?$/.test(text) || !(mb <= MAX_OUTBOX_MB)) {
        throw new ConfigError(
            'outboxMaxMb',
            `it must be a number of MB from 0 to ${MAX_OUTBOX_MB}, got "${text}". Leave it empty for ` +
                `${DEFAULT_OUTBOX_MB} MB, or set 0 to keep nothing in PostHog's storage.`
        )
    }
    return mb
}

function positiveOr(value: number | undefined, fallback: number, field: string): number {
    if (value === undefined) {
        return fallback
    }
    // Infinity is allowed: replay's budget is time, not a count of attempts.
    if (!(value > 0)) {
        throw new ConfigError(field, `it must be a positive number, got ${String(value)}.`)
    }
    return value
}

// ---------------------------------------------------------------------------------------------------------------
// Pure policy: redaction, filtering, shaping, batching, response classification, retry planning, signing.
// ---------------------------------------------------------------------------------------------------------------

/** The webhook URL's path is its credential: log only the scheme and the host. */
export function redactUrl(url: string): string {
    try {
        const parsed = new URL(url)
        return `${parsed.protocol}//${parsed.host}/…`
    } catch {
        return '[unparseable URL]'
    }
}

/** A path segment that could be a token, not a word like "webhooks" or "v1" that any body may contain. */
function isTokenSegment(segment: string): boolean {
    return segment.length >= 4 && (/[^a-z-]/.test(segment) || segment.length >= 12)
}

function safeDecode(text: string): string {
    try {
        return decodeURIComponent(text)
    } catch {
        return text
    }
}

/**
 * The parts of the secrets that identify them: the URL's path and its token segments and query values, each
 * header value, and the signing secret. Windows of these are what a quoted body must not contain.
 */
export function distinctiveParts(url: URL, headerValues: readonly string[], signingSecret: string | null): string[] {
    const path = url.pathname + url.search
    const segments = url.pathname.split('/').map(safeDecode).filter(isTokenSegment)
    const queryValues = url.search
        .slice(1)
        .split('&')
        .map((pair) => safeDecode(pair.slice(pair.indexOf('=') + 1)))
        .filter((value) => value.length > 0)
    const parts = [path.length > 1 ? path : '', ...segments, ...queryValues, ...headerValues]
    if (signingSecret) {
        parts.push(signingSecret, signingSecret.slice('whsec_'.length))
    }
    return [...new Set(parts.filter((part) => part.length > 0))]
}

/** Each secret as it may appear in a body: as is, JSON-escaped (also with `\\/`), and percent-encoded. */
export function secretForms(secrets: readonly string[]): string[] {
    const forms = new Set<string>()
    for (const secret of secrets) {
        const json = JSON.stringify(secret).slice(1, -1)
        const percent = encodeURIComponent(secret)
        for (const form of [
            secret,
            json,
            json.replace(/\//g, '\\/'),
            percent,
            percent.toLowerCase(),
            encodeURI(secret),
        ]) {
            // Shorter strings would mangle ordinary words in messages; they are caught by the fragment check instead.
            if (form.length >= 4) {
                forms.add(form)
            }
        }
    }
    // Longest first, so a secret that contains another is removed whole.
    return [...forms].sort((x, y) => y.length - x.length)
}

/** Removes every known secret from a text. A safety net under messages that are built without secrets anyway. */
export function redactText(text: string, secrets: readonly string[]): string {
    let result = text
    for (const secret of secrets) {
        if (secret && result.includes(secret)) {
            result = result.split(secret).join('[redacted]')
        }
    }
    return result
}

/** A text as a receiver may have encoded a secret in it: as is, JSON-unescaped and percent-decoded. */
function decodedViews(text: string): string[] {
    const unescaped = text
        .replace(/\\u([0-9a-fA-F]{4})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)))
        .replace(/\\(.)/g, '$1')
    const decode = (t: string): string =>
        t.replace(/%([0-9a-fA-F]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)))
    return [text, unescaped, decode(text), decode(unescaped)]
}

/** Whether a text holds SECRET_FRAGMENT_CHARS characters in a row of any secret part, in any of its encodings. */
export function containsSecretFragment(text: string, parts: readonly string[]): boolean {
    const views = decodedViews(text)
    for (const part of parts) {
        const width = Math.min(part.length, SECRET_FRAGMENT_CHARS)
        for (let start = 0; start + width <= part.length; start++) {
            const window = part.slice(start, start + width)
            if (views.some((view) => view.includes(window))) {
                return true
            }
        }
    }
    return false
}

/**
 * The start of an error body, safe to log: secrets are removed before anything is cut or collapsed, and if any
 * fragment of a secret remains, the quote is withheld whole.
 */
export function quoteBody(body: string | null, secrets: readonly string[], parts: readonly string[]): string {
    if (!body) {
        return ''
    }
    const redacted = redactText(body, secrets)
    if (containsSecretFragment(redacted, parts)) {
        return ' (body withheld: it quotes part of a secret)'
    }
    const snippet = redacted.replace(/\s+/g, ' ').trim().slice(0, ERROR_BODY_SNIPPET_CHARS)
    return snippet ? ` (body: ${snippet})` : ''
}

export function shouldSend(eventName: string, config: Pick<ParsedConfig, 'allowedEvents' | 'excludedEvents'>): boolean {
    if (config.allowedEvents && !config.allowedEvents.has(eventName)) {
        return false
    }
    return !config.excludedEvents.has(eventName)
}

/** The event as received, minus the excluded properties (also from person updates). The input is not modified. */
export function shapeEvent<E extends object>(event: E, excludedProperties: readonly string[]): E {
    if (excludedProperties.length === 0) {
        return event
    }
    const strip = (bag: unknown): unknown => {
        if (typeof bag !== 'object' || bag === null || Array.isArray(bag)) {
            return bag
        }
        const copy: Record<string, unknown> = { ...(bag as Record<string, unknown>) }
        for (const key of excludedProperties) {
            delete copy[key]
        }
        for (const nested of ['$set', '$set_once']) {
            if (nested in copy) {
                copy[nested] = strip(copy[nested])
            }
        }
        return copy
    }
    const shaped: Record<string, unknown> = { ...(event as Record<string, unknown>) }
    for (const key of ['properties', '$set', '$set_once']) {
        if (key in shaped) {
            shaped[key] = strip(shaped[key])
        }
    }
    // Older hosts also carry the address in a top-level `ip` field; excluding $ip must remove it there too.
    if ('ip' in shaped && excludedProperties.includes('$ip')) {
        delete shaped.ip
    }
    return shaped as E
}

/** How many items from the front of the queue fit in one POST. Always at least one, so an oversized event still goes. */
export function takeCount(sizes: readonly number[], maxEvents: number, maxBytes: number): number {
    let bytes = 2 // the array brackets
    let count = 0
    for (const size of sizes) {
        const added = size + (count > 0 ? 1 : 0)
        if (count >= maxEvents || (count > 0 && bytes + added > maxBytes)) {
            break
        }
        bytes += added
        count++
    }
    return count
}

/** Splits a batch the receiver refused as too large (413) into two halves. */
export function splitInHalves<T>(items: readonly T[]): [T[], T[]] {
    const middle = Math.ceil(items.length / 2)
    return [items.slice(0, middle), items.slice(middle)]
}

/**
 * Retry-After is delta-seconds or an HTTP-date. Returns milliseconds from now, or null if absent or unreadable.
 * Fractional seconds ("1.5") are read as seconds, as receivers mean them; only a text with a month name is a date.
 */
export function parseRetryAfter(value: string | null | undefined, nowMs: number): number | null {
    if (!value) {
        return null
    }
    const text = value.trim()
    if (/^\d+(\.\d+)?$/.test(text)) {
        return Math.ceil(Number(text) * 1000)
    }
    if (!/[A-Za-z]{3}/.test(text)) {
        return null
    }
    const date = Date.parse(text)
    if (Number.isNaN(date)) {
        return null
    }
    return Math.max(0, date - nowMs)
}

/**
 * The outcome ladder: what one HTTP status means for the batch that got it.
 * `location` is the redirect target, already redacted by the caller.
 */
export function classifyResponse(
    status: number,
    retryAfter: string | null,
    location: string | null,
    nowMs: number
): Outcome {
    // Any 2xx: the receiver has the events. Patterns answers with an empty body, so the body is never parsed.
    if (status >= 200 && status < 300) {
        return { kind: 'delivered' }
    }
    // 3xx: redirects are not followed (several hosts refuse to), and a moved webhook needs a config change.
    // `location` only says where in general terms: the target is as secret as the webhook URL.
    if (status >= 300 && status < 400) {
        const where = location ? ` to ${location}` : ''
        return {
            kind: 'permanent',
            reason: `HTTP ${status}: the webhook redirected${where}; redirects are not followed, so set webhookUrl to the final URL`,
        }
    }
    // 413: the batch is too big for the receiver; halves may fit.
    if (status === 413) {
        return { kind: 'split', reason: 'HTTP 413: the receiver refused the request as too large' }
    }
    // 429 and 425: the receiver asks us to slow down; wait as long as it says when we can.
    if (status === 429 || status === 425) {
        return {
            kind: 'retry',
            reason: `HTTP ${status}: the receiver is throttling requests`,
            throttled: true,
            retryAfterMs: parseRetryAfter(retryAfter, nowMs),
        }
    }
    // 408 and 5xx: the receiver or a proxy in front of it (522, 524, ...) had a passing problem. Only 501 and 505
    // say the request itself can never work.
    if (status === 408 || (status >= 500 && status < 600 && status !== 501 && status !== 505)) {
        return {
            kind: 'retry',
            reason: `HTTP ${status}: the receiver had a temporary failure`,
            throttled: false,
            retryAfterMs: parseRetryAfter(retryAfter, nowMs),
        }
    }
    // 401/403: retrying the same credentials cannot help.
    if (status === 401 || status === 403) {
        return {
            kind: 'permanent',
            reason: `HTTP ${status}: the receiver rejected the credentials or headers; check customHeaders and signingSecret`,
        }
    }
    // 404/410: the URL is wrong or the webhook is gone; retrying only adds load.
    if (status === 404 || status === 410) {
        return {
            kind: 'permanent',
            reason: `HTTP ${status}: the webhook does not exist; perhaps the Patterns webhook node was deleted. Check webhookUrl`,
        }
    }
    // 501, 505 and every other 4xx: the receiver will refuse the same request again.
    if (status >= 400 && status < 600) {
        return { kind: 'permanent', reason: `HTTP ${status}: the receiver refused the events` }
    }
    // Anything else (1xx, nonsense) is not an acceptance, and nothing suggests a retry would differ.
    return { kind: 'permanent', reason: `HTTP ${status}: unexpected status from the receiver` }
}

/** What a thrown fetch error means: network failures and timeouts are retryable; anything else is a bug, never retried. */
export function classifyError(error: unknown): Outcome {
    const description = describeNetworkError(error)
    if (description) {
        return { kind: 'retry', reason: description, throttled: false, retryAfterMs: null }
    }
    const name = errorName(error)
    return { kind: 'permanent', reason: `unexpected ${name} while sending` }
}

/** An error's name without trusting `instanceof`: errors from the host's fetch come from another realm in the sandbox. */
export function errorName(error: unknown): string {
    const name = typeof error === 'object' && error !== null ? (error as { name?: unknown }).name : undefined
    return typeof name === 'string' && name ? name : typeof error
}

/** A short, secret-free description of a network failure, or null if the error is not one. */
export function describeNetworkError(error: unknown): string | null {
    if (typeof error !== 'object' || error === null) {
        return null
    }
    const e = error as { name?: unknown; code?: unknown; type?: unknown; message?: unknown; cause?: unknown }
    const cause = (typeof e.cause === 'object' && e.cause !== null ? e.cause : {}) as { code?: unknown; name?: unknown }
    const code = typeof e.code === 'string' ? e.code : typeof cause.code === 'string' ? cause.code : null
    if (e.name === 'AbortError' || e.name === 'TimeoutError' || cause.name === 'TimeoutError') {
        return 'the request timed out'
    }
    // node-fetch v2 (the classic hosts' fetch) marks its own timeout with type 'request-timeout'.
    if (e.name === 'FetchError' && e.type === 'request-timeout') {
        return 'the request timed out'
    }
    if (code && NETWORK_ERROR_CODES.has(code)) {
        return `network error ${code}`
    }
    if (e.name === 'FetchError' || (e.name === 'TypeError' && e.message === 'fetch failed')) {
        return `network error${code ? ` ${code}` : ''}`
    }
    if (typeof e.message === 'string' && /socket hang up|network|timed? ?out/i.test(e.message)) {
        return 'network error'
    }
    return null
}

/**
 * How much time an attempt needs. Where the timeout can be enforced, any attempt can be cut to fit; where it can't
 * (the timerless sandbox, whose fetch may run for the host's own timeout), the next request may take as long as
 * the last one did.
 */
/**
 * How much time an attempt needs. Where the timeout can be enforced, any attempt can be cut to fit; where it can't
 * (a host fetch that ignores the plugin's timeout), the request may run for the host's own fetch timeout.
 */
export function attemptNeedsMs(timeoutEnforced: boolean): number {
    return timeoutEnforced ? MIN_ATTEMPT_MS : HOST_FETCH_TIMEOUT_MS + DEADLINE_MARGIN_MS
}

/**
 * Full-jitter exponential backoff: random(0, min(cap, base * 2^attempt)). `attempt` counts from 0. The webhook's
 * base and cap are the defaults; sync's queries pass their own.
 */
export function backoffDelay(
    attempt: number,
    random: () => number,
    baseMs: number = BACKOFF_BASE_MS,
    capMs: number = BACKOFF_CAP_MS
): number {
    const ceiling = Math.min(capMs, baseMs * 2 ** attempt)
    return Math.floor(random() * ceiling)
}

export interface RetryPlanInput {
    /** Attempts already made for this batch (1 after the first failure). */
    attempts: number
    outcome: Extract<Outcome, { kind: 'retry' }>
    remainingMs: number
    timers: boolean
    timeoutEnforced: boolean
    /** Attempts allowed where timers exist (the config's maxAttempts). */
    maxAttempts: number
    /** The longest Retry-After honoured (the config's retryAfterCapMs). */
    retryAfterCapMs: number
    random: () => number
}

/** Whether and when to try a batch again. Pure, so the whole schedule can be asserted without waiting. */
export function planRetry(input: RetryPlanInput): RetryPlan {
    const { attempts, outcome, remainingMs, timers } = input
    const neededForAttempt = attemptNeedsMs(input.timeoutEnforced)
    if (!timers) {
        // Without timers a throttled receiver can't be given time, and hammering it would make things worse.
        if (outcome.throttled) {
            return { retry: false, why: 'the host has no timers to wait before retrying' }
        }
        if (attempts >= Math.min(MAX_ATTEMPTS_WITHOUT_TIMERS, input.maxAttempts)) {
            return { retry: false, why: 'out of immediate retries' }
        }
        if (remainingMs < neededForAttempt) {
            return { retry: false, why: 'no time left before the deadline' }
        }
        return { retry: true, delayMs: 0 }
    }
    if (attempts >= input.maxAttempts) {
        return { retry: false, why: 'out of retries' }
    }
    if (outcome.retryAfterMs !== null) {
        // Honour Retry-After exactly (no jitter) when it fits; a shorter wait would only be refused again.
        const delayMs = Math.max(outcome.retryAfterMs, MIN_RETRY_AFTER_MS)
        if (delayMs > input.retryAfterCapMs || delayMs + neededForAttempt > remainingMs) {
            return {
                retry: false,
                why: `the receiver asked to wait ${Math.ceil(delayMs / 1000)} s, longer than the time left`,
            }
        }
        return { retry: true, delayMs }
    }
    const delayMs = backoffDelay(attempts - 1, input.random)
    if (delayMs + neededForAttempt > remainingMs) {
        return { retry: false, why: 'no time left before the deadline' }
    }
    return { retry: true, delayMs }
}

/** Standard Webhooks signature: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`. */
export function signPayload(key: Buffer, id: string, timestampSeconds: number, body: string | Uint8Array): string {
    const digest = createHmac('sha256', key).update(`${id}.${timestampSeconds}.`).update(body).digest('base64')
    return `v1,${digest}`
}

export function buildHeaders(
    config: Pick<ParsedConfig, 'customHeaders' | 'signingKey'>,
    body: string | Uint8Array,
    webhookId: string,
    nowMs: number
): Record<string, string> {
    // webhook-id goes on every request, signed or not: it stays the same across retries of one body, so a
    // receiver can deduplicate on it.
    const headers: Record<string, string> = {
        ...config.customHeaders,
        'Content-Type': 'application/json',
        'User-Agent': USER_AGENT,
        'webhook-id': webhookId,
    }
    if (config.signingKey) {
        const timestamp = Math.floor(nowMs / 1000)
        headers['webhook-timestamp'] = String(timestamp)
        headers['webhook-signature'] = signPayload(config.signingKey, webhookId, timestamp, body)
    }
    return headers
}

export function newWebhookId(): string {
    return `msg_${randomBytes(16).toString('hex')}`
}

/**
 * A `webhook-id` derived from the events themselves: the host's job queue retries a batch later, in another VM
 * that shares nothing with this one, and the same events must carry the same id there so receivers can
 * deduplicate. An event without a uuid stands in by its JSON.
 */
export function batchWebhookId(items: readonly { json: string; uuid: string }[]): string {
    const key = items.map((item) => item.uuid || item.json).join('\n')
    return `msg_${createHash('sha256').update(key).digest('hex').slice(0, WEBHOOK_ID_HEX_CHARS)}`
}

/**
 * The `webhook-id` of a whole export batch, from its body: the same batch retried by the host's job queue, in
 * another VM, is the same JSON, so it carries the same id there. Only the body's length and its first and last
 * WEBHOOK_ID_SAMPLE_CHARS are hashed: hashing a whole 1 MB batch cost about 3% of the host's time per event in
 * PostHog's 2021 host, and two different batches never share their first and last events (each has its uuid and
 * timestamp there; a historical page read again differs in every event's `now`).
 */
export function bodyWebhookId(body: string): string {
    const hash = createHash('sha1')
    if (body.length <= 2 * WEBHOOK_ID_SAMPLE_CHARS) {
        hash.update(body)
    } else {
        hash.update(`${body.length}:`)
        hash.update(body.slice(0, WEBHOOK_ID_SAMPLE_CHARS))
        hash.update(body.slice(-WEBHOOK_ID_SAMPLE_CHARS))
    }
    return `msg_${hash.digest('hex').slice(0, WEBHOOK_ID_HEX_CHARS)}`
}

/** Whether events go out exactly as received: no event filter, no removed property, the plugin's own body. */
export function sendsAsReceived(
    config: Pick<ParsedConfig, 'allowedEvents' | 'excludedEvents' | 'excludedProperties'>,
    env: Pick<SenderEnv, 'encodeBody'>
): boolean {
    return (
        config.allowedEvents === null &&
        config.excludedEvents.size === 0 &&
        config.excludedProperties.length === 0 &&
        !env.encodeBody
    )
}

/** A whole batch as one JSON array, or null when an event cannot be serialised (the itemised path says which). */
export function wholeBatchBody(events: readonly unknown[]): string | null {
    try {
        return JSON.stringify(events)
    } catch {
        return null
    }
}

/**
 * The part of `meta.cache` that can serialise in the host: PostHog's `set` runs JSON.stringify outside the sandbox,
 * and its `get` with `jsonSerialize: false` hands the stored text back unparsed (from March 2021 on).
 */
export type SerialisingCache = Pick<PluginCache, 'get' | 'set' | 'expire'>

/**
 * The body inside the text the host's cache gave back for `[tag, events]`: null unless it is exactly that (a
 * string, tagged with this batch's tag), so a value of any other writer, or a host that parsed it, is never sent.
 */
export function hostJsonBody(text: unknown, tag: string): string | null {
    const head = `[${JSON.stringify(tag)},[`
    // The batch is an array, so the whole ends in two brackets: a text cut off inside the batch does not.
    return typeof text === 'string' && text.startsWith(head) && text.endsWith(']]') && text.length > head.length
        ? text.slice(head.length - 1, -1)
        : null
}

/**
 * Serialises export batches in the host instead of the sandbox. The classic sandbox (vm2) hands the plugin the
 * host's events as proxies, and JSON.stringify in the sandbox pays a proxy trap for every property it reads:
 * measured in PostHog's 1.10.5 host, about 170 ms for a 1 MiB batch of 1,350 events, most of an export run's
 * time, against about 5 ms for the same batch stringified in the host and read back through Redis. The batch is
 * lent to the cache under a key of its own, read back as text, and removed. Anything else (a failed call, a
 * missing key, a host that parses) leaves the sandbox to serialise it; a host whose cache cannot hand text back
 * is not asked again.
 */
export class HostJson {
    /** false once the host answered with something other than the text: its cache parses what it returns. */
    private works = true
    private lent = 0
    /** When each batch still waiting on the cache was lent, by tag. */
    private readonly unanswered = new Map<string, number>()

    constructor(
        private readonly cache: SerialisingCache,
        private readonly env: Pick<SenderEnv, 'random' | 'now'>
    ) {}

    /** The batch as one JSON array, made by the host; resolves null when it was not (never rejects). */
    batchBody(events: readonly unknown[]): Promise<string | null> | null {
        const now = this.env.now()
        if (!this.works || this.stalled(now)) {
            return null
        }
        // Unique per batch across the install: several VMs share the cache's key space (two draws: 104 bits).
        const draw = (): string => Math.floor(this.env.random() * 2 ** 52).toString(36)
        const tag = `${draw()}${draw()}.${(this.lent++).toString(36)}`
        const key = HOST_JSON_KEY_PREFIX + tag
        this.unanswered.set(tag, now)
        return this.cache
            .set(key, [tag, events], HOST_JSON_TTL_SECONDS)
            .then(() => this.cache.get(key, null, { jsonSerialize: false }))
            .then(
                (text) => {
                    this.unanswered.delete(tag)
                    this.cache.expire(key, 0).then(undefined, () => undefined)
                    const body = hostJsonBody(text, tag)
                    // Missing (evicted, expired) says nothing about the host; any other answer does.
                    if (body === null && text !== null) {
                        this.works = false
                    }
                    return body
                },
                () => {
                    this.unanswered.delete(tag)
                    return null
                }
            )
    }

    private stalled(now: number): boolean {
        for (const since of this.unanswered.values()) {
            if (now - since > HOST_JSON_STALL_MS) {
                return true
            }
        }
        return false
    }
}

export function batchBody(items: readonly { json: string }[]): string {
    return `[${items.map((item) => item.json).join(',')}]`
}

// ---------------------------------------------------------------------------------------------------------------
// Transport: adapts each host's fetch to the same small surface.
// ---------------------------------------------------------------------------------------------------------------

/** Reads a header by lowercase name from a `Headers`-like object or a plain object (the CDP executor's). */
export function readHeader(headers: unknown, lowercaseName: string): string | null {
    if (typeof headers !== 'object' || headers === null) {
        return null
    }
    const withGet = headers as { get?: unknown }
    if (typeof withGet.get === 'function') {
        const value: unknown = (withGet.get as (name: string) => unknown).call(headers, lowercaseName)
        return typeof value === 'string' ? value : null
    }
    for (const [name, value] of Object.entries(headers as Record<string, unknown>)) {
        if (name.toLowerCase() === lowercaseName) {
            return Array.isArray(value) ? String(value[0]) : typeof value === 'string' ? value : null
        }
    }
    return null
}

interface BodyReader {
    read: () => Promise<{ done: boolean; value?: Uint8Array }>
    cancel: () => Promise<void>
}

/** Reads a WHATWG body stream up to maxBytes, then cancels it: the rest is never downloaded. */
async function readCapped(reader: BodyReader, maxBytes: number): Promise<string> {
    const chunks: Buffer[] = []
    let bytes = 0
    try {
        while (bytes < maxBytes) {
            const { done, value } = await reader.read()
            if (done || !value) {
                break
            }
            chunks.push(Buffer.from(value))
            bytes += value.length
        }
    } finally {
        reader.cancel().catch(() => undefined)
    }
    return Buffer.concat(chunks).subarray(0, maxBytes).toString('utf8')
}

/**
 * At most ERROR_BODY_MAX_BYTES of an error body, or null if it can't be read. A WHATWG stream (undici) is read
 * in chunks and cancelled; node-fetch v2 enforces the `size` option the transport passes; the CDP executor has
 * read the body already. The time it may take is bounded by the request's own timeout, which covers the body.
 */
export async function readErrorBody(response: FetchLikeResponse): Promise<string | null> {
    try {
        const stream = response.body as { getReader?: () => BodyReader } | null | undefined
        if (stream && typeof stream.getReader === 'function') {
            return await readCapped(stream.getReader(), ERROR_BODY_MAX_BYTES)
        }
        return (await response.text()).slice(0, ERROR_BODY_MAX_BYTES)
    } catch {
        // An unreadable error body changes nothing about the outcome; it just isn't quoted.
        return null
    }
}

/** Adapts a response to the transport surface. The body is read only where it will be quoted: not for 2xx or 413. */
function toTransportResponse(response: FetchLikeResponse): TransportResponse | Promise<TransportResponse> {
    const status = response.status
    const header = (name: string): string | null => readHeader(response.headers, name)
    if ((status >= 200 && status < 300) || status === 413) {
        return { status, header, body: null }
    }
    return readErrorBody(response).then((body) => ({ status, header, body }))
}

/** A transport over the CDP executor's `meta.fetch`, which takes the timeout itself. */
export function metaFetchTransport(metaFetch: MetaFetch): Transport {
    return ({ url, headers, body, timeoutMs }) =>
        metaFetch(url, {
            method: 'POST',
            headers,
            body: typeof body === 'string' ? body : Buffer.from(body).toString('utf8'),
            timeoutMs,
        }).then(toTransportResponse)
}

/**
 * A transport over a classic fetch. `timeout` and `size` are node-fetch v2 options (the 2021–2023 hosts' fetch):
 * they bound the request, its error body included, in a sandbox without timers. Other fetches ignore them, and
 * the timeout is enforced with AbortController where it exists.
 */
export function fetchTransport(fetchFn: FetchLike): Transport {
    return async ({ url, headers, body, timeoutMs }) => {
        const init: Record<string, unknown> = {
            method: 'POST',
            headers,
            body,
            redirect: 'manual',
            timeout: timeoutMs,
            size: ERROR_BODY_MAX_BYTES,
        }
        const canAbort = typeof AbortController === 'function' && typeof setTimeout === 'function'
        if (!canAbort) {
            // Returned, not awaited: every await in the sandbox costs a host guard.
            return toTransportResponse(await fetchFn(url, init))
        }
        const controller = new AbortController()
        const timer = setTimeout(() => controller.abort(), timeoutMs)
        init.signal = controller.signal
        try {
            // The timer runs until the error body is read too, so a body that stalls is cut off with the request.
            return await toTransportResponse(await fetchFn(url, init))
        } finally {
            clearTimeout(timer)
        }
    }
}

/** node-fetch v2 (the 2021–2023 hosts' `fetch`) enforces its `timeout` option itself, with or without timers. */
export function isNodeFetchV2(fetchFn: unknown): boolean {
    return typeof fetchFn === 'function' && typeof (fetchFn as { isRedirect?: unknown }).isRedirect === 'function'
}

// ---------------------------------------------------------------------------------------------------------------
// Delivery: one POST (the I/O), and the retry loop around it.
// ---------------------------------------------------------------------------------------------------------------

/** Where a redirect pointed, in words that reveal nothing of the target: it is as secret as the webhook URL. */
export function describeRedirect(location: string | null, base: string): string | null {
    if (!location) {
        return null
    }
    try {
        return new URL(location, base).host === new URL(base).host ? 'another path on the same host' : 'another host'
    } catch {
        return 'an unreadable address'
    }
}

/** The redirect target's distinctive parts, so that a body naming it is not quoted either. */
export function redirectParts(location: string, base: string): string[] {
    try {
        const target = new URL(location, base)
        return [location, target.toString(), ...distinctiveParts(target, [], null)]
    } catch {
        return [location]
    }
}

const DELIVERED: Outcome = { kind: 'delivered' }

/** The one I/O function: POSTs a body once and says what came of it. Never throws. */
export async function postOnce(
    config: ParsedConfig,
    env: SenderEnv,
    body: string | Uint8Array,
    webhookId: string,
    timeoutMs: number
): Promise<Outcome> {
    let response: TransportResponse
    try {
        const headers = buildHeaders(config, body, webhookId, env.now())
        response = await env.transport({ url: config.webhookUrl, headers, body, timeoutMs })
    } catch (error) {
        return classifyError(error)
    }
    if (response.status >= 200 && response.status < 300) {
        return DELIVERED
    }
    const location = response.header('location')
    const where = describeRedirect(location, config.webhookUrl)
    const outcome = classifyResponse(response.status, response.header('retry-after'), where, env.now())
    if (outcome.kind === 'delivered' || outcome.kind === 'split') {
        return outcome
    }
    // Quote the start of an error body: receivers often explain themselves there. It is never parsed as JSON.
    const parts = location ? [...config.secretParts, ...redirectParts(location, config.webhookUrl)] : config.secretParts
    const secrets = location ? [...secretForms(parts), ...config.secrets] : config.secrets
    return { ...outcome, reason: outcome.reason + quoteBody(response.body, secrets, parts) }
}

/** The fate of a group of items after delivery: `error` is null when the receiver accepted them. */
export interface DeliveryResult<T> {
    items: T[]
    error: Error | null
    /**
     * Whether a later try could succeed (the error is a RetryError). Kept here because the 2021 scaffold's
     * RetryError is named "Error", so the error itself can't tell.
     */
    retryable: boolean
    /** The `webhook-id` the group's body was sent with, so a later re-send of the same body carries it too. */
    webhookId: string
}

export interface DeliveryHooks {
    /** After each request: its outcome, how long it took, and which attempt of its body it was (from 1). */
    onAttempt?: (outcome: Outcome, durationMs: number, attempt: number) => void
    /** The `webhook-id` of a body, from its items; a fresh random id per body when absent. */
    webhookIdFor?: (items: readonly { json: string; uuid: string }[]) => string
}

function attemptsText(attempts: number): string {
    return `${attempts} attempt${attempts === 1 ? '' : 's'}`
}

/** Why a body was not sent at all: the deadline is too close for the request this host may make. */
function notSentWhy(remainingMs: number, config: ParsedConfig): string {
    if (remainingMs < MIN_ATTEMPT_MS) {
        return `the ${Math.round(config.deadlineMs / 1000)} s deadline ran out first`
    }
    return (
        `${(remainingMs / 1000).toFixed(1)} s were left before the deadline, and this host's fetch may hold a request for ` +
        `${HOST_FETCH_TIMEOUT_MS / 1000} s, which the connector cannot cut short`
    )
}

/** What one batch shares while it is split on 413: how many "too large" answers it has had. */
interface SplitBudget {
    tooLarge: number
}

/** What every attempt of a body needs: where, how, until when, and the 413s its batch has had. */
interface AttemptContext {
    config: ParsedConfig
    env: SenderEnv
    deadline: number
    hooks: DeliveryHooks
    budget: SplitBudget
}

interface Delivery<T> extends AttemptContext {
    fail: (items: T[], message: string, retryable: boolean, webhookId?: string) => DeliveryResult<T>[]
}

/**
 * Delivers items as one POST, retrying within the deadline and splitting on 413.
 * Never throws: each group of items comes back with its error, a plain Error when permanent, a RetryError otherwise.
 */
export function deliver<T extends { json: string; uuid: string }>(
    items: T[],
    config: ParsedConfig,
    env: SenderEnv,
    deadline: number,
    hooks: DeliveryHooks = {}
): Promise<DeliveryResult<T>[]> {
    const fail = (group: T[], message: string, retryable: boolean, webhookId?: string): DeliveryResult<T>[] => {
        const what = group.length === 1 ? `event ${group[0]?.uuid ?? ''}` : `batch of ${group.length} events`
        const text = redactText(`${what} to ${config.redactedUrl}: ${message}`, config.secrets)
        const error = retryable ? new RetryError(text) : new Error(text)
        return [{ items: group, error, retryable, webhookId: webhookId ?? batchWebhookId(group) }]
    }
    return deliverGroup(items, { config, env, deadline, hooks, budget: { tooLarge: 0 }, fail })
}

/** How a body's attempts ended: accepted, refused as too large (413), or failed with a message. */
export type BodyFate =
    { kind: 'delivered' } | { kind: 'split'; reason: string } | { kind: 'failed'; message: string; retryable: boolean }

/** Stops before an attempt when the deadline is too close or the batch had too many 413s; null: go on. */
function beforeAttempt(delivery: AttemptContext): BodyFate | null {
    const { config, env, deadline } = delivery
    const remaining = deadline - env.now()
    if (remaining < attemptNeedsMs(env.timeoutEnforced)) {
        return { kind: 'failed', message: `not sent: ${notSentWhy(remaining, config)}`, retryable: true }
    }
    if (delivery.budget.tooLarge >= MAX_TOO_LARGE_PER_BATCH) {
        const refused = `the receiver refused ${delivery.budget.tooLarge} requests of this batch as too large (HTTP 413)`
        return { kind: 'failed', message: `not sent: ${refused}; raise the receiver's size limit`, retryable: false }
    }
    return null
}

/** After an attempt: its fate when there is no point in another, or how long to wait before the next. */
function afterAttempt(outcome: Outcome, attempts: number, delivery: AttemptContext): BodyFate | number {
    if (outcome.kind === 'delivered') {
        return { kind: 'delivered' }
    }
    if (outcome.kind === 'permanent') {
        return {
            kind: 'failed',
            message: `${outcome.reason}; gave up after ${attemptsText(attempts)}`,
            retryable: false,
        }
    }
    if (outcome.kind === 'split') {
        return { kind: 'split', reason: outcome.reason }
    }
    const { config, env, deadline } = delivery
    const plan = planRetry({
        attempts,
        outcome,
        remainingMs: deadline - env.now(),
        timers: env.sleep !== null,
        timeoutEnforced: env.timeoutEnforced,
        maxAttempts: config.maxAttempts,
        retryAfterCapMs: config.retryAfterCapMs,
        random: env.random,
    })
    if (!plan.retry) {
        const message = `${outcome.reason}; gave up after ${attemptsText(attempts)}: ${plan.why}`
        return { kind: 'failed', message, retryable: true }
    }
    return plan.delayMs
}

/**
 * Sends one body until it is accepted, refused for good, refused as too large, or out of time. The loop is
 * written out here and in deliverGroup, not shared through a callback, because each extra await or `.then`
 * costs a host guard in the classic sandbox.
 */
async function sendBody(body: string, webhookId: string, delivery: AttemptContext): Promise<BodyFate> {
    for (let attempts = 0; ;) {
        const stop = beforeAttempt(delivery)
        if (stop) {
            return stop
        }
        const started = delivery.env.now()
        const timeoutMs = Math.min(delivery.config.requestTimeoutMs, delivery.deadline - started - DEADLINE_MARGIN_MS)
        const outcome = await postOnce(delivery.config, delivery.env, body, webhookId, timeoutMs)
        attempts++
        delivery.hooks.onAttempt?.(outcome, delivery.env.now() - started, attempts)
        const next = afterAttempt(outcome, attempts, delivery)
        if (typeof next !== 'number') {
            return next
        }
        if (next > 0 && delivery.env.sleep) {
            await delivery.env.sleep(next)
        }
    }
}

async function deliverGroup<T extends { json: string; uuid: string }>(
    items: T[],
    delivery: Delivery<T>
): Promise<DeliveryResult<T>[]> {
    const { config, env } = delivery
    const body = env.encodeBody ? env.encodeBody(items) : batchBody(items)
    // The same id on every retry of this body lets receivers deduplicate.
    const webhookId = delivery.hooks.webhookIdFor?.(items) ?? newWebhookId()
    for (let attempts = 0; ;) {
        const stop = beforeAttempt(delivery)
        if (stop) {
            return groupResult(items, stop, attempts, delivery, webhookId)
        }
        const started = env.now()
        const timeoutMs = Math.min(config.requestTimeoutMs, delivery.deadline - started - DEADLINE_MARGIN_MS)
        const outcome = await postOnce(config, env, body, webhookId, timeoutMs)
        attempts++
        delivery.hooks.onAttempt?.(outcome, env.now() - started, attempts)
        const next = afterAttempt(outcome, attempts, delivery)
        if (typeof next !== 'number') {
            return groupResult(items, next, attempts, delivery, webhookId)
        }
        if (next > 0 && env.sleep) {
            await env.sleep(next)
        }
    }
}

/** A group's results from its fate: one result, or, after a 413, those of its halves. */
function groupResult<T extends { json: string; uuid: string }>(
    items: T[],
    fate: BodyFate,
    attempts: number,
    delivery: Delivery<T>,
    webhookId: string
): DeliveryResult<T>[] | Promise<DeliveryResult<T>[]> {
    if (fate.kind === 'delivered') {
        return [{ items, error: null, retryable: false, webhookId }]
    }
    if (fate.kind === 'split') {
        return splitGroup(items, fate.reason, attempts, delivery)
    }
    return delivery.fail(items, fate.message, fate.retryable, webhookId)
}

/** A 413: each half goes on its own, so one oversized event fails alone and the rest are delivered. */
async function splitGroup<T extends { json: string; uuid: string }>(
    items: T[],
    reason: string,
    attempts: number,
    delivery: Delivery<T>
): Promise<DeliveryResult<T>[]> {
    delivery.budget.tooLarge++
    if (items.length === 1) {
        return delivery.fail(items, `${reason} even as a single event; gave up after ${attemptsText(attempts)}`, false)
    }
    const [first, second] = splitInHalves(items)
    const firstResults = await deliverGroup(first, delivery)
    const secondResults = await deliverGroup(second, delivery)
    return [...firstResults, ...secondResults]
}

// ---------------------------------------------------------------------------------------------------------------
// The sender: natural batching of overlapping onEvent calls.
// ---------------------------------------------------------------------------------------------------------------

/** POSTs one sender may have out at once. */
export const MAX_IN_FLIGHT = 4

/** The bytes of a string as UTF-8. Plain ASCII, the usual case, is counted without calling out of the sandbox. */
export function utf8Bytes(text: string): number {
    // eslint-disable-next-line no-control-regex
    return /^[\x00-\x7f]*$/.test(text) ? text.length : Buffer.byteLength(text)
}

/** One event of an export batch, serialised. */
interface ExportItem {
    uuid: string
    json: string
    bytes: number
}

export class Sender {
    readonly stats: SenderStats = {
        events: 0,
        filtered: 0,
        delivered: 0,
        failed: 0,
        requests: 0,
        retries: 0,
        splits: 0,
        kept: 0,
        failuresByCause: {},
    }
    private readonly queue: QueuedEvent[] = []
    private inFlight = 0
    private gathering = false
    /** Calls waiting for their event's fate (queued or in a POST), and the most of them in the current round. */
    private pending = 0
    private roundPeak = 0
    /**
     * The most calls seen waiting at once, in any round so far: how many the host starts together (it waits for
     * all of them to settle before starting more). Once that many are waiting, no more are coming, so they go
     * at once: on the Kafka path the calls of a micro-batch arrive spread out, not together.
     */
    private learnedBurst = 0
    private lastArrival = 0
    private failedRequestsInStreak = 0

    /** Where a batch the webhook could not take waits (PostHog's plugin storage); null: it fails as before. */
    outbox: Outbox | null = null
    /** The one attempt hook of every POST this sender makes: onEvent's batches, export batches and drains. */
    private readonly countAttempt: NonNullable<DeliveryHooks['onAttempt']> = (outcome, _durationMs, attempt) =>
        this.recordAttempt(outcome, attempt)

    /** Whether nothing configured changes an event, so an export batch goes out exactly as the host gave it. */
    private readonly sendsAsReceived: boolean
    /** Where the host's cache can serialise, export batches are serialised there. */
    private hostJson: HostJson | null = null

    constructor(
        readonly config: ParsedConfig,
        readonly env: SenderEnv
    ) {
        this.sendsAsReceived = sendsAsReceived(config, env)
    }

    /** Serialises export batches through the host's cache from now on (see HostJson). */
    useHostJson(cache: SerialisingCache): void {
        this.hostJson = new HostJson(cache, this.env)
    }

    /** Gives this sender an outbox over the host's storage and cache. */
    useOutbox(storage: PluginStorage, cache: PluginCache | null, count: OutboxIo['count']): Outbox {
        this.outbox = new Outbox({
            storage,
            cache: cache ?? memoryCache(),
            config: this.config,
            env: this.env,
            count: (metric, value) => {
                // What a drain sends counts as delivered here too: these counters say what reached the webhook.
                if (metric === 'outbox_events_delivered') {
                    this.stats.delivered += value
                }
                count(metric, value)
            },
            deliver: (items, webhookIdFor, deadline, oneAttempt) =>
                deliver(items, oneAttempt ? { ...this.config, maxAttempts: 1 } : this.config, this.env, deadline, {
                    onAttempt: this.countAttempt,
                    webhookIdFor,
                }),
        })
        return this.outbox
    }

    /** The outbox, where it may keep what failed; with outboxMaxMb 0 it only drains what an earlier config kept. */
    private get keeper(): Outbox | null {
        return this.config.outboxBytes > 0 ? this.outbox : null
    }

    /** The config a request goes out with: one attempt while the webhook is known down (see Outbox). */
    private get sendConfig(): ParsedConfig {
        return this.keeper?.deliveryConfig(this.config) ?? this.config
    }

    /**
     * Resolves once the webhook accepted this event (or the event was filtered out); rejects if it was not accepted.
     * The event is queued synchronously, so a burst of calls made together goes out together.
     */
    send(event: AnyEvent): Promise<void> {
        this.stats.events++
        if (!shouldSend(event.event, this.config)) {
            this.stats.filtered++
            return Promise.resolve()
        }
        let json: string
        try {
            json = JSON.stringify(shapeEvent(event, this.config.excludedProperties))
        } catch (error) {
            const name = errorName(error)
            return Promise.reject(new Error(`event ${event.uuid} could not be serialised as JSON (${name})`))
        }
        const promise = new Promise<void>((resolve, reject) => {
            const deadline = this.env.now() + this.config.deadlineMs
            this.queue.push({ uuid: event.uuid, json, bytes: utf8Bytes(json), deadline, resolve, reject })
        })
        this.pending++
        this.roundPeak = Math.max(this.roundPeak, this.pending)
        this.lastArrival = this.env.now()
        this.schedule()
        return promise
    }

    /** Events waiting for a POST, for tools that show progress. */
    get queued(): number {
        return this.queue.length
    }

    /**
     * Decides when the queue goes: at once when the whole burst is here; otherwise, when nothing is in flight,
     * after a gather; otherwise when a POST in flight completes.
     */
    private schedule(): void {
        if (this.learnedBurst > 0 && this.pending >= this.learnedBurst) {
            this.dispatch()
        } else if (this.inFlight === 0 && !this.gathering) {
            this.gathering = true
            void this.gather(this.env.now() + BURST_GATHER_MAX_MS, BURST_GATHER_MAX_TURNS)
        }
    }

    /**
     * Lets the rest of a burst arrive, one event-loop turn at a time, so 10 calls become one POST and not 1 + 9:
     * until no call has come for BURST_IDLE_MS, or BURST_GATHER_MAX_MS in all (the arrival that completes a
     * learned burst sends it at once). A turn at a time, not a loop: the host's loop guard counts a loop's life.
     */
    private gather(until: number, turnsLeft: number): Promise<void> {
        return this.env.yieldTurn().then(() => {
            const now = this.env.now()
            const waiting = this.queue.length > 0 && this.inFlight === 0
            if (waiting && turnsLeft > 1 && now < until && now - this.lastArrival < BURST_IDLE_MS) {
                return this.gather(until, turnsLeft - 1)
            }
            this.gathering = false
            this.dispatch()
            return undefined
        })
    }

    /**
     * Starts POSTs for what is queued, up to MAX_IN_FLIGHT. Each POST settles in a fresh call, not in one long
     * loop: the host's loop guard throws once a single loop has run for 30 s, which a busy sender would reach.
     */
    private dispatch(): void {
        while (this.queue.length > 0 && this.inFlight < MAX_IN_FLIGHT) {
            // Only the first maxBatchEvents items can go in this POST, so only their sizes are looked at.
            const count = takeCount(
                this.queue.slice(0, this.config.maxBatchEvents).map((item) => item.bytes),
                this.config.maxBatchEvents,
                this.config.maxBatchBytes
            )
            this.inFlight++
            void this.post(this.queue.splice(0, count))
        }
    }

    private async post(batch: QueuedEvent[]): Promise<void> {
        // FIFO: the first item has the earliest deadline, so the batch must finish by then, outbox write included.
        const callDeadline = batch[0]?.deadline ?? this.env.now()
        const deadline = callDeadline - (this.keeper ? OUTBOX_WRITE_RESERVE_MS : 0)
        let results: Settled<QueuedEvent>[]
        try {
            results = this.keeper?.skipsWebhook(this.env.now())
                ? [this.knownDown(batch)]
                : await deliver(batch, this.sendConfig, this.env, deadline, {
                      onAttempt: this.countAttempt,
                  })
            if (this.keeper && results.some((result) => result.error && result.retryable)) {
                results = await this.keepFailed(results, callDeadline)
            }
        } catch (error) {
            // Only a bug gets here; still, no call may be left hanging, and the next batch still goes.
            const failure = new Error(`the connector failed unexpectedly (${errorName(error)}); the event was not sent`)
            results = [{ items: batch, error: failure, retryable: false, webhookId: '' }]
        }
        this.inFlight--
        this.settle(results)
        // What queued while this POST was out has waited long enough: it goes now, without another gather.
        this.dispatch()
    }

    /** A batch not sent because the webhook is known down: it goes to the outbox like a failed one. */
    private knownDown<T extends { json: string; uuid: string }>(items: T[]): DeliveryResult<T> {
        const since = new Date(this.keeper?.downSince ?? this.env.now()).toISOString()
        const error = new RetryError(`not sent: webhook ${this.config.redactedUrl} has been failing since ${since}`)
        return { items, error, retryable: true, webhookId: batchWebhookId(items) }
    }

    /**
     * Puts the groups that failed in a way that can pass into the outbox, each as the body it was sent as. A
     * kept group counts as handled; one the outbox refused keeps its error, which now also says why.
     */
    private async keepFailed<T extends { json: string; uuid: string }>(
        results: Settled<T>[],
        waitUntil: number
    ): Promise<Settled<T>[]> {
        const outbox = this.keeper as Outbox
        const failed = results.filter((result) => result.error && result.retryable)
        const entries = failed.map((result) => ({
            id: result.webhookId,
            body: batchBody(result.items),
            events: result.items.length,
        }))
        const outcome = await outbox.keep(entries, waitUntil)
        const refused = new Set(outcome.refused)
        return results.map((result) => {
            const index = failed.indexOf(result)
            const entry = entries[index]
            if (index < 0 || !entry) {
                return result
            }
            if (!refused.has(entry)) {
                return { ...result, error: null, kept: true }
            }
            const message = `${result.error?.message ?? ''}; ${outcome.why ?? 'the outbox could not keep it'}`
            return { ...result, error: new RetryError(message) }
        })
    }

    private recordAttempt(outcome: Outcome, attempt: number): void {
        this.stats.requests++
        if (attempt > 1) {
            this.stats.retries++
        }
        if (outcome.kind === 'delivered') {
            this.keeper?.markUp()
            if (this.failedRequestsInStreak > 0) {
                this.env.logger.info(
                    `Webhook ${this.config.redactedUrl} recovered after ${this.failedRequestsInStreak} failed request(s).`
                )
            }
            this.failedRequestsInStreak = 0
            return
        }
        if (outcome.kind === 'split') {
            this.stats.splits++
        }
        // One log line per failure streak, not one per event or request: a down webhook must not flood the log.
        if (this.failedRequestsInStreak === 0) {
            this.env.logger.warn(
                redactText(`Webhook ${this.config.redactedUrl} is failing: ${outcome.reason}.`, this.config.secrets)
            )
        }
        this.failedRequestsInStreak++
        if (this.failedRequestsInStreak >= DOWN_AFTER_FAILED_REQUESTS && outcome.kind === 'retry') {
            this.keeper?.markDown(this.env.now())
        }
    }

    /**
     * One batch from the host's export buffer, POSTed as one body (split in halves only if the receiver answers
     * 413), with the same filters, shape, retries and signing as onEvent's batches. Resolves once the webhook
     * accepted every event, or the outbox kept what it did not take. Otherwise it rejects with a RetryError when
     * a later try could succeed (hosts that still retry re-queue the batch), or with a plain Error when the
     * receiver refused for good.
     */
    exportBatch(events: readonly AnyEvent[]): Promise<void> {
        // From the call's start: the host's guard counts the serialising too.
        const callDeadline = this.env.now() + this.config.deadlineMs
        this.stats.events += events.length
        if (!this.sendsAsReceived || events.length === 0) {
            return this.exportItems(events, callDeadline)
        }
        const fromHost = this.hostJson?.batchBody(events) ?? null
        return fromHost === null
            ? this.exportBody(events, wholeBatchBody(events), callDeadline)
            : fromHost.then((body) => this.exportBody(events, body ?? wholeBatchBody(events), callDeadline))
    }

    private exportBody(events: readonly AnyEvent[], body: string | null, callDeadline: number): Promise<void> {
        return body === null ? this.exportItems(events, callDeadline) : this.exportWhole(events, body, callDeadline)
    }

    /**
     * The batch as the host handed it, in one JSON.stringify, as one POST: no work per event beyond that. A 413
     * sends it again the itemised way, which splits it; a failure that can pass leaves the body in the outbox.
     */
    private exportWhole(events: readonly AnyEvent[], body: string, callDeadline: number): Promise<void> {
        const count = events.length
        const webhookId = bodyWebhookId(body)
        const fate: Promise<BodyFate> = this.keeper?.skipsWebhook(this.env.now())
            ? Promise.resolve(this.knownDownFate())
            : sendBody(body, webhookId, {
                  config: this.sendConfig,
                  env: this.env,
                  deadline: callDeadline - (this.keeper ? OUTBOX_WRITE_RESERVE_MS : 0),
                  hooks: { onAttempt: this.countAttempt },
                  budget: { tooLarge: 0 },
              })
        // One `.then` on the clean path: the host guards each one.
        return fate.then((ended): void | Promise<void> => {
            if (ended.kind === 'delivered') {
                this.countHandled({ items: events as AnyEvent[], error: null, retryable: false, webhookId })
                return undefined
            }
            if (ended.kind === 'split') {
                // Within the same call deadline: the host's guard counts the whole call.
                return this.exportItems(events, callDeadline)
            }
            const error = `batch of ${count} events to ${this.config.redactedUrl}: ${ended.message}`
            const keeper = this.keeper
            if (!ended.retryable || !keeper) {
                return this.failWhole(count, redactText(error, this.config.secrets), ended.retryable)
            }
            const entry = { id: webhookId, body, events: count }
            return keeper.keep([entry], callDeadline).then((kept) => {
                if (kept.refused.length === 0) {
                    this.stats.kept += count
                    return
                }
                const why = `${error}; ${kept.why ?? 'the outbox could not keep it'}`
                this.failWhole(count, redactText(why, this.config.secrets), true)
            })
        })
    }

    private knownDownFate(): BodyFate {
        const since = new Date(this.keeper?.downSince ?? this.env.now()).toISOString()
        return { kind: 'failed', message: `not sent: webhook has been failing since ${since}`, retryable: true }
    }

    /** Counts a whole batch as failed and throws what the host should see: RetryError when a later try can pass. */
    private failWhole(count: number, message: string, retryable: boolean): never {
        this.stats.failed += count
        const cause = retryable ? 'retryable' : 'permanent'
        this.stats.failuresByCause[cause] = (this.stats.failuresByCause[cause] ?? 0) + count
        const what = `${count} of the ${count} events of this batch were not accepted: ${message}`
        throw retryable
            ? new RetryError(`${what}; PostHog will retry the batch where it still retries`)
            : new Error(what)
    }

    /** Serialises each event on its own: where filters or removed properties apply, and after a 413. */
    private exportItems(events: readonly AnyEvent[], callDeadline: number): Promise<void> {
        const { items, unserialisable } = this.serialiseAll(events)
        if (items.length === 0) {
            return new Promise<void>((resolve) => resolve(this.settleExport([], events.length, unserialisable)))
        }
        const deadline = callDeadline - (this.keeper ? OUTBOX_WRITE_RESERVE_MS : 0)
        const sent: Promise<Settled<ExportItem>[]> = this.keeper?.skipsWebhook(this.env.now())
            ? Promise.resolve([this.knownDown(items)])
            : deliver(items, this.sendConfig, this.env, deadline, {
                  onAttempt: this.countAttempt,
                  webhookIdFor: batchWebhookId,
              })
        // One `.then` on the clean path: the host guards each one.
        return sent.then((results) => {
            if (this.keeper && results.some((result) => result.error && result.retryable)) {
                return this.keepFailed(results, callDeadline).then((kept) =>
                    this.settleExport(kept, events.length, unserialisable)
                )
            }
            return this.settleExport(results, events.length, unserialisable)
        })
    }

    private serialiseAll(events: readonly AnyEvent[]): { items: ExportItem[]; unserialisable: string[] } {
        const items: ExportItem[] = []
        const unserialisable: string[] = []
        for (const event of events) {
            if (!shouldSend(event.event, this.config)) {
                this.stats.filtered++
                continue
            }
            try {
                const json = JSON.stringify(shapeEvent(event, this.config.excludedProperties))
                items.push({ uuid: event.uuid, json, bytes: utf8Bytes(json) })
            } catch (error) {
                unserialisable.push(`event ${event.uuid} could not be serialised as JSON (${errorName(error)})`)
            }
        }
        return { items, unserialisable }
    }

    private settleExport(results: Settled<ExportItem>[], total: number, unserialisable: string[]): void {
        let failed = unserialisable.length
        let retryable = false
        let first: Error | null = unserialisable.length ? new Error(unserialisable.join('; ')) : null
        for (const result of results) {
            if (!result.error) {
                this.countHandled(result)
                continue
            }
            failed += result.items.length
            retryable = retryable || result.retryable
            first = first ?? result.error
            const cause = result.retryable ? 'retryable' : 'permanent'
            this.stats.failuresByCause[cause] = (this.stats.failuresByCause[cause] ?? 0) + result.items.length
        }
        this.stats.failed += failed
        if (!first) {
            return
        }
        const what = `${failed} of the ${total} events of this batch were not accepted: ${first.message}`
        throw retryable
            ? new RetryError(`${what}; PostHog will retry the batch where it still retries`)
            : new Error(what)
    }

    /** Counts a group that needs nothing more (accepted, or kept); an accepted one may start a drain. */
    private countHandled(result: Settled<unknown>): void {
        if (result.kept) {
            this.stats.kept += result.items.length
            return
        }
        this.stats.delivered += result.items.length
        this.outbox?.drainInBackground()
    }

    private settle(results: Settled<QueuedEvent>[]): void {
        for (const result of results) {
            const { items, error, retryable } = result
            if (!error) {
                this.countHandled(result)
            }
            for (const item of items) {
                this.pending--
                if (error) {
                    this.stats.failed++
                    const cause = retryable ? 'retryable' : 'permanent'
                    this.stats.failuresByCause[cause] = (this.stats.failuresByCause[cause] ?? 0) + 1
                    item.reject(error)
                } else {
                    item.resolve()
                }
            }
        }
        if (this.pending === 0) {
            // The largest round so far: a round cut short by a fast POST must not teach a smaller burst.
            this.learnedBurst = Math.max(this.learnedBurst, this.roundPeak)
            this.roundPeak = 0
        }
    }
}

/** A group's fate after delivery and, where it failed, after the outbox: `kept` when the outbox took it. */
type Settled<T> = DeliveryResult<T> & { kept?: boolean }

// ---------------------------------------------------------------------------------------------------------------
// The outbox: what the webhook could not take waits in PostHog's plugin storage (rows in its Postgres) and goes
// out, oldest first, once the webhook answers again. docs/hosts.md says where each PostHog version keeps it.
// ---------------------------------------------------------------------------------------------------------------

/** `meta.storage` as every classic host has it: JSON values, `set` an upsert, one table for every thread. */
export interface PluginStorage {
    get: (key: string, defaultValue: unknown) => Promise<unknown>
    set: (key: string, value: unknown) => Promise<void>
    del: (key: string) => Promise<void>
}

/**
 * The part of `meta.cache` (Redis) the plugin uses, with PostHog's signatures. The outbox: an atomic counter hands
 * out entry numbers, and another, with a TTL, is the lock. HostJson: `set` with a TTL and `get` of the raw text.
 */
export interface PluginCache {
    get: (key: string, defaultValue: unknown, options?: { jsonSerialize?: boolean }) => Promise<unknown>
    incr: (key: string) => Promise<number>
    expire: (key: string, ttlSeconds: number) => Promise<unknown>
    set: (key: string, value: unknown, ttlSeconds?: number) => Promise<unknown>
}

/** An entry number not yet counted into the index: first seen missing at `since`, when `below` were handed out. */
export interface OutboxGap {
    entry: number
    since: number
    below: number
}

/**
 * The outbox's index, one storage row. Entries `head` (the oldest) to `tail` are counted in `events` and `bytes`;
 * numbers from `tail` up to the counter in the cache were handed to writers and are counted in once written.
 * Each entry's body is stored in pieces under `pieceKey(number, piece)`.
 */
export interface OutboxState {
    head: number
    tail: number
    events: number
    bytes: number
    /** When the oldest kept entry was written (ms), or null when the outbox is empty. */
    since: number | null
    /** When a drain last had an entry accepted (ms): other VMs learn from it that the webhook is back. */
    deliveredAt: number
    /** Events kept since the outbox was last empty, and its peak size then, for the line logged once it is. */
    keptInOutage: number
    peakBytes: number
    /** The first number past `tail` whose entry is not there yet, while its writer may still be writing it. */
    gap: OutboxGap | null
    /** Entries already sent and counted out whose pieces may still be stored: `[entry, pieces]`, deleted next. */
    reclaim: Array<[number, number]>
}

/** One body the webhook did not take: sent again later as the same bytes with the same `webhook-id`. */
export interface OutboxEntry {
    id: string
    body: string
    events: number
}

/** What a stored piece holds; the first piece of an entry also carries its header. */
interface StoredPiece {
    body: string
    id?: string
    pieces?: number
    events?: number
    /** The whole body's length, and when its writer began writing it (ms). */
    bytes?: number
    at?: number
    /** Set instead of the entry by a writer that failed to write it: the number is skipped at once. */
    abandoned?: boolean
}

/** An entry's first piece, read back: its header. */
export interface EntryHeader {
    id: string
    pieces: number
    events: number
    bytes: number
    at: number
}

/** What the merge found at an entry number: the whole entry, its first pieces only, a writer's mark, or nothing. */
export type EntrySeen =
    | { kind: 'whole'; header: EntryHeader }
    | { kind: 'partial'; header: EntryHeader }
    | { kind: 'abandoned' }
    | { kind: 'missing' }

export interface KeepResult {
    kept: number
    refused: OutboxEntry[]
    /** Why entries were refused (the outbox is full, off, or storage failed), or null. */
    why: string | null
}

export type DrainResult =
    | { kind: 'empty' }
    | { kind: 'busy' }
    | { kind: 'drained'; entries: number; events: number; left: number; stillDown: boolean }

export function emptyOutboxState(): OutboxState {
    return {
        head: 0,
        tail: 0,
        events: 0,
        bytes: 0,
        since: null,
        deliveredAt: 0,
        keptInOutage: 0,
        peakBytes: 0,
        gap: null,
        reclaim: [],
    }
}

const isCount = (value: unknown): value is number => typeof value === 'number' && Number.isFinite(value) && value >= 0

/** The stored index, checked field by field: a missing or damaged row reads as an empty outbox. */
export function readOutboxState(value: unknown): OutboxState {
    const state = emptyOutboxState()
    if (typeof value !== 'object' || value === null) {
        return state
    }
    const stored = value as Record<string, unknown>
    const count = (name: keyof OutboxState): number => {
        const field = stored[name]
        return isCount(field) ? field : 0
    }
    state.head = count('head')
    state.tail = Math.max(count('tail'), state.head)
    state.events = count('events')
    state.bytes = count('bytes')
    state.since = typeof stored.since === 'number' ? stored.since : null
    state.deliveredAt = count('deliveredAt')
    state.keptInOutage = count('keptInOutage')
    state.peakBytes = count('peakBytes')
    const gap = stored.gap as Partial<OutboxGap> | null | undefined
    if (gap && isCount(gap.entry) && isCount(gap.since) && isCount(gap.below)) {
        state.gap = { entry: gap.entry, since: gap.since, below: gap.below }
    }
    if (Array.isArray(stored.reclaim)) {
        state.reclaim = stored.reclaim.filter(
            (pair): pair is [number, number] => Array.isArray(pair) && isCount(pair[0]) && isCount(pair[1])
        )
    }
    return state
}

export function pieceKey(entry: number, piece: number): string {
    return `outbox/${entry}/${piece}`
}

/** Cuts a body into pieces of at most `maxChars` characters; an empty body is one empty piece. */
export function slicePieces(body: string, maxChars: number): string[] {
    const pieces: string[] = []
    for (let start = 0; start < body.length; start += maxChars) {
        pieces.push(body.slice(start, start + maxChars))
    }
    return pieces.length > 0 ? pieces : ['']
}

/** An entry's header from its stored first piece, or null when that is not one. */
export function readEntryHeader(value: unknown): (EntryHeader & { body: string }) | null {
    const piece = value as StoredPiece | null
    if (!piece || typeof piece.body !== 'string' || typeof piece.id !== 'string' || !(Number(piece.pieces) >= 1)) {
        return null
    }
    return {
        body: piece.body,
        id: piece.id,
        pieces: Number(piece.pieces),
        events: isCount(piece.events) ? piece.events : 0,
        // Entries kept before these fields existed were counted in when written: their size is read from the body.
        bytes: isCount(piece.bytes) ? piece.bytes : piece.body.length,
        at: isCount(piece.at) ? piece.at : 0,
    }
}

/**
 * Which entries fit: each is kept if the outbox has room for it, else refused. When the outbox is full the
 * newest events are refused, never the oldest dropped: what was kept stays, and the refusal is a failure PostHog
 * counts (or retries, where it still retries).
 */
export function planKeep(
    state: OutboxState,
    entries: readonly OutboxEntry[],
    limitBytes: number
): { kept: OutboxEntry[]; refused: OutboxEntry[] } {
    const kept: OutboxEntry[] = []
    const refused: OutboxEntry[] = []
    let bytes = state.bytes
    for (const entry of entries) {
        if (bytes + entry.body.length <= limitBytes) {
            kept.push(entry)
            bytes += entry.body.length
        } else {
            refused.push(entry)
        }
    }
    return { kept, refused }
}

/** The index after the whole entry at `tail` was counted in. */
export function afterKeep(state: OutboxState, header: Pick<EntryHeader, 'events' | 'bytes' | 'at'>): OutboxState {
    const bytes = state.bytes + header.bytes
    const tail = state.tail + 1
    return {
        ...state,
        tail,
        events: state.events + header.events,
        bytes,
        since: state.since ?? header.at,
        keptInOutage: state.keptInOutage + header.events,
        peakBytes: Math.max(state.peakBytes, bytes),
        gap: state.gap && tail < state.gap.below ? state.gap : null,
    }
}

/**
 * What the merge does with the entry number at `tail`, given what it found there and the counter's value:
 * - a whole entry is counted in; one its writer marked abandoned is skipped, and the mark deleted;
 * - a partial one (its writer failed, or died, between pieces) waits for its writer until
 *   OUTBOX_ENTRY_WRITE_MAX_MS after it began, then is skipped and its pieces deleted;
 * - a missing one waits as well: the first time it is seen missing it becomes the `gap`, with the counter's value
 *   then; once the gap is that old, every number below that value that is still missing is skipped (its writer
 *   failed before writing, or died).
 */
export function judgeEntry(
    state: OutboxState,
    seen: EntrySeen,
    counter: number,
    now: number
): { action: 'count' | 'skip' | 'wait'; state: OutboxState; deletePieces: number } {
    const entry = state.tail
    const skip = (deletePieces: number) => {
        const tail = entry + 1
        const gap = state.gap && tail < state.gap.below ? state.gap : null
        return { action: 'skip' as const, state: { ...state, tail, gap }, deletePieces }
    }
    if (seen.kind === 'whole') {
        return { action: 'count', state: afterKeep(state, seen.header), deletePieces: 0 }
    }
    if (seen.kind === 'abandoned') {
        return skip(1)
    }
    if (seen.kind === 'partial') {
        const stale = now - seen.header.at >= OUTBOX_ENTRY_WRITE_MAX_MS
        return stale ? skip(seen.header.pieces) : { action: 'wait', state, deletePieces: 0 }
    }
    const gap = state.gap
    if (gap && gap.entry <= entry && entry < gap.below) {
        return now - gap.since >= OUTBOX_ENTRY_WRITE_MAX_MS ? skip(0) : { action: 'wait', state, deletePieces: 0 }
    }
    return { action: 'wait', state: { ...state, gap: { entry, since: now, below: counter } }, deletePieces: 0 }
}

/**
 * The index after entry `entry` left the outbox (delivered, refused for good, or found gone), before its pieces
 * are deleted: they are listed in `reclaim` so that whoever holds the lock next deletes them if this VM does not.
 */
export function afterDrained(
    state: OutboxState,
    entry: number,
    removed: { events: number; bytes: number; pieces: number },
    deliveredAt: number | null
): OutboxState {
    const next: OutboxState = {
        ...state,
        head: Math.max(state.head, entry + 1),
        tail: Math.max(state.tail, entry + 1),
        events: Math.max(0, state.events - removed.events),
        bytes: Math.max(0, state.bytes - removed.bytes),
        deliveredAt: deliveredAt ?? state.deliveredAt,
        reclaim: removed.pieces > 0 ? [[entry, removed.pieces]] : [],
    }
    if (next.head >= next.tail) {
        return { ...next, events: 0, bytes: 0, since: null, keptInOutage: 0, peakBytes: 0 }
    }
    return next
}

/** Whether the index and the counter say nothing waits and nothing is left to delete. */
export function outboxIsEmpty(state: OutboxState, counter: number): boolean {
    return state.head >= state.tail && counter <= state.tail && state.reclaim.length === 0
}

export function megabytes(bytes: number): string {
    return (bytes / BYTES_PER_MB).toFixed(bytes < BYTES_PER_MB ? 2 : 1)
}

export function describeOutbox(state: OutboxState, limitBytes: number): string {
    const since = state.since === null ? '' : ` since ${new Date(state.since).toISOString()}`
    return `${state.events} events kept${since}; the outbox holds ${megabytes(state.bytes)} of ${megabytes(limitBytes)} MB`
}

/** Storage for hosts that have none (PostHog's CDP): the outbox lives as long as this VM, no longer. */
export function memoryStorage(): PluginStorage {
    const values = new Map<string, string>()
    return {
        get: (key, defaultValue) => {
            const value = values.get(key)
            return Promise.resolve(value === undefined ? defaultValue : (JSON.parse(value) as unknown))
        },
        set: (key, value) => {
            values.set(key, JSON.stringify(value))
            return Promise.resolve()
        },
        del: (key) => {
            values.delete(key)
            return Promise.resolve()
        },
    }
}

/** The cache that goes with memoryStorage: this VM alone uses it, so a TTL has nothing to free. */
export function memoryCache(): PluginCache {
    const values = new Map<string, unknown>()
    return {
        get: (key, defaultValue) => Promise.resolve(values.has(key) ? values.get(key) : defaultValue),
        set: (key, value) => {
            values.set(key, value)
            return Promise.resolve()
        },
        incr: (key) => {
            const next = (Number(values.get(key)) || 0) + 1
            values.set(key, next)
            return Promise.resolve(next)
        },
        expire: () => Promise.resolve(true),
    }
}

/** Counters the plugin shows in PostHog's UI where the host has plugin metrics (2021 to early 2022). */
export const metrics = {
    outbox_events_kept: 'sum',
    outbox_events_delivered: 'sum',
    outbox_events_refused: 'sum',
    outbox_events_dropped: 'sum',
} as const
export type OutboxMetric = keyof typeof metrics

/** What the outbox needs from its host and its sender. */
export interface OutboxIo {
    storage: PluginStorage
    /** The host's cache, or memoryCache() where the outbox is in memory too. */
    cache: PluginCache
    config: ParsedConfig
    env: SenderEnv
    /**
     * Sends kept items as one body (413 splits as usual), counting the requests as the sender's own; with
     * `oneAttempt`, a single request (the webhook is known down: one request finds out whether it is back).
     */
    deliver: (
        items: ExportItem[],
        webhookIdFor: (group: readonly { json: string; uuid: string }[]) => string,
        deadline: number,
        oneAttempt: boolean
    ) => Promise<DeliveryResult<ExportItem>[]>
    count: (metric: OutboxMetric, value: number) => void
}

type EntryOutcome = { kind: 'done'; events: number; state: OutboxState } | { kind: 'failed' }

/** A held lock: when its last refresh began, which bounds when it can expire. */
interface HeldLock {
    since: number
}

/** The events of a kept body, as items to send again; null when the body is not a JSON array. */
export function parseKeptBody(body: string): ExportItem[] | null {
    let parsed: unknown
    try {
        parsed = JSON.parse(body)
    } catch {
        return null
    }
    if (!Array.isArray(parsed)) {
        return null
    }
    return parsed.map((event: unknown) => {
        const json = JSON.stringify(event)
        const uuid = (event as { uuid?: unknown } | null)?.uuid
        return { uuid: typeof uuid === 'string' ? uuid : '', json, bytes: utf8Bytes(json) }
    })
}

function storageErrorText(error: unknown, secrets: readonly string[]): string {
    const message = (error as { message?: unknown } | null)?.message
    const text = typeof message === 'string' ? `: ${message.slice(0, ERROR_BODY_SNIPPET_CHARS)}` : ''
    return redactText(`${errorName(error)}${text}`, secrets)
}

/** Raised by a writer whose call's deadline came before its entry was written. */
class OutOfTime extends Error {}

/**
 * The outbox. Writers never wait on one another: each takes its own entry number from a counter in the cache and
 * writes its entry's pieces, first piece (with the header) first. The index is changed only under the lock: by
 * a writer that finds it free, counting in every whole entry past the tail, or by a drain, which counts in and
 * sends until the outbox is empty or its time is spent. docs/hosts.md walks through each failure.
 */
export class Outbox {
    /** When this VM found the webhook down (ms), or null while it is taken to be up. */
    downSince: number | null = null
    /** When a call last tried the webhook while it was known down. */
    private lastProbe = 0
    /** Whether the outbox may hold entries, as far as this VM knows; a new VM does not know, so it looks once. */
    mayHaveEntries = true
    /** Keeps started in this VM: a drain's early read cannot clear `mayHaveEntries` past one that came later. */
    private keeps = 0
    private draining: Promise<DrainResult> | null = null
    private lastRefusalLog = 0

    constructor(private readonly io: OutboxIo) {}

    /**
     * Whether a batch should go straight to the outbox: while the webhook is known down, calls must not wait on
     * it. Once a minute a call tries it anyway, for hosts where no runEveryMinute drain finds out it is back.
     */
    skipsWebhook(now: number): boolean {
        if (this.downSince === null) {
            return false
        }
        if (now - this.lastProbe >= PROBE_INTERVAL_MS) {
            this.lastProbe = now
            return false
        }
        return true
    }

    /** The config a request goes out with: while the webhook is known down, one attempt, no retry ladder. */
    deliveryConfig(config: ParsedConfig): ParsedConfig {
        return this.downSince === null ? config : { ...config, maxAttempts: 1 }
    }

    markDown(now: number): void {
        if (this.downSince === null) {
            this.downSince = now
            this.lastProbe = now
        }
    }

    markUp(): void {
        this.downSince = null
    }

    /**
     * Writes entries to the outbox; what could not be kept comes back with why. Never rejects, and never waits
     * for another writer: a failure here fails only these entries, as a storage failure.
     */
    keep(entries: OutboxEntry[], deadline: number): Promise<KeepResult> {
        this.keeps++
        this.mayHaveEntries = true
        return this.keepNow(entries, deadline).catch((error: unknown) => this.refuse(entries, this.failedWhy(error)))
    }

    private failedWhy(error: unknown): string {
        if (error instanceof OutOfTime) {
            return 'the call ran out of time before its batch was written to the outbox'
        }
        return `PostHog's plugin storage failed (${storageErrorText(error, this.io.config.secrets)})`
    }

    private async keepNow(entries: OutboxEntry[], deadline: number): Promise<KeepResult> {
        const { config } = this.io
        if (config.outboxBytes <= 0) {
            return this.refuse(entries, null)
        }
        const state = await this.readState()
        this.learnFrom(state, null)
        const plan = planKeep(state, entries, config.outboxBytes)
        if (plan.kept.length === 0) {
            return this.refuse(entries, `the outbox is full (${describeOutbox(state, config.outboxBytes)})`)
        }
        const written: OutboxEntry[] = []
        let failure: unknown = null
        for (const entry of plan.kept) {
            try {
                await this.writeEntry(entry, state, deadline)
                written.push(entry)
            } catch (error) {
                failure = error
                break
            }
        }
        const unwritten = plan.kept.slice(written.length)
        if (written.length > 0) {
            this.noteKept(state, written)
            await this.countInIfFree()
        }
        const why = failure
            ? this.failedWhy(failure)
            : plan.refused.length > 0
              ? `the outbox is full (${describeOutbox(state, config.outboxBytes)})`
              : null
        const events = written.reduce((sum, entry) => sum + entry.events, 0)
        return { ...this.refuse([...unwritten, ...plan.refused], why), kept: events }
    }

    /** One entry under its own number: the first piece (with the header) first, so a partial entry is known. */
    private async writeEntry(entry: OutboxEntry, state: OutboxState, deadline: number): Promise<void> {
        const { storage, env } = this.io
        const number = await this.claimNumber(state)
        const pieces = slicePieces(entry.body, OUTBOX_PIECE_CHARS)
        const header = { id: entry.id, pieces: pieces.length, events: entry.events, bytes: entry.body.length }
        const at = env.now()
        let tried = 0
        try {
            for (const [index, body] of pieces.entries()) {
                if (env.now() > deadline) {
                    throw new OutOfTime()
                }
                tried = index + 1
                const piece: StoredPiece = index === 0 ? { body, ...header, at } : { body }
                await this.retried(() => storage.set(pieceKey(number, index), piece))
            }
        } catch (error) {
            await this.abandon(number, tried)
            throw error
        }
    }

    /**
     * Nothing of a failed entry stays: the host is told it failed, and retries or counts it. Its first piece
     * becomes a mark that lets the next count-in skip the number at once, instead of waiting for a writer that
     * gave up; if even that fails, the count-in skips it after OUTBOX_ENTRY_WRITE_MAX_MS.
     */
    private async abandon(entry: number, tried: number): Promise<void> {
        const { storage } = this.io
        try {
            await this.deletePieces(entry, tried, 1)
            await this.retried(() => storage.set(pieceKey(entry, 0), { body: '', abandoned: true }))
        } catch {
            await this.retried(() => storage.del(pieceKey(entry, 0))).catch(() => undefined)
        }
    }

    /**
     * This writer's entry number. A number below the index's tail, or one whose first piece exists, means the
     * cache lost the counter: it is moved past the tail, once, and a number taken again.
     */
    private async claimNumber(state: OutboxState, again = true): Promise<number> {
        const { cache, storage } = this.io
        const number = (await this.retried(() => cache.incr(OUTBOX_SEQ_KEY))) - 1
        const taken = number < state.tail || (await this.retried(() => storage.get(pieceKey(number, 0), null))) !== null
        if (!taken) {
            return number
        }
        if (!again) {
            throw new Error('the outbox counter in the cache is behind the stored index')
        }
        await this.retried(() => cache.set(OUTBOX_SEQ_KEY, Math.max(number, state.tail) + OUTBOX_SEQ_HEADROOM))
        return this.claimNumber(state, false)
    }

    /** Deletes an entry's pieces below `pieces`, the first piece last: while it exists, the rest can be found. */
    private async deletePieces(entry: number, pieces: number, from = 0): Promise<void> {
        for (let index = pieces - 1; index >= from; index--) {
            await this.retried(() => this.io.storage.del(pieceKey(entry, index)))
        }
    }

    /** A storage or cache call, tried again at once when it fails: one lost connection must not refuse a batch. */
    private retried<T>(call: () => Promise<T>, attempts = OUTBOX_CALL_ATTEMPTS): Promise<T> {
        return call().catch((error: unknown) =>
            attempts > 1 ? this.retried(call, attempts - 1) : Promise.reject(error)
        )
    }

    private async readState(): Promise<OutboxState> {
        return readOutboxState(await this.retried(() => this.io.storage.get(OUTBOX_STATE_KEY, null)))
    }

    /** How many entry numbers were handed out: every entry is numbered below it. */
    private async readCounter(): Promise<number> {
        const value = Number(await this.retried(() => this.io.cache.get(OUTBOX_SEQ_KEY, 0)))
        return isCount(value) ? value : 0
    }

    /** Counts and logs what was refused: the first refusal of a streak, then at most one line a minute. */
    private refuse(entries: OutboxEntry[], why: string | null): KeepResult {
        const events = entries.reduce((sum, entry) => sum + entry.events, 0)
        if (events > 0 && why) {
            this.io.count('outbox_events_refused', events)
            const now = this.io.env.now()
            if (now - this.lastRefusalLog >= PROBE_INTERVAL_MS) {
                this.lastRefusalLog = now
                this.io.env.logger.error(`${events} events could not be kept for a later try: ${why}.`)
            }
        }
        return { kept: 0, refused: entries, why }
    }

    /** One line per outage, when the outbox goes from empty to holding something. */
    private noteKept(before: OutboxState, kept: readonly OutboxEntry[]): void {
        const events = kept.reduce((sum, entry) => sum + entry.events, 0)
        this.io.count('outbox_events_kept', events)
        if (before.since === null) {
            const after = { ...before, events: before.events + events, since: this.io.env.now() }
            after.bytes += kept.reduce((sum, entry) => sum + entry.body.length, 0)
            this.io.env.logger.warn(
                `Webhook ${this.io.config.redactedUrl} is not taking events: they wait in PostHog's plugin storage ` +
                    `and go out oldest first once it answers again, checked every minute (` +
                    `${describeOutbox(after, this.io.config.outboxBytes)}).`
            )
        }
    }

    /**
     * What the stored index tells this VM: whether there is anything to drain (unless this VM kept something
     * since `keeps` was read), and whether the webhook is back.
     */
    private learnFrom(state: OutboxState, keeps: number | null, counter = state.tail): void {
        if (keeps === this.keeps) {
            this.mayHaveEntries = !outboxIsEmpty(state, counter)
        }
        if (this.downSince !== null && state.deliveredAt > this.downSince) {
            this.markUp()
        }
    }

    /**
     * The lock, if it is free: the first `incr` of the key gets 1 and holds it. It is never waited for. The second
     * comer sets the TTL too, in case the holder died between its incr and its expire.
     */
    private async tryLock(): Promise<HeldLock | null> {
        const { cache, env } = this.io
        const since = env.now()
        const holders = await this.retried(() => cache.incr(OUTBOX_LOCK_KEY))
        if (holders <= 2) {
            await this.retried(() => cache.expire(OUTBOX_LOCK_KEY, OUTBOX_LOCK_TTL_SECONDS))
        }
        return holders === 1 ? { since } : null
    }

    /** Whether the lock is surely still this holder's: its TTL, set after `since`, cannot have run out. */
    private holds(lock: HeldLock): boolean {
        return this.io.env.now() - lock.since < OUTBOX_LOCK_SAFE_MS
    }

    /** Extends the lock before a step; false, and the step is not taken, once it may have expired. */
    private async refresh(lock: HeldLock): Promise<boolean> {
        if (!this.holds(lock)) {
            return false
        }
        const since = this.io.env.now()
        await this.retried(() => this.io.cache.expire(OUTBOX_LOCK_KEY, OUTBOX_LOCK_TTL_SECONDS))
        lock.since = since
        return true
    }

    /**
     * Frees the lock, only while it is surely still this holder's: else its TTL frees it. A failed release is
     * tried again, as every other call is: left to its TTL, the lock would hold every drain off for a minute.
     */
    private async unlock(lock: HeldLock): Promise<void> {
        if (!this.holds(lock)) {
            return
        }
        try {
            await this.retried(() => this.io.cache.set(OUTBOX_LOCK_KEY, 0))
        } catch {
            // The TTL frees it.
        }
    }

    /** A writer counts in what was written, if the lock is free; if not, its holder or the next drain does. */
    private async countInIfFree(): Promise<void> {
        try {
            const lock = await this.tryLock()
            if (!lock) {
                return
            }
            try {
                await this.countIn(await this.readState(), lock)
            } finally {
                await this.unlock(lock)
            }
        } catch {
            // The entries are written: counting them in is left to the next holder of the lock.
        }
    }

    /** Under the lock: counts in every entry written past the tail, and stores the index if that moved it. */
    private async countIn(state: OutboxState, lock: HeldLock): Promise<OutboxState> {
        const counter = await this.readCounter()
        const next = await this.countFrom(state, counter, lock)
        if (next !== state) {
            await this.writeState(next, lock)
        }
        return next
    }

    /** Entry after entry, as a chain of calls rather than a loop (the host's loop guard counts a loop's life). */
    private async countFrom(state: OutboxState, counter: number, lock: HeldLock): Promise<OutboxState> {
        if (state.tail >= counter || !this.holds(lock)) {
            return state
        }
        const step = judgeEntry(state, await this.inspect(state.tail), counter, this.io.env.now())
        if (step.deletePieces > 0) {
            await this.deletePieces(state.tail, step.deletePieces)
        }
        return step.action === 'wait' ? step.state : this.countFrom(step.state, counter, lock)
    }

    /** What is stored under an entry number: whole, partial (its last piece missing), or nothing. */
    private async inspect(entry: number): Promise<EntrySeen> {
        const first = await this.retried(() => this.io.storage.get(pieceKey(entry, 0), null))
        const header = readEntryHeader(first)
        if (!header) {
            return (first as StoredPiece | null)?.abandoned === true ? { kind: 'abandoned' } : { kind: 'missing' }
        }
        if (header.pieces > 1) {
            const last = await this.retried(() => this.io.storage.get(pieceKey(entry, header.pieces - 1), null))
            if (last === null) {
                return { kind: 'partial', header }
            }
        }
        return { kind: 'whole', header }
    }

    /** Stores the index, only while the lock is surely held: a holder that lost it must not overwrite another's. */
    private async writeState(state: OutboxState, lock: HeldLock): Promise<void> {
        if (!this.holds(lock)) {
            throw new Error('the outbox lock was held too long to be sure it is still held')
        }
        await this.retried(() => this.io.storage.set(OUTBOX_STATE_KEY, state))
    }

    /**
     * Sends what the outbox holds, oldest first, until it is empty (entries kept meanwhile included) or its time
     * is spent: it starts no entry after DRAIN_START_WITHIN_MS, inside PostHog's 30 s limit. Costs one storage
     * read and one cache read when the outbox is empty. A drain already going (in this VM, or anywhere else,
     * through the lock) makes this one return at once.
     */
    drain(): Promise<DrainResult> {
        if (!this.draining) {
            this.draining = this.drainNow().finally(() => {
                this.draining = null
            })
        }
        return this.draining
    }

    /** A drain started after a request went through, when the outbox may hold entries; its errors are logged. */
    drainInBackground(): void {
        if (this.draining || !this.mayHaveEntries) {
            return
        }
        this.drain().catch((error: unknown) =>
            this.io.env.logger.warn(
                `The outbox could not be drained: ${storageErrorText(error, this.io.config.secrets)}.`
            )
        )
    }

    private async drainNow(): Promise<DrainResult> {
        const started = this.io.env.now()
        const keeps = this.keeps
        const state = await this.readState()
        const counter = await this.readCounter()
        this.learnFrom(state, keeps, counter)
        if (outboxIsEmpty(state, counter)) {
            return { kind: 'empty' }
        }
        const lock = await this.tryLock()
        if (!lock) {
            return { kind: 'busy' }
        }
        try {
            // Read again under the lock: a drain or a writer that just let it go may have moved the index.
            return await this.drainLocked(await this.readState(), lock, started, keeps)
        } finally {
            await this.unlock(lock)
        }
    }

    private async drainLocked(first: OutboxState, lock: HeldLock, started: number, keeps: number) {
        await this.reclaim(first)
        const totals = { entries: 0, events: 0 }
        const { outcome, state } = await this.drainFrom(first, lock, started, totals)
        let last = state
        if (last.reclaim.length > 0 && this.holds(lock)) {
            // The last entry's pieces are gone (drainEntry deleted them): the index need not list them any more.
            last = { ...last, reclaim: [] }
            await this.writeState(last, lock)
        }
        if (outcome === 'failed') {
            this.markDown(this.io.env.now())
        }
        this.learnFrom(last, outcome === 'done' ? keeps : null)
        const left = Math.max(0, last.tail - last.head)
        return { kind: 'drained' as const, ...totals, left, stillDown: outcome === 'failed' }
    }

    /** Deletes the pieces of entries sent before, which a drain that stopped early left listed in the index. */
    private async reclaim(state: OutboxState): Promise<void> {
        for (const [entry, pieces] of state.reclaim) {
            await this.deletePieces(entry, pieces)
        }
    }

    /** Entry after entry, as a chain of calls rather than a loop (the host's loop guard counts a loop's life). */
    private async drainFrom(
        state: OutboxState,
        lock: HeldLock,
        started: number,
        totals: { entries: number; events: number }
    ): Promise<{ outcome: 'done' | 'failed' | 'paused'; state: OutboxState }> {
        if (this.io.env.now() - started >= DRAIN_START_WITHIN_MS || !(await this.refresh(lock))) {
            return { outcome: 'paused', state }
        }
        let current = state
        if (current.head >= current.tail) {
            // Entries kept since this drain began are counted in and sent too.
            current = await this.countIn(current, lock)
            if (current.head >= current.tail) {
                return { outcome: 'done', state: current }
            }
        }
        const outcome = await this.drainEntry(current, lock, started + DRAIN_DEADLINE_MS)
        if (outcome.kind === 'failed') {
            return { outcome: 'failed', state: current }
        }
        totals.entries++
        totals.events += outcome.events
        return this.drainFrom(outcome.state, lock, started, totals)
    }

    /**
     * Sends the entry at the head. Once it is accepted, the index is stored first (the entry counted out, its
     * pieces listed to reclaim), then its pieces are deleted: a failure between the two leaves pieces the next
     * holder deletes, and a failure before stores nothing, so the entry is sent again with its same webhook-id.
     */
    private async drainEntry(state: OutboxState, lock: HeldLock, deadline: number): Promise<EntryOutcome> {
        const entry = state.head
        const stored = await this.readEntry(entry)
        if (!stored) {
            // Counted in, then gone (deleted by hand, or by an older version of the plugin): nothing to send.
            const next = afterDrained(state, entry, { events: 0, bytes: 0, pieces: 0 }, null)
            await this.writeState(next, lock)
            return { kind: 'done', events: 0, state: next }
        }
        const items = parseKeptBody(stored.body) ?? []
        const results = await this.io.deliver(
            items,
            (group) => (group.length === items.length ? stored.id : batchWebhookId(group)),
            deadline,
            this.downSince !== null
        )
        if (results.some((result) => result.error && result.retryable)) {
            // Still down: the entry stays whole, with its webhook-id, for the next drain.
            return { kind: 'failed' }
        }
        const delivered = results.filter((result) => !result.error).reduce((sum, r) => sum + r.items.length, 0)
        this.dropRefused(results, stored.events - items.length)
        const next = afterDrained(state, entry, stored, this.io.env.now())
        await this.writeState(next, lock)
        this.markUp()
        this.io.count('outbox_events_delivered', delivered)
        this.noteEmptied(state, next)
        await this.deletePieces(entry, stored.pieces)
        return { kind: 'done', events: delivered, state: next }
    }

    /** The drain that empties the outbox says so, once. */
    private noteEmptied(before: OutboxState, after: OutboxState): void {
        if (before.since !== null && after.since === null) {
            this.io.env.logger.info(
                `Webhook ${this.io.config.redactedUrl} is taking events again: the ${before.keptInOutage} events kept ` +
                    `since ${new Date(before.since).toISOString()} were sent (the outbox held at most ` +
                    `${megabytes(before.peakBytes)} MB); the outbox is empty.`
            )
        }
    }

    /** Kept events the receiver now refuses for good are dropped, counted and logged: retrying cannot help. */
    private dropRefused(results: DeliveryResult<ExportItem>[], unreadable: number): void {
        const refused = results.filter((result) => result.error && !result.retryable)
        const events = refused.reduce((sum, result) => sum + result.items.length, 0) + unreadable
        if (events === 0) {
            return
        }
        this.io.count('outbox_events_dropped', events)
        const why = refused[0]?.error?.message ?? 'the kept body could not be read back'
        this.io.env.logger.error(`${events} kept events were dropped, refused for good: ${why}`)
    }

    private async readEntry(entry: number): Promise<(EntryHeader & { body: string }) | null> {
        const header = readEntryHeader(await this.retried(() => this.io.storage.get(pieceKey(entry, 0), null)))
        if (!header) {
            return null
        }
        let body = header.body
        for (let index = 1; index < header.pieces; index++) {
            const piece = (await this.retried(() =>
                this.io.storage.get(pieceKey(entry, index), null)
            )) as StoredPiece | null
            if (!piece || typeof piece.body !== 'string') {
                return null
            }
            body += piece.body
        }
        return { ...header, body }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host adaptation: pick the fetch, the logger and the scheduling primitives that this host has.
// ---------------------------------------------------------------------------------------------------------------

/** Turns `console` or the CDP executor's `meta.logger` into a Logger, whichever methods it has. */
export function toLogger(sink: unknown): Logger {
    const target = (typeof sink === 'object' && sink !== null ? sink : {}) as Record<string, unknown>
    const pick = (...names: string[]): ((message: string) => void) => {
        for (const name of names) {
            const fn = target[name]
            if (typeof fn === 'function') {
                return (message) => (fn as (m: string) => void).call(sink, message)
            }
        }
        return () => undefined
    }
    return { info: pick('info', 'log'), warn: pick('warn', 'log'), error: pick('error', 'log') }
}

async function microtaskTurns(count: number): Promise<void> {
    for (let i = 0; i < count; i++) {
        await Promise.resolve()
    }
}

/**
 * One event-loop turn in a sandbox without timers: crypto's callback form runs in Node's thread pool and calls
 * back from a later macrotask, which lets the host deliver calls that are still on their way.
 */
function cryptoTurn(): Promise<void> {
    return new Promise((resolve) => randomBytes(1, () => resolve()))
}

/** The cheapest way this host has to wait one event-loop turn. */
export function hostYieldTurn(): () => Promise<void> {
    if (typeof setImmediate === 'function') {
        return () => new Promise((resolve) => setImmediate(resolve))
    }
    return typeof randomBytes === 'function' ? cryptoTurn : () => microtaskTurns(BURST_GATHER_MICROTASKS)
}

/** Builds the environment from what this host provides. `meta.fetch` and `meta.logger` exist only in the CDP executor. */
export function hostEnv(meta: { fetch?: unknown; logger?: unknown }): SenderEnv {
    const hasTimers = typeof setTimeout === 'function'
    let transport: Transport
    let timeoutEnforced: boolean
    if (typeof meta.fetch === 'function') {
        transport = metaFetchTransport(meta.fetch as MetaFetch)
        timeoutEnforced = true
    } else if (typeof fetch === 'function') {
        transport = fetchTransport(fetch as unknown as FetchLike)
        timeoutEnforced = (typeof AbortController === 'function' && hasTimers) || isNodeFetchV2(fetch)
    } else {
        throw new Error('This PostHog host provides no fetch, so the connector cannot send events.')
    }
    return {
        transport,
        timeoutEnforced,
        logger: toLogger(meta.logger ?? console),
        now: () => Date.now(),
        sleep: hasTimers ? (ms) => new Promise((resolve) => setTimeout(resolve, ms)) : null,
        random: Math.random,
        yieldTurn: hostYieldTurn(),
    }
}

function createSender(meta: PatternsMeta): Sender {
    const config = parseConfig(meta.config)
    const sender = new Sender(config, hostEnv(meta as { fetch?: unknown; logger?: unknown }))
    const host = meta as { storage?: unknown; cache?: unknown; metrics?: unknown }
    const storage = hasMethods<PluginStorage>(host.storage, ['get', 'set', 'del'])
    const cache = hasMethods<PluginCache>(host.cache, ['get', 'incr', 'expire', 'set'])
    // Shared by every VM only with both; with outboxMaxMb 0, an outbox over them still drains what was kept.
    const shared = storage && cache ? { storage, cache } : null
    if (config.outboxBytes > 0 || shared) {
        sender.useOutbox(shared?.storage ?? memoryStorage(), shared?.cache ?? null, metricCounter(host.metrics))
    }
    const serialising = hasMethods<SerialisingCache>(host.cache, ['get', 'set', 'expire'])
    if (serialising) {
        sender.useHostJson(serialising)
    }
    return sender
}

function hasMethods<T>(value: unknown, names: readonly string[]): T | null {
    const target = value as Record<string, unknown> | null | undefined
    return target && names.every((name) => typeof target[name] === 'function') ? (value as T) : null
}

/** `meta.metrics` where the host shows plugin metrics (2021 to early 2022); elsewhere counting does nothing. */
export function metricCounter(hostMetrics: unknown): OutboxIo['count'] {
    return (metric, value) => {
        try {
            const counter = (hostMetrics as Record<string, { increment?: (n: number) => void }> | undefined)?.[metric]
            counter?.increment?.(value)
        } catch {
            // The host refuses metric names it was not told about: nothing to show there.
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PostHog hooks. Both handlers are exported, and exactly one delivers on each host: exportEvents where the host
// has an export path (it buffers events and calls exportEvents with each batch), onEvent everywhere else.
// ---------------------------------------------------------------------------------------------------------------

/** What PostHog's classic sandbox puts in scope before the plugin's code runs; absent on other hosts. */
declare const __pluginHostMeta: unknown

/**
 * Whether the host certainly buffers every event for exportEvents, read from `__pluginHostMeta`, which the
 * classic sandbox fills before this module runs (it collects the exports only afterwards). Its `metrics` member,
 * the plugin metrics, existed from July 2021 (plugin-server #480) until May 2022 (posthog #9627), and only on
 * hosts that also have the export path (May 2021 to November 2023). Without it nothing is certain: false.
 */
export function hostCertainlyBuffers(hostMeta: unknown): boolean {
    if (typeof hostMeta !== 'object' || hostMeta === null) {
        return false
    }
    // Only the member's type is read: the 2021 host's metrics object throws on any unknown property.
    const metrics = (hostMeta as { metrics?: unknown }).metrics
    return typeof metrics === 'object' && metrics !== null
}

/** Read once, while the module loads; `typeof` keeps hosts without the global from a ReferenceError. */
const HOST_CERTAINLY_BUFFERS = hostCertainlyBuffers(
    typeof __pluginHostMeta === 'undefined' ? undefined : __pluginHostMeta
)

/**
 * Whether this host will call exportEvents with every event: it sets these keys on `meta.global` before
 * setupPlugin, only when it has an export path (2021 to November 2023). Since December 2023, and in the CDP,
 * they are never set and exportEvents is never called.
 */
export function hostExportsEvents(global: Partial<PatternsGlobal> | undefined): boolean {
    return global?.exportEventsBuffer != null && global.exportEventsWithRetry != null
}

export const setupPlugin: PatternsPlugin['setupPlugin'] = (meta) => {
    // Parsing here makes bad config fail at install time, with a message naming the field.
    const sender = senderFor(meta)
    const how = hostExportsEvents(meta.global) ? "in the batches PostHog's export buffer hands over" : 'in batches'
    sender.env.logger.info(`Sending events to ${sender.config.redactedUrl} ${how}.`)
}

/** The sender of this VM; a host that skipped setupPlugin (or a job in a fresh VM) gets one made here. */
function senderFor(meta: PatternsMeta): Sender {
    if (!meta.global.sender) {
        meta.global.sender = createSender(meta)
        meta.global.config = meta.global.sender.config
    }
    return meta.global.sender
}

/**
 * Not async on purpose: the host guards every await in the plugin, and returning the sender's promise costs none.
 * It settles when the webhook accepted the event, or rejects with the reason it was not. Where the host has an
 * export path, its wrapper has already put the event in its buffer, so this returns at once: exportEvents sends it.
 */
const sendOnEvent: NonNullable<PatternsPlugin['onEvent']> = (event, meta) => {
    if (hostExportsEvents(meta.global)) {
        return undefined
    }
    try {
        return senderFor(meta).send(event)
    } catch (error) {
        return Promise.reject(error)
    }
}

/**
 * Where the host certainly buffers (2021 to April 2022), no onEvent at all: the host then never calls into the
 * sandbox per event, and its wrapper still fills the export buffer. Everywhere else, both handlers.
 */
export const onEvent: PatternsPlugin['onEvent'] = HOST_CERTAINLY_BUFFERS ? undefined : sendOnEvent

/**
 * Called by hosts with an export path with each batch of their buffer (1 MiB or 10 s by default). A RetryError
 * makes the host re-queue the whole batch in its job queue (up to 15 times over about 54 hours in 2021, 3 times
 * in 2022–2023, none from August 2023); any other error is final.
 */
export const exportEvents: PatternsPlugin['exportEvents'] = (events, meta) => {
    try {
        return senderFor(meta).exportBatch(events)
    } catch (error) {
        return Promise.reject(error)
    }
}

/**
 * Drains the outbox, on the hosts that run scheduled tasks: one storage read when it is empty, and while the
 * webhook is down, one request a minute to find out when it is back.
 */
export const runEveryMinute: PatternsPlugin['runEveryMinute'] = (meta) => {
    const outbox = senderFor(meta).outbox
    return outbox ? outbox.drain().then(() => undefined) : undefined
}

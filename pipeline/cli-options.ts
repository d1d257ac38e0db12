/**
 * The webhook half of the command line, shared by `replay` and `sync`: the flags, their checks and messages, and
 * the plugin's config built from them (by the plugin's own parseConfig, so the CLIs and the plugin agree). Each
 * CLI adds its own source flags (an input file, or PostHog) next to these.
 */
import {
    ConfigError,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    hostEnv,
    parseConfig,
    ParsedConfig,
    SenderEnv,
} from '../index'
import { batchBodyBytes } from './body'
import { UsageError } from './errors'
import { DEFAULT_CONCURRENCY } from './index'
import { didYouMean, FLAG_OF_CONFIG_KEY, inFlagWords } from './usage'

export { UsageError }

/**
 * --retry-for's default: how long one batch keeps retrying before the run stops. A command has no host to
 * guard it, so it may wait far longer than the plugin's 25 s per call; a resume sends the rest.
 */
export const DEFAULT_RETRY_FOR_MS = 120_000

/** With a time budget, attempts are not what ends a batch's retries (--retry-for is). */
export const TIME_BUDGET_MAX_ATTEMPTS = 1_000_000

/** The delivery flags both CLIs take, as node:util parseArgs options. */
export const DELIVERY_OPTIONS = {
    'webhook-url': { type: 'string' },
    'allowed-events': { type: 'string' },
    'excluded-events': { type: 'string' },
    'excluded-properties': { type: 'string' },
    'custom-headers': { type: 'string' },
    'signing-secret': { type: 'string' },
    concurrency: { type: 'string' },
    'batch-events': { type: 'string' },
    'batch-bytes': { type: 'string' },
    timeout: { type: 'string' },
    'retry-for': { type: 'string' },
    checkpoint: { type: 'string' },
    'dead-letter': { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
} as const

/** The delivery flags' values as parseArgs returns them. */
export interface DeliveryValues {
    'webhook-url'?: string
    'allowed-events'?: string
    'excluded-events'?: string
    'excluded-properties'?: string
    'custom-headers'?: string
    'signing-secret'?: string
    concurrency?: string
    'batch-events'?: string
    'batch-bytes'?: string
    timeout?: string
    'retry-for'?: string
    checkpoint?: string
    'dead-letter'?: string
}

/** The numeric delivery flags: a negative value given to one must reach its range check (joinNegativeNumbers). */
const NUMERIC_OPTIONS = ['concurrency', 'batch-events', 'batch-bytes', 'timeout', 'retry-for']

/** What every duration flag takes, in its help and its error. */
export const DURATION_FORMS = '500ms, 30s, 2m, 1h or 7d (a bare number is seconds)'

const DURATION_UNIT_MS: Readonly<Record<string, number>> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/**
 * A duration flag's value in milliseconds: "500ms", "30s", "2m", "1h", "7d", or a bare number of seconds. One
 * parser for every duration flag of both commands, so each takes the same forms; the message names the flag.
 */
export function parseDuration(flag: string, text: string): number {
    const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(text.trim())
    if (!match) {
        throw new UsageError(`--${flag}: expected a duration such as ${DURATION_FORMS}; got "${text}"`)
    }
    return Math.round(Number(match[1]) * (DURATION_UNIT_MS[match[2] ?? 's'] ?? 1_000))
}

/** A duration flag in ms, or `fallback` when it is absent; more than 0 unless `allowZero` (--lag 0s). */
export function durationFlag(flag: string, text: string | undefined, fallback: number, allowZero = false): number {
    if (text === undefined) {
        return fallback
    }
    const ms = parseDuration(flag, text)
    if (ms <= 0 && !allowZero) {
        throw new UsageError(`--${flag}: must be more than 0 (${DURATION_FORMS}); got "${text}"`)
    }
    return ms
}

/**
 * A whole number from 1 (to `max` if given), or `fallback` when the flag is absent. The message names the flag and
 * repeats what was typed: numeric flags hold no secret.
 */
export function wholeNumber(flag: string, text: string | undefined, fallback: number, max?: number): number {
    if (text === undefined) {
        return fallback
    }
    const value = Number(text)
    if (!Number.isInteger(value) || value < 1 || (max !== undefined && value > max)) {
        const range = max === undefined ? 'of at least 1' : `from 1 to ${max}`
        throw new UsageError(`--${flag}: expected a whole number ${range}, got "${text}"`)
    }
    return value
}

/**
 * `--concurrency -1` would read as an option named -1 ("argument is ambiguous"): a value that looks like a
 * number is joined to its numeric option, so it reaches the range check that names the flag.
 */
export function joinNegativeNumbers(argv: string[], numeric: readonly string[] = NUMERIC_OPTIONS): string[] {
    const joined: string[] = []
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i] as string
        const value = argv[i + 1]
        if (numeric.includes(arg.replace(/^--/, '')) && arg.startsWith('--') && /^-[\d.]/.test(value ?? '')) {
            joined.push(`${arg}=${value}`)
            i++
        } else {
            joined.push(arg)
        }
    }
    return joined
}

/**
 * Node's parseArgs message as a usage error: its first line only (a value given to a flag is not repeated, it
 * could be a secret), with the fix for the one that says "ambiguous", and the closest of the `known` flags for an
 * unknown one.
 */
export function usageMessage(error: Error, known: readonly string[] = Object.keys(DELIVERY_OPTIONS)): string {
    const ambiguous = /Option '(-[^ ']+)[^']*' argument is ambiguous/.exec(error.message)
    const flag = ambiguous?.[1] ?? 'the option'
    // Of Node's message for an unknown option only its first sentence: the rest is about positional arguments.
    const firstLine = (error.message.split('\n')[0] ?? 'bad arguments').replace(/^(Unknown option '[^']*')\..*$/, '$1')
    const message = ambiguous
        ? `${flag}: its value starts with "-"; write ${flag}=VALUE, or give it a value`
        : firstLine
    return `${message}.${didYouMean(message, known)} Run with --help for the options.`
}

/** The sender environment for a Node process: real fetch, timers, and nothing logged per request. */
export function nodeEnv(): SenderEnv {
    // The plugin's own host adaptation: Node has fetch, AbortController and timers. The commands print their own
    // progress and warnings, so the sender's log lines are dropped, and bodies are written as bytes.
    return { ...hostEnv({ logger: {} }), encodeBody: batchBodyBytes }
}

/** The message when no webhook URL is given, the same for every command. */
export const WEBHOOK_URL_REQUIRED =
    '--webhook-url is required: the URL of your webhook (or set PATTERNS_WEBHOOK_URL, which keeps it out of ' +
    'shell history)'

/** The environment variables the secret flags fall back to. */
const ENV_OF_FLAG: Readonly<Record<string, string>> = {
    'webhook-url': 'PATTERNS_WEBHOOK_URL',
    'custom-headers': 'PATTERNS_CUSTOM_HEADERS',
    'signing-secret': 'PATTERNS_SIGNING_SECRET',
}

/**
 * The plugin's config error in the command line's words: the flag (or the environment variable the value came
 * from) instead of the plugin's config key, in the lead and in the fix.
 */
export function configErrorMessage(error: ConfigError, values: DeliveryValues): string {
    const detail = inFlagWords(error.message.replace(/^Invalid config "[^"]*": /, ''))
    const flag = FLAG_OF_CONFIG_KEY[error.field] as keyof DeliveryValues | undefined
    if (!flag) {
        return detail
    }
    const env = ENV_OF_FLAG[flag]
    return `${values[flag] === undefined && env ? env : `--${flag}`}: ${detail}`
}

/** The webhook URL from --webhook-url, else PATTERNS_WEBHOOK_URL (the documented way: it stays out of `ps`). */
export function webhookUrlFrom(values: DeliveryValues, env: Record<string, string | undefined>): string | undefined {
    return values['webhook-url'] ?? env.PATTERNS_WEBHOOK_URL
}

export interface DeliverySettings {
    config: ParsedConfig
    /** --retry-for in ms: how long one batch may keep failing (Infinity: no limit). */
    retryForMs: number
    concurrency: number
    checkpointFile: string | null
    deadLetterFile: string | null
}

/**
 * The plugin's config and the run's delivery settings from the flags and the environment; errors name the field,
 * never its value. `retryForIsBudget`: --retry-for is the whole budget of a batch (retries and Retry-After waits
 * go on until it is spent) rather than a deadline over the plugin's own count of attempts.
 */
export function deliverySettings(
    values: DeliveryValues,
    env: Record<string, string | undefined>,
    webhookUrl: string,
    retryForIsBudget: boolean,
    defaultRetryForMs: number = DEFAULT_RETRY_FOR_MS
): DeliverySettings {
    // Infinity by default for a feed that follows: it waits out any outage (pipeline/outage.ts).
    const retryForMs = durationFlag('retry-for', values['retry-for'], defaultRetryForMs)
    const overrides = {
        requestTimeoutMs: durationFlag('timeout', values.timeout, DEFAULT_REQUEST_TIMEOUT_MS),
        deadlineMs: retryForMs,
        ...(retryForIsBudget ? { maxAttempts: TIME_BUDGET_MAX_ATTEMPTS, retryAfterCapMs: retryForMs } : {}),
        maxBatchEvents: wholeNumber('batch-events', values['batch-events'], DEFAULT_MAX_BATCH_EVENTS),
        maxBatchBytes: wholeNumber('batch-bytes', values['batch-bytes'], DEFAULT_MAX_BATCH_BYTES),
    }
    let config: ParsedConfig
    try {
        config = parseConfig(
            {
                webhookUrl,
                allowedEventTypes: values['allowed-events'],
                excludedEventTypes: values['excluded-events'],
                excludedProperties: values['excluded-properties'],
                customHeaders: values['custom-headers'] ?? env.PATTERNS_CUSTOM_HEADERS,
                signingSecret: values['signing-secret'] ?? env.PATTERNS_SIGNING_SECRET,
            },
            overrides
        )
    } catch (error) {
        throw new UsageError(
            error instanceof ConfigError ? configErrorMessage(error, values) : (error as Error).message
        )
    }
    return {
        config,
        retryForMs,
        concurrency: wholeNumber('concurrency', values.concurrency, DEFAULT_CONCURRENCY),
        checkpointFile: values.checkpoint ?? null,
        deadLetterFile: values['dead-letter'] ?? null,
    }
}

/** `patterns-connector replay <file | -> --webhook-url URL [options]`: backfill exported events into the webhook. */
import { createReadStream, openSync, ReadStream, statSync } from 'node:fs'
import { Readable } from 'node:stream'
import { parseArgs } from 'node:util'

import {
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_REQUEST_TIMEOUT_MS,
    hostEnv,
    SenderEnv,
} from '../index'
import { batchBodyBytes } from '../pipeline/body'
import {
    DELIVERY_OPTIONS,
    deliverySettings,
    joinNegativeNumbers,
    TIME_BUDGET_MAX_ATTEMPTS,
    UsageError,
    usageMessage,
    webhookUrlFrom,
} from '../pipeline/cli-options'
import { INPUT_FORMATS, InputError, InputFormat } from './input'
import {
    CheckpointError,
    DEFAULT_CONCURRENCY,
    replay,
    REPLAY_BATCH_DEADLINE_MS,
    ReplayProgress,
    ReplayReport,
} from './replay'

export const HELP = `Usage: patterns-connector replay <file | -> --webhook-url URL [options]

Sends exported PostHog events to the webhook with the plugin's own filters, property removal,
signing, retries and 413 splitting. Reads JSON Lines, a JSON array, or PostHog API pages
({"results": [...]}, one per line or concatenated), streaming, in constant memory.

Options (secrets can come from the environment instead, so they stay out of shell history):
  --webhook-url URL            or PATTERNS_WEBHOOK_URL. Never printed.
  --allowed-events LIST        comma-separated event names to send (default: all)
  --excluded-events LIST       comma-separated event names to skip
  --excluded-properties LIST   property names to remove, e.g. "$ip,email"
  --custom-headers JSON        or PATTERNS_CUSTOM_HEADERS, e.g. '{"Authorization":"Bearer ..."}'
  --signing-secret SECRET      or PATTERNS_SIGNING_SECRET (whsec_...)
  --concurrency K              requests in flight (default: ${DEFAULT_CONCURRENCY})
  --batch-events N             events per request at most (default: ${DEFAULT_MAX_BATCH_EVENTS})
  --batch-bytes N              bytes per request at most (default: ${DEFAULT_MAX_BATCH_BYTES})
  --timeout SECONDS            per-request timeout (default: ${DEFAULT_REQUEST_TIMEOUT_MS / 1000})
  --retry-for SECONDS          the whole budget of one batch: retries with backoff and Retry-After waits
                               until it is spent, then the run stops (default: ${REPLAY_BATCH_DEADLINE_MS / 1000})
  --format FORMAT              auto, ${INPUT_FORMATS.join(', ')} (default: auto, from the first bytes)
  --checkpoint FILE            resume from FILE and keep it up to date; the same command resumes. It is
                               bound to this input, its filters and the webhook: another one is refused
  --dead-letter FILE           append refused events and unreadable lines here (JSON Lines)
  --dry-run                    read, filter and batch, report what would be sent, send nothing
  -h, --help                   show this help

Exit codes: 0 every event was delivered or deliberately filtered; 1 anything else (see the summary);
2 bad usage: a flag, a missing, unreadable or compressed input, a checkpoint of another input.
Compressed input goes through standard input: gunzip -c FILE | patterns-connector replay - [options]
Ctrl-C finishes the requests in flight, writes the checkpoint and exits.
`

export { UsageError }

/** Problem lines printed before the rest are only counted. */
export const MAX_WARNING_LINES = 20

/** Replay's own per-batch budget: time, not a count of attempts (--retry-for). */
export const REPLAY_MAX_ATTEMPTS = TIME_BUDGET_MAX_ATTEMPTS

const OPTIONS = {
    ...DELIVERY_OPTIONS,
    format: { type: 'string', default: 'auto' },
    'dry-run': { type: 'boolean', default: false },
} as const

export function parseReplayArgs(argv: string[], env: Record<string, string | undefined>) {
    let parsed
    try {
        parsed = parseArgs({ args: joinNegativeNumbers(argv), allowPositionals: true, strict: true, options: OPTIONS })
    } catch (error) {
        throw new UsageError(usageMessage(error as Error))
    }
    const { values, positionals } = parsed
    if (values.help) {
        return null
    }
    if (positionals.length !== 1) {
        throw new UsageError('give exactly one input: a file path, or - for standard input')
    }
    const format = values.format
    if (format !== 'auto' && !(INPUT_FORMATS as readonly string[]).includes(format)) {
        throw new UsageError(`--format: expected auto, ${INPUT_FORMATS.join(', ')}; got "${format}"`)
    }
    const webhookUrl = webhookUrlFrom(values, env)
    if (!webhookUrl && !values['dry-run']) {
        throw new UsageError('--webhook-url (or PATTERNS_WEBHOOK_URL) is required')
    }
    return {
        input: positionals[0] ?? '-',
        format: format as InputFormat | 'auto',
        // --retry-for is the whole budget of a batch: retries and Retry-After waits go on until it is spent.
        ...deliverySettings(values, env, webhookUrl ?? 'https://dry-run.invalid/', true),
        dryRun: values['dry-run'],
    }
}

/** A readable input file and its size, or why not (a missing file, a directory, no permission). */
function openInputFile(path: string): { size: number; stream: ReadStream } | string {
    const cannot = (error: unknown) =>
        `cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? 'error'}; give a file path, or - for standard input`
    let stats
    let fd
    try {
        stats = statSync(path)
        if (stats.isDirectory()) {
            return `cannot read ${path}: it is a directory; give a file in it, or - for standard input`
        }
        // Opened here, so a file without read permission is bad usage too, not a failure halfway.
        fd = openSync(path, 'r')
    } catch (error) {
        return cannot(error)
    }
    // The default 64 KB reads: bigger reads only keep more decoded text alive while its events are in flight.
    return { size: stats.size, stream: createReadStream(path, { fd }) }
}

/** The sender environment for a Node process: real fetch, timers, and nothing logged per request. */
export function nodeEnv(): SenderEnv {
    // The plugin's own host adaptation: Node has fetch, AbortController and timers. The tools print their own
    // progress and warnings, so the sender's log lines are dropped, and bodies are written as bytes.
    return { ...hostEnv({ logger: {} }), encodeBody: batchBodyBytes }
}

function formatDuration(seconds: number): string {
    if (!Number.isFinite(seconds)) {
        return '?'
    }
    const s = Math.round(seconds)
    return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`
}

export function progressLine(p: ReplayProgress, elapsedMs: number, fraction: number | null): string {
    const rate = p.delivered / Math.max(elapsedMs / 1000, 0.001)
    const eta = fraction && fraction > 0 ? ` ETA ${formatDuration((elapsedMs / 1000) * (1 / fraction - 1))}` : ''
    return (
        `read ${p.read}, sent ${p.delivered}, ${Math.round(rate)} events/s, retries ${p.retries}, ` +
        `failures ${p.deadLettered}, in flight ${p.inFlight}${eta}`
    )
}

export function summaryText(report: ReplayReport, dryRun: boolean): string {
    const rows: Array<[string, string | number]> = [
        ['input format', report.format],
        ['records read', report.read],
        ['skipped (checkpoint)', report.skipped],
        [dryRun ? 'would send' : 'delivered', report.delivered],
        ['filtered out', report.filtered],
        ['refused (dead-letter)', report.deadLettered],
        ['unreadable (dead-letter)', report.malformed],
        [dryRun ? 'requests needed' : 'requests', dryRun ? report.batches : report.requests],
        ['retries', report.retries],
        ['bytes', report.bytesSent],
        ['events/s', Math.round(report.delivered / Math.max(report.durationMs / 1000, 0.001))],
        ['checkpoint at record', report.checkpoint],
        ['stopped early', report.stopped ?? 'no'],
    ]
    return rows.map(([k, v]) => `  ${k.padEnd(26)}${v}`).join('\n')
}

type Terminal = NodeJS.WritableStream & { isTTY?: boolean }

/** Progress on one refreshed line on a terminal (every 5 s otherwise), and a bounded number of warning lines. */
function terminal(stderr: Terminal, deadLetterFile: string | null, fraction: () => number | null) {
    const started = Date.now()
    const tty = Boolean(stderr.isTTY)
    let lastPlain = Date.now()
    const onProgress = (p: ReplayProgress): void => {
        const line = progressLine(p, Date.now() - started, fraction())
        if (tty) {
            stderr.write(`\r\x1b[K${line}`)
        } else if (Date.now() - lastPlain >= 5_000) {
            lastPlain = Date.now()
            stderr.write(`${line}\n`)
        }
    }
    // Each problem gets a line, up to a limit, so a file full of bad lines cannot flood the terminal.
    let warnings = 0
    const onWarning = (message: string): void => {
        warnings++
        const where = deadLetterFile ? ` (kept in ${deadLetterFile})` : ''
        if (warnings <= MAX_WARNING_LINES) {
            stderr.write(`${tty ? '\r\x1b[K' : ''}warning: ${message}${where}\n`)
        } else if (warnings === MAX_WARNING_LINES + 1) {
            stderr.write('warning: more problems; the summary counts them all\n')
        }
    }
    return { onProgress, onWarning }
}

export async function runReplayCli(
    argv: string[],
    env: Record<string, string | undefined>,
    io: { stdout: Terminal; stderr: Terminal; stdin: Readable },
    signal?: AbortSignal
): Promise<number> {
    let parsed
    try {
        parsed = parseReplayArgs(argv, env)
    } catch (error) {
        io.stderr.write(`error: ${(error as Error).message}\n`)
        return 2
    }
    if (!parsed) {
        io.stdout.write(HELP)
        return 0
    }
    let input: Readable
    let size: number | null = null
    let bytesRead: () => number = () => 0
    if (parsed.input === '-') {
        input = io.stdin
    } else {
        const opened = openInputFile(parsed.input)
        if (typeof opened === 'string') {
            io.stderr.write(`error: ${opened}\n`)
            return 2
        }
        ;({ size, stream: input } = opened)
        bytesRead = () => opened.stream.bytesRead
    }
    const tty = Boolean(io.stderr.isTTY)
    const { onProgress, onWarning } = terminal(io.stderr, parsed.deadLetterFile, () =>
        size ? bytesRead() / size : null
    )
    let report: ReplayReport
    try {
        const inputLabel = parsed.input === '-' ? null : parsed.input
        report = await replay({ ...parsed, input, inputLabel, env: nodeEnv(), signal, onProgress, onWarning })
    } catch (error) {
        io.stderr.write(`${tty ? '\n' : ''}error: ${(error as Error).message}\n`)
        // An unusable input or checkpoint is found before anything is sent: bad usage.
        return error instanceof InputError || error instanceof CheckpointError ? 2 : 1
    }
    if (tty) {
        io.stderr.write('\n')
    }
    io.stdout.write(
        `${parsed.dryRun ? 'Dry run, nothing sent' : 'Replay finished'}\n${summaryText(report, parsed.dryRun)}\n`
    )
    const clean = !report.stopped && report.deadLettered === 0 && report.malformed === 0
    return clean ? 0 : 1
}

/** `patterns-connector replay <file | - | files… | folder> --webhook-url URL [options]`: backfill exported events into the webhook. */
import { createReadStream, openSync, ReadStream, statSync } from 'node:fs'
import { Readable } from 'node:stream'
import { parseArgs } from 'node:util'

import { DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_EVENTS, DEFAULT_REQUEST_TIMEOUT_MS } from '../index'
import {
    DELIVERY_OPTIONS,
    deliverySettings,
    DURATION_FORMS,
    joinNegativeNumbers,
    nodeEnv,
    TIME_BUDGET_MAX_ATTEMPTS,
    UsageError,
    usageMessage,
    WEBHOOK_URL_REQUIRED,
    webhookUrlFrom,
} from '../pipeline/cli-options'
import {
    CliOutput,
    cliOutput,
    CliStreams,
    deliveryRows,
    eventsPerSecond,
    joinParts,
    progressParts,
    seconds,
    summaryText,
} from '../pipeline/cli-output'
import { logFormatIn, Service, SERVICE_HELP, SERVICE_OPTIONS, serviceSettings, startService } from '../pipeline/service'
import { DEDUPE_WINDOW, isExportInput, runExportsCli } from './exports/cli'
import { INPUT_FORMATS, InputError, InputFormat } from './input'
import {
    CheckpointError,
    DEFAULT_CONCURRENCY,
    replay,
    REPLAY_BATCH_DEADLINE_MS,
    ReplayProgress,
    ReplayReport,
} from './replay'

export const HELP = `Usage: patterns-connector replay <file | folder | manifest ... | -> --webhook-url URL [options]

Sends exported PostHog events to the webhook with the plugin's own filters, property removal,
signing, retries and 413 splitting. Reads PostHog batch-export files (a folder of them, several
files, or a manifest: JSON Lines plain, gzip, brotli or zstd, or Parquet; in interval order), or
one file or standard input of JSON Lines, a JSON array, or PostHog API pages ({"results": [...]},
one per line or concatenated), streaming, in constant memory.

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
  --timeout DURATION           per-request timeout (default: ${DEFAULT_REQUEST_TIMEOUT_MS / 1000}s)
  --retry-for DURATION         the whole budget of one batch: retries with backoff and Retry-After waits
                               until it is spent, then the run stops (default: ${REPLAY_BATCH_DEADLINE_MS / 1000}s)
  --format FORMAT              auto, ${INPUT_FORMATS.join(', ')} (default: auto, from the first bytes)
  --checkpoint FILE            resume from FILE and keep it up to date; the same command resumes. It is
                               bound to this input, its filters and the webhook: another one is refused
  --dead-letter FILE           append refused events and unreadable lines here (JSON Lines)
  --dedupe                     export files: drop an event whose uuid was sent in this run (among the
                               last ${DEDUPE_WINDOW.toLocaleString('en')} uuids); dropped events are counted
  --dry-run                    export files: list what would be read; one file: read, filter and batch,
                               report what would be sent; either way send nothing
  -h, --help                   show this help

${SERVICE_HELP}

Every DURATION: ${DURATION_FORMS}.
Exit codes: 0 every event was delivered or deliberately filtered; 1 anything else (see the summary);
2 bad usage: a flag, a missing or unreadable input, a checkpoint of another input or of a file that
changed since. Compressed standard input: gunzip -c FILE | patterns-connector replay - [options]
Ctrl-C (exit 130) or SIGTERM (exit 143) finishes the requests in flight within 10 s, writes the
checkpoint and exits.
`

export { nodeEnv, UsageError }

/** Problem lines printed before the rest are only counted. */
export const MAX_WARNING_LINES = 20

/** Replay's own per-batch budget: time, not a count of attempts (--retry-for). */
export const REPLAY_MAX_ATTEMPTS = TIME_BUDGET_MAX_ATTEMPTS

const OPTIONS = {
    ...DELIVERY_OPTIONS,
    ...SERVICE_OPTIONS,
    format: { type: 'string', default: 'auto' },
    'dry-run': { type: 'boolean', default: false },
    dedupe: { type: 'boolean', default: false },
} as const

export function parseReplayArgs(argv: string[], env: Record<string, string | undefined>) {
    let parsed
    try {
        parsed = parseArgs({ args: joinNegativeNumbers(argv), allowPositionals: true, strict: true, options: OPTIONS })
    } catch (error) {
        throw new UsageError(usageMessage(error as Error, Object.keys(OPTIONS)))
    }
    const { values, positionals } = parsed
    if (values.help) {
        return null
    }
    if (positionals.length === 0) {
        throw new UsageError('give an input: export files or a folder of them, a file, or - for standard input')
    }
    if (positionals.length > 1 && positionals.includes('-')) {
        throw new UsageError('- (standard input) cannot be given with other inputs: give it alone')
    }
    const format = values.format
    if (format !== 'auto' && !(INPUT_FORMATS as readonly string[]).includes(format)) {
        throw new UsageError(`--format: expected auto, ${INPUT_FORMATS.join(', ')}; got "${format}"`)
    }
    const webhookUrl = webhookUrlFrom(values, env)
    if (!webhookUrl && !values['dry-run']) {
        throw new UsageError(`${WEBHOOK_URL_REQUIRED}; or --dry-run to send nothing`)
    }
    return {
        input: positionals[0] ?? '-',
        inputs: positionals,
        dedupe: values.dedupe,
        format: format as InputFormat | 'auto',
        // --retry-for is the whole budget of a batch: retries and Retry-After waits go on until it is spent.
        ...deliverySettings(values, env, webhookUrl ?? 'https://dry-run.invalid/', true),
        dryRun: values['dry-run'],
        service: serviceSettings(values),
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

/**
 * read, sent, rate, retries, failures, in flight, and an ETA once something is sent and the input's size is
 * known: the records to come are estimated from the share of the input read, at the pace of sending (reading
 * runs ahead of it, so the share read alone would promise the end too early).
 */
export function progressLine(p: ReplayProgress, elapsedMs: number, fraction: number | null): string {
    const handled = p.delivered + p.filtered + p.deadLettered
    const remaining = fraction && fraction > 0 ? Math.max(0, p.read / fraction - handled) : null
    const eta = remaining !== null && handled > 0 ? `ETA ${seconds((remaining / handled) * elapsedMs)}` : null
    return joinParts([progressParts(p, elapsedMs), eta])
}

/** The summary: every row true for this run (no checkpoint row without --checkpoint, say). */
export function replaySummary(
    report: ReplayReport,
    run: { dryRun: boolean; checkpointFile: string | null; deadLetterFile: string | null }
): string {
    const { dryRun, checkpointFile } = run
    return summaryText([
        ['input format', report.format],
        ['records read', report.read],
        checkpointFile ? ['skipped (checkpoint)', report.skipped] : null,
        ...deliveryRows(report, run.deadLetterFile, dryRun),
        [dryRun ? 'requests needed' : 'requests', dryRun ? report.batches : report.requests],
        ['retries', report.retries],
        ['bytes', report.bytesSent],
        ['events/s', eventsPerSecond(report.delivered, report.durationMs)],
        checkpointFile && !dryRun ? ['checkpoint at record', report.checkpoint] : null,
        ['stopped early', report.stopped ?? 'no'],
    ])
}

/** Progress through the shared output, and a bounded number of warning lines. */
function terminal(output: CliOutput, deadLetterFile: string | null, fraction: () => number | null) {
    const started = Date.now()
    const onProgress = (p: ReplayProgress): void => output.progress(progressLine(p, Date.now() - started, fraction()))
    // Each problem gets a line, up to a limit, so a file full of bad lines cannot flood the terminal.
    let warnings = 0
    const onWarning = (message: string): void => {
        warnings++
        const where = deadLetterFile ? ` (kept in ${deadLetterFile})` : ''
        if (warnings <= MAX_WARNING_LINES) {
            output.line(`warning: ${message}${where}`)
        } else if (warnings === MAX_WARNING_LINES + 1) {
            output.line('warning: more problems; the summary counts them all')
        }
    }
    return { onProgress, onWarning }
}

/** The input stream and how much of it is read so far (a share of its size), or why it cannot be read. */
function openInput(path: string, stdin: Readable): { input: Readable; fraction: () => number | null } | string {
    if (path === '-') {
        return { input: stdin, fraction: () => null }
    }
    const opened = openInputFile(path)
    if (typeof opened === 'string') {
        return opened
    }
    const { size, stream } = opened
    return { input: stream, fraction: () => (size ? stream.bytesRead / size : null) }
}

export async function runReplayCli(
    argv: string[],
    env: Record<string, string | undefined>,
    io: CliStreams & { stdin: Readable },
    signal?: AbortSignal
): Promise<number> {
    const secrets = [env.PATTERNS_WEBHOOK_URL, env.PATTERNS_CUSTOM_HEADERS, env.PATTERNS_SIGNING_SECRET]
    const output = cliOutput(io, secrets, logFormatIn(argv))
    let parsed
    try {
        parsed = parseReplayArgs(argv, env)
    } catch (error) {
        output.line(`error: ${(error as Error).message}`)
        return 2
    }
    if (!parsed) {
        output.out(HELP)
        return 0
    }
    output.addSecrets(parsed.config.secrets)
    let service: Service
    try {
        service = await startService({ settings: parsed.service, output, env: nodeEnv() })
    } catch (error) {
        output.line(`error: ${(error as Error).message}`)
        return 2
    }
    try {
        if (isExportInput(parsed.inputs)) {
            return await runExportsCli(parsed, output, signal, service)
        }
        return await replayOneInput(parsed, output, io.stdin, service, signal)
    } finally {
        await service.close()
    }
}

/** One JSON file or standard input. */
async function replayOneInput(
    parsed: NonNullable<ReturnType<typeof parseReplayArgs>>,
    output: CliOutput,
    stdin: Readable,
    service: Service,
    signal?: AbortSignal
): Promise<number> {
    if (parsed.dedupe) {
        output.line('error: --dedupe reads export files (a folder, several files, a manifest); not one JSON file')
        return 2
    }
    const opened = openInput(parsed.input, stdin)
    if (typeof opened === 'string') {
        output.line(`error: ${opened}`)
        return 2
    }
    const { onProgress, onWarning } = terminal(output, parsed.deadLetterFile, opened.fraction)
    let report: ReplayReport
    try {
        const inputLabel = parsed.input === '-' ? null : parsed.input
        const input = opened.input
        report = await replay({
            ...parsed,
            input,
            inputLabel,
            env: service.env,
            signal,
            onProgress: (p) => {
                service.onProgress(p)
                onProgress(p)
            },
            onWarning,
            onOutcome: service.onOutcome,
        })
    } catch (error) {
        output.endProgress()
        output.line(`error: ${(error as Error).message}`)
        // An unusable input or checkpoint is found before anything is sent: bad usage.
        return error instanceof InputError || error instanceof CheckpointError ? 2 : 1
    }
    output.endProgress()
    output.out(`${parsed.dryRun ? 'Dry run, nothing sent' : 'Replay finished'}\n${replaySummary(report, parsed)}\n`)
    const clean = !report.stopped && report.deadLettered === 0 && report.malformed === 0
    return clean ? 0 : 1
}

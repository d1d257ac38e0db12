/**
 * What the commands print, written once: the progress line (redrawn in place on a terminal, every few seconds
 * otherwise), message lines, the summary table, and durations. Every line passes through the redaction of the
 * run's known secrets first, as a net under the rule that messages never carry them, and names flags where the
 * plugin's messages name its config keys.
 */
import { redactText } from '../index'
import type { PipelineProgress, PipelineReport } from './types'
import { inFlagWords } from './usage'

/** Off a terminal (a log file, CI), the progress line is printed at most this often. */
export const PLAIN_PROGRESS_INTERVAL_MS = 5_000
/**
 * A command that runs as a service redraws its progress line this often even when nothing reports, so its
 * health parts ("webhook failing since …") and the lag stay current, and off a terminal a line is still written
 * every PLAIN_PROGRESS_INTERVAL_MS.
 */
export const PROGRESS_REDRAW_MS = 1_000
/** Summary labels are padded to this width so the values line up. */
const LABEL_WIDTH = 26
/** Erases the line a terminal shows (the progress line), so a message can take its place. */
const CLEAR_LINE = '\r\x1b[K'

/** A duration for people: "45s", "2m05s", "1h02m"; "?" when it is not known. */
export function seconds(ms: number): string {
    if (!Number.isFinite(ms)) {
        return '?'
    }
    const s = Math.max(0, Math.round(ms / 1000))
    if (s >= 3600) {
        return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`
    }
    return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`
}

export function eventsPerSecond(events: number, elapsedMs: number): number {
    return Math.round(events / Math.max(elapsedMs / 1000, 0.001))
}

/** The parts of a progress line that are known, joined: an unknown part is left out, not printed empty. */
export function joinParts(parts: ReadonlyArray<string | null | false | undefined>): string {
    return parts.filter((part): part is string => Boolean(part)).join(', ')
}

/** The delivery counters every progress line starts and ends with, around the source's own parts. */
export function progressParts(p: PipelineProgress, elapsedMs: number, sourceParts: Array<string | null> = []) {
    return joinParts([
        `read ${p.read}`,
        `sent ${p.delivered}`,
        `${eventsPerSecond(p.delivered, elapsedMs)} events/s`,
        ...sourceParts,
        `retries ${p.retries}`,
        `failures ${p.deadLettered}`,
        `in flight ${p.inFlight}`,
    ])
}

/** One row of a summary; null rows are left out (a row that does not apply to this run). */
export type SummaryRow = readonly [label: string, value: string | number] | null

/** The rows as aligned text; a label longer than the usual width still keeps two spaces before its value. */
export function summaryText(rows: readonly SummaryRow[]): string {
    return rows
        .filter((row): row is readonly [string, string | number] => row !== null)
        .map(([label, value]) => `  ${label.padEnd(LABEL_WIDTH - 2)}  ${value}`)
        .join('\n')
}

/**
 * The rows about what happened to the events. Refused and unreadable records say "(dead-letter)" only when a
 * --dead-letter file holds them; without one they were counted and reported, not kept.
 */
export function deliveryRows(
    report: PipelineReport<unknown>,
    deadLetterFile: string | null,
    dryRun = false
): SummaryRow[] {
    const kept = deadLetterFile ? ' (dead-letter)' : ''
    return [
        [dryRun ? 'would send' : 'delivered', report.delivered],
        ['filtered out', report.filtered],
        [`refused${kept}`, report.deadLettered],
        [`unreadable${kept}`, report.malformed],
        deadLetterFile && report.deadLettered + report.malformed > 0 ? ['dead letters in', deadLetterFile] : null,
    ]
}

export interface CliStreams {
    stdout: NodeJS.WritableStream
    stderr: NodeJS.WritableStream & { isTTY?: boolean }
}

/** `--log-format`: lines for people (the default), or one JSON object per line for a log shipper. */
export const LOG_FORMATS = ['human', 'json'] as const
export type LogFormat = (typeof LOG_FORMATS)[number]

/** Values a JSON log line carries next to `time`, `level` and `msg`. */
export type LogFields = Record<string, string | number | boolean | null>

export interface CliOutput {
    readonly tty: boolean
    readonly format: LogFormat
    /** Text on standard output (help, the summary); `fields` are the summary's values, for JSON lines. */
    out: (text: string, fields?: LogFields) => void
    /** A line on standard error, in place of a progress line a terminal may show. */
    line: (text: string, fields?: LogFields) => void
    /** The progress line: redrawn on a terminal, every PLAIN_PROGRESS_INTERVAL_MS otherwise. */
    progress: (text: string, fields?: LogFields) => void
    /** Ends a progress line a terminal shows, so what follows starts on its own line. */
    endProgress: () => void
    /** Secrets learnt once the flags are read (header values, the API key), removed from what follows. */
    addSecrets: (more: readonly string[]) => void
}

/** A message's level, from how the commands word it: "error: …", "warning: …", anything else is information. */
export function levelOf(text: string): { level: 'error' | 'warn' | 'info'; msg: string } {
    const match = /^\s*(error|warning): /.exec(text)
    const level = match?.[1] === 'error' ? 'error' : match ? 'warn' : 'info'
    return { level, msg: (match ? text.slice(match[0].length) : text).trim() }
}

/**
 * One JSON log line. Every string is redacted before it is encoded, and the encoded line once more with the
 * secrets as JSON writes them (a secret with a quote or a backslash changes when encoded).
 */
export function jsonLogLine(
    level: string,
    msg: string,
    fields: LogFields,
    redact: (text: string) => string,
    nowMs: number = Date.now()
): string {
    const clean: Record<string, unknown> = { time: new Date(nowMs).toISOString(), level, msg: redact(msg) }
    for (const [key, value] of Object.entries(fields)) {
        if (!(key in clean)) {
            clean[key] = typeof value === 'string' ? redact(value) : value
        }
    }
    return redact(JSON.stringify(clean)) + '\n'
}

/** A summary's rows as JSON fields: "events read" becomes events_read. */
export function summaryFields(rows: readonly SummaryRow[]): LogFields {
    const fields: LogFields = {}
    for (const row of rows) {
        if (row) {
            const key = row[0]
                .toLowerCase()
                .replace(/[^a-z0-9]+/g, '_')
                .replace(/^_|_$/g, '')
            fields[key === 'events_s' ? 'events_per_second' : key] = row[1]
        }
    }
    return fields
}

/** Longest first, so a secret that contains another is removed whole; each also as JSON encodes it. */
function secretList(secrets: ReadonlyArray<string | undefined>): string[] {
    const known = secrets.filter((s): s is string => Boolean(s && s.length >= 4))
    const encoded = known.map((s) => JSON.stringify(s).slice(1, -1)).filter((s) => !known.includes(s))
    return [...known, ...encoded].sort((a, b) => b.length - a.length)
}

/** True at most once per interval; the first interval starts now (a short run prints only its summary). */
function intervalGate(intervalMs: number): () => boolean {
    let last = Date.now()
    return () => {
        const due = Date.now() - last >= intervalMs
        last = due ? Date.now() : last
        return due
    }
}

export function cliOutput(
    io: CliStreams,
    secrets: ReadonlyArray<string | undefined>,
    format: LogFormat = 'human'
): CliOutput {
    let known = secretList(secrets)
    const tty = Boolean(io.stderr.isTTY) && format === 'human'
    // The plugin's sender names its config keys in its reasons (a 401: "check customHeaders"); here they are flags.
    const redact = (text: string): string => redactText(inFlagWords(text), known)
    const write = (stream: NodeJS.WritableStream, text: string): void => {
        stream.write(redact(text))
    }
    const json = (stream: NodeJS.WritableStream, text: string, fields: LogFields = {}, level?: string): void => {
        const parsed = levelOf(text)
        stream.write(jsonLogLine(level ?? parsed.level, parsed.msg, fields, redact))
    }
    let drawn = false
    const plainDue = intervalGate(PLAIN_PROGRESS_INTERVAL_MS)
    return {
        tty,
        format,
        // In JSON, the summary's heading is the message and its rows the fields; help is one message.
        out: (text, fields) =>
            format === 'json'
                ? json(io.stdout, fields ? (text.split('\n')[0] ?? text) : text, fields, 'info')
                : write(io.stdout, text),
        line: (text, fields) => {
            if (format === 'json') {
                json(io.stderr, text, fields)
                return
            }
            write(io.stderr, `${drawn ? CLEAR_LINE : ''}${text}\n`)
            drawn = false
        },
        progress: (text, fields) => {
            if (tty) {
                write(io.stderr, `${CLEAR_LINE}${text}`)
                drawn = true
            } else if (plainDue()) {
                if (format === 'json') {
                    json(io.stderr, fields ? 'progress' : text, fields, 'info')
                } else {
                    write(io.stderr, `${text}\n`)
                }
            }
        },
        endProgress: () => {
            if (drawn) {
                write(io.stderr, '\n')
                drawn = false
            }
        },
        addSecrets: (more) => {
            known = secretList([...known, ...more])
        },
    }
}

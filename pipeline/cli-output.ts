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

export interface CliOutput {
    readonly tty: boolean
    /** Text on standard output (help, the summary). */
    out: (text: string) => void
    /** A line on standard error, in place of a progress line a terminal may show. */
    line: (text: string) => void
    /** The progress line: redrawn on a terminal, every PLAIN_PROGRESS_INTERVAL_MS otherwise. */
    progress: (text: string) => void
    /** Ends a progress line a terminal shows, so what follows starts on its own line. */
    endProgress: () => void
    /** Secrets learnt once the flags are read (header values, the API key), removed from what follows. */
    addSecrets: (more: readonly string[]) => void
}

export function cliOutput(io: CliStreams, secrets: ReadonlyArray<string | undefined>): CliOutput {
    // Longest first, so a secret that contains another is removed whole.
    const known = secrets.filter((s): s is string => Boolean(s && s.length >= 4)).sort((a, b) => b.length - a.length)
    const tty = Boolean(io.stderr.isTTY)
    // The plugin's sender names its config keys in its reasons (a 401: "check customHeaders"); here they are flags.
    const write = (stream: NodeJS.WritableStream, text: string): void => {
        stream.write(redactText(inFlagWords(text), known))
    }
    let drawn = false
    // Off a terminal the first progress line waits an interval too: a short run prints only its summary.
    let lastPlain = Date.now()
    return {
        tty,
        out: (text) => write(io.stdout, text),
        line: (text) => {
            write(io.stderr, `${drawn ? CLEAR_LINE : ''}${text}\n`)
            drawn = false
        },
        progress: (text) => {
            if (tty) {
                write(io.stderr, `${CLEAR_LINE}${text}`)
                drawn = true
            } else if (Date.now() - lastPlain >= PLAIN_PROGRESS_INTERVAL_MS) {
                lastPlain = Date.now()
                write(io.stderr, `${text}\n`)
            }
        },
        endProgress: () => {
            if (drawn) {
                write(io.stderr, '\n')
                drawn = false
            }
        },
        addSecrets: (more) => {
            known.push(...more.filter((s) => s.length >= 4))
            known.sort((a, b) => b.length - a.length)
        },
    }
}

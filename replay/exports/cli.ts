/**
 * `replay` over export files: a folder, several files or a manifest (or one compressed, Parquet or
 * export-named file). Lists what it found before sending; with --dry-run it stops there.
 */
import { closeSync, openSync, readSync, statSync } from 'node:fs'
import { basename, resolve } from 'node:path'

import { DeliverySettings, nodeEnv } from '../../pipeline/cli-options'
import {
    CliOutput,
    deliveryRows,
    eventsPerSecond,
    joinParts,
    progressParts,
    summaryText,
} from '../../pipeline/cli-output'
import { CheckpointError } from '../../pipeline/errors'
import type { Service } from '../../pipeline/service'
import { InputError } from '../input'
import { checkBinding, readExportsCheckpoint, resumePlan } from './checkpoint'
import { DEDUPE_WINDOW } from './dedupe'
import { discoverExports, ExportListing } from './discover'
import { detectExportFormat, EXPORT_FORMATS, FORMAT_LABELS, HEAD_BYTES } from './formats'
import { parseExportName } from './names'
import { exportsBinding, ExportsReport, replayExports } from './run'

/** Skipped files, and problem lines, named one per line before the rest are only counted. */
export const MAX_SKIPPED_LINES = 20

export interface ExportsRun extends DeliverySettings {
    inputs: string[]
    format: string
    dryRun: boolean
    dedupe: boolean
}

function headOf(path: string): Buffer {
    const fd = openSync(path, 'r')
    try {
        const head = Buffer.alloc(HEAD_BYTES)
        return head.subarray(0, readSync(fd, head, 0, HEAD_BYTES, 0))
    } finally {
        closeSync(fd)
    }
}

/**
 * Whether the inputs are export files rather than one JSON file or standard input: several inputs, a folder, a
 * file named like an export, or a file whose bytes are compressed or Parquet. A plain file of JSON with any other
 * name is read as before (JSON Lines, an array, API pages), and sent as read.
 */
export function isExportInput(inputs: string[]): boolean {
    if (inputs.length !== 1) {
        return true
    }
    const [input] = inputs as [string]
    if (input === '-') {
        return false
    }
    try {
        if (statSync(input).isDirectory() || parseExportName(basename(input))) {
            return true
        }
        const format = detectExportFormat(headOf(input))
        return typeof format === 'string' && format !== 'jsonl'
    } catch {
        // A missing or unreadable file: the one-file path says so.
        return false
    }
}

const MB = 1024 * 1024

/** An interval bound for people: ISO 8601 in UTC, to the minute. */
const when = (ms: number): string => new Date(ms).toISOString().replace(/:\d\d\.\d{3}Z$/, 'Z')

/** What was found: files, formats, the span of intervals, the size; then every file skipped and why. */
export function listingText(listing: ExportListing): string {
    const { files } = listing
    const counts = EXPORT_FORMATS.map((f) => [f, files.filter((file) => file.format === f).length] as const)
    const formats = counts.filter(([, n]) => n > 0).map(([f, n]) => `${n} ${FORMAT_LABELS[f]}`)
    const dated = files.flatMap((f) => (f.interval ? [f.interval] : []))
    const starts = dated.map((i) => i.start ?? i.end)
    const span = dated.length
        ? `${when(Math.min(...starts))} to ${when(Math.max(...dated.map((i) => i.end)))}`
        : 'no intervals in their names'
    const size = (files.reduce((sum, f) => sum + f.size, 0) / MB).toFixed(1)
    const manifests = listing.manifests ? `, ${listing.manifests} manifest${listing.manifests > 1 ? 's' : ''}` : ''
    const undated = files.length - dated.length
    const lines = [
        `Found ${files.length} export file${files.length === 1 ? '' : 's'} in ${listing.root}: ${span}, ` +
            `${formats.join(', ') || 'no events'}, ${size} MB${manifests}`,
    ]
    if (undated > 0 && dated.length > 0) {
        lines.push(`  ${undated} without an interval in their names come last, in name order`)
    }
    if (listing.skipped.length) {
        lines.push(`Skipped ${listing.skipped.length} file${listing.skipped.length === 1 ? '' : 's'}:`)
        for (const { name, reason } of listing.skipped.slice(0, MAX_SKIPPED_LINES)) {
            lines.push(`  ${name}: ${reason}`)
        }
        if (listing.skipped.length > MAX_SKIPPED_LINES) {
            lines.push(`  and ${listing.skipped.length - MAX_SKIPPED_LINES} more`)
        }
    }
    return lines.join('\n') + '\n'
}

export function exportsSummary(report: ExportsReport, run: ExportsRun): string {
    const { checkpointFile } = run
    return summaryText([
        ['files', report.files],
        checkpointFile ? ['files done before', report.filesDone] : null,
        report.filesGone ? ['done, now gone from input', report.filesGone] : null,
        ['records read', report.read],
        checkpointFile ? ['skipped (checkpoint)', report.skipped] : null,
        run.dedupe ? ['duplicates (--dedupe)', report.duplicates] : null,
        ...deliveryRows(report, run.deadLetterFile),
        ['requests', report.requests],
        ['retries', report.retries],
        ['bytes', report.bytesSent],
        ['events/s', eventsPerSecond(report.delivered, report.durationMs)],
        checkpointFile ? ['checkpoint at', report.checkpoint] : null,
        ['stopped early', report.stopped ?? 'no'],
    ])
}

/** Files replay writes itself, never read as input. */
function ownFiles(run: ExportsRun): Map<string, string> {
    const own = new Map<string, string>()
    if (run.checkpointFile) {
        own.set(resolve(run.checkpointFile), 'the --checkpoint file')
        own.set(resolve(`${run.checkpointFile}.tmp`), 'the --checkpoint file being written')
    }
    if (run.deadLetterFile) {
        own.set(resolve(run.deadLetterFile), 'the --dead-letter file')
    }
    return own
}

/**
 * On a dry run with --checkpoint, where the run would start: files done, and the place in the current one. A
 * checkpoint that cannot be used here throws, as the real run would.
 */
function checkpointText(run: ExportsRun, listing: ExportListing): string {
    const file = run.checkpointFile
    const saved = file ? readExportsCheckpoint(file) : null
    if (!file || !saved) {
        return ''
    }
    const bound = exportsBinding(run.config, run.dedupe)
    checkBinding(file, saved, bound.options, bound.destination)
    const { plan } = resumePlan(file, saved, listing.files)
    const done = plan.filter((step) => 'done' in step).length
    const at = saved.current && listing.files.some((f) => f.name === saved.current?.name)
    const current = at && saved.current ? `; resumes in ${saved.current.name} at row ${saved.current.next}` : ''
    return `Checkpoint ${file}: ${done} of ${plan.length} files done${current}\n`
}

/** One line per problem up to a limit, so a file full of bad lines cannot flood the terminal. */
function boundedWarnings(output: CliOutput, deadLetterFile: string | null) {
    let warnings = 0
    return (message: string): void => {
        warnings++
        if (warnings <= MAX_SKIPPED_LINES) {
            output.line(`warning: ${message}${deadLetterFile ? ` (kept in ${deadLetterFile})` : ''}`)
        } else if (warnings === MAX_SKIPPED_LINES + 1) {
            output.line('warning: more problems; the summary counts them all')
        }
    }
}

async function listOrExplain(run: ExportsRun, output: CliOutput): Promise<ExportListing | null> {
    const listing = await discoverExports(run.inputs, ownFiles(run))
    output.out(listingText(listing))
    if (listing.files.length > 0) {
        return listing
    }
    const [only] = run.inputs
    const where = run.inputs.length === 1 && only ? `cannot read ${only}: it is a directory with` : 'the inputs hold'
    output.line(
        `error: ${where} no export files in it (JSON Lines, plain or gzip, brotli or zstd, or Parquet); ` +
            'download the export prefix there first (see docs/replay.md)'
    )
    return null
}

export async function runExportsCli(
    run: ExportsRun,
    output: CliOutput,
    signal?: AbortSignal,
    service?: Service
): Promise<number> {
    if (run.format !== 'auto') {
        output.line(
            'error: --format is for one JSON file or standard input; export files are read for what their bytes are'
        )
        return 2
    }
    let report: ExportsReport
    try {
        const listing = await listOrExplain(run, output)
        if (!listing) {
            return 2
        }
        if (run.dryRun) {
            output.out(`${checkpointText(run, listing)}Dry run, nothing sent\n`)
            return 0
        }
        const started = Date.now()
        let file = ''
        report = await replayExports({
            ...run,
            files: listing.files,
            env: service?.env ?? nodeEnv(),
            signal,
            onFile: (index) => (file = listing.files[index]?.name ?? ''),
            onProgress: (p) => {
                service?.onProgress(p)
                output.progress(joinParts([progressParts(p, Date.now() - started), file]))
            },
            onOutcome: service?.onOutcome,
            onWarning: boundedWarnings(output, run.deadLetterFile),
        })
    } catch (error) {
        output.endProgress()
        output.line(`error: ${(error as Error).message}`)
        return error instanceof InputError || error instanceof CheckpointError ? 2 : 1
    }
    output.endProgress()
    output.out(`Replay finished\n${exportsSummary(report, run)}\n`)
    return !report.stopped && report.deadLettered === 0 && report.malformed === 0 ? 0 : 1
}

export { DEDUPE_WINDOW }

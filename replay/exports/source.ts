/**
 * The source stage for export files: each file in order, read in a stream (JSON Lines a read at a time, Parquet a
 * row group at a time), each row shaped into the plugin's event and positioned by its file and row. Rows the
 * checkpoint covers are skipped, and with --dedupe, events whose uuid was just sent are dropped and counted.
 */
import { shouldSend } from '../../index'
import { Source, SourceRecord } from '../../pipeline'
import { Resume } from './checkpoint'
import { Dedupe } from './dedupe'
import { jsonLinesBytes, splitLines } from './lines'
import { ParquetRow, parquetRowGroups } from './parquet'
import { ShapedRow, shapeExportLine, shapeExportRow } from './rows'

/** A row of the run: the index of its file in the run's order, and its row number in the file (from 0). */
export interface FilePosition {
    file: number
    row: number
}

export interface SourceCounts {
    /** Rows an earlier run handled, per the checkpoint. */
    skipped: number
    /** Events dropped by --dedupe. */
    duplicates: number
}

export interface ExportSourceOptions {
    excludedProperties: readonly string[]
    /** The event filters, so --dedupe only remembers events that are sent. */
    filters: Parameters<typeof shouldSend>[1]
    dedupe: Dedupe | null
    counts: SourceCounts
    /** Told when a file is opened, e.g. for progress. */
    onFile?: (index: number) => void
}

type Shaped = ShapedRow | { error: string }

/** Rows of a Parquet row group shaped and handed to the pipeline at a time. */
export const PARQUET_SLICE_ROWS = 1_000
/** Takes the place of a row already shaped, so the row can be collected while the rest of its group is read. */
const RELEASED: ParquetRow = {}

/** A Parquet row as text, for a dead letter: bigints as their digits. */
const rawRow = (row: ParquetRow): string =>
    JSON.stringify(row, (_key, value: unknown) => (typeof value === 'bigint' ? String(value) : value))

/** A shaped row as a pipeline record, or null when --dedupe drops it. */
function toRecord(
    shaped: Shaped,
    position: FilePosition,
    where: string,
    raw: () => string,
    options: ExportSourceOptions
): SourceRecord<FilePosition> | null {
    if ('error' in shaped) {
        return { position, kind: 'malformed', reason: `${where}: ${shaped.error}`, raw: raw() }
    }
    const { uuid, event, text } = shaped
    if (options.dedupe && uuid !== '' && shouldSend(event, options.filters) && options.dedupe.seen(uuid)) {
        options.counts.duplicates++
        return null
    }
    // The pipeline reads only the name (filters) and uuid of `event` when `text` is given.
    return { position, kind: 'event', event: { uuid, event }, text }
}

async function* jsonLinesRecords(
    step: { index: number; path: string; name: string; format: Exclude<Resume['file']['format'], 'parquet'> },
    from: number,
    options: ExportSourceOptions
): Source<FilePosition> {
    let row = 0
    let lineNumber = 0
    for await (const lines of splitLines(jsonLinesBytes(step.path, step.format))) {
        const records: SourceRecord<FilePosition>[] = []
        for (const line of lines) {
            lineNumber++
            if (line.trim() === '') {
                continue
            }
            const position = { file: step.index, row: row++ }
            if (position.row < from) {
                options.counts.skipped++
                continue
            }
            const shaped = shapeExportLine(line, options.excludedProperties)
            const record = toRecord(shaped, position, `${step.name}:${lineNumber}`, () => line, options)
            if (record) {
                records.push(record)
            }
        }
        yield records
    }
}

async function* parquetRecords(
    step: { index: number; path: string; name: string; size: number },
    from: number,
    options: ExportSourceOptions
): Source<FilePosition> {
    options.counts.skipped += from
    for await (const group of parquetRowGroups(step.path, step.size, from)) {
        const { rows } = group
        // A row group is shaped and handed on a slice at a time, each row let go once shaped: what is held is the
        // slice's events, not the row group's rows and their events both.
        for (let start = 0; start < rows.length; start += PARQUET_SLICE_ROWS) {
            const records: SourceRecord<FilePosition>[] = []
            for (let i = start; i < Math.min(rows.length, start + PARQUET_SLICE_ROWS); i++) {
                const row = rows[i] as ParquetRow
                rows[i] = RELEASED
                const position = { file: step.index, row: group.first + i }
                const shaped = shapeExportRow(row, false, options.excludedProperties)
                const record = toRecord(
                    shaped,
                    position,
                    `${step.name} row ${position.row}`,
                    () => rawRow(row),
                    options
                )
                if (record) {
                    records.push(record)
                }
            }
            yield records
        }
    }
}

/** Every file of the plan not yet done, in order; a file that cannot be read stops the run, naming it. */
export async function* exportRecords(plan: Resume[], options: ExportSourceOptions): Source<FilePosition> {
    for (const [index, step] of plan.entries()) {
        if ('done' in step) {
            continue
        }
        const { file, from } = step
        options.onFile?.(index)
        const where = { index, path: file.path, name: file.name, size: file.size }
        try {
            if (file.format === 'parquet') {
                yield* parquetRecords(where, from, options)
            } else {
                yield* jsonLinesRecords({ ...where, format: file.format }, from, options)
            }
        } catch (error) {
            // Events before the damage that were acknowledged are in the checkpoint; the rest are read again.
            const fix = 'download it again, or move it out of the input, and run the same command'
            throw new Error(`cannot read ${file.name}: ${(error as Error).message}; ${fix}`)
        }
    }
}

/**
 * PostHog batch-export files for tests, made in the test: JSON Lines as PostHog writes them (gzip with one member
 * per line, brotli), and zstd and Parquet written by a real engine (chdb, ClickHouse in-process) or hyparquet-writer.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { brotliCompressSync, gzipSync } from 'node:zlib'

import { query } from 'chdb'

/** An event as PostHog's default batch-export model writes it to JSON Lines. */
export interface ExportRow {
    uuid: string
    event: string
    distinct_id: string
    person_id: string
    properties: Record<string, unknown>
    person_properties: Record<string, unknown>
    elements_chain: string
    timestamp: string
    created_at: string
    _inserted_at: string
}

const HOUR_MS = 3_600_000
/** 2025-01-07T00:00:00Z */
export const DAY_ONE_MS = Date.UTC(2025, 0, 7)

/** An ISO bound as PostHog names files with: `2025-01-07T00:00:00+00:00`. */
export function bound(ms: number): string {
    return new Date(ms).toISOString().replace('.000Z', '+00:00')
}

/** `{year}/{month}/{day}/{hour}/{start}-{end}[-{n}].{ext}`, the folders taken from the interval end. */
export function exportPath(startMs: number, part: number | null, ext: string, hours = 1): string {
    const endMs = startMs + hours * HOUR_MS
    const end = new Date(endMs).toISOString()
    const folders = `${end.slice(0, 4)}/${end.slice(5, 7)}/${end.slice(8, 10)}/${end.slice(11, 13)}`
    return `${folders}/${bound(startMs)}-${bound(endMs)}${part === null ? '' : `-${part}`}.${ext}`
}

/** The i-th event of a fixture, at `ms`: every field of the default model, key order as PostHog writes it. */
export function exportRow(i: number, ms: number, tag = 'a'): ExportRow {
    const micros = String(123456 + i).slice(-6)
    const at = (offset: number) => new Date(ms + offset).toISOString().replace(/\.\d{3}Z$/, `.${micros}+00:00`)
    return {
        uuid: `0190a1b2-${tag.padEnd(4, '0').slice(0, 4)}-7000-8000-${String(i).padStart(12, '0')}`,
        event: i % 5 === 0 ? '$identify' : '$pageview',
        distinct_id: `user-${i % 17}`,
        person_id: `0190ffff-0000-7000-8000-${String(i % 17).padStart(12, '0')}`,
        // Person updates on $identify only, as PostHog sends them: other properties can be sent as read.
        properties:
            i % 5 === 0
                ? { $current_url: `https://example.com/${i}`, $set: { plan: 'pro' }, $set_once: { first: i }, i }
                : { $current_url: `https://example.com/${i}`, i },
        person_properties: { email: `user-${i % 17}@example.com` },
        elements_chain: i % 3 === 0 ? 'button:text="Buy"nth-child="1"' : '',
        timestamp: at(0),
        created_at: at(1_000),
        _inserted_at: at(2_000),
    }
}

/** `count` events from `first`, spread over the hour starting at `startMs`. */
export function exportRows(first: number, count: number, startMs: number, tag = 'a'): ExportRow[] {
    return Array.from({ length: count }, (_, k) => exportRow(first + k, startMs + k * 1_000, tag))
}

export const jsonLines = (rows: object[]): string => rows.map((row) => JSON.stringify(row) + '\n').join('')

/** gzip as PostHog writes JSON Lines: every line its own gzip member. */
export const gzipMembers = (rows: object[]): Buffer =>
    Buffer.concat(rows.map((row) => gzipSync(JSON.stringify(row) + '\n')))

export const brotli = (text: string): Buffer => brotliCompressSync(text)

export function writeAt(root: string, path: string, data: string | Buffer): string {
    const full = join(root, path)
    mkdirSync(dirname(full), { recursive: true })
    writeFileSync(full, data)
    return full
}

const sql = (text: string): string => `'${text.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`

/** The export columns as ClickHouse types; the JSON fields are strings holding JSON, as in PostHog's Parquet. */
const PARQUET_COLUMNS =
    "uuid String, event String, distinct_id String, person_id String, properties String, person_properties String, elements_chain String, timestamp DateTime64(6, 'UTC'), created_at DateTime64(6, 'UTC'), _inserted_at DateTime64(6, 'UTC')"

/** A row as chdb reads it: JSON fields as JSON text, datetimes without the zone (UTC). */
function parquetInputLine(row: ExportRow, propertiesText?: string): string {
    const datetime = (iso: string) => iso.replace('T', ' ').replace('+00:00', '')
    return JSON.stringify({
        ...row,
        properties: propertiesText ?? JSON.stringify(row.properties),
        person_properties: JSON.stringify(row.person_properties),
        timestamp: datetime(row.timestamp),
        created_at: datetime(row.created_at),
        _inserted_at: datetime(row._inserted_at),
    })
}

/** The engine's input, in a folder of its own (never inside the export folder a test lists). */
function engineInput(text: string | Buffer): string {
    const input = join(mkdtempSync(join(tmpdir(), 'export-fixture-')), 'input')
    writeFileSync(input, text)
    return input
}

/**
 * One standalone chdb query. chdb's engine is one per process: a PostHog stand-in of an earlier test file in this
 * jest worker may still hold its session for a moment (it closes when idle), so wait for it rather than fail.
 */
async function engineQuery(text: string): Promise<void> {
    const deadline = Date.now() + 5_000
    for (;;) {
        try {
            query(text, 'CSV')
            return
        } catch (error) {
            const busy = /session .* is active/.test(error instanceof Error ? error.message : String(error))
            if (!busy || Date.now() > deadline) {
                throw error
            }
            await new Promise((resolve) => setTimeout(resolve, 50))
        }
    }
}

/**
 * A Parquet file written by ClickHouse (chdb) with the codec given, in row groups of `rowGroup` rows.
 * `propertiesText` overrides a row's properties JSON text (to carry numbers JSON.stringify cannot write).
 */
export async function writeParquet(
    file: string,
    rows: ExportRow[],
    codec: string,
    rowGroup = 1_000,
    propertiesText: Map<number, string> = new Map()
): Promise<void> {
    mkdirSync(dirname(file), { recursive: true })
    const input = engineInput(rows.map((row, i) => parquetInputLine(row, propertiesText.get(i)) + '\n').join(''))
    await engineQuery(
        `SELECT * FROM file(${sql(input)}, JSONEachRow, ${sql(PARQUET_COLUMNS)}) ` +
            // COMPRESSION 'none': ClickHouse would otherwise zstd a whole `.parquet.zst` file, which PostHog does not.
            `INTO OUTFILE ${sql(file)} TRUNCATE COMPRESSION 'none' FORMAT Parquet SETTINGS ` +
            `output_format_parquet_compression_method = ${sql(codec)}, ` +
            `output_format_parquet_row_group_size = ${rowGroup}, max_threads = 1`
    )
    rmSync(dirname(input), { recursive: true, force: true })
}

/** A zstd-compressed file written by ClickHouse (chdb) from the given bytes, byte for byte (RawBLOB). */
export async function writeZstd(file: string, data: string | Buffer): Promise<void> {
    mkdirSync(dirname(file), { recursive: true })
    const input = engineInput(data)
    await engineQuery(
        `SELECT * FROM file(${sql(input)}, RawBLOB) INTO OUTFILE ${sql(file)} TRUNCATE ` +
            `COMPRESSION 'zstd' FORMAT RawBLOB`
    )
    rmSync(dirname(input), { recursive: true, force: true })
}

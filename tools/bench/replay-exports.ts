/**
 * `npx tsx tools/bench/replay-exports.ts`: replay of the same events from PostHog batch-export files in each
 * format, with the CLI as users run it, in one run:
 *
 *   plain JSON Lines (one file), gzip JSON Lines (one gzip member per line, as PostHog writes it), Parquet with
 *   zstd as one file and as 50 files, each file in row groups of PARQUET_ROW_GROUP rows,
 *
 * each with events/s, peak RSS and CPU per 1,000 events, next to the raw limit (a plain loop POSTing the plain
 * file's lines unparsed). Targets: gzip ≥ 60% and Parquet ≥ 50% of plain JSON Lines' events/s, peak RSS ≤ 250 MB.
 * The Parquet files are written by ClickHouse (chdb), a real engine, from the same rows.
 */
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { gzipSync } from 'node:zlib'

import { query } from 'chdb'

import { sampleEvent } from '../host/sample-events'
import { seededRandom } from '../receiver/receiver'
import { Figures, measureRawFile, measureReplayRss, REPLAY_CONCURRENCY } from './replay'

export const EXPORT_BENCH_EVENTS = 1_000_000
export const PARQUET_FILES = 50
/** Rows per Parquet row group: the reader holds one row group decoded at a time. */
export const PARQUET_ROW_GROUP = 10_000
export const GZIP_TARGET = 0.6
export const PARQUET_TARGET = 0.5
export const EXPORT_RSS_CEILING_MB = 250

const HOUR_MS = 3_600_000
const START_MS = Date.UTC(2025, 0, 7)

export interface FormatFigures {
    label: string
    events: number
    ms: number
    peakMb: number
    cpuMs: number
}

export interface ExportsBench {
    events: number
    raw: Figures
    formats: FormatFigures[]
}

/** Events per second of a measured run. */
const rate = (f: { events: number; ms: number }): number => Math.round(f.events / Math.max(f.ms / 1000, 0.001))

/** `{start}-{end}-{n}.{ext}`, as PostHog names a file of an interval. */
function exportName(hour: number, part: number, ext: string): string {
    const bound = (ms: number) => new Date(ms).toISOString().replace('.000Z', '+00:00')
    return `${bound(START_MS + hour * HOUR_MS)}-${bound(START_MS + (hour + 1) * HOUR_MS)}-${part}.${ext}`
}

/** The n-th realistic event as PostHog's default batch-export model writes it to JSON Lines. */
function exportLine(n: number, random: () => number): string {
    const event = sampleEvent(n, random, START_MS)
    const at = (offsetMs: number) =>
        new Date(Date.parse(event.timestamp) + offsetMs)
            .toISOString()
            .replace('Z', `${String(n % 1000).padStart(3, '0')}+00:00`)
    const properties = { ...event.properties, ...(event.$set ? { $set: event.$set, $set_once: event.$set_once } : {}) }
    return JSON.stringify({
        uuid: event.uuid,
        event: event.event,
        distinct_id: event.distinct_id,
        person_id: `0190ffff-0000-7000-8000-${event.distinct_id.replace(/\D/g, '').padStart(12, '0')}`,
        properties,
        person_properties: { email: `${event.distinct_id}@example.com` },
        elements_chain: event.elements ? 'button.btn:text="Next"nth-child="1"nth-of-type="1"' : '',
        timestamp: at(0),
        created_at: at(1_000),
        _inserted_at: at(2_000),
    })
}

/** Writes the events as plain JSON Lines, as gzip JSON Lines, and as ClickHouse's input for each Parquet part. */
function writeJsonLines(workDir: string, events: number) {
    const random = seededRandom(7)
    const plain = join(workDir, 'plain', exportName(0, 0, 'jsonl'))
    const gzip = join(workDir, 'gzip', exportName(0, 0, 'jsonl.gz'))
    const perPart = Math.ceil(events / PARQUET_FILES)
    const parts: string[] = []
    for (const folder of ['plain', 'gzip', 'parquet-one', 'parquet-many', 'input']) {
        mkdirSync(join(workDir, folder))
    }
    const plainFd = openSync(plain, 'w')
    const gzipFd = openSync(gzip, 'w')
    let partFd = -1
    for (let n = 0; n < events; n++) {
        if (n % perPart === 0) {
            if (partFd !== -1) {
                closeSync(partFd)
            }
            parts.push(join(workDir, 'input', `part-${parts.length}.jsonl`))
            partFd = openSync(parts[parts.length - 1] as string, 'w')
        }
        const line = exportLine(n, random) + '\n'
        writeSync(plainFd, line)
        // PostHog gzips every line as its own member.
        writeSync(gzipFd, gzipSync(line))
        writeSync(partFd, line)
    }
    ;[plainFd, gzipFd, partFd].forEach((fd) => closeSync(fd))
    return { plain, parts }
}

const quote = (text: string): string => `'${text.replace(/'/g, "\\'")}'`

/** The default model's columns as PostHog's Parquet holds them: JSON fields as strings, datetimes in µs, UTC. */
const COLUMNS =
    "uuid String, event String, distinct_id String, person_id String, properties String, person_properties String, elements_chain String, timestamp DateTime64(6, 'UTC'), created_at DateTime64(6, 'UTC'), _inserted_at DateTime64(6, 'UTC')"

/** A JSON Lines file to a Parquet file with zstd, in row groups of PARQUET_ROW_GROUP rows (ClickHouse). */
function writeParquet(input: string, file: string): void {
    query(
        `SELECT * FROM file(${quote(input)}, JSONEachRow, ${quote(COLUMNS)}) ` +
            `INTO OUTFILE ${quote(file)} TRUNCATE COMPRESSION 'none' FORMAT Parquet SETTINGS ` +
            `output_format_parquet_compression_method = 'zstd', output_format_parquet_row_group_size = ` +
            `${PARQUET_ROW_GROUP}, input_format_json_read_objects_as_strings = 1, ` +
            `date_time_input_format = 'best_effort', max_threads = 1, max_block_size = ${PARQUET_ROW_GROUP}`,
        'CSV'
    )
}

export function writeExportFiles(workDir: string, events: number) {
    const { plain, parts } = writeJsonLines(workDir, events)
    writeParquet(plain, join(workDir, 'parquet-one', exportName(0, 0, 'parquet')))
    parts.forEach((part, i) => writeParquet(part, join(workDir, 'parquet-many', exportName(0, i, 'parquet'))))
    rmSync(join(workDir, 'input'), { recursive: true, force: true })
    return plain
}

const FORMATS = [
    { folder: 'plain', label: 'JSON Lines, plain' },
    { folder: 'gzip', label: 'JSON Lines, gzip' },
    { folder: 'parquet-one', label: 'Parquet zstd, 1 file' },
    { folder: 'parquet-many', label: `Parquet zstd, ${PARQUET_FILES} files` },
] as const

export async function benchReplayExports(events = EXPORT_BENCH_EVENTS): Promise<ExportsBench> {
    const workDir = mkdtempSync(join(tmpdir(), 'bench-exports-'))
    try {
        const plain = writeExportFiles(workDir, events)
        const formats: FormatFigures[] = []
        for (const { folder, label } of FORMATS) {
            const run = await measureReplayRss(join(workDir, folder), events)
            if (run.rows !== events) {
                throw new Error(`${label}: the receiver got ${run.rows} of ${events} events`)
            }
            formats.push({ label, events: run.rows, ms: run.ms, peakMb: run.peakMb, cpuMs: run.cpuMs })
        }
        const raw = await measureRawFile(plain, REPLAY_CONCURRENCY)
        return { events, raw, formats }
    } finally {
        rmSync(workDir, { recursive: true, force: true })
    }
}

const cpuPer1k = (f: FormatFigures): number => (f.cpuMs / Math.max(f.events, 1)) * 1000

/** Why a format missed a target, from what was measured in the same run. */
function missReasons(f: FormatFigures, plain: FormatFigures, speedOk: boolean, rssOk: boolean): string[] {
    const reasons: string[] = []
    if (!speedOk) {
        reasons.push(
            `${f.label} is slower: the CLI spent ${cpuPer1k(f).toFixed(1)} ms of CPU per 1,000 events, plain JSON ` +
                `Lines ${cpuPer1k(plain).toFixed(1)} ms (decoding and decompressing on the same core as sending)`
        )
    }
    if (!rssOk) {
        const why = f.label.startsWith('Parquet')
            ? `a row group (${PARQUET_ROW_GROUP} rows) is decoded whole, its pages, strings and rows, before it is ` +
              'sent, and the garbage collector lets the heap grow past that while the run allocates fast'
            : 'the events read ahead of sending and the garbage collector’s slack'
        reasons.push(`${f.label} peaked at ${f.peakMb} MB (plain JSON Lines: ${plain.peakMb} MB): ${why}`)
    }
    return reasons
}

export function replayExportsBenchText(bench: ExportsBench): string {
    const plain = bench.formats[0] as FormatFigures
    const plainRate = rate(plain)
    const percent = (share: number): string => `${Math.round(share * 100)}%`
    const lines = [
        `Replay of ${bench.events} events from batch-export files, by format (the CLI, ${REPLAY_CONCURRENCY} in ` +
            `flight; Parquet in row groups of ${PARQUET_ROW_GROUP})`,
        `  ${'format'.padEnd(24)}${'events/s'.padStart(10)}${'of plain'.padStart(10)}${'peak RSS'.padStart(10)}` +
            `${'CPU/1k ev'.padStart(11)}  speed target      RSS target`,
    ]
    const reasons: string[] = []
    for (const f of bench.formats) {
        const share = rate(f) / Math.max(plainRate, 1)
        const target = f === plain ? null : f.label.startsWith('Parquet') ? PARQUET_TARGET : GZIP_TARGET
        const speedOk = target === null || share >= target
        const rssOk = f.peakMb <= EXPORT_RSS_CEILING_MB
        const speed = target === null ? 'baseline' : `≥ ${percent(target)}: ${speedOk ? 'ok' : 'MISSED'}`
        lines.push(
            `  ${f.label.padEnd(24)}${String(rate(f)).padStart(10)}${percent(share).padStart(10)}` +
                `${`${f.peakMb} MB`.padStart(10)}${`${cpuPer1k(f).toFixed(1)} ms`.padStart(11)}  ${speed.padEnd(18)}` +
                `≤ ${EXPORT_RSS_CEILING_MB} MB: ${rssOk ? 'ok' : 'MISSED'}`
        )
        reasons.push(...missReasons(f, plain, speedOk, rssOk))
    }
    lines.push(
        `  ${'raw limit'.padEnd(24)}${String(rate(bench.raw)).padStart(10)}` +
            `${percent(rate(bench.raw) / Math.max(plainRate, 1)).padStart(10)}` +
            `  (the plain file's lines POSTed unparsed by a plain loop, ${REPLAY_CONCURRENCY} in flight)`
    )
    lines.push(...reasons.map((reason) => `  MISSED, why: ${reason}`))
    return lines.join('\n') + '\n'
}

async function main(): Promise<void> {
    const { values } = parseArgs({
        options: { events: { type: 'string' }, quick: { type: 'boolean', default: false } },
    })
    const events = values.quick ? 50_000 : Number(values.events ?? EXPORT_BENCH_EVENTS)
    process.stdout.write(
        `Replay exports bench, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
            `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}\n\n`
    )
    process.stdout.write(replayExportsBenchText(await benchReplayExports(events)))
}

if (require.main === module) {
    void main().catch((error) => {
        process.stderr.write(`bench failed: ${(error as Error).message}\n`)
        process.exit(1)
    })
}

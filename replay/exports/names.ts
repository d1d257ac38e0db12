/**
 * PostHog's batch-export file names, read and ordered. PostHog names each file
 * `{data_interval_start}-{data_interval_end}[-{n}].{jsonl|parquet}[.{gz|br|zst|lz4|sz}]`, and, when a maximum file
 * size is set, writes `{start}-{end}_manifest.json` last. Pure functions.
 */

/** An interval bound as PostHog writes it: ISO (`2025-01-07T00:00:00+00:00`) or older (`2023-01-01 00:00:00`). */
const DATETIME = String.raw`\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d(?::?\d\d)?)?`

/** A backfill "from the beginning" has no start: nothing, or Python's `None`, before the dash. */
const EXPORT_NAME = new RegExp(
    `^(?:(${DATETIME})|None)?-(${DATETIME})(?:-(\\d+))?` +
        String.raw`(?:(_manifest\.json)|\.(jsonl|parquet)(?:\.(gz|br|zst|lz4|sz))?)$`
)

/** Names of data files that other tools (or a user's own `zstd`) write: read too, after the dated ones. */
const DATA_NAME = /\.(jsonl|ndjson|parquet)(?:\.(gz|br|zst|lz4|sz))?$/

export interface ExportName {
    /** The interval's start in ms since the epoch, or null when the file has none. */
    start: number | null
    end: number
    /** The `-{n}` file number within the interval, or null when the name has none. */
    part: number | null
    manifest: boolean
}

/** An interval bound in ms: a bound without a zone is UTC (PostHog's intervals are UTC). */
export function parseBound(text: string): number {
    let iso = text.replace(' ', 'T')
    if (!/(Z|[+-]\d\d(:?\d\d)?)$/.test(iso)) {
        iso += 'Z'
    } else if (/[+-]\d\d$/.test(iso)) {
        iso += ':00'
    }
    return Date.parse(iso)
}

/** The interval and file number in a file's base name, or null when it is not named like a batch export. */
export function parseExportName(base: string): ExportName | null {
    const match = EXPORT_NAME.exec(base)
    if (!match) {
        return null
    }
    const [, startText, endText, part, manifest] = match
    const start = startText ? parseBound(startText) : null
    const end = parseBound(endText as string)
    if (Number.isNaN(end) || Number.isNaN(start)) {
        return null
    }
    return { start, end, part: part === undefined ? null : Number(part), manifest: manifest !== undefined }
}

/** Whether a base name looks like a file of events replay reads (an export file, or JSON Lines or Parquet). */
export function isDataName(base: string): boolean {
    return DATA_NAME.test(base)
}

/**
 * Interval order: by interval end, then start (none first), then file number as an integer (`-10` after `-9`, which
 * key order gets wrong). Files whose names carry no interval come after, in natural name order.
 */
export function compareExportFiles(
    a: { name: string; interval: ExportName | null },
    b: { name: string; interval: ExportName | null }
): number {
    const x = a.interval
    const y = b.interval
    if (x && y) {
        return (
            x.end - y.end ||
            (x.start ?? -Infinity) - (y.start ?? -Infinity) ||
            (x.part ?? -1) - (y.part ?? -1) ||
            naturalCompare(a.name, b.name)
        )
    }
    if (x || y) {
        return x ? -1 : 1
    }
    return naturalCompare(a.name, b.name)
}

const collator = new Intl.Collator('en', { numeric: true })

/** Name order with runs of digits compared as numbers (`part-2` before `part-10`). */
export function naturalCompare(a: string, b: string): number {
    return collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0)
}

/** The interval's two bounds, for grouping a manifest with its files. */
export function intervalKey(name: ExportName): string {
    return `${name.start ?? ''}/${name.end}`
}

/**
 * Parquet export files, a row group at a time, with hyparquet (a maintained pure-JavaScript reader) and its
 * compressors for the codec inside the file: zstd, snappy, lz4, gzip or brotli. Only the footer and one row group's
 * column chunks are in memory at once, so memory follows the row group size, not the file size. Resuming skips whole
 * row groups before the position unread, and the rows before it in the row group it falls in.
 */
import { FileHandle, open } from 'node:fs/promises'

import type { AsyncBuffer, ParquetReadOptions } from 'hyparquet'

/** A row as hyparquet decodes it: strings, numbers, bigints (INT64), Dates (TIMESTAMP), nulls. */
export type ParquetRow = Record<string, unknown>

/** The file as hyparquet reads it: ranges on demand, through one open handle. */
function fileBuffer(handle: FileHandle, size: number): AsyncBuffer {
    return {
        byteLength: size,
        slice: async (start: number, end = size): Promise<ArrayBuffer> => {
            const bytes = new Uint8Array(end - start)
            let done = 0
            while (done < bytes.length) {
                const { bytesRead } = await handle.read(bytes, done, bytes.length - done, start + done)
                if (bytesRead === 0) {
                    throw new Error(`the file ended at byte ${start + done} of ${size}: it is truncated`)
                }
                done += bytesRead
            }
            return bytes.buffer
        },
    }
}

/**
 * hyparquet and its compressors ship only as ES modules: loaded on the first Parquet file, so a replay of JSON
 * Lines never pays for them.
 */
async function loadReader() {
    try {
        const [{ parquetMetadataAsync, parquetRead }, { compressors }] = await Promise.all([
            import('hyparquet'),
            import('hyparquet-compressors'),
        ])
        return { parquetMetadataAsync, parquetRead, compressors }
    } catch (error) {
        // Compiled to CommonJS, the import is a require(): Node loads ES modules that way from 20.19 on.
        if ((error as NodeJS.ErrnoException).code === 'ERR_REQUIRE_ESM') {
            throw new Error(`reading Parquet needs Node 20.19 or later (this is Node ${process.versions.node})`)
        }
        throw error
    }
}

/** ms since the epoch as ISO 8601 UTC with milliseconds. */
const iso = (ms: number): string => new Date(ms).toISOString()

/**
 * TIMESTAMP columns straight to the text the event carries, without a Date per value. PostHog's are in
 * microseconds; milliseconds and nanoseconds are read too.
 */
const TIMESTAMP_PARSERS = {
    timestampFromMilliseconds: (ms: bigint) => iso(Number(ms)),
    timestampFromMicroseconds: (us: bigint) => iso(Math.floor(Number(us) / 1_000)),
    timestampFromNanoseconds: (ns: bigint) => iso(Math.floor(Number(ns) / 1_000_000)),
}

/** One row group's rows from `from` on, as objects. */
async function readRows(
    read: (options: ParquetReadOptions) => Promise<void>,
    options: Omit<ParquetReadOptions, 'onComplete' | 'rowFormat'>
): Promise<ParquetRow[]> {
    let rows: ParquetRow[] = []
    await read({
        ...options,
        parsers: TIMESTAMP_PARSERS,
        rowFormat: 'object',
        onComplete: (decoded) => (rows = decoded),
    })
    return rows
}

/**
 * The rows of a Parquet file from row `from` (0-based) on, one array per row group, each with the number of its
 * first row.
 */
export async function* parquetRowGroups(
    path: string,
    size: number,
    from = 0
): AsyncGenerator<{ first: number; rows: ParquetRow[] }> {
    const { parquetMetadataAsync, parquetRead, compressors } = await loadReader()
    const handle = await open(path, 'r')
    try {
        const file = fileBuffer(handle, size)
        const metadata = await parquetMetadataAsync(file)
        let groupStart = 0
        for (const group of metadata.row_groups) {
            const groupEnd = groupStart + Number(group.num_rows)
            if (groupEnd > from) {
                const rowStart = Math.max(groupStart, from)
                const rows = await readRows(parquetRead, { file, metadata, compressors, rowStart, rowEnd: groupEnd })
                yield { first: rowStart, rows }
            }
            groupStart = groupEnd
        }
    } finally {
        await handle.close()
    }
}

/**
 * What a file holds, decided from its first bytes rather than its name: a file renamed, or compressed by hand, is
 * still read for what it is. Brotli has no magic number, so a file that is none of the others is tried as brotli.
 */
import { brotliDecompressSync, constants, gunzipSync } from 'node:zlib'

import { Decompress } from 'fzstd'

export const EXPORT_FORMATS = ['jsonl', 'jsonl.gz', 'jsonl.br', 'jsonl.zst', 'parquet'] as const
export type ExportFormat = (typeof EXPORT_FORMATS)[number]

/** How each format is called in listings. */
export const FORMAT_LABELS: Record<ExportFormat, string> = {
    jsonl: 'JSON Lines',
    'jsonl.gz': 'JSON Lines gzip',
    'jsonl.br': 'JSON Lines brotli',
    'jsonl.zst': 'JSON Lines zstd',
    parquet: 'Parquet',
}

/** How many of a file's first bytes decide its format (and are fingerprinted by the checkpoint). */
export const HEAD_BYTES = 4096

const PARQUET_MAGIC = [0x50, 0x41, 0x52, 0x31]
const GZIP_MAGIC = [0x1f, 0x8b]
const ZSTD_MAGIC = [0x28, 0xb5, 0x2f, 0xfd]

/** Compressions replay does not read, by magic bytes, and the command that decompresses each. */
const UNREAD = [
    { name: 'lz4', magic: [0x04, 0x22, 0x4d, 0x18], command: 'lz4 -d' },
    { name: 'bzip2', magic: [0x42, 0x5a, 0x68], command: 'bzip2 -dk' },
    { name: 'xz', magic: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], command: 'xz -dk' },
    { name: 'zip', magic: [0x50, 0x4b, 0x03, 0x04], command: 'unzip' },
]

const startsWith = (head: Uint8Array, magic: number[]): boolean => magic.every((byte, i) => head[i] === byte)

/** Text that starts like JSON Lines: after a byte order mark and white space, `{` (or nothing at all). */
export function looksLikeJsonLines(head: Uint8Array): boolean {
    let i = head[0] === 0xef && head[1] === 0xbb && head[2] === 0xbf ? 3 : 0
    while (i < head.length && (head[i] === 0x20 || head[i] === 0x0a || head[i] === 0x0d || head[i] === 0x09)) {
        i++
    }
    return i === head.length || head[i] === 0x7b
}

/** The start of a brotli stream, decompressed as far as these bytes go; null when they are not brotli. */
function brotliStart(head: Uint8Array): Buffer | null {
    try {
        return brotliDecompressSync(head, { finishFlush: constants.BROTLI_OPERATION_FLUSH })
    } catch {
        return null
    }
}

/** The start of a gzip or zstd stream, decompressed as far as these bytes go; null when that cannot be told. */
function inflatedStart(format: 'jsonl.gz' | 'jsonl.zst', head: Uint8Array): Uint8Array | null {
    try {
        if (format === 'jsonl.gz') {
            return gunzipSync(head, { finishFlush: constants.Z_SYNC_FLUSH })
        }
        const out: Uint8Array[] = []
        new Decompress((chunk) => {
            out.push(chunk)
        }).push(head)
        return out[0] ?? null
    } catch {
        return null
    }
}

/** A compressed file that holds something other than JSON Lines: why it is not read, or null. */
function insideCompressed(format: 'jsonl.gz' | 'jsonl.zst', head: Uint8Array): { unreadable: string } | null {
    const inner = inflatedStart(format, head)
    if (!inner || inner.length === 0 || looksLikeJsonLines(inner.subarray(0, HEAD_BYTES))) {
        return null
    }
    const tool = format === 'jsonl.gz' ? 'gunzip' : 'zstd -d'
    return startsWith(inner, PARQUET_MAGIC)
        ? { unreadable: `it is a whole Parquet file compressed again: ${tool} it first (Parquet compresses inside)` }
        : { unreadable: `it is compressed, but what it holds is not JSON Lines` }
}

/**
 * The format of a file from its first bytes (HEAD_BYTES of them, or all of a smaller file), or why it cannot be
 * read, with the fix.
 */
export function detectExportFormat(head: Uint8Array): ExportFormat | { unreadable: string } {
    if (startsWith(head, PARQUET_MAGIC)) {
        return 'parquet'
    }
    if (startsWith(head, GZIP_MAGIC)) {
        return insideCompressed('jsonl.gz', head) ?? 'jsonl.gz'
    }
    if (startsWith(head, ZSTD_MAGIC)) {
        return insideCompressed('jsonl.zst', head) ?? 'jsonl.zst'
    }
    const unread = UNREAD.find((c) => startsWith(head, c.magic))
    if (unread) {
        return { unreadable: `it is ${unread.name}-compressed, which replay does not read: ${unread.command} it first` }
    }
    if (looksLikeJsonLines(head)) {
        return 'jsonl'
    }
    const inflated = brotliStart(head)
    if (inflated && inflated.length > 0 && looksLikeJsonLines(inflated.subarray(0, HEAD_BYTES))) {
        return 'jsonl.br'
    }
    return { unreadable: 'it is not JSON Lines (plain, gzip, brotli or zstd) or Parquet' }
}

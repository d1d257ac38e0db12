/**
 * JSON Lines export files as streams of lines, in bounded memory: plain, gzip (PostHog writes every line as its own
 * gzip member; Node's gunzip reads members one after another), brotli (one stream) and zstd (fzstd, streaming).
 * Lines are cut on bytes, before decoding: a newline byte is never part of a multi-byte character, so a character
 * split between two reads is decoded whole, and a line of tens of MB is joined once, not once per read.
 */
import { createReadStream } from 'node:fs'
import { Readable } from 'node:stream'
import { createBrotliDecompress, createGunzip } from 'node:zlib'

import { Decompress } from 'fzstd'

import { ExportFormat } from './formats'

/** Bytes per read from the file, and per decompressed chunk. */
export const READ_BYTES = 64 * 1024

const NEWLINE = 0x0a

/** The decompressed bytes of a JSON Lines file. */
export function jsonLinesBytes(path: string, format: Exclude<ExportFormat, 'parquet'>): AsyncIterable<Buffer> {
    const file = createReadStream(path, { highWaterMark: READ_BYTES })
    if (format === 'jsonl') {
        return file
    }
    if (format === 'jsonl.zst') {
        return zstdChunks(file)
    }
    const inflate =
        format === 'jsonl.gz'
            ? createGunzip({ chunkSize: READ_BYTES })
            : createBrotliDecompress({ chunkSize: READ_BYTES })
    // An error in the file stream ends the decompressed one with it, so the reader sees it.
    file.on('error', (error) => inflate.destroy(error))
    inflate.on('close', () => file.destroy())
    return file.pipe(inflate)
}

/** zstd frames (one or several) decompressed as the file is read: one read in, whatever it yields out. */
async function* zstdChunks(file: Readable): AsyncGenerator<Buffer> {
    let out: Uint8Array[] = []
    const decompress = new Decompress((chunk) => {
        out.push(chunk)
    })
    try {
        for await (const chunk of file as AsyncIterable<Buffer>) {
            decompress.push(chunk)
            for (const piece of out) {
                yield Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength)
            }
            out = []
        }
        decompress.push(new Uint8Array(0), true)
    } catch (error) {
        throw new Error(`the zstd stream is damaged: ${(error as Error).message}`)
    } finally {
        file.destroy()
    }
    for (const piece of out) {
        yield Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength)
    }
}

const BOM = [0xef, 0xbb, 0xbf]

/** Lines of decoded text, one array per read that completes at least one line. Blank lines are kept (numbering). */
export async function* splitLines(chunks: AsyncIterable<Buffer>): AsyncGenerator<string[]> {
    let pending: Buffer[] = []
    let first = true
    for await (const raw of chunks) {
        let chunk = raw
        if (first && chunk.length > 0) {
            first = false
            chunk = BOM.every((byte, i) => chunk[i] === byte) ? chunk.subarray(BOM.length) : chunk
        }
        const last = chunk.lastIndexOf(NEWLINE)
        if (last === -1) {
            pending.push(chunk)
            continue
        }
        const complete = pending.length ? Buffer.concat([...pending, chunk.subarray(0, last)]) : chunk.subarray(0, last)
        // A copy of the tail: a slice would keep the whole read (or decompressed chunk) alive with it.
        pending = last + 1 < chunk.length ? [Buffer.from(chunk.subarray(last + 1))] : []
        yield complete.toString('utf8').split('\n')
    }
    if (pending.length) {
        yield [Buffer.concat(pending).toString('utf8')]
    }
}

/**
 * Reads query API response bodies. A page is megabytes, and the sync's speed and memory are decided here
 * (tools/bench/sync.ts), so:
 *
 * - The bytes land in buffers kept from page to page (`BodyBuffers`), not a fresh buffer per response: a fresh
 *   multi-megabyte buffer costs page faults and garbage every time.
 * - The body is never turned into one string and one object graph. The small fields are parsed as usual, and each
 *   row of `results` is cut out of the bytes and parsed when the source asks for it, so rows die young, a few at a
 *   time, instead of a whole page surviving into the old generation as garbage.
 * - Plain ASCII bodies (the usual case) are decoded as ASCII, which Node does about ten times faster than UTF-8;
 *   `isAscii` checks that at memory speed, and both decoders give the same text for such bytes.
 */
import { isAscii } from 'node:buffer'

const QUOTE = 0x22
const BACKSLASH = 0x5c
const OPEN_BRACKET = 0x5b
const CLOSE_BRACKET = 0x5d
const OPEN_BRACE = 0x7b
const CLOSE_BRACE = 0x7d
const COLON = 0x3a

/** Rows of a plain ASCII body decoded with one call (see `readPage`): tens of KB, young-generation strings. */
const ROWS_PER_DECODE = 64

/** Where the top-level `results` array lies in the body, and where each of its rows starts and ends. */
export interface ResultsLayout {
    /** Byte offsets of `[` and just past `]` of the results array. */
    start: number
    end: number
    /** Row n spans bytes [bounds[2n], bounds[2n + 1]): one flat array, not an array per row. */
    bounds: number[]
}

function isSpace(byte: number | undefined): boolean {
    return byte === 0x20 || byte === 0x0a || byte === 0x0d || byte === 0x09
}

/** Whether the string at `keyStart` is `"results"`, followed by `:` and the `[` at `bracket`. */
function isResultsKey(body: Buffer, keyStart: number, bracket: number): boolean {
    return (
        body.toString('latin1', keyStart, keyStart + 9) === '"results"' &&
        /^\s*:\s*$/.test(body.toString('latin1', keyStart + 9, bracket))
    )
}

/**
 * One pass over the bytes, aware of strings and escapes: finds the array under the top-level key `results` and
 * its rows. Returns null if the body has none (the caller then parses it whole, and reports what is missing).
 */
export function findResults(body: Buffer): ResultsLayout | null {
    let depth = 0
    let keyStart = -1
    let layout: ResultsLayout | null = null
    let rowStart = -1
    for (let i = 0; i < body.length; i++) {
        const byte = body[i]
        if (byte === QUOTE) {
            const open = i
            for (i++; i < body.length && body[i] !== QUOTE; i++) {
                if (body[i] === BACKSLASH) {
                    i++
                }
            }
            keyStart = depth === 1 && !layout ? open : -1
            continue
        }
        if (byte === OPEN_BRACKET || byte === OPEN_BRACE) {
            depth++
            if (layout && layout.end < 0 && depth === 3 && byte === OPEN_BRACKET) {
                rowStart = i
            }
            if (depth === 2 && byte === OPEN_BRACKET && keyStart >= 0 && isResultsKey(body, keyStart, i)) {
                layout = { start: i, end: -1, bounds: [] }
            }
        } else if (byte === CLOSE_BRACKET || byte === CLOSE_BRACE) {
            if (layout && layout.end < 0 && depth === 3 && byte === CLOSE_BRACKET && rowStart >= 0) {
                layout.bounds.push(rowStart, i + 1)
                rowStart = -1
            }
            if (layout && layout.end < 0 && depth === 2) {
                layout.end = i + 1
            }
            depth--
        }
        if (byte !== COLON && !isSpace(byte)) {
            keyStart = -1
        }
    }
    return layout && layout.end > 0 ? layout : null
}

/** A page's body: the small fields, parsed; the rows, each parsed when asked for. */
export interface PageBody {
    /** The body with an empty `results`. */
    head: unknown
    rowCount: number
    /** Row `index` of `results`, parsed from the bytes (each call parses anew). */
    row(index: number): unknown
}

/** Reads a body lazily; null if it has no top-level `results` array. The bytes must not change while it is used. */
export function readPage(body: Buffer): PageBody | null {
    const layout = findResults(body)
    if (!layout) {
        return null
    }
    const encoding = isAscii(body) ? 'ascii' : 'utf8'
    const head: unknown = JSON.parse(
        body.toString(encoding, 0, layout.start) + '[]' + body.toString(encoding, layout.end, body.length)
    )
    const { bounds } = layout
    const rowCount = bounds.length / 2
    if (encoding === 'utf8') {
        // Byte offsets are not string offsets here: each row is decoded on its own.
        const row = (index: number): unknown =>
            JSON.parse(body.toString('utf8', bounds[2 * index], bounds[2 * index + 1])) as unknown
        return { head, rowCount, row }
    }
    // ASCII: rows are decoded ROWS_PER_DECODE at a time and each is parsed from a slice of that text (a V8 slice
    // shares its parent's characters), one decode call per group instead of one per row. Rows are read in order.
    let text = ''
    let textStart = 0
    const row = (index: number): unknown => {
        const start = bounds[2 * index] as number
        const end = bounds[2 * index + 1] as number
        if (start < textStart || end > textStart + text.length) {
            const last = Math.min(rowCount, index + ROWS_PER_DECODE) - 1
            textStart = start
            text = body.toString('ascii', start, bounds[2 * last + 1])
        }
        return JSON.parse(text.slice(start - textStart, end - textStart)) as unknown
    }
    return { head, rowCount, row }
}

/** A buffer grown past this (an unusually large page) is not kept for the next one. */
export const MAX_KEPT_BUFFER_BYTES = 64 * 1024 * 1024

function sizeText(bytes: number): string {
    return bytes >= 1024 * 1024 ? `${Math.round(bytes / 1024 / 1024)} MB` : `${Math.round(bytes / 1024)} KB`
}

export class BodyTooLargeError extends Error {
    name = 'BodyTooLargeError'
}

/** A body read into a kept buffer. `release` hands the buffer back for the next response; call it once done. */
export interface BodyLease {
    bytes: Buffer
    release: () => void
}

/**
 * Buffers for response bodies, reused from page to page. A buffer is lent out with each body and only reused once
 * released, so a page being read is never overwritten by the next response. At most `keep` buffers are kept
 * (the page being delivered and the one prefetched); any more are left to the garbage collector.
 */
export class BodyBuffers {
    private readonly free: Buffer[] = []

    constructor(
        private readonly keep = 2,
        private readonly maxKeptBytes = MAX_KEPT_BUFFER_BYTES
    ) {}

    /**
     * Reads the whole stream; throws BodyTooLargeError once it passes `maxBytes` (the rest is not read).
     * `expectedBytes` (Content-Length, if sent) sizes a new buffer at once instead of doubling up to it.
     */
    async read(stream: AsyncIterable<Uint8Array> | null, maxBytes: number, expectedBytes = 0): Promise<BodyLease> {
        let buffer = this.free.pop() ?? Buffer.allocUnsafeSlow(0)
        let length = 0
        try {
            for await (const chunk of stream ?? []) {
                if (length + chunk.length > maxBytes) {
                    throw new BodyTooLargeError(`the response passed ${sizeText(maxBytes)}`)
                }
                if (length + chunk.length > buffer.length) {
                    buffer = this.grow(buffer, length, length + chunk.length, maxBytes, expectedBytes)
                }
                buffer.set(chunk, length)
                length += chunk.length
            }
        } catch (error) {
            this.give(buffer)
            throw error
        }
        let released = false
        const kept = buffer
        return {
            bytes: kept.subarray(0, length),
            release: () => {
                if (!released) {
                    released = true
                    this.give(kept)
                }
            },
        }
    }

    /**
     * A larger buffer holding the first `length` bytes. At first, the announced size and an eighth more (the next
     * page is likely a little larger and then fits), if it is one worth keeping: a server cannot make this
     * allocate more than that by announcing it. Doubling after that, so a wrong announcement costs O(log n)
     * copies, not O(n).
     */
    private grow(buffer: Buffer, length: number, needed: number, maxBytes: number, expectedBytes: number): Buffer {
        const announced = length === 0 && expectedBytes >= needed && expectedBytes <= this.maxKeptBytes
        const wanted = announced ? expectedBytes + Math.ceil(expectedBytes / 8) : Math.max(needed, 2 * buffer.length)
        const grown = Buffer.allocUnsafeSlow(Math.min(maxBytes, wanted))
        buffer.copy(grown, 0, 0, length)
        return grown
    }

    private give(buffer: Buffer): void {
        if (this.free.length < this.keep && buffer.length > 0 && buffer.length <= this.maxKeptBytes) {
            this.free.push(buffer)
        }
    }
}

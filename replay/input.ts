/**
 * Streams events out of an export in constant memory: JSON Lines, one JSON array, or PostHog API pages
 * (`{"results": [...]}` objects, one per line or concatenated). Each record carries its ordinal, which is what
 * the checkpoint counts, so resuming works the same for every format. Bytes are decoded with a stateful decoder,
 * so a character split across two reads arrives whole, and a leading UTF-8 byte order mark is dropped.
 */
import { Readable } from 'node:stream'
import { StringDecoder } from 'node:string_decoder'

import { parser } from 'stream-json'
import { streamArray } from 'stream-json/streamers/StreamArray'
import { streamValues } from 'stream-json/streamers/StreamValues'

export const INPUT_FORMATS = ['jsonl', 'json', 'pages'] as const
export type InputFormat = (typeof INPUT_FORMATS)[number]

/** One record of input: an event, or a line that could not be read (sent to the dead-letter file, not skipped). */
export type InputRecord =
    | {
          ordinal: number
          kind: 'event'
          event: Record<string, unknown> & { event?: unknown; uuid?: unknown }
          /** The event's own JSON text where the format has one per line: reused when nothing is removed. */
          text?: string
      }
    | { ordinal: number; kind: 'malformed'; line: number | null; reason: string; raw: string }

/** How many bytes to look at before deciding the format, at least. */
export const SNIFF_BYTES = 64 * 1024
/** The format is decided on the first whole line; a first line longer than this is judged by its first key. */
export const MAX_SNIFF_BYTES = 8 * 1024 * 1024
/** How many bytes of the input's start the checkpoint fingerprints. */
export const FINGERPRINT_BYTES = 64 * 1024

const BOM = Buffer.from([0xef, 0xbb, 0xbf])

/** Input that cannot be replayed as it is, found before anything is sent: bad usage, not a failed run. */
export class InputError extends Error {
    constructor(message: string) {
        super(message)
        this.name = 'InputError'
    }
}

/** Compressed files, by their magic bytes, and the command that decompresses each to standard output. */
const COMPRESSIONS = [
    { name: 'gzip', magic: [0x1f, 0x8b], tool: 'gunzip', command: 'gunzip -c' },
    { name: 'zstd', magic: [0x28, 0xb5, 0x2f, 0xfd], tool: 'zstd', command: 'zstd -dc' },
    { name: 'bzip2', magic: [0x42, 0x5a, 0x68], tool: 'bzip2', command: 'bzip2 -dc' },
    { name: 'xz', magic: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], tool: 'xz', command: 'xz -dc' },
    { name: 'zip', magic: [0x50, 0x4b, 0x03, 0x04], tool: 'unzip', command: 'unzip -p' },
]

/**
 * Stops with the fix when the bytes are a compressed file: otherwise every "line" would be binary noise.
 * `label` names the input; `pipeInto` is the command that reads decompressed bytes on standard input, if any.
 */
export function refuseCompressed(head: Buffer, label: string | null, pipeInto: string | null = null): void {
    const found = COMPRESSIONS.find((c) => c.magic.every((byte, i) => head[i] === byte))
    if (found) {
        const file = label ?? 'FILE'
        const fix = pipeInto
            ? `pipe it through ${found.tool} (${found.command} ${file} | ${pipeInto})`
            : `decompress it first, e.g. ${found.command} ${file} > events.jsonl`
        throw new InputError(`this input is ${found.name}: ${fix}`)
    }
}

function isPage(value: unknown): boolean {
    const page = value as { results?: unknown; event?: unknown } | null
    return typeof page === 'object' && page !== null && Array.isArray(page.results) && typeof page.event !== 'string'
}

/**
 * Decides the format from the first bytes: `[` is an array; a first line that is a whole JSON value is an API page
 * if it has a `results` array (and no event name), else an event; a first line that is not (a pretty-printed
 * page) is a page if its first key is one of a page's.
 */
export function detectFormat(head: string): InputFormat {
    const text = head.replace(/^\uFEFF/, '').trimStart()
    if (text.startsWith('[')) {
        return 'json'
    }
    const newline = text.indexOf('\n')
    try {
        return isPage(JSON.parse(newline === -1 ? text : text.slice(0, newline))) ? 'pages' : 'jsonl'
    } catch {
        return /^\{\s*"(next|previous|count|results)"\s*:/.test(text) ? 'pages' : 'jsonl'
    }
}

function isEvent(value: unknown): value is Record<string, unknown> {
    return (
        typeof value === 'object' &&
        value !== null &&
        !Array.isArray(value) &&
        typeof (value as { event?: unknown }).event === 'string'
    )
}

/** Reads the stream's first bytes, up to the end of its first line, without losing them. */
async function sniff(input: AsyncIterable<Buffer | string>): Promise<{ head: Buffer; rest: AsyncIterable<Buffer> }> {
    const iterator = input[Symbol.asyncIterator]()
    const chunks: Buffer[] = []
    let size = 0
    let newline = false
    let done = false
    while (size < MAX_SNIFF_BYTES && (size < SNIFF_BYTES || !newline)) {
        const next = await iterator.next()
        if (next.done) {
            done = true
            break
        }
        const chunk = typeof next.value === 'string' ? Buffer.from(next.value) : next.value
        chunks.push(chunk)
        size += chunk.length
        newline ||= chunk.includes(10)
    }
    const head = Buffer.concat(chunks)
    async function* rest(): AsyncGenerator<Buffer> {
        try {
            yield head.subarray(0, BOM.length).equals(BOM) ? head.subarray(BOM.length) : head
            for (let next = done ? null : await iterator.next(); next && !next.done; next = await iterator.next()) {
                yield typeof next.value === 'string' ? Buffer.from(next.value) : next.value
            }
        } finally {
            // Stopping early closes the file.
            await iterator.return?.()
        }
    }
    return { head, rest: rest() }
}

/** A reader for one line: its record, or null for a blank line. */
function lineReader() {
    let ordinal = 0
    let lineNumber = 0
    return (line: string): InputRecord | null => {
        lineNumber++
        const text = line.endsWith('\r') ? line.slice(0, -1) : line
        if (!text.trim()) {
            return null
        }
        let value: unknown
        try {
            value = JSON.parse(text)
        } catch {
            return { ordinal: ordinal++, kind: 'malformed', line: lineNumber, reason: 'not valid JSON', raw: text }
        }
        if (isEvent(value)) {
            return { ordinal: ordinal++, kind: 'event', event: value, text }
        }
        const reason = 'not a PostHog event (no "event" name)'
        return { ordinal: ordinal++, kind: 'malformed', line: lineNumber, reason, raw: text }
    }
}

async function* jsonLines(input: AsyncIterable<Buffer>): AsyncGenerator<InputRecord[]> {
    const read = lineReader()
    // Stateful: a multi-byte character split between two reads is held back until its last byte arrives.
    const decoder = new StringDecoder('utf8')
    let carry = ''
    // One yield per chunk read, not per line: an await per event would cost more than parsing it.
    for await (const chunk of input) {
        const lines = (carry + decoder.write(chunk)).split('\n')
        carry = lines.pop() ?? ''
        const records: InputRecord[] = []
        for (const line of lines) {
            const record = read(line)
            if (record) {
                records.push(record)
            }
        }
        yield records
    }
    const last = read(carry + decoder.end())
    if (last) {
        yield [last]
    }
}

/** Pipes through the stream-json stages so that an error anywhere ends the iteration with that error. */
function through<T extends NodeJS.ReadWriteStream>(input: Readable, ...stages: NodeJS.ReadWriteStream[]): T {
    const last = stages[stages.length - 1] as T & { destroy: (error?: Error) => void }
    const fail = (error: Error): void => last.destroy(new Error(`the input is not valid JSON: ${error.message}`))
    input.on('error', (error) => last.destroy(error))
    let source: NodeJS.ReadableStream = input
    for (const stage of stages) {
        if (stage !== last) {
            stage.on('error', fail)
        }
        source = source.pipe(stage)
    }
    last.on('error', () => undefined)
    return last
}

function notAnEvent(ordinal: number, value: unknown, reason: string): InputRecord {
    return { ordinal, kind: 'malformed', line: null, reason, raw: JSON.stringify(value).slice(0, 1_000) }
}

async function* jsonArray(input: AsyncIterable<Buffer>): AsyncGenerator<InputRecord[]> {
    let ordinal = 0
    // stream-json decodes with a StringDecoder too.
    const items = through(Readable.from(input, { objectMode: false }), parser(), streamArray())
    for await (const item of items as AsyncIterable<{ key: number; value: unknown }>) {
        yield [
            isEvent(item.value)
                ? { ordinal: ordinal++, kind: 'event', event: item.value }
                : notAnEvent(ordinal++, item.value, `array item ${item.key} is not a PostHog event`),
        ]
    }
}

async function* apiPages(input: AsyncIterable<Buffer>): AsyncGenerator<InputRecord[]> {
    let ordinal = 0
    // One page in memory at a time: PostHog pages hold at most a few thousand events.
    const pages = through(Readable.from(input, { objectMode: false }), parser({ jsonStreaming: true }), streamValues())
    for await (const page of pages as AsyncIterable<{ key: number; value: unknown }>) {
        const results = (page.value as { results?: unknown }).results
        if (!Array.isArray(results)) {
            yield [notAnEvent(ordinal++, page.value, `page ${page.key + 1} has no "results" array`)]
            continue
        }
        yield results.map((value: unknown): InputRecord =>
            isEvent(value)
                ? { ordinal: ordinal++, kind: 'event', event: value }
                : notAnEvent(ordinal++, value, `an item of page ${page.key + 1} is not a PostHog event`)
        )
    }
}

export interface OpenedInput {
    format: InputFormat
    chunks: AsyncGenerator<InputRecord[]>
    /** The input's first bytes as read (at most FINGERPRINT_BYTES), for the checkpoint's fingerprint. */
    start: Buffer
}

/**
 * Reads records from an input stream, in chunks in input order, detecting the format unless one is given.
 * Throws an InputError for a compressed input, naming the input (`label`) and the command that could read it
 * decompressed on standard input (`pipeInto`).
 */
export async function readRecords(
    input: AsyncIterable<Buffer | string>,
    format: InputFormat | 'auto' = 'auto',
    label: string | null = null,
    pipeInto: string | null = null
): Promise<OpenedInput> {
    const { head, rest } = await sniff(input)
    refuseCompressed(head, label, pipeInto)
    const chosen = format === 'auto' ? detectFormat(head.toString('utf8')) : format
    const readers = { jsonl: jsonLines, json: jsonArray, pages: apiPages }
    // A copy, so a long first line is not kept alive by the fingerprint.
    const start = Buffer.from(head.subarray(0, FINGERPRINT_BYTES))
    return { format: chosen, chunks: readers[chosen](rest), start }
}

/**
 * Streams events out of an export file in constant memory: JSON Lines, one JSON array, or PostHog API pages
 * (`{"results": [...]}` objects, one per line or concatenated). Each record carries its ordinal, which is what
 * the checkpoint counts, so resuming works the same for every format.
 */
import { Readable } from 'node:stream'

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

/** How many bytes to look at before deciding the format. */
const SNIFF_BYTES = 64 * 1024

/** Decides the format from the first bytes: `[` is an array; an object with `results` is an API page; else lines. */
export function detectFormat(head: string): InputFormat {
    const text = head.replace(/^\uFEFF/, '').trimStart()
    if (text.startsWith('[')) {
        return 'json'
    }
    if (/^\{\s*"(next|previous|count)"\s*:/.test(text) || /^\{\s*"results"\s*:/.test(text)) {
        return 'pages'
    }
    const firstLine = text.split('\n', 1)[0] ?? ''
    try {
        const first = JSON.parse(firstLine) as Record<string, unknown>
        return Array.isArray(first.results) ? 'pages' : 'jsonl'
    } catch {
        // A first line that is not a whole JSON value: a pretty-printed page, or a malformed JSONL line.
        return /"results"\s*:\s*\[/.test(text) ? 'pages' : 'jsonl'
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

/** Reads the stream's first bytes without losing them. */
async function sniff(input: Readable): Promise<{ head: string; rest: Readable }> {
    const chunks: Buffer[] = []
    let size = 0
    const iterator = input[Symbol.asyncIterator]()
    let done = false
    while (size < SNIFF_BYTES) {
        const next = (await iterator.next()) as IteratorResult<Buffer | string>
        if (next.done) {
            done = true
            break
        }
        const chunk = typeof next.value === 'string' ? Buffer.from(next.value) : next.value
        chunks.push(chunk)
        size += chunk.length
    }
    const head = Buffer.concat(chunks)
    async function* replay(): AsyncGenerator<Buffer> {
        yield head
        if (!done) {
            for (;;) {
                const next = (await iterator.next()) as IteratorResult<Buffer | string>
                if (next.done) {
                    return
                }
                yield typeof next.value === 'string' ? Buffer.from(next.value) : next.value
            }
        }
    }
    return { head: head.toString('utf8'), rest: Readable.from(replay(), { objectMode: false }) }
}

async function* jsonLines(input: Readable): AsyncGenerator<InputRecord[]> {
    let ordinal = 0
    let lineNumber = 0
    let carry = ''
    const handle = (line: string): InputRecord | null => {
        lineNumber++
        const text = line.endsWith('\r') ? line.slice(0, -1) : line
        if (!text.trim()) {
            return null
        }
        try {
            const value: unknown = JSON.parse(text)
            if (isEvent(value)) {
                return { ordinal: ordinal++, kind: 'event', event: value, text }
            }
            return {
                ordinal: ordinal++,
                kind: 'malformed',
                line: lineNumber,
                reason: 'not a PostHog event (no "event" name)',
                raw: text,
            }
        } catch {
            return { ordinal: ordinal++, kind: 'malformed', line: lineNumber, reason: 'not valid JSON', raw: text }
        }
    }
    // One yield per chunk read, not per line: an await per event would cost more than parsing it.
    for await (const chunk of input) {
        const text = carry + (typeof chunk === 'string' ? chunk : (chunk as Buffer).toString('utf8'))
        const lines = text.split('\n')
        carry = lines.pop() ?? ''
        const records: InputRecord[] = []
        for (const line of lines) {
            const record = handle(line)
            if (record) {
                records.push(record)
            }
        }
        yield records
    }
    const last = carry ? handle(carry) : null
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

async function* jsonArray(input: Readable): AsyncGenerator<InputRecord[]> {
    let ordinal = 0
    const items = through(input, parser(), streamArray())
    for await (const item of items as AsyncIterable<{ key: number; value: unknown }>) {
        yield [
            isEvent(item.value)
                ? { ordinal: ordinal++, kind: 'event', event: item.value }
                : {
                      ordinal: ordinal++,
                      kind: 'malformed',
                      line: null,
                      reason: `array item ${item.key} is not a PostHog event`,
                      raw: JSON.stringify(item.value).slice(0, 1_000),
                  },
        ]
    }
}

async function* apiPages(input: Readable): AsyncGenerator<InputRecord[]> {
    let ordinal = 0
    // One page in memory at a time: PostHog pages hold at most a few thousand events.
    const pages = through(input, parser({ jsonStreaming: true }), streamValues())
    for await (const page of pages as AsyncIterable<{ key: number; value: unknown }>) {
        const results = (page.value as { results?: unknown }).results
        if (!Array.isArray(results)) {
            yield [
                {
                    ordinal: ordinal++,
                    kind: 'malformed',
                    line: null,
                    reason: `page ${page.key + 1} has no "results" array`,
                    raw: JSON.stringify(page.value).slice(0, 1_000),
                },
            ]
            continue
        }
        yield results.map((value: unknown): InputRecord =>
            isEvent(value)
                ? { ordinal: ordinal++, kind: 'event', event: value }
                : {
                      ordinal: ordinal++,
                      kind: 'malformed',
                      line: null,
                      reason: `an item of page ${page.key + 1} is not a PostHog event`,
                      raw: JSON.stringify(value).slice(0, 1_000),
                  }
        )
    }
}

/** Reads records from an input stream, in chunks in input order, detecting the format unless one is given. */
export async function readRecords(
    input: Readable,
    format: InputFormat | 'auto' = 'auto'
): Promise<{ format: InputFormat; chunks: AsyncGenerator<InputRecord[]> }> {
    const { head, rest } = await sniff(input)
    const chosen = format === 'auto' ? detectFormat(head) : format
    const readers = { jsonl: jsonLines, json: jsonArray, pages: apiPages }
    return { format: chosen, chunks: readers[chosen](rest) }
}

/**
 * What goes over the wire, PostHog's way: error bodies (drf-exceptions-hog's `{type, code, detail, attr}`), the
 * mapping of ClickHouse failures to PostHog's statuses, request parsing, and results rendered the way PostHog's
 * orjson renderer writes them. Sources: standin/FACTS.md §2–6.
 */
import { IncomingMessage, ServerResponse } from 'node:http'

import { EngineError } from './engine'
import { PERSONS_ON_EVENTS_MODES, quoteIdentifier } from './hogql'

/** PostHog's cap on a request body (`DATA_UPLOAD_MAX_MEMORY_SIZE`, 20 MB). */
export const MAX_BODY_BYTES = 20 * 1024 * 1024

export type ErrorType =
    'validation_error' | 'authentication_error' | 'invalid_request' | 'throttled_error' | 'server_error'

/** PostHog's error body (drf-exceptions-hog). */
export function errorBody(type: ErrorType, code: string, detail: string, attr: string | null = null) {
    return { type, code, detail, attr }
}

/** A response other than 200: its status, PostHog's error body and headers such as Retry-After. */
export class HttpError extends Error {
    constructor(
        readonly status: number,
        readonly body: ReturnType<typeof errorBody>,
        readonly headers: Record<string, string> = {}
    ) {
        super(body.detail)
    }
}

export const TIMEOUT_DETAIL =
    'Query has hit the max execution time before completing. See our docs for how to improve your query ' +
    'performance. You may need to materialize.'
/** ClickHouse errors PostHog answers with its own status and text (posthog/errors.py, posthog/exceptions.py). */
const CAPACITY_ERRORS: Readonly<Record<number, { status: number; detail: string }>> = {
    159: { status: 504, detail: TIMEOUT_DETAIL }, // TIMEOUT_EXCEEDED
    241: {
        status: 504, // MEMORY_LIMIT_EXCEEDED (per query)
        detail:
            'Query has reached the max memory limit before completing. See our docs for how to improve your query ' +
            'memory footprint. You may need to narrow date range or materialize.',
    },
    202: {
        status: 503, // TOO_MANY_SIMULTANEOUS_QUERIES
        detail: "Queries are a little too busy right now. We're working to free up resources. Please try again later.",
    },
    160: {
        status: 512, // TOO_SLOW
        detail: 'Estimated query execution time is too long. Try reducing its scope by changing the time range.',
    },
}

/** ClickHouse error codes PostHog passes to the user as a 400 with their name (posthog/errors.py). */
const USER_ERROR_CODES: Readonly<Record<number, string>> = {
    43: 'illegal_type_of_argument',
    386: 'no_common_type',
    215: 'not_an_aggregate',
    46: 'unknown_function',
    53: 'type_mismatch',
    184: 'illegal_aggregation',
    42: 'number_of_arguments_doesnt_match',
    376: 'cannot_parse_uuid',
}

/**
 * ClickHouse's JSONCompactEachRow output (one JSON array per line) as one JSON array of rows, on the bytes: a raw
 * newline only ever separates rows (JSON escapes newlines inside strings). With `pageSize`, PostHog's paginator:
 * keep the first `pageSize` rows and report whether there were more.
 */
export function rowsToJsonArray(
    output: Buffer,
    pageSize: number | null
): { json: Buffer; hasMore: boolean | null; rows: number } {
    let rows = 0
    let end = output.length
    let hasMore: boolean | null = pageSize === null ? null : false
    for (let at = output.indexOf(0x0a); at !== -1; at = output.indexOf(0x0a, at + 1)) {
        rows += 1
        if (pageSize !== null && rows === pageSize) {
            hasMore = at + 1 < output.length
            end = at
            break
        }
        if (at === output.length - 1) {
            end = at
        } else {
            output[at] = 0x2c
        }
    }
    const json = Buffer.concat([Buffer.from('['), output.subarray(0, end), Buffer.from(']')])
    return { json, hasMore, rows: Math.min(rows, pageSize ?? rows) }
}

/** orjson's rendering of a UTC datetime: RFC 3339 with `Z`, microseconds only when non-zero. */
export function posthogDateTime(ms: number): string {
    const iso = new Date(ms).toISOString()
    return iso.endsWith('.000Z') ? iso.replace('.000Z', 'Z') : iso.replace('Z', '000Z')
}

/** The ClickHouse expression that renders a result column as PostHog's JSON renderer would. */
export function formatColumn(alias: string, type: string): string {
    const column = quoteIdentifier(alias)
    const base = type.replace(/^Nullable\((.*)\)$/, '$1')
    if (base.startsWith('DateTime64')) {
        return (
            `if(toMicrosecond(${column}) = 0, formatDateTime(${column}, '%Y-%m-%dT%H:%i:%SZ', 'UTC'), ` +
            `formatDateTime(toDateTime64(${column}, 6), '%Y-%m-%dT%H:%i:%S.%fZ', 'UTC'))`
        )
    }
    if (base.startsWith('DateTime')) {
        return `formatDateTime(${column}, '%Y-%m-%dT%H:%i:%SZ', 'UTC')`
    }
    return column
}

export function readBody(req: IncomingMessage): Promise<string> {
    return new Promise((resolve, reject) => {
        const chunks: Buffer[] = []
        let size = 0
        req.on('data', (chunk: Buffer) => {
            size += chunk.length
            if (size > MAX_BODY_BYTES) {
                reject(new HttpError(413, errorBody('invalid_request', 'request_too_large', 'Request body too large.')))
                req.destroy()
                return
            }
            chunks.push(chunk)
        })
        req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')))
        req.on('error', reject)
    })
}

/**
 * The personal API key and where it was found, in PostHog's order (`PersonalAPIKeyAuthentication`): the
 * `Authorization: Bearer <key>` header (case-sensitive), a `personal_api_key` body field, the query string.
 */
export function findApiKey(req: IncomingMessage, raw: string): { key: string; source: string } | null {
    const match = /^Bearer\s+(\S.+)$/.exec(req.headers.authorization ?? '')
    if (match) {
        return { key: (match[1] as string).trim(), source: 'Authorization header' }
    }
    try {
        const body = JSON.parse(raw) as { personal_api_key?: unknown } | null
        if (body && typeof body.personal_api_key === 'string') {
            return { key: body.personal_api_key, source: 'body' }
        }
    } catch {
        // Not JSON: the body is refused later, with PostHog's parse error.
    }
    const fromQuery = new URL(req.url ?? '/', 'http://standin').searchParams.get('personal_api_key')
    return fromQuery ? { key: fromQuery, source: 'query string' } : null
}

/** A request body as the stand-in records it: never the key a client may send in it. */
export function redactKey(body: unknown): unknown {
    if (body && typeof body === 'object' && 'personal_api_key' in body) {
        return { ...(body as Record<string, unknown>), personal_api_key: '[redacted]' }
    }
    return body
}

export interface QueryRequestBody {
    query: {
        kind: 'HogQLQuery'
        query: string
        values?: Record<string, unknown>
        /** HogQL query modifiers; the stand-in reads `personsOnEventsMode`. */
        modifiers?: { personsOnEventsMode?: string; [name: string]: unknown } | null
    }
    refresh?: unknown
    name?: unknown
}

/** Validates the request body the way PostHog's QueryRequest model does for the fields the stand-in reads. */
export function parseRequest(raw: string): QueryRequestBody {
    let parsed: unknown
    try {
        parsed = JSON.parse(raw)
    } catch (error) {
        const detail = `JSON parse error - ${(error as Error).message}`
        throw new HttpError(400, errorBody('invalid_request', 'parse_error', detail))
    }
    const body = parsed as Partial<QueryRequestBody> | null
    if (!body || typeof body !== 'object' || !body.query || typeof body.query !== 'object') {
        throw new HttpError(400, errorBody('validation_error', 'invalid_input', 'Field required', 'query'))
    }
    if (body.query.kind !== 'HogQLQuery') {
        const detail = `The PostHog stand-in serves HogQLQuery only, not ${JSON.stringify(body.query.kind)}.`
        throw new HttpError(400, errorBody('validation_error', 'invalid_input', detail, 'query'))
    }
    if (typeof body.query.query !== 'string') {
        throw new HttpError(400, errorBody('validation_error', 'invalid_input', 'Field required', 'query__query'))
    }
    const values = body.query.values
    if (values !== undefined && values !== null && (typeof values !== 'object' || Array.isArray(values))) {
        const detail = 'Input should be a valid dictionary'
        throw new HttpError(400, errorBody('validation_error', 'invalid_input', detail, 'query__values'))
    }
    checkModifiers(body.query.modifiers)
    return body as QueryRequestBody
}

/** `modifiers` as PostHog's `HogQLQueryModifiers` model checks the one the stand-in reads (pydantic's message). */
function checkModifiers(modifiers: unknown): void {
    if (modifiers === undefined || modifiers === null) {
        return
    }
    if (typeof modifiers !== 'object' || Array.isArray(modifiers)) {
        const detail = 'Input should be a valid dictionary or instance of HogQLQueryModifiers'
        throw new HttpError(400, errorBody('validation_error', 'invalid_input', detail, 'query__modifiers'))
    }
    const mode = (modifiers as { personsOnEventsMode?: unknown }).personsOnEventsMode
    if (mode !== undefined && mode !== null && !(PERSONS_ON_EVENTS_MODES as readonly unknown[]).includes(mode)) {
        const names = PERSONS_ON_EVENTS_MODES.map((m) => `'${m}'`)
        const detail = `Input should be ${names.slice(0, -1).join(', ')} or ${names[names.length - 1]}`
        const attr = 'query__modifiers__personsOnEventsMode'
        throw new HttpError(400, errorBody('validation_error', 'invalid_input', detail, attr))
    }
}

/** ClickHouse failures as PostHog reports them: timeout 504, user errors 400, anything else 500. */
export function queryError(error: unknown): HttpError {
    if (error instanceof HttpError) {
        return error
    }
    if (error instanceof EngineError) {
        const capacity = CAPACITY_ERRORS[error.clickhouseCode ?? -1]
        if (capacity) {
            return new HttpError(capacity.status, errorBody('server_error', 'error', capacity.detail))
        }
        const name = error.clickhouseCode !== null ? USER_ERROR_CODES[error.clickhouseCode] : undefined
        if (name) {
            const message = error.message
                .replace(/^[\s\S]*?DB::Exception:\s*/, '')
                .replace(/\s*Stack trace:[\s\S]*$/, '')
            return new HttpError(400, errorBody('validation_error', name, message.trim()))
        }
    }
    return new HttpError(500, errorBody('server_error', 'error', 'ClickHouse error while executing query.'))
}

export function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    sendText(res, status, JSON.stringify(body), headers)
}

export function sendText(
    res: ServerResponse,
    status: number,
    text: string | Buffer,
    headers: Record<string, string> = {}
): void {
    if (res.headersSent || res.destroyed) {
        return
    }
    res.writeHead(status, {
        'Content-Type': 'application/json',
        'Content-Length': Buffer.byteLength(text),
        ...headers,
    })
    res.end(text)
}

/** A 200 written from pieces, with the length of them all: a large body is never copied into one buffer. */
export function sendParts(res: ServerResponse, status: number, parts: readonly Buffer[]): void {
    if (res.headersSent || res.destroyed) {
        return
    }
    res.writeHead(status, {
        'Content-Type': 'application/json',
        'Content-Length': parts.reduce((sum, part) => sum + part.length, 0),
    })
    res.cork()
    for (const part of parts) {
        res.write(part)
    }
    res.end()
}

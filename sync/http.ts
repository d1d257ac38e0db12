/**
 * The query client's one I/O function: a JSON POST over node:http(s), its answer read into a kept buffer.
 *
 * Not fetch: a page is megabytes, and fetch hands them over through a web stream that copies every chunk, which
 * cost the sync more CPU than reading the rows (tools/bench/sync.ts). Redirects are never followed (the caller refuses
 * them: they would carry the API key elsewhere). Bodies may come gzip-compressed, as PostHog's edge sends them to
 * clients that ask; the size bound applies to the unpacked bytes, so a small bomb cannot get past it.
 */
import { ClientRequest, IncomingMessage, request as httpRequest } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { createGunzip } from 'node:zlib'

import { BodyLease } from './body'

export interface PostAnswer {
    status: number
    /** A response header by lowercase name, or null. */
    header: (name: string) => string | null
    body: BodyLease
}

export interface PostOptions {
    headers: Record<string, string>
    body: string
    /** Aborting ends the request and the body read with an error. */
    signal: AbortSignal
    /** A connection not made within this long fails with code ETIMEDOUT (0: no limit but the signal's). */
    connectTimeoutMs?: number
    /** Reads the (unpacked) body; `expectedBytes` is the announced size, or 0. */
    read: (stream: AsyncIterable<Uint8Array>, expectedBytes: number) => Promise<BodyLease>
}

/** Fails the request if its socket has not connected within `ms`: a host that drops packets never refuses. */
function limitConnectTime(request: ClientRequest, ms: number): void {
    request.once('socket', (socket) => {
        if (!socket.connecting) {
            return
        }
        const timer = setTimeout(() => {
            const error = Object.assign(new Error(`no connection within ${ms} ms`), { code: 'ETIMEDOUT' })
            request.destroy(error)
        }, ms)
        socket.once('connect', () => clearTimeout(timer))
        request.once('close', () => clearTimeout(timer))
    })
}

function responseTo(url: URL, options: PostOptions): Promise<IncomingMessage> {
    const send = url.protocol === 'https:' ? httpsRequest : httpRequest
    return new Promise((resolve, reject) => {
        const request = send(url, {
            method: 'POST',
            headers: {
                ...options.headers,
                'Accept-Encoding': 'gzip',
                'Content-Length': String(Buffer.byteLength(options.body)),
            },
            signal: options.signal,
        })
        request.once('response', resolve)
        request.once('error', reject)
        if (options.connectTimeoutMs) {
            limitConnectTime(request, options.connectTimeoutMs)
        }
        request.end(options.body)
    })
}

export async function postJson(url: URL, options: PostOptions): Promise<PostAnswer> {
    const response = await responseTo(url, options)
    const header = (name: string): string | null => {
        const value = response.headers[name]
        return Array.isArray(value) ? (value[0] ?? null) : (value ?? null)
    }
    let stream: AsyncIterable<Uint8Array> = response
    let expectedBytes = Number(header('content-length'))
    if (/^\s*(x-)?gzip\s*$/i.test(header('content-encoding') ?? '')) {
        const gunzip = createGunzip()
        response.once('error', (error) => gunzip.destroy(error))
        stream = response.pipe(gunzip)
        expectedBytes = 0
    }
    try {
        const body = await options.read(stream, Number.isSafeInteger(expectedBytes) ? expectedBytes : 0)
        return { status: response.statusCode ?? 0, header, body }
    } catch (error) {
        // Not read to its end (too large, aborted): the connection cannot be reused, and is closed now.
        response.destroy()
        throw error
    }
}

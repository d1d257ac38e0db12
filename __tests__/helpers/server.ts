import { createServer, IncomingHttpHeaders, Server } from 'node:http'
import { AddressInfo, Socket } from 'node:net'

/** What the test server got: one entry per request, in arrival order. */
export interface ReceivedRequest {
    method: string
    path: string
    headers: IncomingHttpHeaders
    body: string
}

/** How the test server answers one request. */
export type Reply =
    { status: number; headers?: Record<string, string>; body?: string; delayMs?: number } | 'reset' | 'hang'

export type Responder = (request: ReceivedRequest, index: number) => Reply | Promise<Reply>

export interface TestServer {
    url: string
    received: ReceivedRequest[]
    /** Every event that arrived in an answered-2xx request body, in order. */
    accepted: Record<string, unknown>[]
    close: () => Promise<void>
}

export const WEBHOOK_TOKEN = 'wh_5ecret_T0ken_9f8e7d6c5b4a'

/** A real HTTP server on 127.0.0.1 whose answers the test scripts. */
export async function startServer(responder: Responder): Promise<TestServer> {
    const received: ReceivedRequest[] = []
    const accepted: Record<string, unknown>[] = []
    const sockets = new Set<Socket>()
    const server: Server = createServer((req, res) => {
        const chunks: Buffer[] = []
        req.on('data', (chunk: Buffer) => chunks.push(chunk))
        req.on('end', () => {
            const request: ReceivedRequest = {
                method: req.method ?? '',
                path: req.url ?? '',
                headers: req.headers,
                body: Buffer.concat(chunks).toString('utf8'),
            }
            const index = received.length
            received.push(request)
            void Promise.resolve(responder(request, index)).then(async (reply) => {
                if (reply === 'hang') {
                    return
                }
                if (reply === 'reset') {
                    req.socket.destroy()
                    return
                }
                if (reply.delayMs) {
                    await new Promise((resolve) => setTimeout(resolve, reply.delayMs))
                }
                if (reply.status >= 200 && reply.status < 300) {
                    accepted.push(...(JSON.parse(request.body) as Record<string, unknown>[]))
                }
                res.writeHead(reply.status, reply.headers ?? {})
                res.end(reply.body ?? '')
            })
        })
    })
    server.on('connection', (socket) => {
        sockets.add(socket)
        socket.on('close', () => sockets.delete(socket))
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const { port } = server.address() as AddressInfo
    return {
        url: `http://127.0.0.1:${port}/api/v1/webhooks/${WEBHOOK_TOKEN}`,
        received,
        accepted,
        close: async () => {
            for (const socket of sockets) {
                socket.destroy()
            }
            await new Promise<void>((resolve) => server.close(() => resolve()))
        },
    }
}

/** Events in a request body. */
export function eventsIn(request: ReceivedRequest | undefined): Record<string, unknown>[] {
    if (!request) {
        throw new Error('no such request')
    }
    return JSON.parse(request.body) as Record<string, unknown>[]
}

/**
 * The servers of one test file: `start` runs one with a responder, `serve` one that answers from a script (a list
 * of replies, then 200s, or a function of the request index). Each test's servers are closed after it.
 */
export function perTestServers(): {
    start: (responder: Responder) => Promise<TestServer>
    serve: (replies: Reply[] | ((index: number) => Reply)) => Promise<TestServer>
} {
    const open: TestServer[] = []
    afterEach(async () => {
        await Promise.all(open.splice(0).map((s) => s.close()))
    })
    const start = async (responder: Responder): Promise<TestServer> => {
        const s = await startServer(responder)
        open.push(s)
        return s
    }
    const serve = (replies: Reply[] | ((index: number) => Reply)): Promise<TestServer> =>
        start((_request, index) =>
            typeof replies === 'function' ? replies(index) : (replies[index] ?? { status: 200 })
        )
    return { start, serve }
}

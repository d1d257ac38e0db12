/**
 * The embedded receiver on its own thread, for the bench: a webhook never shares the plugin server's thread, and
 * a receiver answering one request per event on the host's own thread would slow the per-event app most.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads'

import { startReceiver } from '../../receiver/receiver'

type Reply = { type: 'url'; url: string } | { type: 'requests'; requests: number } | { type: 'closed' }

export interface ReceiverThread {
    url: string
    requests: () => Promise<number>
    close: () => Promise<void>
}

export async function startReceiverThread(latencyMs: number): Promise<ReceiverThread> {
    const worker = new Worker(join(__dirname, 'receiver-entry.js'), { workerData: { latencyMs } })
    const next = <T extends Reply['type']>(type: T): Promise<Extract<Reply, { type: T }>> =>
        new Promise((resolve, reject) => {
            const onMessage = (reply: Reply): void => {
                if (reply.type === type) {
                    worker.off('message', onMessage)
                    resolve(reply as Extract<Reply, { type: T }>)
                }
            }
            worker.on('message', onMessage)
            worker.once('error', reject)
        })
    const { url } = await next('url')
    return {
        url,
        requests: async () => {
            const reply = next('requests')
            worker.postMessage('requests')
            return (await reply).requests
        },
        close: async () => {
            const reply = next('closed')
            worker.postMessage('close')
            await reply
            await worker.terminate()
        },
    }
}

async function serve(): Promise<void> {
    const port = parentPort
    if (!port) {
        return
    }
    const dataDir = mkdtempSync(join(tmpdir(), 'bench-rx-'))
    const rx = await startReceiver({
        dataDir,
        persist: false,
        faults: { latencyMs: (workerData as { latencyMs: number }).latencyMs },
    })
    port.on('message', (message: string) => {
        if (message === 'requests') {
            port.postMessage({ type: 'requests', requests: rx.summary().requests } satisfies Reply)
        } else {
            void rx.close().then(() => {
                rmSync(dataDir, { recursive: true, force: true })
                port.postMessage({ type: 'closed' } satisfies Reply)
            })
        }
    })
    port.postMessage({ type: 'url', url: rx.url } satisfies Reply)
}

if (!isMainThread) {
    void serve()
}

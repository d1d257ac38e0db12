/**
 * One host worker thread on the Kafka path, like one of the 2021 host's piscina threads: its own VM and its own
 * `meta.global`, set up when the thread starts, and the tasks the consumer sends it (processEvent, onEvent,
 * ingestEvent), each answered with a plain copy of its result.
 */
import { parentPort, workerData } from 'node:worker_threads'

import type { ExportJob } from './export-path'
import { InstanceOptions, PluginInstance } from './instance'
import { StorageError, StoreTransport } from './storage'
import type { DbOp } from './storage-db'

export type WorkerTask = 'processEvent' | 'onEvent' | 'ingestEvent' | 'runEveryMinute'

/** The main thread's answer to a storage or cache call. */
export type StoreAnswer =
    | { type: 'store'; id: number; ok: true; value: unknown }
    | { type: 'store'; id: number; ok: false; message: string; code: string | null }

export type ToWorker =
    | { type: 'task'; id: number; task: WorkerTask; args: { event: Record<string, unknown> } }
    | { type: 'report'; id: number; settle: boolean }
    | { type: 'teardown'; id: number }
    | StoreAnswer

export type FromWorker =
    | { type: 'log'; line: string }
    | { type: 'ready' }
    | { type: 'result'; id: number; value: unknown }
    | { type: 'job'; job: ExportJob; seconds: number }
    /** A storage or cache call for the install's database, which the main thread holds. */
    | { type: 'store'; id: number; op: DbOp; args: unknown[] }

export type WorkerData = Omit<InstanceOptions, 'log' | 'now' | 'onGuard' | 'enqueueJob' | 'store'>

/** meta.storage and meta.cache in a worker thread: each call goes to the main thread and waits for its answer. */
function remoteStore(send: (message: FromWorker) => void) {
    const waiting = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void }>()
    let nextId = 1
    const transport: StoreTransport = (op, args) =>
        new Promise((resolve, reject) => {
            const id = nextId++
            waiting.set(id, { resolve, reject })
            send({ type: 'store', id, op, args })
        })
    const answer = (message: StoreAnswer): void => {
        const call = waiting.get(message.id)
        waiting.delete(message.id)
        if (message.ok) {
            call?.resolve(message.value)
        } else {
            call?.reject(new StorageError(message.message, message.code))
        }
    }
    return { transport, answer }
}

/** The host copies each task's result, key by key, out of any VM proxies before sending it back. */
export function plainCopy(value: unknown): unknown {
    if (value === null || typeof value !== 'object') {
        return value
    }
    if (Array.isArray(value)) {
        return value.map(plainCopy)
    }
    const copy: Record<string, unknown> = {}
    for (const key in value) {
        copy[key] = plainCopy((value as Record<string, unknown>)[key])
    }
    return copy
}

function main(): void {
    const port = parentPort
    if (!port) {
        throw new Error('host/worker.ts runs only as a worker thread')
    }
    const send = (message: FromWorker): void => port.postMessage(message)
    const store = remoteStore(send)
    const instance = new PluginInstance({
        ...(workerData as WorkerData),
        log: (line) => send({ type: 'log', line }),
        enqueueJob: (job, seconds) => send({ type: 'job', job, seconds }),
        store: store.transport,
    })
    const tasks: Record<WorkerTask, (args: { event: Record<string, unknown> }) => Promise<unknown>> = {
        processEvent: (args) => instance.processEvent(args.event),
        onEvent: (args) => instance.onEvent(args.event),
        // Writing the event to the database is out of scope; the task's round trip is not.
        ingestEvent: async () => null,
        runEveryMinute: () => instance.runEveryMinute(),
    }
    port.on('message', (message: ToWorker) => {
        if (message.type === 'store') {
            store.answer(message)
        } else if (message.type === 'task') {
            void tasks[message.task](message.args).then((value) =>
                send({ type: 'result', id: message.id, value: plainCopy(value) })
            )
        } else if (message.type === 'report') {
            const settled = message.settle ? instance.settled() : Promise.resolve()
            void settled
                .then(() => instance.senderStats())
                .then((stats) => {
                    const value = {
                        stats,
                        setup: { ...instance.setup },
                        exportMetrics: { ...instance.exportMetrics },
                        undeliveredUuids: instance.undeliveredUuids,
                        pluginMetrics: instance.pluginMetrics.values,
                    }
                    send({ type: 'result', id: message.id, value })
                })
        } else {
            // Teardown flushes the export buffer; the thread answers once every batch it handed over was handled.
            void instance
                .teardown()
                .then(() => instance.exportsDrained())
                .then(() => send({ type: 'result', id: message.id, value: null }))
        }
    })
    void instance.started().then(() => send({ type: 'ready' }))
}

main()

/**
 * One host worker thread on the Kafka path, like one of the 2021 host's piscina threads: its own VM and its own
 * `meta.global`, set up when the thread starts, and the tasks the consumer sends it (processEvent, onEvent,
 * ingestEvent), each answered with a plain copy of its result.
 */
import { parentPort, workerData } from 'node:worker_threads'

import type { ExportJob } from './export-path'
import { InstanceOptions, PluginInstance } from './instance'

export type WorkerTask = 'processEvent' | 'onEvent' | 'ingestEvent'

export type ToWorker =
    | { type: 'task'; id: number; task: WorkerTask; args: { event: Record<string, unknown> } }
    | { type: 'report'; id: number; settle: boolean }
    | { type: 'teardown'; id: number }

export type FromWorker =
    | { type: 'log'; line: string }
    | { type: 'ready' }
    | { type: 'result'; id: number; value: unknown }
    | { type: 'job'; job: ExportJob; seconds: number }

export type WorkerData = Omit<InstanceOptions, 'log' | 'now' | 'onGuard' | 'enqueueJob'>

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
    const instance = new PluginInstance({
        ...(workerData as WorkerData),
        log: (line) => send({ type: 'log', line }),
        enqueueJob: (job, seconds) => send({ type: 'job', job, seconds }),
    })
    const tasks: Record<WorkerTask, (args: { event: Record<string, unknown> }) => Promise<unknown>> = {
        processEvent: (args) => instance.processEvent(args.event),
        onEvent: (args) => instance.onEvent(args.event),
        // Writing the event to the database is out of scope; the task's round trip is not.
        ingestEvent: async () => null,
    }
    port.on('message', (message: ToWorker) => {
        if (message.type === 'task') {
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

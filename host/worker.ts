/**
 * One host worker thread on the Kafka path, like one of the 2021 host's piscina threads: its own VM and its own
 * `meta.global`, set up when the thread starts, and the tasks the consumer sends it (processEvent, onEvent,
 * ingestEvent), each answered with a plain copy of its result.
 */
import { parentPort, workerData } from 'node:worker_threads'

import { InstanceOptions, PluginInstance } from './instance'

export type WorkerTask = 'processEvent' | 'onEvent' | 'ingestEvent'

export type ToWorker =
    | { type: 'task'; id: number; task: WorkerTask; args: { event: Record<string, unknown> } }
    | { type: 'report'; id: number; settle: boolean }
    | { type: 'teardown'; id: number }

export type FromWorker =
    { type: 'log'; line: string } | { type: 'ready' } | { type: 'result'; id: number; value: unknown }

export type WorkerData = Omit<InstanceOptions, 'log' | 'now' | 'onGuard'>

/** The host copies each task's result out of the VM's proxies before sending it back. */
function plainCopy(value: unknown): unknown {
    return value === undefined ? undefined : (JSON.parse(JSON.stringify(value)) as unknown)
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
                .then((stats) =>
                    send({ type: 'result', id: message.id, value: { stats, setup: { ...instance.setup } } })
                )
        } else {
            void instance.teardown().then(() => send({ type: 'result', id: message.id, value: null }))
        }
    })
    void instance.started().then(() => send({ type: 'ready' }))
}

main()

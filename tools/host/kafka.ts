/**
 * The classic hosts' production Kafka path (docs/hosts.md): the consumer cuts each Kafka batch
 * into micro-batches of WORKER_CONCURRENCY × TASKS_PER_WORKER, and for each message runs a processEvent task on a
 * worker thread, then its onEvent and ingestEvent tasks. The next micro-batch starts once all of this one settled.
 * So the calls of one micro-batch reach a VM one message at a time, spread over several macrotasks.
 */
import { cpus } from 'node:os'
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'

import type { SenderStats } from '../../index'
import type { ExportJob, ExportMetrics } from './export-path'
import type { CallOutcome, SetupStatus } from './instance'
import type { PluginMetricValues } from './plugin-metrics'
import type { StoreTransport } from './storage'
import type { FromWorker, StoreAnswer, ToWorker, WorkerData, WorkerTask } from './worker'

/** The 2021 host's defaults: one worker thread per core, 10 tasks in flight per worker. */
export const DEFAULT_WORKERS = Math.max(1, cpus().length)
export const DEFAULT_TASKS_PER_WORKER = 10
/** The host's "still running" warning timer around each task, cleared when the task settles. */
const TASK_WARNING_MS = 30_000

type TaskMessage = Omit<Extract<ToWorker, { type: 'task' }>, 'id'>

interface Slot {
    worker: Worker
    inFlight: number
    /** Set once the thread died: it gets no more tasks, and its tasks in flight were rejected. */
    dead: Error | null
}

interface Pending {
    resolve: (value: unknown) => void
    reject: (error: Error) => void
    slot: Slot
    /** Tasks count against the thread's limit; reports and teardown do not. */
    counted: boolean
}

export interface WorkerReport {
    stats: SenderStats | null
    setup: SetupStatus
    exportMetrics: ExportMetrics
    undeliveredUuids: string[]
    pluginMetrics: PluginMetricValues
}

/**
 * A pool of worker threads that hands each task to the least busy thread with room (at most `tasksPerWorker`
 * tasks in flight on one thread), queueing the rest, as piscina does.
 */
export class WorkerPool {
    private readonly slots: Slot[] = []
    private readonly queue: Array<{
        message: TaskMessage
        resolve: (value: unknown) => void
        reject: (error: Error) => void
    }> = []
    private readonly pending = new Map<number, Pending>()
    private nextId = 1
    private readonly ready: Promise<void>
    private tornDown = false

    constructor(
        workers: number,
        readonly tasksPerWorker: number,
        data: WorkerData,
        log: (line: string, worker: number) => void,
        enqueueJob: (job: ExportJob, seconds: number) => void,
        /** The install's database: every thread's storage and cache calls come here. */
        store: StoreTransport
    ) {
        const started: Promise<void>[] = []
        for (let n = 0; n < workers; n++) {
            const worker = new Worker(join(__dirname, 'worker-entry.js'), { workerData: data })
            const slot: Slot = { worker, inFlight: 0, dead: null }
            this.slots.push(slot)
            worker.on('error', (error) => this.died(slot, error))
            started.push(
                new Promise((resolve, reject) => {
                    worker.once('error', reject)
                    worker.on('message', (message: FromWorker) => {
                        if (message.type === 'log') {
                            log(message.line, n)
                        } else if (message.type === 'job') {
                            enqueueJob(message.job, message.seconds)
                        } else if (message.type === 'store') {
                            void answerStore(worker, store, message)
                        } else if (message.type === 'ready') {
                            resolve()
                        } else {
                            this.settle(message.id, message.value)
                        }
                    })
                })
            )
        }
        this.ready = Promise.all(started).then(() => undefined)
    }

    /** Resolves once every thread has made its first setup attempt. */
    started(): Promise<void> {
        return this.ready
    }

    run(task: WorkerTask, event: Record<string, unknown>): Promise<unknown> {
        return this.enqueue({ type: 'task', task, args: { event } })
    }

    /**
     * Asks every thread, outside the task limit, for its sender counters and setup state; with `settle`, once its
     * setup has succeeded or the plugin was disabled.
     */
    reports(settle = false): Promise<WorkerReport[]> {
        return Promise.all(
            this.slots.filter((slot) => !slot.dead).map((slot) => this.direct(slot, { type: 'report', id: 0, settle }))
        ) as Promise<WorkerReport[]>
    }

    /** teardownPlugin in every thread: the export path's last flush, awaited until its batches were handled. */
    async teardown(): Promise<void> {
        if (!this.tornDown) {
            this.tornDown = true
            await Promise.allSettled(this.slots.map((slot) => this.direct(slot, { type: 'teardown', id: 0 })))
        }
    }

    async close(): Promise<void> {
        await this.teardown()
        await Promise.all(this.slots.map((slot) => slot.worker.terminate()))
    }

    /** A crashed thread fails its tasks in flight, and the queue once no thread is left. */
    private died(slot: Slot, error: Error): void {
        slot.dead = error
        for (const [id, pending] of this.pending) {
            if (pending.slot === slot) {
                this.pending.delete(id)
                pending.reject(new Error(`a host worker thread crashed: ${error.message}`))
            }
        }
        if (this.slots.every((s) => s.dead)) {
            for (const queued of this.queue.splice(0)) {
                queued.reject(new Error(`every host worker thread crashed: ${error.message}`))
            }
        }
    }

    private direct(slot: Slot, message: Exclude<ToWorker, { type: 'task' }>): Promise<unknown> {
        if (slot.dead) {
            return Promise.reject(slot.dead)
        }
        const id = this.nextId++
        return new Promise((resolve, reject) => {
            // Not counted against the thread's task limit.
            this.pending.set(id, { resolve, reject, slot, counted: false })
            slot.worker.postMessage({ ...message, id })
        })
    }

    private enqueue(message: TaskMessage): Promise<unknown> {
        return new Promise((resolve, reject) => {
            this.queue.push({ message, resolve, reject })
            this.dispatch()
        })
    }

    private dispatch(): void {
        while (this.queue.length > 0) {
            let best: Slot | undefined
            for (const slot of this.slots) {
                if (!slot.dead && slot.inFlight < this.tasksPerWorker && (!best || slot.inFlight < best.inFlight)) {
                    best = slot
                }
            }
            if (!best) {
                return
            }
            const next = this.queue.shift()
            if (!next) {
                return
            }
            const id = this.nextId++
            best.inFlight++
            this.pending.set(id, { resolve: next.resolve, reject: next.reject, slot: best, counted: true })
            best.worker.postMessage({ ...next.message, id } satisfies ToWorker)
        }
    }

    private settle(id: number, value: unknown): void {
        const pending = this.pending.get(id)
        if (!pending) {
            return
        }
        this.pending.delete(id)
        if (pending.counted) {
            pending.slot.inFlight--
        }
        pending.resolve(value)
        this.dispatch()
    }
}

/** Runs a worker's storage or cache call on the install's database and posts the answer back to that worker. */
async function answerStore(
    worker: Worker,
    store: StoreTransport,
    call: Extract<FromWorker, { type: 'store' }>
): Promise<void> {
    let answer: StoreAnswer
    try {
        answer = { type: 'store', id: call.id, ok: true, value: await store(call.op, call.args) }
    } catch (error) {
        const e = error as { message?: string; code?: unknown }
        const code = typeof e.code === 'string' ? e.code : null
        answer = { type: 'store', id: call.id, ok: false, message: e.message ?? String(error), code }
    }
    worker.postMessage(answer satisfies ToWorker)
}

/** Cuts a batch into micro-batches of `size`, as the consumer's groupIntoBatches does. */
export function microBatches<T>(items: readonly T[], size: number): T[][] {
    const groups: T[][] = []
    for (let start = 0; start < items.length; start += size) {
        groups.push(items.slice(start, start + size))
    }
    return groups
}

/**
 * The host wraps each task in a 30 s "still running" warning timer carrying the event as JSON, cleared when the
 * task settles: a cost per task on the consumer's thread, kept here.
 */
async function instrumented<T>(event: unknown, task: () => Promise<T>): Promise<T> {
    const context = { event: JSON.stringify(event) }
    const warning = setTimeout(() => context, TASK_WARNING_MS)
    try {
        return await task()
    } finally {
        clearTimeout(warning)
    }
}

/**
 * One Kafka message through the host: parse it, processEvent on a worker, then onEvent and ingestEvent together.
 * Resolves with what the host saw of the onEvent call (null when processEvent dropped the event).
 */
export async function eachMessage(pool: WorkerPool, message: string): Promise<CallOutcome | null> {
    try {
        return await runMessage(pool, message)
    } catch (error) {
        // Only a crashed worker thread gets here: the event is reported failed, never dropped.
        const text = (error as Error).message
        return { kind: 'failed', name: 'Error', message: text, retryable: false, hostRetries: 0, ms: 0 }
    }
}

async function runMessage(pool: WorkerPool, message: string): Promise<CallOutcome | null> {
    const event = JSON.parse(message) as Record<string, unknown>
    const processed = (await instrumented(event, () => pool.run('processEvent', event))) as Record<
        string,
        unknown
    > | null
    if (!processed) {
        return null
    }
    const [, outcome] = await Promise.all([
        instrumented(processed, () => pool.run('ingestEvent', processed)),
        instrumented(processed, () => pool.run('onEvent', processed)),
    ])
    return outcome as CallOutcome
}

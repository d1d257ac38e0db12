/**
 * A test's view of one install's outbox: PostHog's plugin storage and cache as the emulator keeps them (a real
 * Postgres engine, PGlite), one plugin config per test, and a Sender with its outbox built the way the hooks build it.
 */
import { OUTBOX_STATE_KEY, OutboxMetric, OutboxState, PluginCache, PluginStorage, Sender } from '../../index'
import { HostStore, metaCache, metaStorage, StorageFaults } from '../../tools/host/storage'
import { makeSender, TestEnv } from './env'
import { eventsIn, ReceivedRequest, Reply } from './server'

export interface OutboxHost {
    store: HostStore
    configId: number
    storage: PluginStorage
    cache: PluginCache
    /** While true, every cache call fails as ioredis does when Redis is gone. */
    cacheDown: { value: boolean }
    counted: Partial<Record<OutboxMetric, number>>
}

/**
 * One database for a test file (it takes seconds to start); each host() is a plugin config of its own. The
 * faults reset after each test, and the database closes after the file.
 */
export function outboxHosts(): { store: HostStore; host: (faults?: StorageFaults) => OutboxHost } {
    const store = new HostStore()
    let nextConfigId = 1
    afterEach(() => store.setFaults({}))
    afterAll(() => store.close())
    const host = (faults: StorageFaults = {}): OutboxHost => {
        store.setFaults(faults)
        const configId = nextConfigId++
        const cache = metaCache(store.call, configId, 1)
        const cacheDown = { value: false }
        const guard =
            <A extends unknown[], R>(fn: (...args: A) => Promise<R>) =>
            (...args: A): Promise<R> =>
                cacheDown.value ? Promise.reject(new Error('Connection is closed.')) : fn(...args)
        return {
            store,
            configId,
            storage: metaStorage(store.call, configId),
            cache: {
                get: guard(cache.get),
                set: guard(cache.set),
                incr: guard(cache.incr),
                expire: guard(cache.expire),
            },
            cacheDown,
            counted: {},
        }
    }
    return { store, host }
}

/** A sender with an outbox over the host's storage, as createSender builds it inside PostHog. */
export function withOutbox(url: string, h: OutboxHost, env: TestEnv, outboxMaxMb = '50'): Sender {
    const sender = makeSender({ webhookUrl: url, outboxMaxMb }, env)
    sender.useOutbox(h.storage, h.cache, (metric, value) => {
        h.counted[metric] = (h.counted[metric] ?? 0) + value
    })
    return sender
}

export function contents(h: OutboxHost): Promise<Record<string, unknown>> {
    return h.store.contents(h.configId)
}

export async function outboxState(h: OutboxHost): Promise<OutboxState> {
    return (await contents(h))[OUTBOX_STATE_KEY] as OutboxState
}

export function uuidsIn(requests: readonly ReceivedRequest[]): string[] {
    return requests.flatMap((request) => eventsIn(request).map((event) => String(event.uuid)))
}

/** A webhook that answers 503 while `down.value` is true, 200 otherwise; `accepted` gets each uuid it took. */
export function switchable(down: { value: boolean }, accepted: string[] = []): (request: ReceivedRequest) => Reply {
    return (request) => {
        if (down.value) {
            return { status: 503, body: 'maintenance' }
        }
        accepted.push(...uuidsIn([request]))
        return { status: 200 }
    }
}

/**
 * The four PostHog host eras the emulator reproduces: their fetch, their meta, their retry policy and their
 * concurrency. Facts from the project's HOSTS.md.
 */
import type { PluginEvent, ProcessedPluginEvent } from '@posthog/plugin-scaffold'
import nodeFetch from 'node-fetch'

import type { MetaFetch } from '../index'

export const ERA_NAMES = ['vm2021', 'vm2022', 'vm2024', 'cdp2025'] as const
export type EraName = (typeof ERA_NAMES)[number]

/** The undici host's own fetch timeout, which replaces any signal the plugin passes. */
export const VM2024_FETCH_TIMEOUT_MS = 10_000
/** Calls the classic consumers start together with Promise.all. */
export const CLASSIC_MICRO_BATCH = 10
/** How many calls the CDP consumer starts at once: a whole Kafka batch. */
export const CDP_KAFKA_BATCH = 500

export interface Era {
    name: EraName
    description: string
    /** Whether the sandbox has setTimeout, AbortController and friends. */
    timers: boolean
    /** The plugin's global `fetch`. */
    fetch: unknown
    /** `meta.fetch`, only in the CDP executor. */
    metaFetch: MetaFetch | null
    /** Waits before each host retry of a RetryError; empty means the host does not retry. */
    hostRetryDelaysMs: number[]
    /** Calls started together; the next group starts after all of them settled. */
    concurrency: number
    /** The event as this era hands it to onEvent. */
    shapeEvent: (event: ProcessedPluginEvent) => { event: unknown; person?: unknown }
}

function asPluginEvent(event: ProcessedPluginEvent): PluginEvent {
    return {
        ...event,
        ip: '198.51.100.7',
        now: new Date().toISOString(),
        sent_at: event.timestamp,
        site_url: 'http://localhost:8000',
    }
}

/** undici, with the signal replaced by the host's own timeout and redirects not followed. */
const vm2024Fetch = (url: string, init: Record<string, unknown> = {}): Promise<Response> =>
    fetch(url, {
        ...(init as RequestInit),
        redirect: 'manual',
        signal: AbortSignal.timeout(VM2024_FETCH_TIMEOUT_MS),
    })

/** The CDP executor's fetch: `{ status, headers, text(), json() }` with plain lowercase headers and no `ok`. */
export const cdpMetaFetch: MetaFetch = async (url, init) => {
    const once = () =>
        fetch(url, {
            method: init.method,
            headers: init.headers,
            body: init.body,
            redirect: 'manual',
            signal: AbortSignal.timeout(init.timeoutMs),
        })
    let response: Response
    try {
        response = await once()
    } catch (error) {
        // One immediate retry on a socket error, as the executor does; timeouts are not retried.
        if ((error as { name?: string }).name === 'TimeoutError') {
            throw error
        }
        response = await once()
    }
    const headers: Record<string, string> = {}
    response.headers.forEach((value, name) => {
        headers[name.toLowerCase()] = value
    })
    const text = await response.text()
    return {
        status: response.status,
        headers,
        text: () => Promise.resolve(text),
        json: () => Promise.resolve(JSON.parse(text) as unknown),
    }
}

export function getEra(name: string): Era {
    switch (name) {
        case 'vm2021':
            return {
                name,
                description: 'standalone plugin-server 1.10: node-fetch v2, no host retry, micro-batches of 10',
                timers: false,
                fetch: nodeFetch,
                metaFetch: null,
                hostRetryDelaysMs: [],
                concurrency: CLASSIC_MICRO_BATCH,
                shapeEvent: (event) => ({ event: asPluginEvent(event) }),
            }
        case 'vm2022':
            return {
                name,
                description: 'monorepo 2022–2023: node-fetch v2, RetryError retried after 3 s then 6 s',
                timers: false,
                fetch: nodeFetch,
                metaFetch: null,
                hostRetryDelaysMs: [3_000, 6_000],
                concurrency: CLASSIC_MICRO_BATCH,
                shapeEvent: (event) => ({ event }),
            }
        case 'vm2024':
            return {
                name,
                description: 'Aug 2023–2025: undici fetch with the host 10 s timeout, no host retry',
                timers: false,
                fetch: vm2024Fetch,
                metaFetch: null,
                hostRetryDelaysMs: [],
                concurrency: CLASSIC_MICRO_BATCH,
                shapeEvent: (event) => ({ event }),
            }
        case 'cdp2025':
            return {
                name,
                description: 'CDP executor: meta.fetch and meta.logger, timers, whole Kafka batch at once',
                timers: true,
                fetch: fetch,
                metaFetch: cdpMetaFetch,
                hostRetryDelaysMs: [],
                concurrency: CDP_KAFKA_BATCH,
                shapeEvent: (event) => {
                    // eslint-disable-next-line @typescript-eslint/no-unused-vars
                    const { elements, ...rest } = event
                    return {
                        event: rest,
                        person: { uuid: 'p-' + event.distinct_id, properties: {}, posthog_url: '' },
                    }
                },
            }
        default:
            throw new Error(`unknown era "${name}"; choose one of: ${ERA_NAMES.join(', ')}`)
    }
}

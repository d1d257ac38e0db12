/**
 * The PostHog host eras the emulator reproduces: their fetch, their meta, their retry policy, their concurrency
 * and, from 2021 to November 2023, their export path (export-path.ts). docs/hosts.md tells them apart.
 */
import * as nodeCrypto from 'node:crypto'
import { createRequire } from 'node:module'
import { PassThrough } from 'node:stream'
import * as nodeUrl from 'node:url'
import * as zlib from 'node:zlib'

import type { PluginEvent, ProcessedPluginEvent } from '@posthog/plugin-scaffold'
import * as scaffoldCurrent from '@posthog/plugin-scaffold'
import nodeFetch from 'node-fetch'
import * as scaffold2021 from 'plugin-scaffold-2021'

import type { MetaFetch } from '../../index'
import {
    EXPORT_PATH_A,
    EXPORT_PATH_B,
    EXPORT_PATH_C,
    EXPORT_PATH_D,
    EXPORT_PATH_D_LATE,
    ExportPathPolicy,
} from './export-path'
import type { BabelStandalone } from './transforms'

export const ERA_NAMES = [
    'vm2021',
    'vm2022feb',
    'vm2022',
    'vm2023',
    'vm2023aug',
    'vm2024',
    'vm2025',
    'cdp2025',
] as const
export type EraName = (typeof ERA_NAMES)[number]

/** The undici host's own fetch timeout, which replaces any signal the plugin passes. */
export const VM2024_FETCH_TIMEOUT_MS = 10_000
/** The same fetch's timeout in 2025. */
export const VM2025_FETCH_TIMEOUT_MS = 3_000
/** Calls the classic consumers start together with Promise.all. */
export const CLASSIC_MICRO_BATCH = 10
/** How many calls the CDP consumer starts at once: a whole Kafka batch. */
export const CDP_KAFKA_BATCH = 500

/** What an era offers a plugin besides fetch: `meta.storage`, `meta.cache`, runEveryMinute, `meta.metrics`. */
export interface HostServices {
    /** `meta.storage`: posthog_pluginstorage in the install's Postgres. */
    storage: boolean
    /** `meta.cache`: Redis, shared by every thread. */
    cache: boolean
    /** runEveryMinute, on one thread at a time, debounced. */
    scheduledTasks: boolean
    /** `export const metrics` with `meta.metrics[name].increment/max/min` (removed in May 2022). */
    pluginMetrics: boolean
}

const CLASSIC_WITH_METRICS: HostServices = { storage: true, cache: true, scheduledTasks: true, pluginMetrics: true }
const CLASSIC: HostServices = { ...CLASSIC_WITH_METRICS, pluginMetrics: false }

/**
 * The one table of what each era offers. The CDP executor's meta is { config, global, logger, fetch, geoip,
 * person } only. Change a row here and every path of the emulator follows.
 */
export const HOST_SERVICES: Record<EraName, HostServices> = {
    vm2021: CLASSIC_WITH_METRICS,
    vm2022feb: CLASSIC_WITH_METRICS,
    vm2022: CLASSIC,
    vm2023: CLASSIC,
    vm2023aug: CLASSIC,
    vm2024: CLASSIC,
    // PR #29352 (February 2025) removed jobs and scheduled tasks; storage and cache stayed.
    vm2025: { ...CLASSIC, scheduledTasks: false },
    cdp2025: { storage: false, cache: false, scheduledTasks: false, pluginMetrics: false },
}

const requireModule = createRequire(__filename)

/** Loads a @babel/standalone version on first use: worker threads get code already transpiled and skip it. */
function lazyBabel(name: string): () => BabelStandalone {
    let loaded: BabelStandalone | undefined
    return () => (loaded ??= requireModule(name) as BabelStandalone)
}
const babel2021 = lazyBabel('babel-standalone-2021')
/** node-fetch 2.6.1, the version the 2021 host's lock file pins (typed like the newer 2.x). */
const nodeFetch2021 = requireModule('node-fetch-2021') as typeof nodeFetch
const babelCurrent = lazyBabel('@babel/standalone')

/** How a host handles a setupPlugin that throws: attempts, the first wait and its growth, and what is retried. */
export interface SetupPolicy {
    /** Attempts in all, the first included; after the last failure the plugin is disabled. */
    maxAttempts: number
    firstWaitMs: number
    factor: number
    /** true: only a RetryError is retried, any other error disables the plugin at once. */
    onlyRetryError: boolean
}

/** The 2021 LazyPluginVM: 10 attempts, waiting 3 s, 6 s, 12 s, … (about 25 minutes in all), whatever the error. */
export const SETUP_2021: SetupPolicy = { maxAttempts: 10, firstWaitMs: 3_000, factor: 2, onlyRetryError: false }
/** 2022 docs: a RetryError in setup gets up to 5 retries; any other error disables the plugin at once. */
export const SETUP_2022: SetupPolicy = { maxAttempts: 6, firstWaitMs: 3_000, factor: 2, onlyRetryError: true }
/** The CDP executor: a setup error fails the function at once. */
export const SETUP_CDP: SetupPolicy = { maxAttempts: 1, firstWaitMs: 0, factor: 1, onlyRetryError: true }

/** Waits before each retry of setupPlugin: 3 s, 6 s, … for the 2021 host. */
export function setupRetryWaits(policy: SetupPolicy): number[] {
    return Array.from({ length: policy.maxAttempts - 1 }, (_, n) => policy.firstWaitMs * policy.factor ** n)
}

/**
 * A module the 2021 host whitelisted but this emulator does not install (aws-sdk, BigQuery, …): importing it
 * works, as in the host; using it says why it cannot.
 */
function notInstalled(name: string): unknown {
    return new Proxy(
        {},
        {
            get: (_target, key) => {
                if (typeof key === 'symbol' || key === 'then') {
                    return undefined
                }
                throw new Error(`'${name}' is whitelisted in the 2021 host but not installed in this emulator`)
            },
        }
    )
}

/** The 2021 host's 16 importable modules. `crypto` is the default import; `stream` has only PassThrough. */
export const IMPORTS_2021: Record<string, unknown> = {
    '@google-cloud/bigquery': notInstalled('@google-cloud/bigquery'),
    '@google-cloud/pubsub': notInstalled('@google-cloud/pubsub'),
    '@google-cloud/storage': notInstalled('@google-cloud/storage'),
    '@posthog/plugin-contrib': notInstalled('@posthog/plugin-contrib'),
    '@posthog/plugin-scaffold': scaffold2021,
    'aws-sdk': notInstalled('aws-sdk'),
    'generic-pool': notInstalled('generic-pool'),
    'node-fetch': nodeFetch2021,
    'snowflake-sdk': notInstalled('snowflake-sdk'),
    crypto: nodeCrypto,
    jsonwebtoken: notInstalled('jsonwebtoken'),
    faker: notInstalled('faker'),
    pg: notInstalled('pg'),
    stream: { PassThrough },
    url: nodeUrl,
    zlib,
}

/** What every later era is known to provide (others came and went between releases: do not rely on them). */
export const IMPORTS_CURRENT: Record<string, unknown> = {
    '@posthog/plugin-scaffold': scaffoldCurrent,
    'node-fetch': nodeFetch,
    crypto: nodeCrypto,
    url: nodeUrl,
}

export interface Era {
    name: EraName
    description: string
    /** The @babel/standalone version the host transpiled with. */
    babel: () => BabelStandalone
    /** What `import x from 'm'` gives, by module name; anything else is refused at load time. */
    imports: Record<string, unknown>
    /** The scaffold's RetryError of this era (in 0.12.9 its `name` is "Error"). */
    RetryError: new (message?: string) => Error
    setup: SetupPolicy
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
    /** How the host buffers and retries for a plugin that exports exportEvents; null: it never calls it. */
    exportPath: ExportPathPolicy | null
    /** Storage, cache, scheduled tasks and plugin metrics: a row of HOST_SERVICES. */
    services: HostServices
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
const undiciFetch =
    (timeoutMs: number) =>
    (url: string, init: Record<string, unknown> = {}): Promise<Response> =>
        fetch(url, { ...(init as RequestInit), redirect: 'manual', signal: AbortSignal.timeout(timeoutMs) })
const vm2024Fetch = undiciFetch(VM2024_FETCH_TIMEOUT_MS)

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

/** What the classic eras after 2021 share: the current babel, scaffold and modules, node-fetch, no timers. */
function classicEra(name: EraName, description: string, exportPath: ExportPathPolicy | null): Era {
    return {
        name,
        description,
        babel: babelCurrent,
        imports: IMPORTS_CURRENT,
        RetryError: scaffoldCurrent.RetryError,
        setup: SETUP_2022,
        timers: false,
        fetch: nodeFetch,
        metaFetch: null,
        hostRetryDelaysMs: [],
        concurrency: CLASSIC_MICRO_BATCH,
        shapeEvent: (event) => ({ event }),
        exportPath,
        services: HOST_SERVICES[name],
    }
}

const vm2021 = (): Era => ({
    ...classicEra(
        'vm2021',
        'standalone plugin-server 1.10 (vm2 3.9.5, babel 7.13.7, node-fetch 2.6.1): export path A (1 MiB / 10 s ' +
            'buffer, 15 job retries), no host retry of onEvent',
        EXPORT_PATH_A
    ),
    babel: babel2021,
    imports: IMPORTS_2021,
    RetryError: scaffold2021.RetryError,
    setup: SETUP_2021,
    fetch: nodeFetch2021,
    shapeEvent: (event) => ({ event: asPluginEvent(event) }),
})

/** The waits before the host retries an onEvent RetryError, from mid-2022 to July 2023. */
const ONEVENT_RETRY_WAITS_2022_MS = [3_000, 6_000]

/** An undici fetch with the host's own timeout: from August 2023. */
const withUndici = (era: Era): Era => ({ ...era, fetch: vm2024Fetch })

function cdp2025(): Era {
    return {
        ...classicEra('cdp2025', 'CDP executor: meta.fetch and meta.logger, timers, whole Kafka batch at once', null),
        setup: SETUP_CDP,
        timers: true,
        fetch: fetch,
        metaFetch: cdpMetaFetch,
        concurrency: CDP_KAFKA_BATCH,
        shapeEvent: (event) => {
            // eslint-disable-next-line @typescript-eslint/no-unused-vars
            const { elements, ...rest } = event
            return { event: rest, person: { uuid: 'p-' + event.distinct_id, properties: {}, posthog_url: '' } }
        },
    }
}

const ERAS: Record<EraName, () => Era> = {
    vm2021,
    vm2022feb: () =>
        classicEra(
            'vm2022feb',
            'Feb–Apr 2022: export path B (the host buffer, add awaited, 10 job retries)',
            EXPORT_PATH_B
        ),
    vm2022: () => ({
        ...classicEra(
            'vm2022',
            'May–Sep 2022: export path C (3 job retries); onEvent RetryError retried after 3 s, 6 s',
            EXPORT_PATH_C
        ),
        hostRetryDelaysMs: ONEVENT_RETRY_WAITS_2022_MS,
    }),
    vm2023: () => ({
        ...classicEra(
            'vm2023',
            'Oct 2022–Jul 2023: export path D (3 job retries, app metrics); onEvent retried after 3 s, 6 s',
            EXPORT_PATH_D
        ),
        hostRetryDelaysMs: ONEVENT_RETRY_WAITS_2022_MS,
    }),
    vm2023aug: () =>
        withUndici(
            classicEra(
                'vm2023aug',
                'Aug–Nov 2023: export path D with no retries, 900 KiB buffer; undici fetch',
                EXPORT_PATH_D_LATE
            )
        ),
    vm2024: () =>
        withUndici(
            classicEra(
                'vm2024',
                'Dec 2023 to Feb 2025: no export path (exportEvents ignored); undici fetch with the host 10 s timeout, no host retry',
                null
            )
        ),
    vm2025: () => ({
        ...withUndici(
            classicEra(
                'vm2025',
                'March 2025 on, classic VM: as vm2024, with no scheduled tasks (runEveryMinute never runs) and a 3 s fetch timeout',
                null
            )
        ),
        fetch: undiciFetch(VM2025_FETCH_TIMEOUT_MS),
    }),
    cdp2025,
}

export function getEra(name: string): Era {
    const make = Object.hasOwn(ERAS, name) ? ERAS[name as EraName] : undefined
    if (!make) {
        throw new Error(`unknown era "${name}"; choose one of: ${ERA_NAMES.join(', ')}`)
    }
    return make()
}

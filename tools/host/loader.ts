/**
 * Loads a plugin the way PostHog's classic plugin server does (docs/hosts.md, as measured in its 2021 release):
 * the era's @babel/standalone with PostHog's transforms, then a vm2 `VM` whose globals are exactly the host's,
 * with host objects reaching the plugin through vm2's proxies. The exported methods come back bound to `meta`
 * (always the last argument) and each guarded by 30 s as a whole.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { VM } from 'vm2'

import type { Era } from './eras'
import { GUARD_MS, transpile } from './transforms'

export { GUARD_MS, transpile } from './transforms'

export class PluginLoadError extends Error {
    constructor(message: string) {
        super(message)
        this.name = 'PluginLoadError'
    }
}

/** What the host's guards reject with. */
export class TimeoutError extends Error {
    name = 'TimeoutError'
}

export function timeoutMessage(ms: number): string {
    const seconds = ms / 1000
    return `Script execution timed out after promise waited for ${seconds} second${seconds === 1 ? '' : 's'}`
}

/**
 * The host's guard: a host async function racing the value against a host timer that is never cleared, as in
 * PostHog. Every `await` and `.then` in the plugin goes through one; that cost is why awaits are expensive there.
 * The timer is unref'd only so that a finished run can exit; it still lives its 30 s.
 */
export async function guard<T>(value: T | Promise<T>, ms = GUARD_MS): Promise<T> {
    return await Promise.race([
        value,
        new Promise<never>((_resolve, reject) => {
            setTimeout(() => reject(new TimeoutError(timeoutMessage(ms))), ms).unref()
        }),
    ])
}

export interface PluginConsole {
    log: (...args: unknown[]) => void
    info: (...args: unknown[]) => void
    warn: (...args: unknown[]) => void
    error: (...args: unknown[]) => void
    debug: (...args: unknown[]) => void
}

export interface SandboxOptions {
    /** Where the plugin's console writes (the plugin's log in PostHog's UI). */
    console: PluginConsole
    /** `meta` as the host builds it, without `global` (each VM gets its own). `config` is frozen here. */
    hostMeta: Record<string, unknown>
    /** Replaces the sandbox's Date.now, so tests can move the plugin's clock (and its loop guards) forward. */
    now?: () => number
    /** Counts each call of the host guard, for tests. */
    onGuard?: () => void
}

export const METHOD_NAMES = [
    'setupPlugin',
    'teardownPlugin',
    'exportEvents',
    'onEvent',
    'processEvent',
    'runEveryMinute',
] as const
export type MethodName = (typeof METHOD_NAMES)[number]
export type PluginMethod = (...args: unknown[]) => Promise<unknown>
export type PluginMethods = Partial<Record<MethodName, PluginMethod>>

export interface PluginVm {
    /** Exported methods, bound to meta and guarded by 30 s each; only those the plugin exports. */
    methods: PluginMethods
    /** The sandbox's `meta.global`, read through vm2's proxy. */
    global: Record<string, unknown>
    /** Calls a method with more fields in its meta (the CDP executor's per-event `person`). */
    callWith: (name: MethodName, extraMeta: Record<string, unknown>, args: unknown[]) => Promise<unknown>
    /** `export const metrics`: the plugin's metric names and kinds ('sum', 'max', 'min'), copied out; null if none. */
    metrics: Record<string, string> | null
}

/** Reads plugin.json `main` (or index.js) from a plugin folder. */
export function readPluginSource(pluginDir: string): string {
    let main = 'index.js'
    try {
        const manifest = JSON.parse(readFileSync(join(pluginDir, 'plugin.json'), 'utf8')) as { main?: string }
        main = manifest.main ?? main
    } catch (error) {
        throw new PluginLoadError(`cannot read ${join(pluginDir, 'plugin.json')}: ${(error as Error).message}`)
    }
    try {
        return readFileSync(join(pluginDir, main), 'utf8')
    } catch (error) {
        throw new PluginLoadError(`cannot read the plugin's main file ${main}: ${(error as Error).message}`)
    }
}

/** Transpiles for an era, turning a refused import or a syntax error into a PluginLoadError with PostHog's text. */
export function transpileForEra(source: string, era: Era): string {
    try {
        return transpile(source, era.babel(), Object.keys(era.imports))
    } catch (error) {
        throw new PluginLoadError((error as Error).message.replace(/^\/?index\.ts: /, ''))
    }
}

const TIMER_GLOBALS: Record<string, unknown> = {
    setTimeout,
    clearTimeout,
    setInterval,
    clearInterval,
    setImmediate,
    clearImmediate,
    queueMicrotask,
    AbortController,
    AbortSignal,
    TextEncoder,
    TextDecoder,
    URLSearchParams,
    structuredClone,
}

/**
 * Finds the exports (exports, then exports.default, then module.exports; `global` only if nothing was exported),
 * builds `meta` inside the sandbox with its own `global`, and binds each method to it behind the host's guard.
 * Runs inside the VM, so `meta` and `global` are sandbox objects, as in the host.
 */
const BIND_METHODS = `((__guard, __names) => {
    const __places = [exports, exports.default, module.exports].filter((d) => typeof d === 'object' && d !== null)
    if (!__places.some((d) => Object.keys(d).length > 0)) {
        __places.push(global)
    }
    const __meta = Object.assign({}, __pluginHostMeta, { global: {} })
    const __methods = {}
    for (const __name of __names) {
        const __place = __places.find((d) => d[__name])
        const __fn = __place ? __place[__name] : undefined
        if (typeof __fn === 'function') {
            __methods[__name] = (...args) => __guard(__fn(...args, __meta))
        }
    }
    const callWith = (name, extra, args) => {
        const __place = __places.find((d) => d[name])
        return __guard(__place[name](...args, Object.assign({}, __meta, extra)))
    }
    const __declared = __places.find((d) => d.metrics && typeof d.metrics === 'object')
    const metrics = __declared ? JSON.parse(JSON.stringify(__declared.metrics)) : null
    return { methods: __methods, global: __meta.global, callWith, metrics }
})`

/** Runs transpiled plugin code in a fresh vm2 sandbox with the era's globals and returns its bound methods. */
export function createPluginVm(code: string, era: Era, options: SandboxOptions): PluginVm {
    const vm = new VM({ timeout: GUARD_MS, sandbox: {} })
    const hostGuard = options.onGuard
        ? (value: unknown) => {
              options.onGuard?.()
              return guard(value)
          }
        : guard
    vm.freeze(options.console, 'console')
    vm.freeze({ capture: () => undefined, api: {} }, 'posthog')
    vm.freeze(era.fetch, 'fetch')
    vm.freeze({ auth: {}, cloud: {} }, 'google')
    vm.freeze(era.imports, '__pluginHostImports')
    vm.freeze(era.RetryError, 'RetryError')
    vm.freeze(URL, 'URL')
    vm.freeze(hostGuard, '__asyncGuard')
    vm.freeze(options.hostMeta, '__pluginHostMeta')
    if (era.timers) {
        for (const [name, value] of Object.entries(TIMER_GLOBALS)) {
            vm.freeze(value, name)
        }
    }
    if (options.now) {
        vm.freeze(options.now, '__hostNow')
        vm.run('Date.now = () => __hostNow()')
    }
    try {
        // The plugin's "use strict" is not the script's first statement here, so it runs in sloppy mode, as in
        // the host: writes to the frozen config are ignored rather than thrown.
        vm.run(`const module = { exports: {} };\nlet exports = {};\n${code};\n`)
        const bind = vm.run(BIND_METHODS) as (guard: unknown, names: readonly string[]) => PluginVm
        return bind(hostGuard, METHOD_NAMES)
    } catch (error) {
        const e = error as { name?: string; message?: string }
        throw new PluginLoadError(`${e.name ?? 'Error'}: ${e.message ?? String(error)}`)
    }
}

/** The project's plugin folder: the repository root. */
export const PROJECT_PLUGIN_DIR = join(__dirname, '..', '..')

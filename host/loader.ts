/**
 * Loads a plugin file the way PostHog's classic plugin server does (see HOSTS.md in the project notes):
 * @babel/standalone with PostHog's presets, the import rewrite with its whitelist, 30 s loop and await guards,
 * and a node:vm context holding only the classic sandbox's globals.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createContext, Script } from 'node:vm'

import * as babel from '@babel/standalone'
import * as scaffold from '@posthog/plugin-scaffold'
import { RetryError } from '@posthog/plugin-scaffold'
import * as nodeCrypto from 'crypto'
import nodeFetch from 'node-fetch'
import * as nodeUrl from 'url'

/** How long a loop, an await or a whole exported method may run before the host kills it. */
export const GUARD_MS = 30_000

/** The modules every classic era provides to plugins. */
export const PLUGIN_IMPORTS: Record<string, unknown> = {
    '@posthog/plugin-scaffold': scaffold,
    'node-fetch': nodeFetch,
    crypto: nodeCrypto,
    url: nodeUrl,
}

export class PluginLoadError extends Error {
    constructor(message: string) {
        super(message)
        this.name = 'PluginLoadError'
    }
}

type BabelPath = {
    node: Record<string, unknown> & {
        source?: { value: string }
        specifiers?: Array<{
            type: string
            local: { name: string }
            imported?: { name?: string; value?: string }
        }>
        loc?: { start: { line: number; column: number } }
        body?: unknown
        argument?: unknown
    }
    replaceWithMultiple: (nodes: unknown[]) => void
    replaceWith: (node: unknown) => void
    get: (key: string) => { unshiftContainer: (key: string, node: unknown) => void; node: unknown }
    insertBefore: (node: unknown) => void
    scope: { generateUidIdentifier: (name: string) => { name: string } }
    parentPath: unknown
}
type Build = (...args: unknown[]) => unknown
interface BabelTypes {
    memberExpression: Build
    identifier: Build
    stringLiteral: Build
    variableDeclaration: Build
    variableDeclarator: Build
    callExpression: Build
    awaitExpression: Build
    ensureBlock: Build
}

/** `import X from 'm'` and `import * as X` become `const X = __pluginHostImports['m']`, with no `.default` unwrapping. */
function importRewrite(imports: Record<string, unknown>) {
    return ({ types: t }: { types: BabelTypes }) => ({
        visitor: {
            ImportDeclaration: {
                exit(path: BabelPath) {
                    const source = path.node.source?.value ?? ''
                    if (typeof imports[source] === 'undefined') {
                        throw new Error(
                            `Cannot import '${source}'! This package is not provided by PostHog in plugins.`
                        )
                    }
                    const hostModule = t.memberExpression(
                        t.identifier('__pluginHostImports'),
                        t.stringLiteral(source),
                        true
                    )
                    const declarations = (path.node.specifiers ?? []).map((spec) => {
                        const value =
                            spec.type === 'ImportSpecifier'
                                ? t.memberExpression(
                                      hostModule,
                                      t.stringLiteral(spec.imported?.name ?? spec.imported?.value ?? ''),
                                      true
                                  )
                                : hostModule
                        return t.variableDeclaration('const', [
                            t.variableDeclarator(t.identifier(spec.local.name), value),
                        ])
                    })
                    path.replaceWithMultiple(declarations)
                },
            },
            CallExpression: {
                exit(path: BabelPath) {
                    const node = path.node as unknown as {
                        callee: { type: string; name?: string }
                        arguments: Array<{ type: string; value?: string }>
                    }
                    const [arg] = node.arguments
                    if (node.callee.type !== 'Identifier' || node.callee.name !== 'require' || !arg) {
                        return
                    }
                    const source = arg.type === 'StringLiteral' ? (arg.value ?? '') : ''
                    if (typeof imports[source] === 'undefined') {
                        throw new Error(
                            `Cannot import '${source}'! This package is not provided by PostHog in plugins.`
                        )
                    }
                    path.replaceWith(
                        t.memberExpression(t.identifier('__pluginHostImports'), t.stringLiteral(source), true)
                    )
                },
            },
        },
    })
}

/** Every loop throws once it has run for 30 s. */
function loopGuard() {
    return ({
        types: t,
        template,
    }: {
        types: BabelTypes
        template: { statement: (code: string) => () => unknown }
    }) => {
        const visit = (path: BabelPath): void => {
            const started = path.scope.generateUidIdentifier('loopStart')
            const line = path.node.loc ? `${path.node.loc.start.line}:${path.node.loc.start.column}` : '?'
            path.insertBefore(
                t.variableDeclaration('const', [
                    t.variableDeclarator(
                        t.identifier(started.name),
                        t.callExpression(t.memberExpression(t.identifier('Date'), t.identifier('now')), [])
                    ),
                ])
            )
            const check = template.statement(
                `if (Date.now() - ${started.name} > ${GUARD_MS}) { throw new Error("Script execution timed out after looping for ${GUARD_MS / 1000} seconds on line ${line}") }`
            )()
            t.ensureBlock(path.node)
            path.get('body').unshiftContainer('body', check)
        }
        return {
            visitor: {
                WhileStatement: visit,
                DoWhileStatement: visit,
                ForStatement: visit,
                ForInStatement: visit,
                ForOfStatement: visit,
            },
        }
    }
}

/** Every `await x` becomes `await __asyncGuard(x)`, which rejects after 30 s. */
function awaitGuard() {
    return ({ types: t }: { types: BabelTypes }) => ({
        visitor: {
            AwaitExpression: {
                exit(path: BabelPath) {
                    const argument = path.node.argument as { type?: string; callee?: { name?: string } }
                    if (argument.type === 'CallExpression' && argument.callee?.name === '__asyncGuard') {
                        return
                    }
                    path.replaceWith(
                        t.awaitExpression(t.callExpression(t.identifier('__asyncGuard'), [path.node.argument]))
                    )
                },
            },
        },
    })
}

/** Transpiles plugin source with PostHog's options. Throws PostHog's own error text for a forbidden import. */
export function transpile(source: string, imports: Record<string, unknown> = PLUGIN_IMPORTS): string {
    const result = babel.transform(source, {
        envName: 'production',
        code: true,
        babelrc: false,
        configFile: false,
        filename: 'index.ts',
        presets: ['typescript', ['env', { targets: { node: process.versions.node } }]],
        plugins: [importRewrite(imports), loopGuard(), awaitGuard()],
    })
    if (!result?.code) {
        throw new PluginLoadError('the plugin transpiled to nothing')
    }
    return result.code
}

/** Rejects after `ms` unless the value settles first; the timer never keeps the process alive. */
export function guard<T>(value: T | Promise<T>, ms: number, what: string): Promise<T> {
    if (!value || typeof (value as { then?: unknown }).then !== 'function') {
        return Promise.resolve(value)
    }
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<never>((_resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`Script execution timed out after ${ms / 1000} s: ${what}`)), ms)
        timer.unref()
    })
    return Promise.race([value, timeout]).finally(() => clearTimeout(timer))
}

export interface SandboxOptions {
    /** What the plugin sees as the global `fetch`. */
    fetch: unknown
    /** Where the plugin's console writes. */
    console: Pick<Console, 'log' | 'info' | 'warn' | 'error' | 'debug'>
    /** The CDP executor runs plugins with Node's normal globals, timers included. */
    timers: boolean
    /** Replaces the sandbox's Date.now, so tests can move the plugin's clock (and its loop guards) forward. */
    now?: () => number
}

export type PluginMethods = Record<string, ((...args: unknown[]) => unknown) | undefined>

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

/** Transpiles and runs plugin source in a classic sandbox, and returns its exported methods. */
export function loadPlugin(source: string, options: SandboxOptions): PluginMethods {
    let code: string
    try {
        code = transpile(source)
    } catch (error) {
        throw new PluginLoadError((error as Error).message.replace(/^\/?index\.ts: /, ''))
    }
    const moduleObject: { exports: Record<string, unknown> } = { exports: {} }
    const globals: Record<string, unknown> = {
        console: options.console,
        fetch: options.fetch,
        RetryError,
        URL,
        Buffer,
        posthog: { capture: () => undefined, api: {} },
        __pluginHostImports: PLUGIN_IMPORTS,
        __asyncGuard: (value: unknown) => guard(value, GUARD_MS, 'await'),
        exports: moduleObject.exports,
        module: moduleObject,
    }
    if (options.timers) {
        Object.assign(globals, {
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
        })
    }
    const context = createContext(globals)
    if (options.now) {
        context.__hostNow = options.now
        new Script('Date.now = () => __hostNow()').runInContext(context)
    }
    try {
        new Script(code, { filename: 'index.ts' }).runInContext(context, { timeout: GUARD_MS })
    } catch (error) {
        const e = error as { name?: string; message?: string }
        throw new PluginLoadError(`${e.name ?? 'Error'}: ${e.message ?? String(error)}`)
    }
    // PostHog looks up methods in exports, then exports.default, then module.exports.
    const exportsObject = globals.exports as Record<string, unknown>
    const candidates = [exportsObject, exportsObject.default, moduleObject.exports] as Array<
        Record<string, unknown> | undefined
    >
    const methods: PluginMethods = {}
    for (const name of ['setupPlugin', 'teardownPlugin', 'onEvent', 'exportEvents', 'processEvent', 'composeWebhook']) {
        for (const candidate of candidates) {
            const fn = candidate?.[name]
            if (typeof fn === 'function') {
                methods[name] = fn as (...args: unknown[]) => unknown
                break
            }
        }
    }
    return methods
}

/** The project's plugin folder: the repository root. */
export const PROJECT_PLUGIN_DIR = join(__dirname, '..')

/**
 * PostHog's Babel transforms for classic plugins, as docs/hosts.md describes them:
 * - imports and `require` become reads of `__pluginHostImports[...]`, refused with PostHog's text outside the
 *   era's whitelist;
 * - `while`, `for` and `do-while` loops throw once they have run for 30 s in all (not `for-of` or `for-in`);
 * - every `await x` becomes `await __asyncGuard(x)` and every `x.then` becomes `__asyncGuard(x).then`.
 */

/** How long a loop, an await or a whole exported method may run before the host kills it. */
export const GUARD_MS = 30_000

/** The part of @babel/standalone the emulator uses; each era brings its own version. */
export interface BabelStandalone {
    transform: (code: string, options: Record<string, unknown>) => { code?: string | null } | null
}

interface Node {
    type: string
    [key: string]: unknown
}
interface NodePath {
    node: Node & { loc?: { start: { line: number; column: number } } }
    replaceWith: (node: unknown) => void
    replaceWithMultiple: (nodes: unknown[]) => void
    insertBefore: (node: unknown) => void
    get: (key: string) => { unshiftContainer: (key: string, node: unknown) => void }
    scope: { generateUidIdentifier: (name: string) => { name: string } }
}
type Build = (...args: unknown[]) => Node
interface Types {
    memberExpression: Build
    identifier: Build
    stringLiteral: Build
    variableDeclaration: Build
    variableDeclarator: Build
    callExpression: Build
    awaitExpression: Build
    ensureBlock: (node: unknown) => void
}
interface BabelApi {
    types: Types
    template: { statement: (code: string) => () => unknown }
}

/** Marks nodes this module built, so a visitor does not wrap its own output again. */
const BUILT = new WeakSet<object>()

export function importRefusal(source: string): string {
    return `Cannot import '${source}'! This package is not provided by PostHog in plugins.`
}

function hostModule(t: Types, source: string): Node {
    return t.memberExpression(t.identifier('__pluginHostImports'), t.stringLiteral(source), true)
}

/** `import X from 'm'` and `import * as X` both become `const X = __pluginHostImports['m']` (no `.default`). */
export function importRewrite(whitelist: readonly string[]) {
    const check = (source: string): void => {
        if (!whitelist.includes(source)) {
            throw new Error(importRefusal(source))
        }
    }
    return ({ types: t }: BabelApi) => ({
        visitor: {
            ImportDeclaration: {
                exit(path: NodePath) {
                    const source = (path.node.source as { value: string }).value
                    check(source)
                    const specifiers = path.node.specifiers as Array<{
                        type: string
                        local: { name: string }
                        imported?: { name?: string; value?: string }
                    }>
                    path.replaceWithMultiple(
                        specifiers.map((spec) => {
                            const value =
                                spec.type === 'ImportSpecifier'
                                    ? t.memberExpression(
                                          hostModule(t, source),
                                          t.stringLiteral(spec.imported?.name ?? spec.imported?.value ?? ''),
                                          true
                                      )
                                    : hostModule(t, source)
                            return t.variableDeclaration('const', [
                                t.variableDeclarator(t.identifier(spec.local.name), value),
                            ])
                        })
                    )
                },
            },
            CallExpression: {
                exit(path: NodePath) {
                    const callee = path.node.callee as Node & { name?: string }
                    const [arg] = path.node.arguments as Array<Node & { value?: string }>
                    if (callee.type !== 'Identifier' || callee.name !== 'require' || !arg) {
                        return
                    }
                    const source = arg.type === 'StringLiteral' ? (arg.value ?? '') : ''
                    check(source)
                    path.replaceWith(hostModule(t, source))
                },
            },
        },
    })
}

/** `while`, `for` and `do-while` throw once the loop has run for 30 s, counted from before its first turn. */
export function loopGuard() {
    return ({ types: t, template }: BabelApi) => {
        const visit = (path: NodePath): void => {
            if (!path.node.loc) {
                // A loop Babel generated has no line in the plugin's source; the host leaves those unguarded.
                return
            }
            const started = path.scope.generateUidIdentifier('loopStart')
            const where = `${path.node.loc.start.line}:${path.node.loc.start.column}`
            path.insertBefore(
                t.variableDeclaration('const', [
                    t.variableDeclarator(
                        t.identifier(started.name),
                        t.callExpression(t.memberExpression(t.identifier('Date'), t.identifier('now')), [])
                    ),
                ])
            )
            const check = template.statement(
                `if (Date.now() - ${started.name} > ${GUARD_MS}) { throw new Error("Script execution timed out after looping for ${GUARD_MS / 1000} seconds on line ${where}") }`
            )()
            t.ensureBlock(path.node)
            path.get('body').unshiftContainer('body', check)
        }
        return { visitor: { WhileStatement: visit, DoWhileStatement: visit, ForStatement: visit } }
    }
}

/** `await x` → `await __asyncGuard(x)`; `x.then` → `__asyncGuard(x).then`, whatever `x` is. */
export function promiseGuard() {
    return ({ types: t }: BabelApi) => ({
        visitor: {
            MemberExpression: {
                exit(path: NodePath) {
                    const property = path.node.property as Node & { name?: string }
                    if (BUILT.has(path.node) || property.type !== 'Identifier' || property.name !== 'then') {
                        return
                    }
                    const guarded = t.memberExpression(
                        t.callExpression(t.identifier('__asyncGuard'), [path.node.object]),
                        t.identifier('then')
                    )
                    BUILT.add(guarded)
                    path.replaceWith(guarded)
                },
            },
            AwaitExpression: {
                exit(path: NodePath) {
                    if (BUILT.has(path.node)) {
                        return
                    }
                    const guarded = t.awaitExpression(
                        t.callExpression(t.identifier('__asyncGuard'), [path.node.argument])
                    )
                    BUILT.add(guarded)
                    path.replaceWith(guarded)
                },
            },
        },
    })
}

/** Transpiles plugin source with PostHog's options and transforms. Throws PostHog's text for a refused import. */
export function transpile(source: string, babel: BabelStandalone, whitelist: readonly string[]): string {
    const result = babel.transform(source, {
        envName: 'production',
        code: true,
        babelrc: false,
        configFile: false,
        filename: 'index.ts',
        presets: ['typescript', ['env', { targets: { node: process.versions.node } }]],
        plugins: [importRewrite(whitelist), loopGuard(), promiseGuard()],
    })
    if (!result?.code) {
        throw new Error('the plugin transpiled to nothing')
    }
    return result.code
}

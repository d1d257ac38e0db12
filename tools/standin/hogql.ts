/**
 * HogQL → ClickHouse SQL for the stand-in: PostHog's own parser builds the AST, and this file prints the subset a
 * sync needs the way PostHog's printer does (team scoping, `toTimeZone` on datetimes, JSON property access,
 * timezone-aware `now()`/`toDateTime()`, the 100/50,000 row caps). Anything outside the subset is refused with a
 * HogQL query error rather than guessed at. Pure: no I/O, the parser is passed in.
 *
 * Sources for each rule are in standin/FACTS.md (sections 4, 6 and 7).
 */

/** A node of the AST that `@posthog/hogql-parser` returns as JSON. */
export interface HogQLNode {
    node: string
    [key: string]: unknown
}

/** The part of the WebAssembly parser the stand-in uses. */
export interface HogQLParser {
    parseSelect(input: string, isInternal?: boolean): string
}

export type HogQLErrorCode = 'hogql_syntax_error' | 'hogql_query_error'

/** A query PostHog would refuse with a 400: `code` is PostHog's `code_name` for it. */
export class HogQLError extends Error {
    readonly code: HogQLErrorCode
    constructor(message: string, code: HogQLErrorCode = 'hogql_query_error') {
        super(message)
        this.name = 'HogQLError'
        this.code = code
    }
}

/** PostHog's text for OFFSET on a personal-API-key query (posthog/hogql/user_query_validator.py). */
export const OFFSET_NOT_ALLOWED_MESSAGE =
    'OFFSET is not supported on queries made with a personal API key. ' +
    'For pagination, use keyset pagination on the `timestamp` column, e.g. ' +
    '`WHERE timestamp > :last_seen_timestamp ORDER BY timestamp LIMIT N`. ' +
    'For bulk data extraction, use batch exports: https://posthog.com/docs/cdp/batch-exports'

export interface CompileContext {
    /** The ClickHouse table holding the events, e.g. `standin_1.events`. */
    table: string
    teamId: number
    /** Rows returned without a LIMIT (PostHog: 100). */
    defaultRows: number
    /** The cap on any LIMIT (PostHog: 50,000). */
    maxRows: number
    /** PostHog refuses OFFSET from personal API keys unless the organisation is on an allow-list. */
    allowOffset: boolean
    /** The project's timezone; PostHog prints it into every datetime. */
    timezone: string
    /** Where `person_id` and `person.*` come from (the query's `personsOnEventsMode` modifier, else the project's). */
    personsOnEventsMode: PersonsOnEventsMode
    /** The persons tables, for the modes that join them. */
    personsTable: string
    overridesTable: string
}

/** PostHog's persons-on-events modes (posthog/schema.py `PersonsOnEventsMode`). */
export const PERSONS_ON_EVENTS_MODES = [
    'disabled',
    'person_id_no_override_properties_on_events',
    'person_id_override_properties_on_events',
    'person_id_override_properties_joined',
] as const
export type PersonsOnEventsMode = (typeof PERSONS_ON_EVENTS_MODES)[number]

export interface CompiledQuery {
    /** The ClickHouse SELECT to run (no FORMAT, no SETTINGS). */
    sql: string
    /** The query as HogQL text, with the LIMIT PostHog applied. */
    hogql: string
    /** Result column names, as PostHog names them: the alias, else the printed expression. */
    columns: string[]
    /** The ClickHouse alias of each result column, to read them back by name. */
    aliases: string[]
    /** The SELECT list alone over the table: its column types are the result's, whatever the WHERE and LIMIT. */
    typesSql: string
    /** Set when the query had no LIMIT: PostHog fetched `pageSize + 1` rows and reports `hasMore`. */
    paginator: { pageSize: number } | null
    /** The LIMIT applied when the query had one (after the cap). */
    limit: number | null
}

interface EventField {
    column: string
    datetime?: boolean
}

/** The events table's HogQL fields the stand-in serves (posthog/hogql/database/schema/events.py). */
export const EVENT_FIELDS: Readonly<Record<string, EventField>> = {
    uuid: { column: 'uuid' },
    event: { column: 'event' },
    properties: { column: 'properties' },
    timestamp: { column: 'timestamp', datetime: true },
    team_id: { column: 'team_id' },
    distinct_id: { column: 'distinct_id' },
    elements_chain: { column: 'elements_chain' },
    created_at: { column: 'created_at', datetime: true },
    person_id: { column: 'person_id' },
    $session_id: { column: '$session_id' },
    $window_id: { column: '$window_id' },
}

/** PostHog tables the stand-in does not serve: a clear refusal instead of "unknown table". */
const OTHER_POSTHOG_TABLES = ['persons', 'person_distinct_ids', 'sessions', 'groups', 'cohort_people', 'query_log']

interface FunctionSpec {
    clickhouse: string
    min: number
    max: number
    aggregate?: boolean
}

/** HogQL functions the stand-in prints, with their ClickHouse names (posthog/hogql/functions/mapping.py). */
const FUNCTIONS: Readonly<Record<string, FunctionSpec>> = {
    count: { clickhouse: 'count', min: 0, max: 1, aggregate: true },
    min: { clickhouse: 'min', min: 1, max: 1, aggregate: true },
    max: { clickhouse: 'max', min: 1, max: 1, aggregate: true },
    toUUID: { clickhouse: 'toUUIDOrNull', min: 1, max: 1 },
    toString: { clickhouse: 'toString', min: 1, max: 1 },
    toInt: { clickhouse: 'toInt64OrNull', min: 1, max: 1 },
    toFloat: { clickhouse: 'toFloat64OrNull', min: 1, max: 1 },
    toUnixTimestamp: { clickhouse: 'toUnixTimestamp', min: 1, max: 2 },
    toUnixTimestamp64Milli: { clickhouse: 'toUnixTimestamp64Milli', min: 1, max: 1 },
    toUnixTimestamp64Micro: { clickhouse: 'toUnixTimestamp64Micro', min: 1, max: 1 },
    fromUnixTimestamp: { clickhouse: 'fromUnixTimestamp', min: 1, max: 1 },
    toDate: { clickhouse: 'toDate', min: 1, max: 1 },
    lower: { clickhouse: 'lower', min: 1, max: 1 },
    upper: { clickhouse: 'upper', min: 1, max: 1 },
    length: { clickhouse: 'length', min: 1, max: 1 },
    concat: { clickhouse: 'concat', min: 2, max: Infinity },
    startsWith: { clickhouse: 'startsWith', min: 2, max: 2 },
    endsWith: { clickhouse: 'endsWith', min: 2, max: 2 },
    isNull: { clickhouse: 'isNull', min: 1, max: 1 },
    isNotNull: { clickhouse: 'isNotNull', min: 1, max: 1 },
    ifNull: { clickhouse: 'ifNull', min: 2, max: 2 },
    coalesce: { clickhouse: 'coalesce', min: 1, max: Infinity },
    if: { clickhouse: 'if', min: 3, max: 3 },
    tuple: { clickhouse: 'tuple', min: 1, max: Infinity },
    equals: { clickhouse: 'equals', min: 2, max: 2 },
    notEquals: { clickhouse: 'notEquals', min: 2, max: 2 },
    less: { clickhouse: 'less', min: 2, max: 2 },
    greater: { clickhouse: 'greater', min: 2, max: 2 },
    lessOrEquals: { clickhouse: 'lessOrEquals', min: 2, max: 2 },
    greaterOrEquals: { clickhouse: 'greaterOrEquals', min: 2, max: 2 },
    and: { clickhouse: 'and', min: 2, max: Infinity },
    or: { clickhouse: 'or', min: 2, max: Infinity },
    not: { clickhouse: 'not', min: 1, max: 1 },
    plus: { clickhouse: 'plus', min: 2, max: 2 },
    minus: { clickhouse: 'minus', min: 2, max: 2 },
    multiply: { clickhouse: 'multiply', min: 2, max: 2 },
    divide: { clickhouse: 'divide', min: 2, max: 2 },
    intDiv: { clickhouse: 'intDiv', min: 2, max: 2 },
    modulo: { clickhouse: 'modulo', min: 2, max: 2 },
    empty: { clickhouse: 'empty', min: 1, max: 1 },
    notEmpty: { clickhouse: 'notEmpty', min: 1, max: 1 },
    position: { clickhouse: 'position', min: 2, max: 3 },
    positionCaseInsensitive: { clickhouse: 'positionCaseInsensitive', min: 2, max: 3 },
    match: { clickhouse: 'match', min: 2, max: 2 },
    like: { clickhouse: 'like', min: 2, max: 2 },
    ilike: { clickhouse: 'ilike', min: 2, max: 2 },
    notLike: { clickhouse: 'notLike', min: 2, max: 2 },
    notILike: { clickhouse: 'notILike', min: 2, max: 2 },
    in: { clickhouse: 'in', min: 2, max: 2 },
    notIn: { clickhouse: 'notIn', min: 2, max: 2 },
    has: { clickhouse: 'has', min: 2, max: 2 },
    trim: { clickhouse: 'trim', min: 1, max: 1 },
    replaceAll: { clickhouse: 'replaceAll', min: 3, max: 3 },
    replaceOne: { clickhouse: 'replaceOne', min: 3, max: 3 },
    substring: { clickhouse: 'substring', min: 2, max: 3 },
    splitByChar: { clickhouse: 'splitByChar', min: 2, max: 3 },
    domain: { clickhouse: 'domain', min: 1, max: 1 },
    path: { clickhouse: 'path', min: 1, max: 1 },
    round: { clickhouse: 'round', min: 1, max: 2 },
    floor: { clickhouse: 'floor', min: 1, max: 2 },
    ceil: { clickhouse: 'ceil', min: 1, max: 2 },
    abs: { clickhouse: 'abs', min: 1, max: 1 },
    greatest: { clickhouse: 'greatest', min: 2, max: Infinity },
    least: { clickhouse: 'least', min: 2, max: Infinity },
    nullIf: { clickhouse: 'nullIf', min: 2, max: 2 },
    multiIf: { clickhouse: 'multiIf', min: 3, max: Infinity },
    toHour: { clickhouse: 'toHour', min: 1, max: 1 },
    toDayOfWeek: { clickhouse: 'toDayOfWeek', min: 1, max: 3 },
    toStartOfDay: { clickhouse: 'toStartOfDay', min: 1, max: 1 },
    toStartOfHour: { clickhouse: 'toStartOfHour', min: 1, max: 1 },
    dateDiff: { clickhouse: 'dateDiff', min: 3, max: 3 },
    JSONExtractInt: { clickhouse: 'JSONExtractInt', min: 1, max: Infinity },
    JSONExtractFloat: { clickhouse: 'JSONExtractFloat', min: 1, max: Infinity },
    JSONExtractBool: { clickhouse: 'JSONExtractBool', min: 1, max: Infinity },
    JSONLength: { clickhouse: 'JSONLength', min: 1, max: Infinity },
    JSONExtractString: { clickhouse: 'JSONExtractString', min: 2, max: Infinity },
    JSONExtractRaw: { clickhouse: 'JSONExtractRaw', min: 2, max: Infinity },
    JSONHas: { clickhouse: 'JSONHas', min: 2, max: Infinity },
    ...Object.fromEntries(
        ['Second', 'Minute', 'Hour', 'Day', 'Week', 'Month'].flatMap((unit) => [
            [`toInterval${unit}`, { clickhouse: `toInterval${unit}`, min: 1, max: 1 }],
            [`add${unit}s`, { clickhouse: `add${unit}s`, min: 2, max: 2 }],
            [`subtract${unit}s`, { clickhouse: `subtract${unit}s`, min: 2, max: 2 }],
        ])
    ),
}

/** Functions PostHog prints with the project timezone appended (`tz_aware`), and their own argument counts. */
const TIMEZONE_FUNCTIONS = new Set(['now', 'NOW', 'today', 'yesterday', 'toDateTime', 'toDateTime64'])

const COMPARE_FUNCTIONS: Readonly<Record<string, string>> = {
    '==': 'equals',
    '!=': 'notEquals',
    '<': 'less',
    '>': 'greater',
    '<=': 'lessOrEquals',
    '>=': 'greaterOrEquals',
    like: 'like',
    ilike: 'ilike',
    'not like': 'notLike',
    'not ilike': 'notILike',
    in: 'in',
    'not in': 'notIn',
    '=~': 'match',
    '!~': 'match',
    '=~*': 'match',
    '!~*': 'match',
}

const ARITHMETIC_FUNCTIONS: Readonly<Record<string, string>> = {
    '+': 'plus',
    '-': 'minus',
    '*': 'multiply',
    '/': 'divide',
    '%': 'modulo',
}

type Dialect = 'hogql' | 'clickhouse'

interface PrintContext {
    dialect: Dialect
    compile: CompileContext
    /** Names the events table may be referred to by: `events` and the FROM alias. */
    tableNames: Set<string>
    /** Aliases defined in the SELECT list; HogQL lets other clauses refer to them. */
    selectAliases: Set<string>
    /** The persons tables the printed fields need joined (filled while printing). */
    joins: Set<PersonJoin>
}

type PersonJoin = 'override' | 'person'

function unsupported(what: string): HogQLError {
    return new HogQLError(`${what} is not supported by the PostHog stand-in (PostHog itself may accept it).`)
}

function child(node: HogQLNode, key: string): HogQLNode | null {
    const value = node[key]
    return value && typeof value === 'object' && !Array.isArray(value) ? (value as HogQLNode) : null
}

function children(node: HogQLNode, key: string): HogQLNode[] {
    const value = node[key]
    return Array.isArray(value) ? (value as HogQLNode[]) : []
}

function chainOf(node: HogQLNode): string[] {
    return Array.isArray(node.chain) ? node.chain.map((part) => String(part)) : []
}

/** A ClickHouse string literal. */
export function clickhouseString(value: string): string {
    return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`
}

/** An identifier, backquoted when it is not a plain name (as PostHog's printers do). */
export function quoteIdentifier(name: string, dialect: Dialect = 'clickhouse'): string {
    if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(name) || (dialect === 'hogql' && /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name))) {
        return name
    }
    return '`' + name.replace(/\\/g, '\\\\').replace(/`/g, '\\`') + '`'
}

function printConstant(value: unknown): string {
    if (value === null || value === undefined) {
        return 'NULL'
    }
    if (typeof value === 'string') {
        return clickhouseString(value)
    }
    if (typeof value === 'boolean') {
        return value ? 'true' : 'false'
    }
    if (typeof value === 'number') {
        if (!Number.isFinite(value)) {
            throw new HogQLError(`Unsupported constant: ${String(value)}`)
        }
        return String(value)
    }
    if (Array.isArray(value)) {
        return `[${value.map(printConstant).join(', ')}]`
    }
    throw new HogQLError(`Unsupported constant type: ${typeof value}`)
}

/** `{name}` placeholders become constants from the request's `values`, as PostHog's runner does. */
export function replacePlaceholders(node: unknown, values: Record<string, unknown> | undefined): unknown {
    if (Array.isArray(node)) {
        return node.map((item) => replacePlaceholders(item, values))
    }
    if (!node || typeof node !== 'object') {
        return node
    }
    const current = node as HogQLNode
    if (current.node === 'Placeholder') {
        const expr = child(current, 'expr')
        const chain = expr ? chainOf(expr) : []
        if (!expr || expr.node !== 'Field' || chain.length !== 1) {
            throw new HogQLError('Placeholder expressions are not yet supported')
        }
        const name = chain[0] as string
        if (!values || Object.keys(values).length === 0) {
            throw new HogQLError(`Unresolved placeholder: {${name}}`)
        }
        if (!(name in values) || values[name] === null || values[name] === undefined) {
            throw new HogQLError(
                `Placeholder {${name}} is not available in this context. You can use the following: ` +
                    Object.keys(values).join(', ')
            )
        }
        return valueToNode(values[name])
    }
    const copy: HogQLNode = { node: current.node }
    for (const [key, value] of Object.entries(current)) {
        copy[key] = key === 'node' ? value : replacePlaceholders(value, values)
    }
    return copy
}

function valueToNode(value: unknown): HogQLNode {
    if (Array.isArray(value)) {
        return { node: 'Array', exprs: value.map(valueToNode) }
    }
    if (value !== null && typeof value === 'object') {
        throw new HogQLError('Placeholder values must be strings, numbers, booleans or lists of them')
    }
    return { node: 'Constant', value }
}

/** How HogQL names a field in `columns` and `hogql`: the chain without the table name. */
function hogqlFieldName(chain: string[], ctx: PrintContext): string {
    const parts = chain.length > 1 && ctx.tableNames.has(chain[0] as string) ? chain.slice(1) : chain
    return parts.map((part) => quoteIdentifier(part, 'hogql')).join('.')
}

/** PostHog's printer for `properties.x`: the raw JSON value, unquoted, with '' and JSON null as NULL. */
function jsonProperty(column: string, keys: string[]): string {
    const args = keys.map(clickhouseString).join(', ')
    return `replaceRegexpAll(nullIf(nullIf(JSONExtractRaw(${column}, ${args}), ''), 'null'), '^"|"$', '')`
}

function printField(node: HogQLNode, ctx: PrintContext): string {
    const chain = chainOf(node)
    if (ctx.dialect === 'hogql') {
        return hogqlFieldName(chain, ctx)
    }
    const parts = chain.length > 1 && ctx.tableNames.has(chain[0] as string) ? chain.slice(1) : chain
    const [first, ...rest] = parts
    if (first === undefined || first === '*') {
        throw unsupported('`*`')
    }
    if (rest.length === 0 && ctx.selectAliases.has(first) && parts.length === chain.length) {
        return quoteIdentifier(first)
    }
    if (first === 'person' || first === 'person_id') {
        return printPersonField(parts, ctx)
    }
    const field = EVENT_FIELDS[first]
    if (!field) {
        throw new HogQLError(`Unable to resolve field: ${first}`)
    }
    const column = `events.${quoteIdentifier(field.column)}`
    if (rest.length > 0) {
        if (first !== 'properties') {
            throw new HogQLError(`Unable to resolve field: ${parts.join('.')}`)
        }
        return jsonProperty(column, rest)
    }
    return field.datetime ? `toTimeZone(${column}, ${clickhouseString(ctx.compile.timezone)})` : column
}

/** The override join's person_id, as PostHog's `_use_person_id_from_person_overrides` defines it. */
const OVERRIDDEN_PERSON_ID =
    'if(not(empty(events__override.distinct_id)), events__override.person_id, events.person_id)'

/**
 * `person_id` and `person.*` by the persons-on-events mode (posthog/hogql/database/database.py): the columns
 * ingestion wrote on the event (`poe`), the person id corrected by the overrides of merged persons, or the person
 * as the `persons` table holds it now.
 */
function printPersonField(parts: string[], ctx: PrintContext): string {
    const mode = ctx.compile.personsOnEventsMode
    if (mode === 'disabled') {
        throw unsupported('`person` in the persons-on-events mode "disabled" (a join with person_distinct_id2)')
    }
    if (mode !== 'person_id_no_override_properties_on_events') {
        ctx.joins.add('override')
    }
    const personId = mode === 'person_id_no_override_properties_on_events' ? 'events.person_id' : OVERRIDDEN_PERSON_ID
    const [first, field, ...keys] = parts
    if (first === 'person_id' && field === undefined) {
        return personId
    }
    if (field === undefined) {
        throw unsupported('`person` as a whole (name its fields: person.id, person.properties)')
    }
    const joined = mode === 'person_id_override_properties_joined'
    if (joined) {
        ctx.joins.add('person')
    }
    const tz = clickhouseString(ctx.compile.timezone)
    const columns: Record<string, string> = joined
        ? { id: 'events__person.id', properties: 'events__person.properties', created_at: 'events__person.created_at' }
        : { id: personId, properties: 'events.person_properties', created_at: 'events.person_created_at' }
    const column = columns[field]
    if (!column || (keys.length > 0 && field !== 'properties')) {
        throw new HogQLError(`Unable to resolve field: ${parts.join('.')}`)
    }
    if (keys.length > 0) {
        return jsonProperty(column, keys)
    }
    return field === 'created_at' ? `toTimeZone(${column}, ${tz})` : column
}

/** The LEFT JOINs the printed fields need, as PostHog's lazy joins print them (latest version, deletions dropped). */
function personJoins(joins: Set<PersonJoin>, compile: CompileContext): string[] {
    const team = `equals(team_id, ${compile.teamId})`
    const sql: string[] = []
    if (joins.has('override')) {
        sql.push(
            `LEFT OUTER JOIN (SELECT argMax(person_id, version) AS person_id, distinct_id ` +
                `FROM ${compile.overridesTable} WHERE ${team} GROUP BY distinct_id ` +
                `HAVING ifNull(equals(argMax(is_deleted, version), 0), 0)) AS events__override ` +
                `ON equals(events.distinct_id, events__override.distinct_id)`
        )
    }
    if (joins.has('person')) {
        sql.push(
            `LEFT OUTER JOIN (SELECT argMax(properties, version) AS properties, ` +
                `argMax(created_at, version) AS created_at, id FROM ${compile.personsTable} WHERE ${team} ` +
                `GROUP BY id HAVING ifNull(equals(argMax(is_deleted, version), 0), 0)) AS events__person ` +
                `ON equals(${OVERRIDDEN_PERSON_ID}, events__person.id)`
        )
    }
    return sql
}

/** PostHog's lookup: the exact name, else its lowercase form (`NOT(…)`, `COUNT()`), as `_find_function` does. */
function canonicalFunctionName(name: string): string {
    if (name in FUNCTIONS || TIMEZONE_FUNCTIONS.has(name)) {
        return name
    }
    const lower = name.toLowerCase()
    return lower in FUNCTIONS || TIMEZONE_FUNCTIONS.has(lower) ? lower : name
}

function printCall(rawName: string, args: HogQLNode[], ctx: PrintContext): string {
    const name = canonicalFunctionName(rawName)
    const printed = args.map((arg) => printExpr(arg, ctx))
    if (ctx.dialect === 'hogql') {
        if (name === 'count' && args.length === 1 && args[0]?.node === 'Field' && chainOf(args[0])[0] === '*') {
            return 'count(*)'
        }
        return `${name}(${printed.join(', ')})`
    }
    const tz = clickhouseString(ctx.compile.timezone)
    if (TIMEZONE_FUNCTIONS.has(name)) {
        return printTimezoneCall(name, args, printed, tz)
    }
    const spec = FUNCTIONS[name]
    if (!spec) {
        throw unsupported(`The function \`${name}\``)
    }
    if (args.length < spec.min || args.length > spec.max) {
        throw new HogQLError(`Function '${name}' expects ${spec.min}..${spec.max} arguments, found ${args.length}`)
    }
    if (name === 'count' && args.length === 1 && args[0]?.node === 'Field' && chainOf(args[0])[0] === '*') {
        return 'count()'
    }
    return `${spec.clickhouse}(${printed.join(', ')})`
}

/** `now()`, `toDateTime()` & co. get the project timezone (and precision 6) appended, as PostHog prints them. */
function printTimezoneCall(name: string, args: HogQLNode[], printed: string[], tz: string): string {
    if (name === 'now' || name === 'NOW') {
        if (args.length > 0) {
            throw new HogQLError(`Function '${name}' expects 0 arguments, found ${args.length}`)
        }
        return `now64(6, ${tz})`
    }
    if (name === 'today' || name === 'yesterday') {
        return `${name}()`
    }
    if (name === 'toDateTime64') {
        if (args.length < 1 || args.length > 3) {
            throw new HogQLError(`Function 'toDateTime64' expects 1..3 arguments, found ${args.length}`)
        }
        const [value, precision = '6', zone = tz] = printed
        return `toDateTime64(${value}, ${precision}, ${zone})`
    }
    // toDateTime
    if (args.length < 1 || args.length > 2) {
        throw new HogQLError(`Function 'toDateTime' expects 1..2 arguments, found ${args.length}`)
    }
    const zone = printed[1] ?? tz
    const arg = args[0] as HogQLNode
    if (arg.node === 'Constant' && typeof arg.value === 'string') {
        return `parseDateTime64BestEffort(${printed[0]}, 6, ${zone})`
    }
    if (arg.node === 'Constant' && typeof arg.value === 'number') {
        return `toDateTime(${printed[0]}, ${zone})`
    }
    if (arg.node === 'Field' && isDatetimeField(arg)) {
        return `toDateTime(${printed[0]}, ${zone})`
    }
    return `parseDateTime64BestEffortOrNull(${printed[0]}, 6, ${zone})`
}

function isDatetimeField(node: HogQLNode): boolean {
    const chain = chainOf(node)
    const name = chain[chain.length - 1]
    return name !== undefined && EVENT_FIELDS[name]?.datetime === true
}

/** Functions whose result may be NULL whatever their arguments (the `…OrNull` conversions and friends). */
const NULLABLE_FUNCTIONS = new Set(['toInt', 'toFloat', 'toUUID', 'nullIf', 'JSONExtractRaw', 'toDateTime'])
/** Functions that never return NULL. */
const NOT_NULL_FUNCTIONS = new Set(['isNull', 'isNotNull', 'ifNull', 'coalesce', 'count', 'empty', 'notEmpty', 'has'])

/** Whether an expression may be NULL, as PostHog's types tell its printer (property access always may). */
function nullable(node: HogQLNode): boolean {
    switch (node.node) {
        case 'Constant':
            return node.value === null || node.value === undefined
        case 'Field': {
            const chain = chainOf(node)
            const at = chain.indexOf('properties')
            return at >= 0 && at < chain.length - 1
        }
        case 'ArrayAccess':
            return true
        case 'Alias':
            return nullable(child(node, 'expr') as HogQLNode)
        case 'ArithmeticOperation':
            return nullable(child(node, 'left') as HogQLNode) || nullable(child(node, 'right') as HogQLNode)
        case 'Call': {
            const name = canonicalFunctionName(String(node.name))
            if (NOT_NULL_FUNCTIONS.has(name)) {
                return false
            }
            return NULLABLE_FUNCTIONS.has(name) || children(node, 'args').some(nullable)
        }
        default:
            return false
    }
}

const isConstant = (node: HogQLNode): boolean => node.node === 'Constant'

/**
 * PostHog's NULL rules for a comparison of nullable operands (posthog/hogql/printer, `visit_compare_operation`):
 * `=`, LIKE, ILIKE and `=~` hold when both sides are NULL; `!=`, NOT LIKE, NOT ILIKE and `!~` hold when one is;
 * `<` & co. never hold with a NULL; NOT IN holds for a NULL on the left (`transform_null_in` does IN's part).
 */
function nullSafe(op: string, compare: string, node: { left: HogQLNode; right: HogQLNode }, l: string, r: string) {
    const constantSide = isConstant(node.left) || isConstant(node.right)
    switch (op) {
        case '==':
        case 'like':
        case 'ilike':
            return constantSide ? `ifNull(${compare}, 0)` : `ifNull(${compare}, and(isNull(${l}), isNull(${r})))`
        case '!=':
        case 'not like':
        case 'not ilike':
            return constantSide ? `ifNull(${compare}, 1)` : `ifNull(${compare}, or(isNotNull(${l}), isNotNull(${r})))`
        case 'in':
            return compare
        case 'not in':
            return nullable(node.left) ? `ifNull(${compare}, 1)` : compare
        case '=~':
        case '=~*':
            return `ifNull(${compare}, and(isNull(${l}), isNull(${r})))`
        case '!~':
        case '!~*':
            return `ifNull(${compare}, or(isNotNull(${l}), isNotNull(${r})))`
        default:
            return `ifNull(${compare}, 0)`
    }
}

function printCompare(node: HogQLNode, ctx: PrintContext): string {
    const op = String(node.op)
    const left = child(node, 'left') as HogQLNode
    const right = child(node, 'right') as HogQLNode
    const fn = COMPARE_FUNCTIONS[op]
    if (!fn) {
        throw unsupported(`The operator \`${op}\``)
    }
    if (right.node === 'Constant' && (right.value === null || right.value === undefined)) {
        if (op === '==') {
            return `isNull(${printExpr(left, ctx)})`
        }
        if (op === '!=') {
            return `isNotNull(${printExpr(left, ctx)})`
        }
    }
    const l = printExpr(left, ctx)
    const r = printExpr(right, ctx)
    const insensitive = op === '=~*' || op === '!~*'
    let compare = `${fn}(${l}, ${insensitive ? `concat('(?i)', ${r})` : r})`
    if (op === '!~' || op === '!~*') {
        compare = `not(${compare})`
    }
    if (ctx.dialect === 'hogql' || (!nullable(left) && !nullable(right))) {
        return compare
    }
    return nullSafe(op, compare, { left, right }, l, r)
}

/** `properties['a b']`: an index into a JSON field is the same property access as `properties.a`. */
function flattenArrayAccess(node: HogQLNode): HogQLNode {
    const array = child(node, 'array') as HogQLNode
    const property = child(node, 'property') as HogQLNode
    const base = array.node === 'ArrayAccess' ? flattenArrayAccess(array) : array
    if (base.node !== 'Field' || property.node !== 'Constant' || typeof property.value !== 'string') {
        throw unsupported('Indexing anything but a properties field with a string')
    }
    return { node: 'Field', chain: [...chainOf(base), property.value] }
}

export function printExpr(node: HogQLNode, ctx: PrintContext): string {
    switch (node.node) {
        case 'Constant':
            return printConstant(node.value)
        case 'Field':
            return printField(node, ctx)
        case 'ArrayAccess':
            return printField(flattenArrayAccess(node), ctx)
        case 'Alias':
            return printExpr(child(node, 'expr') as HogQLNode, ctx)
        case 'Call':
            return printCall(String(node.name), children(node, 'args'), ctx)
        case 'Not':
            return `not(${printExpr(child(node, 'expr') as HogQLNode, ctx)})`
        case 'And':
        case 'Or': {
            const exprs = children(node, 'exprs').map((expr) => printExpr(expr, ctx))
            return exprs.length === 1 ? (exprs[0] as string) : `${node.node.toLowerCase()}(${exprs.join(', ')})`
        }
        case 'CompareOperation':
            return printCompare(node, ctx)
        case 'ArithmeticOperation': {
            const fn = ARITHMETIC_FUNCTIONS[String(node.op)]
            if (!fn) {
                throw unsupported(`The operator \`${String(node.op)}\``)
            }
            const left = printExpr(child(node, 'left') as HogQLNode, ctx)
            return `${fn}(${left}, ${printExpr(child(node, 'right') as HogQLNode, ctx)})`
        }
        case 'Tuple':
            return `tuple(${children(node, 'exprs')
                .map((expr) => printExpr(expr, ctx))
                .join(', ')})`
        case 'Array':
            return `[${children(node, 'exprs')
                .map((expr) => printExpr(expr, ctx))
                .join(', ')}]`
        case 'BetweenExpr': {
            const expr = printExpr(child(node, 'expr') as HogQLNode, ctx)
            const low = printExpr(child(node, 'low') as HogQLNode, ctx)
            const high = printExpr(child(node, 'high') as HogQLNode, ctx)
            return `(${expr} ${node.negated ? 'NOT ' : ''}BETWEEN ${low} AND ${high})`
        }
        default:
            throw unsupported(`The expression \`${node.node}\``)
    }
}

/** Refuses the clauses the stand-in does not print, naming the first one found. */
function checkClauses(select: HogQLNode): void {
    const refused: Array<[string, string]> = [
        ['ctes', 'WITH'],
        ['group_by', 'GROUP BY'],
        ['having', 'HAVING'],
        ['prewhere', 'PREWHERE'],
        ['window_exprs', 'WINDOW'],
        ['array_join_op', 'ARRAY JOIN'],
        ['limit_by', 'LIMIT BY'],
        ['qualify', 'QUALIFY'],
    ]
    for (const [key, clause] of refused) {
        const value = select[key]
        if (value !== null && value !== undefined && !(Array.isArray(value) && value.length === 0)) {
            throw unsupported(clause)
        }
    }
    if (select.limit_with_ties) {
        throw unsupported('LIMIT … WITH TIES')
    }
}

function tableOf(select: HogQLNode): { alias: string | null } {
    const from = child(select, 'select_from')
    if (!from) {
        throw unsupported('A SELECT without FROM events')
    }
    const table = child(from, 'table')
    if (!table || table.node !== 'Field') {
        throw unsupported('A subquery in FROM')
    }
    if (from.next_join) {
        throw unsupported('JOIN')
    }
    if (from.sample) {
        throw unsupported('SAMPLE')
    }
    const name = chainOf(table).join('.')
    if (name !== 'events') {
        if (OTHER_POSTHOG_TABLES.includes(name)) {
            throw unsupported(`The table \`${name}\` (only \`events\` is served)`)
        }
        throw new HogQLError(`Unknown table \`${name}\`.`)
    }
    return { alias: typeof from.alias === 'string' ? from.alias : null }
}

function constantInteger(node: HogQLNode | null): number | null {
    return node && node.node === 'Constant' && typeof node.value === 'number' && Number.isInteger(node.value)
        ? node.value
        : null
}

/** Parses with PostHog's parser; a parse failure is PostHog's 400 `hogql_syntax_error` with the parser's text. */
export function parseHogQL(parser: HogQLParser, query: string): HogQLNode {
    const result = JSON.parse(parser.parseSelect(query, true)) as HogQLNode & { error?: boolean; message?: string }
    if (result.error) {
        throw new HogQLError(String(result.message), 'hogql_syntax_error')
    }
    return result
}

interface Paging {
    /** The constant LIMIT after the cap, when there is one. */
    limit: number | null
    /** A LIMIT that is an expression (capped with `min2` when printed). */
    limitExpr: HogQLNode | null
    paginator: CompiledQuery['paginator']
    offset: HogQLNode | null
}

/** LIMIT and OFFSET as PostHog applies them: OFFSET refused, LIMIT capped, no LIMIT → the has-more paginator. */
function pagingOf(select: HogQLNode, compile: CompileContext): Paging {
    const offset = child(select, 'offset')
    if (offset && !compile.allowOffset) {
        throw new HogQLError(OFFSET_NOT_ALLOWED_MESSAGE)
    }
    const limitNode = child(select, 'limit')
    if (!limitNode) {
        // PostHog's HogQLHasMorePaginator: fetch one row more than the page to know whether there is more.
        return { limit: null, limitExpr: null, paginator: { pageSize: compile.defaultRows }, offset }
    }
    const constant = constantInteger(limitNode)
    if (constant !== null) {
        return { limit: Math.min(constant, compile.maxRows), limitExpr: null, paginator: null, offset }
    }
    return { limit: null, limitExpr: limitNode, paginator: null, offset }
}

/** One dialect's text of the whole SELECT. ClickHouse's gets the team scope and an alias on every column. */
function printSelect(
    select: HogQLNode,
    columns: string[],
    paging: Paging,
    ctx: PrintContext,
    from: () => string
): string {
    const clickhouse = ctx.dialect === 'clickhouse'
    const items = children(select, 'select').map((item, i) => {
        const name = columns[i] as string
        if (clickhouse || item.node === 'Alias') {
            return `${printExpr(item, ctx)} AS ${quoteIdentifier(name, ctx.dialect)}`
        }
        return name
    })
    const whereNode = child(select, 'where')
    const userWhere = whereNode ? printExpr(whereNode, ctx) : null
    const teamScope = `equals(events.team_id, ${ctx.compile.teamId})`
    const where = clickhouse ? (userWhere ? `and(${teamScope}, ${userWhere})` : teamScope) : userWhere
    const orderBy = children(select, 'order_by').map(
        (order) => `${printExpr(child(order, 'expr') as HogQLNode, ctx)} ${order.order === 'DESC' ? 'DESC' : 'ASC'}`
    )
    let limit: string
    if (paging.paginator) {
        limit = String(paging.paginator.pageSize + 1)
    } else if (paging.limit !== null) {
        limit = String(paging.limit)
    } else {
        limit = `min2(${ctx.compile.maxRows}, ${printExpr(paging.limitExpr as HogQLNode, ctx)})`
    }
    const offset = paging.offset ? printExpr(paging.offset, ctx) : paging.paginator ? '0' : null
    return [
        `SELECT ${select.distinct ? 'DISTINCT ' : ''}${items.join(', ')}`,
        // After the rest is printed: the fields printed decide which joins the FROM needs.
        `FROM ${from()}`,
        where ? `WHERE ${where}` : null,
        orderBy.length > 0 ? `ORDER BY ${orderBy.join(', ')}` : null,
        `LIMIT ${limit}`,
        offset !== null ? `OFFSET ${offset}` : null,
    ]
        .filter((line): line is string => line !== null)
        .join('\n')
}

/** The whole translation: parse, fill placeholders, check the shape, print both dialects. */
export function compileHogQL(
    parser: HogQLParser,
    query: string,
    values: Record<string, unknown> | undefined,
    compile: CompileContext
): CompiledQuery {
    const parsed = parseHogQL(parser, query)
    if (parsed.node === 'SelectSetQuery') {
        throw unsupported('UNION / INTERSECT / EXCEPT')
    }
    if (parsed.node !== 'SelectQuery') {
        throw unsupported(`A \`${parsed.node}\` query`)
    }
    const select = replacePlaceholders(parsed, values) as HogQLNode
    checkClauses(select)
    const { alias } = tableOf(select)
    const items = children(select, 'select')
    const selectAliases = new Set(items.filter((item) => item.node === 'Alias').map((item) => String(item.alias)))
    const tableNames = new Set(['events', ...(alias ? [alias] : [])])
    const joins = new Set<PersonJoin>()
    const hogqlCtx: PrintContext = { dialect: 'hogql', compile, tableNames, selectAliases, joins: new Set() }
    const chCtx: PrintContext = { dialect: 'clickhouse', compile, tableNames, selectAliases, joins }
    const columns = items.map((item) => (item.node === 'Alias' ? String(item.alias) : printExpr(item, hogqlCtx)))
    const paging = pagingOf(select, compile)
    const from = (): string => [`${compile.table} AS events`, ...personJoins(joins, compile)].join('\n')
    const sql = printSelect(select, columns, paging, chCtx, from)
    const hogql = printSelect(
        select,
        columns,
        paging,
        hogqlCtx,
        () => `events${alias ? ` AS ${quoteIdentifier(alias, 'hogql')}` : ''}`
    )
    const printedItems = items.map((item, i) => `${printExpr(item, chCtx)} AS ${quoteIdentifier(columns[i] as string)}`)
    const typesSql = `SELECT ${printedItems.join(', ')} FROM ${from()}`
    return { sql, hogql, columns, aliases: columns, typesSql, paginator: paging.paginator, limit: paging.limit }
}

/**
 * `sync` as a composition: the PostHog source feeds the shared delivery pipeline, and the pipeline's in-order
 * commits become the checkpoint. This file only wires the two together.
 */
import { Outcome, ParsedConfig, SenderEnv } from '../index'
import { runPipeline } from '../pipeline'
import { deadLetterWriter } from '../pipeline/dead-letter'
import type { WaitOut } from '../pipeline/send'
import type { PipelineProgress, PipelineReport } from '../pipeline/types'
import { SourceBinding, writeSyncCheckpoint } from './checkpoint'
import { QueryClient } from './posthog'
import { Cursor } from './query'
import { PersonShape } from './rows'
import { DEFAULT_CHUNK_ROWS, PageInfo, posthogSource, SourceOptions } from './source'

export interface SyncProgress extends PipelineProgress {
    /** created_at of the newest event read (ms), or null before the first page. */
    cursorMs: number | null
    /** Whether the last page reached the horizon (now minus the lag), and that horizon (ms). */
    caughtUp: boolean
    horizonMs: number | null
    queries: number
    queryRetries: number
}

export interface SyncReport extends PipelineReport<Cursor> {
    queries: number
    queryRetries: number
    /** The checkpoint's cursor at the end (where a resume starts). */
    cursor: Cursor
    /** What stopped the source, if anything did: a PostHogQueryError tells a config problem from an outage. */
    sourceError: unknown
}

export interface SyncOptions extends Omit<SourceOptions, 'run' | 'onPage' | 'signal' | 'person'> {
    /** `--with-person`: each event carries its person, shaped as PostHog's webhook destination sends it. */
    withPerson?: boolean
    client: QueryClient
    config: ParsedConfig
    env: SenderEnv
    concurrency: number
    binding: SourceBinding
    checkpointFile: string | null
    deadLetterFile: string | null
    signal?: AbortSignal
    onProgress?: (progress: SyncProgress) => void
    onWarning?: (message: string) => void
    /** Told of each page the source reads (where the feed stands, whether it caught up). */
    onPage?: (page: PageInfo) => void
    /** Told of the keys of each chunk of rows read, in order, as the pipeline takes it. */
    onRead?: (keys: Cursor[]) => void
    /** Told of each position committed to the checkpoint. */
    onCommit?: (cursor: Cursor) => void
    /** Told of every webhook attempt's outcome. */
    onOutcome?: (outcome: Outcome) => void
    /** With --follow: a batch the webhook will not take waits out the outage within this budget. */
    waitOut?: WaitOut
}

/** One progress report from the pipeline's counters and the source's latest page. */
function progressReporter(
    client: QueryClient,
    onProgress?: (progress: SyncProgress) => void,
    onPage?: (page: PageInfo) => void
) {
    let page: PageInfo | null = null
    let latest: PipelineProgress | null = null
    const report = (): void => {
        if (latest && onProgress) {
            onProgress({
                ...latest,
                cursorMs: page?.cursor.ms ?? null,
                caughtUp: page?.caughtUp ?? false,
                horizonMs: page?.horizonMs ?? null,
                queries: client.queries,
                queryRetries: client.retries,
            })
        }
    }
    return {
        onPage: (info: PageInfo) => {
            page = info
            onPage?.(info)
            report()
        },
        onProgress: (progress: PipelineProgress) => {
            latest = progress
            report()
        },
    }
}

/** Where persons' pages are, and which of their properties are never sent. */
function personShape(client: QueryClient, config: ParsedConfig): PersonShape {
    const { origin, projectId } = client.target
    return {
        projectUrl: `${origin}/project/${encodeURIComponent(projectId)}`,
        excludedProperties: new Set(config.excludedProperties),
    }
}

export async function sync(options: SyncOptions): Promise<SyncReport> {
    const { client } = options
    const now = options.now ?? (() => Date.now())
    const progress = progressReporter(client, options.onProgress, options.onPage)
    let committed = options.start
    if (options.checkpointFile) {
        // Saved before anything is read, so a first run that finds nothing still pins --since and the source.
        writeSyncCheckpoint(options.checkpointFile, options.binding, options.start, now())
    }
    let sourceError: unknown = null
    const pages = posthogSource({
        ...options,
        run: (hogql) => client.run(hogql),
        keepText: options.config.excludedProperties.length === 0,
        person: options.withPerson ? personShape(client, options.config) : null,
        // Whole batches per chunk: the pipeline flushes a partial batch at each chunk's end (for a live feed).
        chunkRows:
            Math.max(1, Math.ceil(DEFAULT_CHUNK_ROWS / options.config.maxBatchEvents)) * options.config.maxBatchEvents,
        onPage: progress.onPage,
    })
    // The pipeline keeps only a source error's message; the error itself says whether it is configuration.
    async function* source() {
        try {
            for await (const chunk of pages) {
                options.onRead?.(chunk.map((record) => record.position))
                yield chunk
            }
        } catch (error) {
            sourceError = error
            throw error
        }
    }
    const report = await runPipeline<Cursor>({
        source: source(),
        start: options.start,
        config: options.config,
        env: options.env,
        concurrency: options.concurrency,
        flushEachChunk: true,
        signal: options.signal,
        // In order, and only over acknowledged batches: a crash resumes from here and replays, never skips.
        commit: (position) => {
            committed = position
            options.onCommit?.(position)
            if (options.checkpointFile) {
                writeSyncCheckpoint(options.checkpointFile, options.binding, position, now())
            }
        },
        deadLetter: deadLetterWriter<Cursor>(options.deadLetterFile),
        onProgress: progress.onProgress,
        onWarning: options.onWarning,
        onOutcome: options.onOutcome,
        waitOut: options.waitOut,
    })
    return { ...report, queries: client.queries, queryRetries: client.retries, cursor: committed, sourceError }
}

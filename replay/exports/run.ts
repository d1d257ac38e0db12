/**
 * Replays export files: the export source (files in interval order, rows shaped into the plugin's event) into the
 * shared pipeline, with a checkpoint of files done and the position in the current one.
 */
import { createHash } from 'node:crypto'

import { Outcome, ParsedConfig, SenderEnv } from '../../index'
import { PipelineProgress, PipelineReport, runPipeline } from '../../pipeline'
import { deadLetterWriter } from '../../pipeline/dead-letter'
import {
    checkBinding,
    EXPORTS_CHECKPOINT_KIND,
    EXPORTS_CHECKPOINT_VERSION,
    ExportsCheckpoint,
    readExportsCheckpoint,
    Resume,
    resumePlan,
    saveExportsCheckpoint,
    stampOf,
} from './checkpoint'
import { recentUuids } from './dedupe'
import { ExportFile } from './discover'
import { exportRecords, FilePosition, SourceCounts } from './source'

export interface ExportsOptions {
    files: ExportFile[]
    config: ParsedConfig
    env: SenderEnv
    concurrency?: number
    checkpointFile?: string | null
    deadLetterFile?: string | null
    dedupe?: boolean
    /** uuids --dedupe remembers at most (DEDUPE_WINDOW). */
    dedupeWindow?: number
    signal?: AbortSignal
    onProgress?: (progress: PipelineProgress) => void
    onWarning?: (message: string) => void
    /** Told when the run starts reading a file, by its index in `files`. */
    onFile?: (index: number) => void
    /** Told of every webhook attempt's outcome (health, metrics). */
    onOutcome?: (outcome: Outcome) => void
}

export interface ExportsReport extends PipelineReport<FilePosition>, SourceCounts {
    files: number
    /** Files an earlier run finished, per the checkpoint. */
    filesDone: number
    /** Files the checkpoint finished that are no longer in the input. */
    filesGone: number
    /** Where the checkpoint stands: "every file", or the file and row it resumes at. */
    checkpoint: string
}

/** The checkpoint is written at least this often while a file is read (and whenever a file is finished). */
export const CHECKPOINT_WRITE_MS = 1_000

const sha256 = (text: string): string => createHash('sha256').update(text).digest('hex')

/** What the checkpoint is bound to besides the files: the options that change what is sent, and the webhook. */
export function exportsBinding(config: ParsedConfig, dedupe: boolean) {
    const sorted = (values: Iterable<string>): string[] => [...values].sort()
    const options = {
        allowedEvents: config.allowedEvents ? sorted(config.allowedEvents) : null,
        excludedEvents: sorted(config.excludedEvents),
        excludedProperties: sorted(config.excludedProperties),
        dedupe,
    }
    return {
        options: sha256(JSON.stringify(options)),
        destination: sha256(`patterns-connector webhook ${config.webhookUrl}`),
    }
}

/**
 * The checkpoint kept up to date as the pipeline commits. It lists every file done, so with thousands of files it
 * is written when a file is finished and otherwise at most every CHECKPOINT_WRITE_MS, and once more at the end: a
 * crash in between resends at most that much, never skips.
 */
function checkpointKeeper(file: string | null, start: ExportsCheckpoint, plan: Resume[]) {
    const done = new Map(start.done.map((stamp) => [stamp.name, stamp]))
    let current = start.current
    let doneUpTo = 0
    let savedAt = 0
    let unsaved = false
    const save = (): void => {
        if (file) {
            saveExportsCheckpoint(file, { ...start, done: [...done.values()], current })
        }
        savedAt = Date.now()
        unsaved = false
    }
    const finishBefore = (index: number): void => {
        for (; doneUpTo < index; doneUpTo++) {
            const step = plan[doneUpTo] as Resume
            done.set(step.file.name, stampOf(step.file))
        }
    }
    return {
        commit: (position: FilePosition): void => {
            const finished = position.file > doneUpTo
            finishBefore(position.file)
            const step = plan[position.file] as Resume
            current = { ...stampOf(step.file), next: position.row + 1 }
            unsaved = true
            if (finished || Date.now() - savedAt >= CHECKPOINT_WRITE_MS) {
                save()
            }
        },
        flush: (): void => {
            if (unsaved) {
                save()
            }
        },
        finishAll: (): void => {
            finishBefore(plan.length)
            current = null
            save()
        },
        describe: (): string => (current ? `${current.name}, row ${current.next}` : 'after every file'),
    }
}

export async function replayExports(options: ExportsOptions): Promise<ExportsReport> {
    const { config, checkpointFile = null } = options
    const bound = exportsBinding(config, Boolean(options.dedupe))
    const saved = checkpointFile ? readExportsCheckpoint(checkpointFile) : null
    if (saved && checkpointFile) {
        checkBinding(checkpointFile, saved, bound.options, bound.destination)
    }
    const { plan, gone } = resumePlan(checkpointFile ?? '', saved, options.files)
    const start: ExportsCheckpoint = saved ?? {
        kind: EXPORTS_CHECKPOINT_KIND,
        version: EXPORTS_CHECKPOINT_VERSION,
        ...bound,
        done: [],
        current: null,
    }
    const keeper = checkpointKeeper(checkpointFile, start, plan)
    const counts: SourceCounts = { skipped: 0, duplicates: 0 }
    const source = exportRecords(plan, {
        excludedProperties: config.excludedProperties,
        filters: config,
        dedupe: options.dedupe ? recentUuids(options.dedupeWindow) : null,
        counts,
        onFile: options.onFile,
    })
    // Properties are removed while shaping (where big numbers are still text): the pipeline sends the text as is.
    const report = await runPipeline<FilePosition>({
        ...options,
        config: { ...config, excludedProperties: [] },
        source,
        commit: (position) => keeper.commit(position),
        deadLetter: deadLetterWriter<FilePosition>(options.deadLetterFile),
    })
    if (report.stopped === null && !options.signal?.aborted) {
        keeper.finishAll()
    } else {
        keeper.flush()
    }
    const filesDone = plan.filter((step) => 'done' in step).length
    return { ...report, ...counts, files: plan.length, filesDone, filesGone: gone, checkpoint: keeper.describe() }
}

/**
 * What one emulated PostHog install shares across its threads for a run: the database behind meta.storage and
 * meta.cache, and the scheduler of runEveryMinute. run.ts makes one per run; a test can hand in its own HostStore to
 * read what the plugin stored, or to "restart" a host over the same data.
 */
import type { Era } from './eras'
import type { ScheduledOutcome } from './instance'
import { MINUTE_MS } from './instance'
import { addPluginMetrics, PluginMetricValues } from './plugin-metrics'
import { DrainOptions, drainWhileScheduled, MinuteScheduler, ScheduleFigures } from './schedule'
import { DEFAULT_PLUGIN_CONFIG_ID, HostStore, StorageFaults, StorageFigures } from './storage'

export interface InstallOptions {
    /** The install's database; default: a fresh one in memory, closed at the end of the run. */
    store?: HostStore
    /** Faults for the database the run makes (with `store`, call its setFaults instead). */
    storageFaults?: StorageFaults
    /** The plugin config the plugin runs as: its storage rows are keyed by it (default 1). */
    pluginConfigId?: number
    /** PostHog's minute in real ms (default 60 000): runEveryMinute's period and the clock of cache TTLs. */
    minuteMs?: number
    /** After the events, keep the host (and runEveryMinute) going until this holds or the bound passed. */
    drain?: DrainOptions
}

/** What the run saw of storage, cache, scheduled tasks and plugin metrics. */
export interface InstallFigures {
    /** The database's figures over its whole life (a store handed in counts earlier runs too). */
    storage: StorageFigures
    /** null where the era has no scheduled tasks. */
    scheduled: ScheduleFigures | null
    /** meta.metrics, summed over the VMs; null where the era has none. */
    pluginMetrics: PluginMetricValues | null
}

export class Install {
    readonly store: HostStore
    readonly pluginConfigId: number
    readonly minuteMs: number
    private readonly ownStore: boolean
    private scheduler: MinuteScheduler | null = null

    constructor(
        private readonly options: InstallOptions,
        private readonly era: Era,
        private readonly log: (line: string) => void
    ) {
        this.ownStore = !options.store
        this.store = options.store ?? new HostStore({ faults: options.storageFaults })
        this.pluginConfigId = options.pluginConfigId ?? DEFAULT_PLUGIN_CONFIG_ID
        this.minuteMs = options.minuteMs ?? MINUTE_MS
        if (!Number.isFinite(this.minuteMs) || this.minuteMs <= 0) {
            throw new Error(`minuteMs: expected a number of ms > 0, got ${String(options.minuteMs)}`)
        }
    }

    /** What every VM of the install is given, in any thread. */
    vmOptions() {
        return { pluginConfigId: this.pluginConfigId, minuteMs: this.minuteMs }
    }

    /** Starts runEveryMinute where the era has scheduled tasks; `runOnce` hands one run to one VM. */
    schedule(runOnce: () => Promise<ScheduledOutcome>): void {
        if (this.era.services.scheduledTasks) {
            this.scheduler = new MinuteScheduler(this.minuteMs, runOnce, this.log)
            this.scheduler.start()
        }
    }

    /** After the events: the drain wait, if asked for, then no more scheduled runs. */
    async stopScheduling(): Promise<void> {
        if (this.options.drain) {
            await drainWhileScheduled(this.scheduler, this.options.drain)
        }
        await this.scheduler?.stop()
    }

    /** The run's figures; the database closes here unless the caller handed it in. */
    async finish(metrics: PluginMetricValues[]): Promise<InstallFigures> {
        await this.scheduler?.stop()
        const storage = await this.store.figures()
        if (this.ownStore) {
            await this.store.close()
        }
        return {
            storage,
            scheduled: this.scheduler ? { ...this.scheduler.figures } : null,
            pluginMetrics: this.era.services.pluginMetrics ? metrics.reduce(addPluginMetrics, {}) : null,
        }
    }
}

/**
 * The 2021 to early-2022 hosts' plugin metrics: a plugin declares `export const metrics = { name: 'sum' | 'max' |
 * 'min' }` and calls `meta.metrics[name].increment(n)`, `.max(n)` or `.min(n)`; the host kept the values and showed
 * them on the plugin's page. Here each VM records its own, and a run adds up those of every thread.
 */
export const METRIC_KINDS = ['sum', 'max', 'min'] as const
export type MetricKind = (typeof METRIC_KINDS)[number]

export interface PluginMetricValue {
    kind: MetricKind
    value: number
}
export type PluginMetricValues = Record<string, PluginMetricValue>

/** How two threads' values of one metric combine: sums add up, the others keep the extreme. */
export function combineMetric(a: PluginMetricValue, b: PluginMetricValue): PluginMetricValue {
    const value =
        a.kind === 'sum'
            ? a.value + b.value
            : a.kind === 'max'
              ? Math.max(a.value, b.value)
              : Math.min(a.value, b.value)
    return { kind: a.kind, value }
}

export function addPluginMetrics(total: PluginMetricValues, more: PluginMetricValues): PluginMetricValues {
    const sum: PluginMetricValues = { ...total }
    for (const [name, metric] of Object.entries(more)) {
        const seen = sum[name]
        sum[name] = seen ? combineMetric(seen, metric) : { ...metric }
    }
    return sum
}

/** One VM's `meta.metrics`: filled in once the plugin's exports are known, the same object across setup attempts. */
export class PluginMetrics {
    /** The host object the sandbox sees as meta.metrics. */
    readonly meta: Record<string, Record<string, (n: number) => void>> = {}
    readonly values: PluginMetricValues = {}

    /** Adds a recorder per declared metric; an unknown kind is reported and left out, as the host refused it. */
    declare(spec: Record<string, string> | null, log: (line: string) => void): void {
        for (const [name, kind] of Object.entries(spec ?? {})) {
            if (this.meta[name]) {
                continue
            }
            if (!(METRIC_KINDS as readonly string[]).includes(kind)) {
                log(`host: metric "${name}" has unknown type "${kind}"; use one of ${METRIC_KINDS.join(', ')}`)
                continue
            }
            this.meta[name] = this.recorder(name, kind as MetricKind)
        }
    }

    private recorder(name: string, kind: MetricKind): Record<string, (n: number) => void> {
        const record = (n: number): void => {
            const value = Number(n)
            const seen = this.values[name]
            this.values[name] = seen ? combineMetric(seen, { kind, value }) : { kind, value }
        }
        const method = kind === 'sum' ? 'increment' : kind
        return { [method]: record }
    }
}

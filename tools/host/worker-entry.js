// Worker thread entry for the Kafka path: registers the TypeScript loader, then runs host/worker.ts.
require('tsx/cjs')
require('./worker.ts')

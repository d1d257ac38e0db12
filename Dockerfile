# The sync as a container: the CLI packed by npm (what users install), on the official Node image, as a non-root
# user. Build: docker build -t patterns-connector .   Run: see docs/sync.md, "Run it as a service".

# Stage 1: build and pack (devDependencies, TypeScript and the tests' tools stay in this stage).
FROM node:20-bookworm-slim AS pack
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm pack --silent --pack-destination /pack && mv /pack/patterns-connector-*.tgz /pack/patterns-connector.tgz

# Stage 2: the packed CLI and its runtime dependencies only.
FROM node:20-bookworm-slim
ENV NODE_ENV=production
COPY --from=pack /pack/patterns-connector.tgz /tmp/patterns-connector.tgz
RUN npm install --global --omit=dev --no-audit --no-fund /tmp/patterns-connector.tgz \
    && rm /tmp/patterns-connector.tgz && npm cache clean --force \
    && mkdir /data && chown node:node /data
# The checkpoint (and any dead letters) go here: mount a volume, one per sync.
WORKDIR /data
VOLUME /data
USER node
# --metrics-port 9464 --metrics-host 0.0.0.0 in the command serves /metrics and /healthz here.
EXPOSE 9464
# SIGTERM: the requests in flight get 10 s, the checkpoint is written, exit 143. Give docker stop -t 20 or more.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["node", "-e", "require('http').get('http://127.0.0.1:9464/healthz', (r) => process.exit(r.statusCode === 200 ? 0 : 1)).on('error', () => process.exit(1))"]
ENTRYPOINT ["patterns-connector"]
CMD ["sync", "--help"]

# The sync as a container: the CLI packed by npm (what users install), on the official Node image, as a non-root
# user. Build: docker build -t patterns-connector .   Run: see docs/sync.md, "Run it as a service".
# Behind a TLS-intercepting proxy, pass its CA certificates (PEM) as a build secret, never by editing this file:
#   docker build --secret id=npm_ca,src=/path/to/proxy-ca.pem -t patterns-connector .   (podman build: the same)
# npm then trusts them on top of Node's own list (NODE_EXTRA_CA_CERTS); without the secret nothing changes.

# Stage 1: build and pack (devDependencies, TypeScript and the tests' tools stay in this stage).
FROM node:20-bookworm-slim AS pack
WORKDIR /src
COPY package.json package-lock.json ./
RUN --mount=type=secret,id=npm_ca,required=false \
    if [ -s /run/secrets/npm_ca ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/npm_ca; fi \
    && npm ci --no-audit --no-fund
COPY . .
# npm pack does not create its destination folder.
RUN mkdir /pack && npm pack --pack-destination /pack && mv /pack/patterns-connector-*.tgz /pack/patterns-connector.tgz

# Stage 2: the packed CLI and its runtime dependencies only.
FROM node:20-bookworm-slim
ENV NODE_ENV=production
COPY --from=pack /pack/patterns-connector.tgz /tmp/patterns-connector.tgz
RUN --mount=type=secret,id=npm_ca,required=false \
    if [ -s /run/secrets/npm_ca ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/npm_ca; fi \
    && npm install --global --omit=dev --no-audit --no-fund /tmp/patterns-connector.tgz \
    && rm /tmp/patterns-connector.tgz && npm cache clean --force \
    && mkdir /data && chown node:node /data
COPY deploy/docker/healthcheck.js /usr/local/lib/patterns-connector/healthcheck.js
# The checkpoint (and any dead letters) go here: mount a volume, one per sync.
WORKDIR /data
VOLUME /data
USER node
# --metrics-port 9464 --metrics-host 0.0.0.0 in the command serves /metrics and /healthz here.
EXPOSE 9464
# SIGTERM: the requests in flight get 10 s, the checkpoint is written, exit 143. Give docker stop -t 20 or more.
STOPSIGNAL SIGTERM
# Fits every command: probes /healthz on the --metrics-port the running command was given, and passes while a
# command run without one (replay, or sync without metrics) is running.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["node", "/usr/local/lib/patterns-connector/healthcheck.js"]
ENTRYPOINT ["patterns-connector"]
CMD ["sync", "--help"]

// OpenAPI 3.0 description of the v1 API (served at /v1/openapi.json).
const id = { type: 'string', pattern: '^[0-9a-f]{32}$' };
const devId = { type: 'string', pattern: '^[A-Za-z0-9_-]{1,64}$' };
const err = { description: 'error', content: { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } } };
const json = (ref: string, description = 'ok') => ({ description, content: { 'application/json': { schema: { $ref: `#/components/schemas/${ref}` } } } });
const list = (ref: string) => ({ description: 'ok', content: { 'application/json': { schema: { type: 'array', items: { $ref: `#/components/schemas/${ref}` } } } } });
const pathId = (name: string, schema: object) => ({ name, in: 'path', required: true, schema });
const body = (schema: object) => ({ required: true, content: { 'application/json': { schema } } });
const errors = { 400: err, 404: err, 409: err, 500: err };

export function openapi(version: string) {
  return {
    openapi: '3.0.3',
    info: { title: 'strata daemon API', version, description: 'Templates, copy-on-write devices (NBD or ublk) and disk-only snapshots.' },
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'required when the API listens beyond loopback' } },
      schemas: {
        Error: { type: 'object', properties: { error: { type: 'object', properties: { status: { type: 'integer' }, code: { type: 'string' }, message: { type: 'string' } } } } },
        Layer: {
          type: 'object', properties: {
            id, parent: { ...id, nullable: true }, chain: { type: 'array', items: id }, size: { type: 'integer' }, blockSize: { type: 'integer' },
            codec: { type: 'string', enum: ['zstd', 'lz4', 'none'] }, dataBytes: { type: 'integer' }, frames: { type: 'integer' }, extents: { type: 'integer' },
          },
        },
        Device: {
          type: 'object', properties: {
            id: devId, layer: id, size: { type: 'integer' }, frontend: { type: 'string', enum: ['nbd', 'ublk'] }, created: { type: 'string', format: 'date-time' },
            path: { type: 'string', nullable: true, description: '/dev/ublkbN for ublk devices' },
            client: { type: 'string', nullable: true, description: 'the TLS identity this device is served to over TCP (null: any)' },
            nbd: { type: 'object', properties: { export: { type: 'string' }, socket: { type: 'string' }, uri: { type: 'string' }, tcpUri: { type: 'string' } } },
            stats: { type: 'object' },
          },
        },
        Operation: {
          type: 'object', properties: {
            id: { type: 'string' }, kind: { type: 'string', enum: ['import', 'snapshot'] }, state: { type: 'string', enum: ['running', 'succeeded', 'failed'] },
            target: { type: 'string' }, progress: { type: 'object', properties: { phase: { type: 'string' }, done: { type: 'integer' }, total: { type: 'integer' } } },
            result: { type: 'object' }, error: { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' } } },
            started: { type: 'string', format: 'date-time' }, finished: { type: 'string', format: 'date-time' },
          },
        },
      },
    },
    security: [{}, { bearer: [] }],
    paths: {
      '/v1/health': { get: { summary: 'liveness', responses: { 200: { description: 'ok' } } } },
      '/v1/ready': { get: { summary: 'readiness', responses: { 200: { description: 'ready' }, 503: { description: 'starting or stopping' } } } },
      '/v1/templates': {
        get: { summary: 'list templates', responses: { 200: list('Layer') } },
        post: {
          summary: 'import a template from a local raw image', requestBody: body({
            type: 'object', required: ['path'], additionalProperties: false,
            properties: { path: { type: 'string', description: 'absolute path (inside the import root when one is configured)' }, codec: { type: 'string', enum: ['zstd', 'lz4', 'none'] }, level: { type: 'integer', minimum: 1, maximum: 19 } },
          }), responses: { 202: json('Operation', 'import started'), ...errors, 403: err },
        },
      },
      '/v1/templates/{id}': {
        parameters: [pathId('id', id)],
        get: { summary: 'inspect a template', responses: { 200: json('Layer'), ...errors } },
        delete: { summary: 'delete a template (refused while devices or snapshots use it)', responses: { 204: { description: 'deleted' }, ...errors } },
      },
      '/v1/devices': {
        get: { summary: 'list devices', responses: { 200: list('Device') } },
        post: {
          summary: 'create a device on a template or snapshot', requestBody: body({
            type: 'object', required: ['layer'], additionalProperties: false,
            properties: {
              layer: id, id: devId, frontend: { type: 'string', enum: ['nbd', 'ublk', 'auto'], default: 'auto' },
              client: { type: 'string', description: 'TLS identity (PSK identity or client certificate common name) that alone may open this device over TCP' },
            },
          }), responses: { 201: json('Device', 'created'), ...errors, 501: err, 507: err },
        },
      },
      '/v1/devices/{id}': {
        parameters: [pathId('id', devId)],
        get: { summary: 'get a device', responses: { 200: json('Device'), ...errors } },
        delete: { summary: 'delete a device (its unsnapshotted changes are dropped)', responses: { 204: { description: 'deleted' }, ...errors } },
      },
      '/v1/devices/{id}/snapshots': {
        parameters: [pathId('id', devId)],
        post: { summary: 'disk-only snapshot of a device (uploads in the background)', responses: { 202: json('Operation', 'snapshot started'), ...errors } },
      },
      '/v1/snapshots': { get: { summary: 'list snapshots', responses: { 200: list('Layer') } } },
      '/v1/snapshots/{id}': {
        parameters: [pathId('id', id)],
        get: { summary: 'inspect a snapshot', responses: { 200: json('Layer'), ...errors } },
        delete: { summary: 'delete a snapshot (refused while devices or later snapshots use it)', responses: { 204: { description: 'deleted' }, ...errors } },
      },
      '/v1/gc': {
        post: {
          summary: 'collect garbage in the store: objects of layers without a header, unfinished deletes, run-out leases, shared-tier leftovers, older than the grace period (dryRun: true by default; graceSeconds: 86400 by default, at least 600)',
          responses: { 202: json('Operation'), ...errors },
        },
      },
      '/v1/operations': { get: { summary: 'list operations', responses: { 200: list('Operation') } } },
      '/v1/operations/{id}': {
        parameters: [pathId('id', { type: 'string', pattern: '^[0-9a-f]{16}$' })],
        get: { summary: 'an operation: state, progress, result or error', responses: { 200: json('Operation'), ...errors } },
      },
    },
  };
}
